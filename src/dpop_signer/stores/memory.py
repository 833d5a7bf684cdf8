"""`MemoryStore`: the `TokenStore` of one process (the default, and the fallback of the others).

It shares nothing across processes; within one it gives the same guarantees as the shared
stores (one lease holder, failures and nonces visible to every thread), so the caller has one
code path whatever the store. Bounded: at most ``max_entries`` tokens and as many origins,
expired entries dropped as they are met and on every write.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from dpop_signer.stores.base import (
    Snapshot,
    StoredFailure,
    StoredToken,
    checked_nonce,
    checked_ttl,
    failure_ttl,
)

__all__ = ["MemoryStore"]

V = TypeVar("V")


class _Expiring(OrderedDict[str, tuple[V, float]], Generic[V]):
    """Values with an expiry (clock seconds), least recently written first, bounded."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def live(self, key: str, now: float) -> V | None:
        item = self.get(key)
        if item is None:
            return None
        if now >= item[1]:
            del self[key]
            return None
        return item[0]

    def store(self, key: str, value: V, until: float, now: float) -> None:
        self[key] = (value, until)
        self.move_to_end(key)
        for old in [k for k, (_, end) in self.items() if now >= end]:
            del self[old]
        while len(self) > self.limit:
            self.popitem(last=False)


class MemoryStore:
    """A `TokenStore` in this process's memory.

    Args:
        max_entries: Tokens (and, separately, origins) kept at most; the oldest go first.
        clock: Seconds since the epoch, for expiry.
    """

    def __init__(self, max_entries: int = 1000, *, clock: Callable[[], float] = time.time) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive integer, not {max_entries!r}")
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: _Expiring[StoredToken] = _Expiring(max_entries)
        self._failures: _Expiring[StoredFailure] = _Expiring(max_entries)
        self._leases: _Expiring[str] = _Expiring(max_entries)
        self._nonces: _Expiring[str] = _Expiring(max_entries)

    @property
    def url(self) -> str:
        """``memory``."""
        return "memory"

    def get(self, key: str) -> StoredToken | None:
        """See `TokenStore.get`."""
        with self._lock:
            return self._tokens.live(key, self._clock())

    def put(self, key: str, token: StoredToken, ttl: float) -> None:
        """See `TokenStore.put`."""
        ttl = checked_ttl(ttl)
        with self._lock:
            now = self._clock()
            self._tokens.store(key, token, now + ttl, now)
            self._failures.pop(key, None)

    def try_lease(self, key: str, ttl: float) -> str | None:
        """See `TokenStore.try_lease`."""
        ttl = checked_ttl(ttl)
        with self._lock:
            now = self._clock()
            if self._leases.live(key, now) is not None:
                return None
            lease = secrets.token_urlsafe(16)
            self._leases.store(key, lease, now + ttl, now)
            return lease

    def release(self, key: str, lease: str) -> None:
        """See `TokenStore.release`."""
        with self._lock:
            item = self._leases.get(key)
            if item is not None and item[0] == lease:
                del self._leases[key]

    def record_failure(self, key: str, failure: StoredFailure) -> None:
        """See `TokenStore.record_failure`."""
        with self._lock:
            now = self._clock()
            self._failures.store(key, failure, now + failure_ttl(failure, now), now)

    def snapshot(self, key: str) -> Snapshot:
        """See `TokenStore.snapshot`."""
        with self._lock:
            now = self._clock()
            return Snapshot(
                self._tokens.live(key, now),
                self._failures.live(key, now),
                self._leases.live(key, now),
            )

    def get_nonce(self, origin: str) -> str | None:
        """See `TokenStore.get_nonce`."""
        with self._lock:
            return self._nonces.live(origin, self._clock())

    def put_nonce(self, origin: str, nonce: str, ttl: float) -> None:
        """See `TokenStore.put_nonce` (a value that is not a nonce is ignored)."""
        ttl = checked_ttl(ttl)
        if checked_nonce(nonce) is None:
            return
        with self._lock:
            now = self._clock()
            self._nonces.store(origin, nonce, now + ttl, now)

    def close(self) -> None:
        """Forget everything."""
        with self._lock:
            for table in (self._tokens, self._failures, self._leases, self._nonces):
                table.clear()

    def __repr__(self) -> str:
        return "MemoryStore()"
