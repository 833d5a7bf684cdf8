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

Nonce values are never logged or put into error messages.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping

import httpx

from dpop_signer.errors import ConfigError, ProofError
from dpop_signer.jose import is_nonce
from dpop_signer.urls import origin_of

__all__ = ["NonceCache"]

logger = logging.getLogger("dpop_signer")


class NonceCache:
    """The latest DPoP nonce of each origin, for at most ``max_entries`` origins.

    Args:
        max_entries: How many origins to remember; the least recently used is dropped first.

    Raises:
        ConfigError: ``max_entries`` is not a positive integer.
    """

    def __init__(self, max_entries: int = 100) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(
                f"NonceCache max_entries must be a positive integer, not {max_entries!r}"
            )
        self._max = max_entries
        self._nonces: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def max_entries(self) -> int:
        """How many origins the cache holds at most."""
        return self._max

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

    def remember(self, url: str | httpx.URL, nonce: str) -> None:
        """Store ``nonce`` as the current nonce of the origin of ``url``.

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
            self._nonces[key] = nonce
            self._nonces.move_to_end(key)
            while len(self._nonces) > self._max:
                self._nonces.popitem(last=False)

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

    def forget(self, url: str | httpx.URL) -> None:
        """Drop the nonce of the origin of ``url`` (no error if there is none)."""
        key = origin_of(url)
        with self._lock:
            self._nonces.pop(key, None)

    def clear(self) -> None:
        """Drop every nonce."""
        with self._lock:
            self._nonces.clear()

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
