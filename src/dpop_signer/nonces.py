"""DPoP nonces (RFC 9449 §8, §9), remembered per origin.

A server hands out a nonce in a ``DPoP-Nonce`` response header, on any response (a ``200`` as
well as a ``use_dpop_nonce`` challenge), and expects it in the ``nonce`` claim of later proofs
sent to it. The cache is keyed by origin (``scheme://host:port``), as oauth4webapi keys it:
one authorization or resource server shares its nonce across paths and methods. It is bounded
(least recently used entries go first), because a client talking to many hosts must not grow
without limit, and thread-safe, because one `dpop_signer.DPoPAuth` serves many threads.

>>> cache = NonceCache()
>>> cache.learn("https://as.example/token", {"DPoP-Nonce": "eyJ7S_zG.eyJH0-Z.HX4w-7v"})
'eyJ7S_zG.eyJH0-Z.HX4w-7v'
>>> cache.get("https://AS.example:443/other") == cache.get("https://as.example/token")
True

With a shared token store (``NonceCache(store=...)``; `dpop_signer.DPoPAuth` passes its
``token_store`` when that is not ``memory``), nonces are shared per origin across processes and
hosts (issue 12): a new nonce learned here is offered to the store (`update`), and on a miss
the flow asks the store (`lookup_due`, `found`) before it pays a ``use_dpop_nonce`` round trip.
This class does no store I/O itself: `dpop_signer.flow` runs those calls as steps of its
drivers. A store that has no nonce for an origin is not asked again for `MISS_TTL` seconds, so
a server that never sends nonces costs one store read per origin per `MISS_TTL`, not one per
request.

Nonce values are never logged or put into error messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import httpx

from dpop_signer.errors import ConfigError, ProofError
from dpop_signer.jose import is_nonce
from dpop_signer.urls import origin_of

if TYPE_CHECKING:
    from dpop_signer.stores.base import TokenStore

__all__ = ["MISS_TTL", "SHARED_NONCE_TTL", "NonceCache"]

MISS_TTL = 5.0
"""Seconds an origin the shared store had no nonce for is not looked up again."""
SHARED_NONCE_TTL = 300.0
"""Seconds a nonce stays in the shared store: servers rotate theirs far sooner (and then send
the new one, which replaces it); an abandoned origin's entry goes away by itself."""

logger = logging.getLogger("dpop_signer")


