"""What a shared token store holds and promises: the `TokenStore` protocol and its values.

A store lets every process (and host) that uses the same client share one client_credentials
token, one fetch at a time, the outcome of a failed fetch with its backoff, and the DPoP nonces
learned from servers (issue 12). It is a cache, never the source of truth: whatever it returns
is re-checked here (shape, length, nonce syntax) and a store that misbehaves reads as empty.

The API is synchronous on purpose. SQLite has no other, one Redis round trip on a LAN costs
well under a millisecond, and `DPoPAuth` keeps its own in-process copy of the token, so a store
is asked once per token lifetime per process (and while waiting for a fetch), never per request.
An async caller runs these calls in a thread (``asyncio.to_thread``); `await_outcome` does that
for the one call that waits. One implementation per engine then serves both drivers.

What is stored, and nothing else:

- per token key (`token_key`: a SHA-256 of token endpoint, client id, scope, resources, audience
  and key thumbprint): the access token, its type and expiry (`StoredToken`);
- per token key, the fetch lease: a random id with an expiry, held by the one fetching;
- per token key, the last failed fetch (`StoredFailure`): its error class, a one-line message
  scrubbed of anything JWS-shaped, the OAuth error code and HTTP status, when the next attempt
  is due and how many failed in a row;
- per origin, the latest DPoP nonce (RFC 9449 §8.2).

Never a client secret, PIN, proof or client assertion: the interface has no place for one.
Expiry times are wall-clock seconds since the epoch (``time.time``), as `AccessToken` keeps
them; hosts sharing a Redis store are expected to run NTP.

Every failure of the engine (Redis down, file unwritable, a corrupt database) raises
`StoreUnavailable`, which `dpop_signer.stores.FallbackStore` turns into "carry on from this
process's memory, with one warning".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from dpop_signer.errors import (
    DPoPSignerError,
    InvalidTokenResponseError,
    OAuthError,
    ServerUnreachableError,
    TokenEndpointError,
    UseDPoPNonceError,
)
from dpop_signer.proof import is_nonce
from dpop_signer.redaction import scrub

__all__ = [
    "FAILURE_MEMORY",
    "Outcome",
    "Snapshot",
    "StoreUnavailable",
    "StoredFailure",
    "StoredToken",
    "TokenStore",
    "await_outcome",
    "checked_nonce",
    "checked_token",
    "failure_ttl",
    "token_key",
    "wait_for_outcome",
]

KEY_VERSION = "dpop-signer/token-key/v1"
"""Part of every token key: a change in what a key means changes every key."""

MAX_TOKEN_CHARS = 16 * 1024
"""A stored token longer than this is not taken (a store is not trusted with unbounded data)."""
MAX_MESSAGE_CHARS = 500
"""Failure messages are cut to this many characters before they are stored."""
FAILURE_MEMORY = 600.0
"""Seconds a failure stays stored after its ``retry_at``: long enough that the count of
failures in a row (the backoff exponent) survives until the next attempt, short enough that a
store does not keep a stale outage forever. A successful fetch clears it at once."""

_POLL_FIRST = 0.01
_POLL_CAP = 0.1

# The error classes a failure can be shared as (by name: the store holds text, not objects).
_KINDS: dict[str, type[OAuthError]] = {
    cls.__name__: cls
    for cls in (
        OAuthError,
        TokenEndpointError,
        InvalidTokenResponseError,
        UseDPoPNonceError,
        ServerUnreachableError,
    )
}


class StoreUnavailable(DPoPSignerError):
    """The store's engine failed (unreachable, unwritable, corrupt); internal to the package.

    `FallbackStore` catches it; a caller of a bare store turns it into a memory fallback too.
    """


@dataclass(frozen=True)
class StoredToken:
    """A shared access token: the value, its type and expiry, nothing else.

    ``value`` stays out of ``repr`` (and so out of logs and tracebacks).
    """

    value: str = field(repr=False)
    token_type: str
    expires_at: float | None  # seconds since the epoch; None: the server did not say


@dataclass(frozen=True)
class StoredFailure:
    """The outcome of a failed token fetch, shared with the processes that waited for it.

    Args:
        kind: The `OAuthError` class name (``ServerUnreachableError``, ``TokenEndpointError``).
        message: One line, already free of secrets (it is scrubbed again when stored).
        retry_at: Seconds since the epoch: no token request before this.
        count: Failed fetches in a row (the backoff exponent).
        error: The OAuth ``error`` code of a `TokenEndpointError`.
        error_description: Its ``error_description`` (already sanitized by the token source).
        status: The HTTP status of the failed response, if there was one.
        lease: The lease id of the fetch that failed: a waiter compares it with the lease it
            waited on to know this is the outcome of *that* fetch.
    """

    kind: str
    message: str
    retry_at: float
    count: int = 1
    error: str | None = None
    error_description: str | None = None
    status: int | None = None
    lease: str | None = None

    @classmethod
    def from_error(
        cls, error: OAuthError, *, retry_at: float, count: int, lease: str | None
    ) -> StoredFailure:
        """The failure to store for ``error`` (its class, message and OAuth fields)."""
        kind = type(error).__name__ if type(error).__name__ in _KINDS else "OAuthError"
        if isinstance(error, TokenEndpointError):
            return cls(
                kind,
                error.message,
                retry_at,
                count,
                error.error,
                error.error_description,
                error.status,
                lease,
            )
        return cls(kind, error.message, retry_at, count, lease=lease)

    def to_error(self) -> OAuthError:
        """A new error of the stored class and message (``retry_after`` is the caller's)."""
        kind = _KINDS.get(self.kind, OAuthError)
        if kind is TokenEndpointError:
            return TokenEndpointError(
                self.message,
                error=self.error or "server_error",
                error_description=self.error_description,
                status=self.status or 400,
            )
        return kind(self.message)

    def to_json(self) -> str:
        """The stored form (the message scrubbed and cut once more)."""
        return json.dumps(
            {
                "kind": self.kind,
                "message": _clean_message(self.message),
                "retry_at": self.retry_at,
                "count": self.count,
                "error": self.error,
                "error_description": None
                if self.error_description is None
                else _clean_message(self.error_description),
                "status": self.status,
                "lease": self.lease,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes | None) -> StoredFailure | None:
        """Parse a stored failure; None when absent or malformed."""
        if text is None:
            return None
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        return checked_failure(**{k: data.get(k) for k in _FAILURE_FIELDS})


_FAILURE_FIELDS = (
    "kind",
    "message",
    "retry_at",
    "count",
    "error",
    "error_description",
    "status",
    "lease",
)


class Snapshot(NamedTuple):
    """What a store holds for one token key, read at once."""

    token: StoredToken | None
    failure: StoredFailure | None
    lease: str | None  # the id of the fetch lease in force, or None


class Outcome(NamedTuple):
    """What a process that waited for another's fetch found (`wait_for_outcome`).

    ``token``: the stored token after the wait (check its expiry). ``failure``: set when the
    fetch waited for failed (its ``lease`` matches) or a backoff is in force; raise it as shared.
    Neither: the holder went away without an outcome (killed): try the lease again.
    ``timed_out``: the lease was still held when the wait ended.
    """

    token: StoredToken | None
    failure: StoredFailure | None
    timed_out: bool


@runtime_checkable
class TokenStore(Protocol):
    """Where tokens, fetch leases, fetch failures and nonces are shared; see the module doc.

    Every method may raise `StoreUnavailable` (except ``release`` and ``close``, which never
    raise: a lease not released expires by itself). TTLs are in seconds.
    """

    @property
    def url(self) -> str:
        """The store's location, fit to print (credentials masked)."""
        ...

    def get(self, key: str) -> StoredToken | None:
        """The token stored under ``key``, or None (absent, expired or malformed)."""
        ...

    def put(self, key: str, token: StoredToken, ttl: float) -> None:
        """Store ``token`` for ``ttl`` seconds and clear the key's failure record."""
        ...

    def try_lease(self, key: str, ttl: float) -> str | None:
        """Take the fetch lease for ``ttl`` seconds: its id, or None if another holds it."""
        ...

    def release(self, key: str, lease: str) -> None:
        """Give the lease back if it is still ``lease`` (not one taken after it expired)."""
        ...

    def record_failure(self, key: str, failure: StoredFailure) -> None:
        """Share a failed fetch (kept until ``retry_at`` plus `FAILURE_MEMORY`)."""
        ...

    def snapshot(self, key: str) -> Snapshot:
        """Token, failure and lease of ``key`` in one read."""
        ...

    def get_nonce(self, origin: str) -> str | None:
        """The latest DPoP nonce of ``origin`` (``scheme://host:port``), or None."""
        ...

    def put_nonce(self, origin: str, nonce: str, ttl: float) -> None:
        """Share ``nonce`` as the latest of ``origin`` for ``ttl`` seconds."""
        ...

    def close(self) -> None:
        """Release connections; the store may not be used afterwards."""
        ...


def token_key(
    token_url: str,
    client_id: str,
    *,
    scope: str | None = None,
    resources: Sequence[str] = (),
    audience: str | None = None,
    jkt: str,
) -> str:
    """The store key of a client_credentials token: a SHA-256 hex digest of what selects it.

    Scope tokens are a set (RFC 6749 §3.3: their order does not matter) and so are resource
    indicators (RFC 8707 §2), so the order they were configured in does not split the cache.
    The key reveals none of its inputs: a store dump shows no client id or endpoint.
    """
    scopes = sorted(set((scope or "").split()))
    material = json.dumps(
        [KEY_VERSION, token_url, client_id, scopes, sorted(set(resources)), audience, jkt],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(material.encode("ascii")).hexdigest()


def failure_ttl(failure: StoredFailure, now: float) -> float:
    """Seconds to keep ``failure``: until its ``retry_at`` plus `FAILURE_MEMORY`."""
    return max(0.0, failure.retry_at - now) + FAILURE_MEMORY


def checked_ttl(ttl: float) -> float:
    """``ttl`` if it is a positive finite number of seconds; else `ValueError` (a bug)."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise ValueError(f"a store TTL must be a finite number of seconds, not {ttl!r}")
    if ttl <= 0:
        raise ValueError(f"a store TTL must be positive, not {ttl!r}")
    return float(ttl)


def checked_token(value: object, token_type: object, expires_at: object) -> StoredToken | None:
    """A `StoredToken` from what a store returned, or None if it is not well formed."""
    if not (isinstance(value, str) and 0 < len(value) <= MAX_TOKEN_CHARS):
        return None
    if not value.isascii() or not value.isprintable():
        return None
    if not (isinstance(token_type, str) and 0 < len(token_type) <= 32 and token_type.isalnum()):
        return None
    if expires_at is not None and (
        isinstance(expires_at, bool)
        or not isinstance(expires_at, int | float)
        or not math.isfinite(expires_at)
    ):
        return None
    return StoredToken(value, token_type, None if expires_at is None else float(expires_at))


def checked_failure(
    kind: object = None,
    message: object = None,
    retry_at: object = None,
    count: object = None,
    error: object = None,
    error_description: object = None,
    status: object = None,
    lease: object = None,
) -> StoredFailure | None:
    """A `StoredFailure` from what a store returned, or None if it is not well formed."""
    if not (isinstance(kind, str) and kind in _KINDS and isinstance(message, str)):
        return None
    if not _number(retry_at) or not (_int(count) and isinstance(count, int) and count >= 1):
        return None
    if not all(v is None or isinstance(v, str) for v in (error, error_description, lease)):
        return None
    if status is not None and not _int(status):
        return None
    assert isinstance(retry_at, int | float)
    return StoredFailure(
        kind,
        _clean_message(message),
        float(retry_at),
        count,
        error if isinstance(error, str) else None,
        error_description if isinstance(error_description, str) else None,
        status if isinstance(status, int) else None,
        lease if isinstance(lease, str) else None,
    )


def checked_nonce(value: object) -> str | None:
    """A nonce from a store if it is ``1*NQCHAR`` (RFC 9449 §8.1), else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) and is_nonce(value) else None


def encode_token(token: StoredToken) -> str:
    """The JSON form of a token for engines that store one string (Redis)."""
    return json.dumps(
        {"value": token.value, "token_type": token.token_type, "expires_at": token.expires_at},
        separators=(",", ":"),
    )


def decode_token(text: str | bytes | None) -> StoredToken | None:
    """Parse `encode_token`'s form; None when absent or malformed."""
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    return checked_token(data.get("value"), data.get("token_type"), data.get("expires_at"))


class _Waiter:
    """The polling of `wait_for_outcome`, shared by its sync and async forms."""

    def __init__(self, key: str, timeout: float, clock: Callable[[], float]) -> None:
        self.key = key
        self.deadline = time.monotonic() + timeout
        self.clock = clock
        self.lease: str | None = None
        self.first = True
        self.interval = _POLL_FIRST

    def step(self, snap: Snapshot) -> Outcome | float:
        """The outcome, or how long to sleep before the next snapshot."""
        if self.first:
            self.first = False
            self.lease = snap.lease
        if snap.lease is None or snap.lease != self.lease:
            return self._outcome(snap, timed_out=False)
        left = self.deadline - time.monotonic()
        if left <= 0:
            return self._outcome(snap, timed_out=True)
        interval = min(self.interval, left)
        self.interval = min(self.interval * 2, _POLL_CAP)
        return interval

    def _outcome(self, snap: Snapshot, *, timed_out: bool) -> Outcome:
        failure = snap.failure
        if failure is not None and not (
            (self.lease is not None and failure.lease == self.lease)
            or self.clock() < failure.retry_at
        ):
            failure = None  # an old failure whose backoff is over: not this fetch's outcome
        return Outcome(snap.token, failure, timed_out)


def wait_for_outcome(
    store: TokenStore,
    key: str,
    *,
    timeout: float,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """Wait until the fetch lease of ``key`` held now is released or expires, then read.

    Polls `TokenStore.snapshot` (10 ms, doubling to 100 ms) for at most ``timeout`` seconds;
    pass the lease TTL (plus a little): a holder killed mid-fetch frees it by then.

    Raises:
        StoreUnavailable: the store failed while waiting.
    """
    waiter = _Waiter(key, timeout, clock)
    for _ in range(_max_polls(timeout)):
        result = waiter.step(store.snapshot(key))
        if isinstance(result, Outcome):
            return result
        time.sleep(result)
    return waiter._outcome(store.snapshot(key), timed_out=True)


async def await_outcome(
    store: TokenStore,
    key: str,
    *,
    timeout: float,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """`wait_for_outcome` for an event loop: each read in a thread, ``asyncio.sleep`` between."""
    waiter = _Waiter(key, timeout, clock)
    for _ in range(_max_polls(timeout)):
        result = waiter.step(await asyncio.to_thread(store.snapshot, key))
        if isinstance(result, Outcome):
            return result
        await asyncio.sleep(result)
    return waiter._outcome(await asyncio.to_thread(store.snapshot, key), timed_out=True)


def _max_polls(timeout: float) -> int:
    # A bound on the loop besides the deadline: every poll after the first few sleeps
    # _POLL_CAP, plus a few for the doubling start.
    return int(max(0.0, timeout) / _POLL_CAP) + 16


def _clean_message(text: str) -> str:
    cleaned = scrub(text)
    return cleaned if len(cleaned) <= MAX_MESSAGE_CHARS else cleaned[:MAX_MESSAGE_CHARS] + "…"


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)
