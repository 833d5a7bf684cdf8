"""`FallbackStore`: a shared store that never fails a request when its engine goes away.

When the primary store raises `StoreUnavailable` (Redis stopped, the SQLite file unwritable),
this process carries on from its own `MemoryStore`, logs one warning, and asks the primary
again at most every ``retry_interval`` seconds (one caller probes; the others keep using
memory meanwhile, so an unreachable server costs one timeout per interval, not one per
request). When a probe succeeds it logs one line that sharing is back and uses the primary
again. While in fallback the processes no longer share a token, so each may fetch its own:
the cost of an outage is that many token requests, never a failed API call.

Writes that reach the primary are mirrored into memory, so a process that falls back still
has the last token and nonces it saw. Lease ids are tagged with the store that issued them,
so a lease taken from memory during an outage is released there after the primary is back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from dpop_signer.stores.base import (
    Snapshot,
    StoredFailure,
    StoredToken,
    StoreUnavailable,
    TokenStore,
)
from dpop_signer.stores.memory import MemoryStore

__all__ = ["FallbackStore"]

logger = logging.getLogger("dpop_signer")

T = TypeVar("T")

_PRIMARY = "p."
_MEMORY = "m."


class FallbackStore:
    """``primary``, or this process's memory while ``primary`` is unavailable.

    Args:
        primary: The shared store (`SqliteStore`, `RedisStore`, or any `TokenStore`).
        retry_interval: Seconds between attempts to reach ``primary`` once it failed.
        memory: The fallback store (a new `MemoryStore` by default).
        clock: A monotonic clock for the retry interval.
    """

    def __init__(
        self,
        primary: TokenStore,
        *,
        retry_interval: float = 5.0,
        memory: MemoryStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._memory = MemoryStore() if memory is None else memory
        self._retry_interval = float(retry_interval)
        self._clock = clock
        self._guard = threading.Lock()
        self._down = False
        self._retry_at = 0.0

    @property
    def url(self) -> str:
        """The primary store's printable URL."""
        return self._primary.url

    @property
    def primary(self) -> TokenStore:
        """The shared store."""
        return self._primary

    @property
    def memory(self) -> MemoryStore:
        """This process's fallback."""
        return self._memory

    @property
    def sharing(self) -> bool:
        """False while the primary is unavailable and memory is used instead."""
        return not self._down

    # -- operations ------------------------------------------------------------------------

    def get(self, key: str) -> StoredToken | None:
        """See `TokenStore.get`."""
        return self._either(lambda: self._primary.get(key), lambda: self._memory.get(key))

    def put(self, key: str, token: StoredToken, ttl: float) -> None:
        """See `TokenStore.put` (mirrored into memory)."""
        self._memory.put(key, token, ttl)
        self._either(lambda: self._primary.put(key, token, ttl), lambda: None)

    def try_lease(self, key: str, ttl: float) -> str | None:
        """See `TokenStore.try_lease` (the id says which store issued it)."""

        def primary() -> str | None:
            lease = self._primary.try_lease(key, ttl)
            return None if lease is None else _PRIMARY + lease

        def memory() -> str | None:
            lease = self._memory.try_lease(key, ttl)
            return None if lease is None else _MEMORY + lease

        return self._either(primary, memory)

    def release(self, key: str, lease: str) -> None:
        """See `TokenStore.release`: to the store that issued ``lease``; never raises."""
        if lease.startswith(_PRIMARY):
            # A third-party store may raise here: its lease then expires by itself.
            with contextlib.suppress(StoreUnavailable):
                self._primary.release(key, lease[len(_PRIMARY) :])
        elif lease.startswith(_MEMORY):
            self._memory.release(key, lease[len(_MEMORY) :])

    def record_failure(self, key: str, failure: StoredFailure) -> None:
        """See `TokenStore.record_failure` (mirrored into memory)."""
        failure = _untagged(failure)  # stores hold bare lease ids; snapshots tag them
        self._memory.record_failure(key, failure)
        self._either(lambda: self._primary.record_failure(key, failure), lambda: None)

    def snapshot(self, key: str) -> Snapshot:
        """See `TokenStore.snapshot` (lease ids tagged like `try_lease`'s)."""

        def primary() -> Snapshot:
            snap = self._primary.snapshot(key)
            return _tagged(snap, _PRIMARY)

        return self._either(primary, lambda: _tagged(self._memory.snapshot(key), _MEMORY))

    def get_nonce(self, origin: str) -> str | None:
        """See `TokenStore.get_nonce`."""
        return self._either(
            lambda: self._primary.get_nonce(origin), lambda: self._memory.get_nonce(origin)
        )

    def put_nonce(self, origin: str, nonce: str, ttl: float) -> None:
        """See `TokenStore.put_nonce` (mirrored into memory)."""
        self._memory.put_nonce(origin, nonce, ttl)
        self._either(lambda: self._primary.put_nonce(origin, nonce, ttl), lambda: None)

    def close(self) -> None:
        """Close both stores."""
        self._primary.close()
        self._memory.close()

    def __repr__(self) -> str:
        return f"FallbackStore({self._primary!r})"

    # -- the switch ------------------------------------------------------------------------

    def _either(self, primary: Callable[[], T], memory: Callable[[], T]) -> T:
        if not self._try_primary():
            return memory()
        try:
            result = primary()
        except StoreUnavailable as exc:
            self._failed(exc)
            return memory()
        if self._down:
            self._recovered()
        return result

    def _try_primary(self) -> bool:
        if not self._down:
            return True
        with self._guard:
            now = self._clock()
            if not self._down:
                return True
            if now < self._retry_at:
                return False
            # This caller probes; the others use memory until the interval is over again.
            self._retry_at = now + self._retry_interval
            return True

    def _failed(self, exc: StoreUnavailable) -> None:
        with self._guard:
            self._retry_at = self._clock() + self._retry_interval
            if self._down:
                return
            self._down = True
        logger.warning(
            "token store unavailable, using this process's memory until it is back "
            "(tokens and nonces are not shared meanwhile; retrying every %g s): %s",
            self._retry_interval,
            exc.message,
        )

    def _recovered(self) -> None:
        with self._guard:
            if not self._down:
                return
            self._down = False
        logger.info("token store %s is back; sharing tokens and nonces again", self.url)


def _tagged(snap: Snapshot, tag: str) -> Snapshot:
    failure = snap.failure
    if failure is not None and failure.lease is not None:
        failure = replace(failure, lease=tag + failure.lease)
    lease = None if snap.lease is None else tag + snap.lease
    return Snapshot(snap.token, failure, lease)


def _untagged(failure: StoredFailure) -> StoredFailure:
    lease = failure.lease
    if lease is not None and lease.startswith((_PRIMARY, _MEMORY)):
        return replace(failure, lease=lease[len(_PRIMARY) :])
    return failure