class NonceCache:
    """The latest DPoP nonce of each origin, for at most ``max_entries`` origins.

    Args:
        max_entries: How many origins to remember; the least recently used is dropped first.
        store: A shared token store (`dpop_signer.stores`) to share nonces through; None:
            this cache only.

    Raises:
        ConfigError: ``max_entries`` is not a positive integer.
    """

    def __init__(self, max_entries: int = 100, *, store: TokenStore | None = None) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(
                f"NonceCache max_entries must be a positive integer, not {max_entries!r}"
            )
        self._max = max_entries
        self._nonces: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._store = store
        # origin -> time.monotonic() of the last store lookup that found nothing (or is on).
        self._asked: OrderedDict[str, float] = OrderedDict()
        # origin -> the nonce last written to or read from the store (not written again).
        self._shared: OrderedDict[str, str] = OrderedDict()

    @property
    def max_entries(self) -> int:
        """How many origins the cache holds at most."""
        return self._max

    @property
    def store(self) -> TokenStore | None:
        """The shared store nonces are shared through, if any."""
        return self._store

    def get(self, url: str | httpx.URL) -> str | None:
        """The nonce last seen from the origin of ``url``, or None.

        Raises:
            ProofError: ``url`` is not an absolute http(s) URL.
        """
        key = origin_of(url)
        with self._lock:
            nonce = self._nonces.get(key)
            if nonce is not None:
                self._nonces.move_to_end(key)
            return nonce

    def remember(self, url: str | httpx.URL, nonce: str) -> bool:
        """Store ``nonce`` as the current nonce of the origin of ``url``; True if it is new.

        Raises:
            ProofError: ``nonce`` is not ``1*NQCHAR`` (RFC 9449 §8.1), or ``url`` is not an
                absolute http(s) URL.
        """
        if not is_nonce(nonce):
            raise ProofError(
                "DPoP nonce is not 1*NQCHAR (RFC 9449 §8.1: printable ASCII without space, "
                "quote or backslash)"
            )
        key = origin_of(url)
        with self._lock:
            new = self._nonces.get(key) != nonce
            self._nonces[key] = nonce
            self._nonces.move_to_end(key)
            while len(self._nonces) > self._max:
                self._nonces.popitem(last=False)
            return new

    def learn(self, url: str | httpx.URL, headers: Mapping[str, str] | httpx.Headers) -> str | None:
        """Remember the ``DPoP-Nonce`` header of a response from ``url``, if it has one.

        Any response may carry one (RFC 9449 §8.2), so call this for every response. A value
        that is not a valid nonce is ignored (and logged, without the value): the challenge
        handling then reports the server's mistake where it matters.

        Returns:
            The nonce learned, or None when the header is absent or invalid.
        """
        nonce = _header(headers, "dpop-nonce")
        if nonce is None:
            return None
        if not is_nonce(nonce):
            logger.warning(
                "ignored a DPoP-Nonce header from %s that is not 1*NQCHAR (RFC 9449 §8.1)",
                origin_of(url),
            )
            return None
        self.remember(url, nonce)
        return nonce

    def update(self, url: str | httpx.URL, nonce: str) -> str | None:
        """Remember a ``DPoP-Nonce`` value from ``url``; the origin if it is worth sharing.

        Returns the origin (``scheme://host:port``) when a store is set and ``nonce`` is new
        for it (servers repeat their nonce on every response: only a change is written to the
        store), else None. An invalid value is ignored as in `learn`.
        """
        if self.learn(url, {"dpop-nonce": nonce}) is None or self._store is None:
            return None
        key = origin_of(url)
        return key if self._changed(key, nonce) else None

    def lookup_due(self, url: str | httpx.URL) -> str | None:
        """The origin of ``url`` if the shared store should be asked for its nonce now.

        None when there is no store, a nonce is known here, or the store was asked less than
        `MISS_TTL` seconds ago (this call counts as asking: concurrent callers do not pile up).
        """
        if self._store is None:
            return None
        key = origin_of(url)
        now = time.monotonic()
        with self._lock:
            if key in self._nonces:
                return None
            asked = self._asked.get(key)
            if asked is not None and now - asked < MISS_TTL:
                return None
            self._asked[key] = now
            self._asked.move_to_end(key)
            while len(self._asked) > self._max:
                self._asked.popitem(last=False)
            return key

    def found(self, url: str | httpx.URL, value: object) -> str | None:
        """Take the store's answer to a `lookup_due`: the nonce, remembered here, or None."""
        if not (isinstance(value, str) and is_nonce(value)):
            return None  # nothing shared (or a malformed value): asked again after MISS_TTL
        key = origin_of(url)
        with self._lock:
            self._nonces[key] = value
            self._nonces.move_to_end(key)
            self._shared[key] = value
            while len(self._nonces) > self._max:
                self._nonces.popitem(last=False)
        return value

    def _changed(self, key: str, nonce: str) -> bool:
        """True (and noted) if ``nonce`` is not the last one shared for ``key``."""
        with self._lock:
            if self._shared.get(key) == nonce:
                return False
            self._shared[key] = nonce
            self._shared.move_to_end(key)
            while len(self._shared) > self._max:
                self._shared.popitem(last=False)
            return True

    def forget(self, url: str | httpx.URL) -> None:
        """Drop the nonce of the origin of ``url`` (no error if there is none)."""
        key = origin_of(url)
        with self._lock:
            self._nonces.pop(key, None)
            self._asked.pop(key, None)

    def clear(self) -> None:
        """Drop every nonce."""
        with self._lock:
            self._nonces.clear()
            self._asked.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._nonces)

    def __contains__(self, url: object) -> bool:
        if not isinstance(url, str | httpx.URL):
            return False
        return self.get(url) is not None

    def __repr__(self) -> str:
        # Origins are not secret; nonces are never shown.
        return f"NonceCache({len(self)}/{self._max} origins)"


def _header(headers: Mapping[str, str] | httpx.Headers, name: str) -> str | None:
    value = headers.get(name)
    if value is not None or isinstance(headers, httpx.Headers):
        return value
    # A plain mapping is case-sensitive; header names are not (RFC 9110 §5.1).
    for key, item in headers.items():
        if key.lower() == name:
            return item
    return None
