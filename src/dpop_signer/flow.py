"""The DPoP client protocol, once for every HTTP client: plain generators that do no I/O.

`DPoPFlow` holds what one client configuration shares across requests (the current key and
its proof builder, the token source, the `TokenCache`, the nonces, the clock offset) and makes
the generators that decide what happens per request (see `dpop_signer.auth` for the whole
story: slots, single-flight token fetches with shared failures and backoff, renewal ahead of
expiry, nonce retries at the token endpoint (RFC 9449 §8) and at the API (§9), one renewal on
``invalid_token``, clock offset from ``Date``). The generators yield small steps and never sign,
send, read or lock themselves:

- `Sign`: sign these bytes with this signer (the reply is the 64-byte signature);
- `SendToken`: send this token request (an `httpx.Request`; the reply is an `httpx.Response`
  whose body has been read, or an `OAuthError` thrown in when it could not be sent);
- `SendApi`: send the application's request with these ``Authorization`` and ``DPoP`` header
  values (the reply is an `Answer`: the few response headers the protocol reads);
- `Lock` and `Slot`: the token fetch lock and the ``max_in_flight`` request slots;
- `TakeAhead`, `SignAhead`: a proof made ahead of time for a repeated (method, URL), and the
  next one to make in the background, only with ``proofs_ahead`` on (`dpop_signer.ahead`);
- `StoreCall`, `TakeLease`, `ReleaseLease`, `AwaitFetch`: the shared token store (issue 12),
  only with a ``token_store`` other than ``memory``: blocking calls, which the async driver
  runs in a thread (`dpop_signer.stores.base` says why the store API is synchronous).

`drive_sync` and `drive_async` carry out `Sign`, `Lock` and `Slot` (a thread lock and
semaphore, or a per-event-loop asyncio lock and semaphore, signing inline or through
`dpop_signer.signers.sign_async`) and hand `SendToken` and `SendApi` up to the client's own
driver: httpx (`dpop_signer.auth`), requests (`dpop_signer.requests`) or aiohttp
(`dpop_signer.aiohttp`). Each of those only sends and translates responses.

Key rotation (`DPoPFlow.rotate`): a token is cached with the proof builder of the key it was
fetched with (`CachedToken.proofs`), only a token of the current key is handed out, and a
request signs every proof with the builder of the token it sends. So a proof's key always
matches its token's ``cnf.jkt``: a request that got its token before a rotation finishes with
the old key; one that needs a token after it gets one for the new key and signs with that.

A shared token store (``token_store=``: ``sqlite:PATH``, ``redis://...`` or a store object)
makes the single flight span processes and hosts. The store is asked only where this process
would fetch, never per request: after the local fetch lock, a valid stored token (not the one
just rejected) is adopted and a stored failure still backing off is raised as shared; else
the store's fetch lease is taken, and without it the flow waits for the holder's outcome (a
token, a failure, or neither: the holder died, so the lease is tried again, at most
`_STORE_ROUNDS` times before fetching anyway). The lease holder fetches, stores the token (or
the failure, with the backoff counted across processes) and releases the lease; the drivers
release a lease still held when a flow is closed. A renewal ahead of expiry reads the store
first (another process may have renewed) and takes the lease without waiting, or keeps the
current token. The token's key thumbprint is part of the store key, so `rotate` moves to the
new key's token. Nonces learned are written to the store when new, and a miss asks the store
(`dpop_signer.nonces`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, TypedDict, TypeVar

import httpx

from dpop_signer.ahead import ProofsAhead, SignAhead, TakeAhead, proofs_ahead_default
from dpop_signer.challenges import dpop_error
from dpop_signer.errors import (
    ConfigError,
    OAuthError,
    ServerUnreachableError,
    TokenEndpointError,
    UseDPoPNonceError,
)
from dpop_signer.jose import is_nonce
from dpop_signer.nonces import SHARED_NONCE_TTL, NonceCache
from dpop_signer.proof import DPoPProofBuilder
from dpop_signer.signers.base import Signer, sign_async
from dpop_signer.stores import (
    Outcome,
    Snapshot,
    StoredFailure,
    StoredToken,
    TokenStore,
    await_outcome,
    open_store,
    token_key,
    wait_for_outcome,
)
from dpop_signer.tokens import (
    AccessToken,
    AssertionAudience,
    CachedToken,
    ClientAuth,
    ClientCredentialsTokenSource,
    TokenCache,
    retry_after_seconds,
)
from dpop_signer.urls import normalize_htu

__all__ = [
    "Answer",
    "AsyncGate",
    "AwaitFetch",
    "DPoPFlow",
    "DPoPOptions",
    "Lock",
    "ReleaseLease",
    "SendApi",
    "SendToken",
    "Sign",
    "Slot",
    "StoreCall",
    "SyncGate",
    "TakeLease",
    "answer_of_httpx",
    "drive_async",
    "drive_sync",
    "token_response",
]

logger = logging.getLogger("dpop_signer")

T = TypeVar("T")

_MIN_SKEW = 2.0
"""Offsets smaller than this are noise: ``Date`` has one-second resolution, plus latency."""

_LEASE_MIN = 10.0
_LEASE_MAX = 60.0
"""A store's fetch lease lasts about two token requests (nonce retry) at the client's timeout
plus 5 s, within these bounds: a holder killed mid-fetch delays the others at most that long."""
_WAIT_SLACK = 1.0
"""Seconds a waiter waits beyond the lease time (the lease expires on the store's clock)."""
_STORE_ROUNDS = 3
"""Leases tried (and holders waited for) before fetching without one."""
_STORED_TOKEN_CAP = 3600.0
"""A token is kept in a store at most this long (its lifetime otherwise)."""


class DPoPOptions(TypedDict, total=False):
    """The keyword arguments of every driver (`dpop_signer.DPoPAuth` documents each)."""

    token_url: str
    client_id: str
    client_secret: str | None
    scope: str | None
    client_auth: ClientAuth
    assertion_signer: Signer | None
    resource: str | Sequence[str] | None
    audience: str | None
    issuer: str | None
    assertion_audience: AssertionAudience
    leeway: float
    accept_bearer: bool
    nonces: NonceCache | None
    clock: Callable[[], float]
    max_in_flight: int | None
    token_store: str | TokenStore
    proofs_ahead: bool | None


class Sign(NamedTuple):
    """Sign ``message`` with ``signer``; reply with the signature."""

    signer: Signer
    message: bytes


class SendToken(NamedTuple):
    """Send a token request; reply with the response, body read."""

    request: httpx.Request


class SendApi(NamedTuple):
    """Send the application's request with these two header values; reply with an `Answer`."""

    authorization: str
    proof: str


class Lock(enum.Enum):
    """The token fetch lock. ``TRY_ACQUIRE`` never waits; the driver replies whether it got it."""

    ACQUIRE = "acquire"
    TRY_ACQUIRE = "try_acquire"
    RELEASE = "release"


class Slot(enum.Enum):
    """One of ``max_in_flight`` request slots, held until the flow ends (the driver frees it)."""

    ACQUIRE = "acquire"


class StoreCall(NamedTuple):
    """Call ``function(*args)``, a token store operation; reply with its result."""

    function: Callable[..., Any]
    args: tuple[Any, ...]


class TakeLease(NamedTuple):
    """Take the store's fetch lease of ``key`` for ``ttl`` s; reply with its id or None.

    The driver releases a lease still held when the flow ends (closed or failed).
    """

    store: TokenStore
    key: str
    ttl: float


class ReleaseLease(NamedTuple):
    """Give back the lease taken with `TakeLease`."""

    store: TokenStore
    key: str
    lease: str


class AwaitFetch(NamedTuple):
    """Wait for the fetch of another process holding ``key``'s lease; reply with the `Outcome`."""

    store: TokenStore
    key: str
    timeout: float
    clock: Callable[[], float]


Step = (
    Sign | SendToken | SendApi | Lock | Slot | StoreCall | TakeLease | ReleaseLease | AwaitFetch
    | SignAhead | TakeAhead
)  # fmt: skip
Flow = Generator[Step, Any, T]
Exchange = SendToken | SendApi
"""The steps a client's own driver carries out."""


class Answer(NamedTuple):
    """What the protocol reads of an API response: no body, a few headers."""

    status: int
    nonce: str | None  # DPoP-Nonce (RFC 9449 §8.2)
    date: str | None  # Date (RFC 9110 §6.6.1)
    cached: bool  # an Age header: the Date is old
    challenges: tuple[str, ...]  # the WWW-Authenticate values


def answer_of_httpx(response: httpx.Response) -> Answer:
    """The `Answer` of an httpx response, in one pass over its raw headers."""
    # Each httpx Headers lookup scans them all anyway, and this runs for every response.
    nonce = date = None
    cached = False
    challenges: list[str] = []
    for key, value in response.headers.raw:
        name = key.lower()
        if name == b"dpop-nonce":
            nonce = value.decode("latin-1")
        elif name == b"date":
            date = value.decode("latin-1")
        elif name == b"age":
            cached = True
        elif name == b"www-authenticate":
            challenges.append(value.decode("latin-1"))
    return Answer(response.status_code, nonce, date, cached, tuple(challenges))


_DECODED_AWAY = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def token_response(
    status: int, headers: Iterable[tuple[str, str]], content: bytes
) -> httpx.Response:
    """An `httpx.Response` for a token response that another client received and decoded.

    The framing and encoding headers are dropped: ``content`` is already decoded.
    """
    kept = [(name, value) for name, value in headers if name.lower() not in _DECODED_AWAY]
    return httpx.Response(status, headers=kept, content=content)


class SyncGate:
    """The fetch lock and request slots for threads."""

    def __init__(self, slots: int | None) -> None:
        self.lock = threading.Lock()
        self.slots = None if slots is None else threading.BoundedSemaphore(slots)


class AsyncGate:
    """The fetch lock and the request slots of one event loop (asyncio objects are per loop)."""

    def __init__(self, slots: int | None) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0  # tasks waiting in ACQUIRE: a TRY_ACQUIRE must not queue behind them
        self.slots = None if slots is None else asyncio.Semaphore(slots)


class DPoPFlow:
    """The state one DPoP client shares across requests, and the protocol generators.

    Takes the arguments of `dpop_signer.DPoPAuth` (documented there).

    Raises:
        ConfigError: missing or contradictory settings.
    """

    def __init__(
        self,
        signer: Signer,
        *,
        token_url: str,
        client_id: str,
        client_secret: str | None = None,
        scope: str | None = None,
        client_auth: ClientAuth = "client_secret_basic",
        assertion_signer: Signer | None = None,
        resource: str | Sequence[str] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        assertion_audience: AssertionAudience = "issuer",
        leeway: float = 30.0,
        accept_bearer: bool = False,
        nonces: NonceCache | None = None,
        clock: Callable[[], float] = time.time,
        max_in_flight: int | None = 100,
        token_store: str | TokenStore = "memory",
        proofs_ahead: bool | None = None,
    ) -> None:
        if max_in_flight is not None and (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ConfigError(
                f"max_in_flight must be a positive integer or None, not {max_in_flight!r}"
            )
        if (
            isinstance(leeway, bool)
            or not isinstance(leeway, int | float)
            or not (math.isfinite(leeway) and leeway >= 0)
        ):
            raise ConfigError(f"leeway must be a non-negative number of seconds, not {leeway!r}")
        # private_key_jwt without its own assertion key signs assertions with the DPoP key,
        # and keeps doing so across rotations.
        self._assertion_follows_key = client_auth == "private_key_jwt" and assertion_signer is None
        self._source_args: dict[str, Any] = {
            "client_secret": client_secret,
            "client_auth": client_auth,
            "scope": scope,
            "resource": resource,
            "audience": audience,
            "accept_bearer": accept_bearer,
            "issuer": issuer,
            "assertion_audience": assertion_audience,
        }
        self.source = ClientCredentialsTokenSource(
            token_url,
            client_id,
            assertion_signer=signer if self._assertion_follows_key else assertion_signer,
            **self._source_args,
        )
        self.proofs = DPoPProofBuilder(signer, clock=clock)
        """The builder of the current key (replaced whole by `rotate`)."""
        if proofs_ahead is None:
            proofs_ahead = proofs_ahead_default(signer)
        self.ahead = ProofsAhead(clock=clock) if proofs_ahead else None
        """Proofs made ahead of time (`dpop_signer.ahead`), or None when off."""
        # The store is opened last, so that a setting refused above leaves nothing to close;
        # a URL is opened (and closed in `close`) here, a store object is the caller's.
        self.store: TokenStore = open_store(token_store)
        self._owns_store = isinstance(token_store, str)
        self.shared = not (isinstance(token_store, str) and token_store.strip() == "memory")
        """True when tokens, fetches and nonces are shared through `store`."""
        self._refused: str | None = None  # a token `invalidate` dropped: not adopted again
        self.nonces = (
            NonceCache(store=self.store if self.shared else None) if nonces is None else nonces
        )
        if self.shared:
            logger.info("token store: %s", self.store.url)
        self.clock = clock
        self.cache = TokenCache(clock, float(leeway))
        self.max_in_flight = max_in_flight
        self.token_requests = 0
        self.skew: float | None = None
        self._last_date: str | None = None
        self._rotate_lock = threading.Lock()
        self.sync_gate = SyncGate(max_in_flight)
        self._async_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncGate] = (
            weakref.WeakKeyDictionary()
        )
        self._async_gates_guard = threading.Lock()

    # -- state --------------------------------------------------------------------------------

    def async_gate(self) -> AsyncGate:
        """The gate of the running event loop (asyncio objects belong to one loop)."""
        loop = asyncio.get_running_loop()
        with self._async_gates_guard:
            gate = self._async_gates.get(loop)
            if gate is None:
                gate = self._async_gates[loop] = AsyncGate(self.max_in_flight)
            return gate

    def rotate(self, signer: Signer) -> str:
        """Make ``signer`` the DPoP key; returns its thumbprint. Thread- and task-safe.

        The cached token is dropped (it is bound to the old key): the next request fetches
        one for the new key. Requests already holding a token finish with the old key.
        """
        with self._rotate_lock:
            proofs = DPoPProofBuilder(
                signer, clock=self.clock, clock_offset=self.proofs.clock_offset
            )
            if self._assertion_follows_key:
                self.source = ClientCredentialsTokenSource(
                    self.source.token_url,
                    self.source.client_id,
                    assertion_signer=signer,
                    **self._source_args,
                )
            old = self.proofs.jkt
            self.proofs = proofs
            self.cache.clear()
        logger.info("DPoP key rotated: jkt %s -> %s; a new token will be fetched", old, proofs.jkt)
        return proofs.jkt

    def invalidate(self) -> None:
        """Forget the cached token; the next request fetches a new one (not the stored one)."""
        entry = self.cache.entry
        if entry is not None:
            self._refused = entry.token.value
        self.cache.clear()

    def close(self) -> None:
        """Close the token store if it was opened from a URL here (a store object is not)."""
        if self._owns_store:
            self.store.close()

    def store_key(self, proofs: DPoPProofBuilder) -> str:
        """The store key of the token for ``proofs``'s key (`dpop_signer.stores.token_key`)."""
        source = self.source
        args = self._source_args
        resource = args["resource"]
        return token_key(
            source.htu,
            source.client_id,
            scope=args["scope"],
            resources=[resource] if isinstance(resource, str) else list(resource or ()),
            audience=args["audience"],
            jkt=proofs.jkt,
        )

    def unreachable(self, cause: BaseException) -> ServerUnreachableError:
        """The error for a token request that could not be sent (``cause`` chained)."""
        detail = str(cause) or "no detail"
        error = ServerUnreachableError(
            f"cannot reach the token endpoint {self.source.htu}: {type(cause).__name__} "
            f"({detail}); check the token URL and that the authorization server is up "
            "(timeouts are the HTTP client's timeout setting)"
        )
        error.__cause__ = cause
        return error

    def token_request_failed(self) -> ServerUnreachableError:
        """The error recorded when the client closed a flow whose token request failed."""
        return ServerUnreachableError(
            f"the token request to {self.source.htu} failed or timed out (the HTTP client "
            "raised the error to the request that sent it); check the token URL and that the "
            "authorization server is up (timeouts are the HTTP client's timeout setting)"
        )

    # -- protocol: plain generators, no I/O ----------------------------------------------------

    def request_flow(
        self,
        method: str,
        url: str | httpx.URL,
        rewindable: Callable[[], bool],
        timeout: object = None,
    ) -> Flow[None]:
        """One API request: token, proof, send, and the retries its answers call for.

        ``rewindable`` tells whether the request body can be sent again; ``timeout`` goes
        into token requests' httpx ``timeout`` extension.
        """
        # Before the token and the nonce are read and the proof is signed: what waits for a
        # connection then is this step, not a proof going stale.
        yield Slot.ACQUIRE
        entry = self.cache.fresh(self.proofs, None)
        if entry is None:
            entry = yield from self.token_flow(None, timeout)
        # Normalized once: the nonce cache and the builder then hit their caches by string.
        htu = normalize_htu(url)
        nonce = self.nonces.get(htu)
        if nonce is None and self.nonces.store is not None:
            nonce = yield from self._stored_nonce(htu)
        nonce_retried = renewed = False
        ahead = self.ahead
        # Each retry spends a flag that forbids its own kind, so the third send is the last.
        for attempt in range(3):
            proofs = entry.proofs  # the token's key, never another (see the module docstring)
            signature = None
            if ahead is not None and not attempt:  # retries always sign afresh
                take = ahead.take(method, htu, entry, nonce)
                if take is not None:
                    signature = yield take
                    prepared = take.pending.prepared
            if signature is None:
                prepared = proofs.prepare(method, htu, access_token=entry.token.value, nonce=nonce)
                signature = yield Sign(proofs.signer, prepared.signing_input.encode("ascii"))
            answer: Answer = yield SendApi(entry.authorization, proofs.finish(prepared, signature))
            yield from self._observe(htu, answer)
            status = answer.status
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s %s -> %d (jti=%s, jkt=%s)", method, htu, status, prepared.jti, proofs.jkt
                )
            if status != 401:
                if ahead is not None:
                    yield from self._sign_ahead(method, htu, self.nonces.get(htu))
                return
            error = dpop_error(answer.challenges)
            where = f"{method} {htu}"
            if error == "use_dpop_nonce":
                if nonce_retried:
                    raise UseDPoPNonceError(
                        f"{where} demanded a new DPoP nonce again right after one was sent; "
                        "giving up instead of looping (check the server's nonce handling; "
                        f"{self._skew_note()})"
                    )
                nonce = self._demanded_nonce(answer.nonce, nonce, where)
                _require_rewindable(rewindable, where, "use_dpop_nonce", UseDPoPNonceError)
                nonce_retried = True
                logger.info("%s demanded a DPoP nonce; retrying once", where)
            elif error == "invalid_token":
                if renewed:
                    raise OAuthError(
                        f"{where} rejected a freshly issued token too (401 invalid_token); "
                        "check that the token's audience/resource and scope fit this API and "
                        f"that the API trusts the authorization server {self.source.htu}"
                    )
                _require_rewindable(rewindable, where, "invalid_token", OAuthError)
                renewed = True
                logger.info("%s answered 401 invalid_token; renewing the token once", where)
                entry = yield from self.token_flow(entry, timeout)
                nonce = self.nonces.get(htu)
            else:
                if error == "invalid_dpop_proof":
                    logger.warning(
                        "%s rejected the DPoP proof (jti=%s, jkt=%s; %s)",
                        where, prepared.jti, proofs.jkt, self._skew_note(),
                    )  # fmt: skip
                return

    def headers_flow(
        self, htm: str, htu: str, timeout: object, nonce: str | None = None
    ) -> Flow[dict[str, str]]:
        """``Authorization`` and ``DPoP`` headers for a request someone else sends.

        ``nonce`` goes into this proof only; by default the nonce known for ``htu``'s origin.
        """
        if nonce is None:
            nonce = self.nonces.get(htu)
            if nonce is None and self.nonces.store is not None:
                nonce = yield from self._stored_nonce(htu)
        entry = self.cache.fresh(self.proofs, None)
        if entry is None:
            entry = yield from self.token_flow(None, timeout)
        proofs = entry.proofs
        ahead = self.ahead
        take = None if ahead is None else ahead.take(htm, htu, entry, nonce)
        signature = None if take is None else (yield take)
        if take is not None and signature is not None:
            prepared = take.pending.prepared
        else:
            prepared = proofs.prepare(htm, htu, access_token=entry.token.value, nonce=nonce)
            signature = yield Sign(proofs.signer, prepared.signing_input.encode("ascii"))
        headers = {"Authorization": entry.authorization, "DPoP": proofs.finish(prepared, signature)}
        if ahead is not None:
            # The caller sends it, not us: the next proof for this pair carries this nonce.
            yield from self._sign_ahead(htm, htu, nonce)
        return headers

    def _sign_ahead(self, method: str, htu: str, nonce: str | None) -> Flow[None]:
        """After (method, htu) was answered: have its next proof signed in the background."""
        assert self.ahead is not None
        step = self.ahead.plan(method, htu, self.cache.fresh(self.proofs, None), nonce)
        if step is not None:
            yield step

    def token_flow(self, rejected: CachedToken | None, timeout: object) -> Flow[CachedToken]:
        """A token of the current key: cached, renewed, or fetched (one fetch at a time).

        A token due for renewal but still valid is returned when the renewal fails.
        """
        cache = self.cache
        proofs = self.proofs
        entry = cache.fresh(proofs, rejected)
        if entry is not None:
            return entry
        current = cache.usable(proofs, rejected)
        if current is not None:
            entry = yield from self._renew(current, rejected, timeout)
            return entry
        # No token we can send: wait for the fetch in progress, or make one.
        seen = cache.fetches
        cache.raise_while_backing_off()
        yield Lock.ACQUIRE
        # Whoever held the lock before us may have fetched a token already: single flight.
        # (A rotation while we waited makes the new key current: take or fetch its token.)
        entry = cache.usable(self.proofs, rejected)
        if entry is None:
            failure = cache.failure
            if failure is not None and cache.fetches != seen:
                # The fetch we waited for failed: single flight for failures too, or each
                # waiter would try in turn, one timeout after another.
                raise cache.shared(failure)
            cache.raise_while_backing_off()
            if self.shared:
                entry = yield from self._obtain(rejected, timeout)
            else:
                entry = yield from self._fetch_shared(timeout)
        yield Lock.RELEASE
        return entry

    def _renew(
        self, current: CachedToken, rejected: CachedToken | None, timeout: object
    ) -> Flow[CachedToken]:
        """Renew a token that is due but still valid; whatever happens, return a valid one."""
        cache = self.cache
        if cache.backing_off():
            return current
        # Never wait here: whoever holds the lock is fetching, and ``current`` is still good.
        if not (yield Lock.TRY_ACQUIRE):
            return current
        entry = cache.fresh(self.proofs, rejected)
        if entry is None and not cache.backing_off():
            try:
                if self.shared:
                    entry = yield from self._renew_shared(current, rejected, timeout)
                else:
                    entry = yield from self._fetch_shared(timeout)
            except OAuthError as exc:
                left = (
                    "unknown"
                    if current.expire_at is None
                    else f"{current.expire_at - self.clock():.0f} s"
                )
                logger.warning(
                    "renewing the token failed; using the current one (valid for %s more): %s",
                    left, exc.message,
                )  # fmt: skip
        yield Lock.RELEASE
        return current if entry is None else entry

    def _fetch_shared(self, timeout: object) -> Flow[CachedToken]:
        """`_fetch_token`, its outcome recorded for the callers waiting on the lock."""
        try:
            return (yield from self._fetch_token(timeout))
        except OAuthError as exc:
            self.cache.failed(exc, self.source.htu)
            raise

    # -- the shared store: adopt, lease, wait, fetch, share (see the module docstring) ----------

    def _obtain(self, rejected: CachedToken | None, timeout: object) -> Flow[CachedToken]:
        """A token for the current key when none can be sent: a stored one, or fetched once."""
        store, proofs = self.store, self.proofs
        key = self.store_key(proofs)
        ttl = _lease_ttl(timeout)
        for _ in range(_STORE_ROUNDS):
            snap: Snapshot = yield StoreCall(store.snapshot, (key,))
            entry = self._adopt(snap.token, proofs, rejected)
            if entry is not None:
                return entry
            failure = snap.failure
            if failure is not None and self.clock() < failure.retry_at:
                raise self._shared_failure(failure)
            lease: str | None = yield TakeLease(store, key, ttl)
            if lease is not None:
                # Another process may have stored its token and released the lease between
                # the snapshot above and this lease: look once more before fetching.
                again: Snapshot = yield StoreCall(store.snapshot, (key,))
                entry = self._adopt(again.token, proofs, rejected)
                if entry is not None:
                    yield ReleaseLease(store, key, lease)
                    return entry
                return (yield from self._fetch_leased(key, lease, failure, timeout))
            outcome: Outcome = yield AwaitFetch(store, key, ttl + _WAIT_SLACK, self.clock)
            entry = self._adopt(outcome.token, proofs, rejected)
            if entry is not None:
                return entry
            if outcome.failure is not None:
                raise self._shared_failure(outcome.failure)
            # Neither: the holder went away without an outcome (killed); try the lease again.
        logger.warning(
            "the token store's fetch lease stayed taken for %d rounds; fetching without it",
            _STORE_ROUNDS,
        )
        return (yield from self._fetch_shared(timeout))

    def _renew_shared(
        self, current: CachedToken, rejected: CachedToken | None, timeout: object
    ) -> Flow[CachedToken | None]:
        """Renew through the store: another process's renewal or one fetch; None: keep it."""
        store, proofs = self.store, self.proofs
        key = self.store_key(proofs)
        snap: Snapshot = yield StoreCall(store.snapshot, (key,))
        stored = snap.token
        if stored is not None and _later(stored, current):
            entry = self._adopt(stored, proofs, rejected)
            if entry is not None and self.cache.fresh(proofs, rejected) is entry:
                return entry
        failure = snap.failure
        if failure is not None and self.clock() < failure.retry_at:
            self._shared_failure(failure)  # this process backs off too
            return None
        lease: str | None = yield TakeLease(store, key, _lease_ttl(timeout))
        if lease is None:
            return None  # another process is renewing: ``current`` is still good
        # A renewal stored (and its lease released) since the snapshot: take it, not a fetch.
        again: Snapshot = yield StoreCall(store.snapshot, (key,))
        stored = again.token
        if stored is not None and _later(stored, current):
            entry = self._adopt(stored, proofs, rejected)
            if entry is not None and self.cache.fresh(proofs, rejected) is entry:
                yield ReleaseLease(store, key, lease)
                return entry
        return (yield from self._fetch_leased(key, lease, failure, timeout))

    def _fetch_leased(
        self, key: str, lease: str, previous: StoredFailure | None, timeout: object
    ) -> Flow[CachedToken]:
        """Fetch holding the store's lease; share the token or the failure; give the lease back.

        ``previous`` is the failure stored before: the backoff counts failures across
        processes. (A flow closed mid-fetch has its lease released by the driver.)
        """
        store = self.store
        try:
            entry = yield from self._fetch_token(timeout)
        except OAuthError as exc:
            count = 1 if previous is None else previous.count + 1
            failure = self.cache.failed(exc, self.source.htu, count=count)
            shared = StoredFailure.from_error(
                exc, retry_at=failure.retry_at, count=failure.count, lease=lease
            )
            yield StoreCall(store.record_failure, (key, shared))
            yield ReleaseLease(store, key, lease)
            raise
        token = entry.token
        now = self.clock()
        ttl = _STORED_TOKEN_CAP if token.expires_at is None else token.expires_at - now
        if ttl > 0:
            stored = StoredToken(token.value, token.token_type, token.expires_at)
            yield StoreCall(store.put, (key, stored, min(ttl, _STORED_TOKEN_CAP)))
        yield ReleaseLease(store, key, lease)
        return entry

    def _adopt(
        self, stored: StoredToken | None, proofs: DPoPProofBuilder, rejected: CachedToken | None
    ) -> CachedToken | None:
        """A stored token, cached as this process's, if it may be sent with ``proofs``'s key."""
        if stored is None or stored.value == self._refused:
            return None
        if rejected is not None and stored.value == rejected.token.value:
            return None  # the server just refused it (invalid_token): never take it back
        kind = stored.token_type.lower()
        if kind != "dpop" and not (kind == "bearer" and self.source.accept_bearer):
            return None
        token = AccessToken(stored.value, stored.token_type, stored.expires_at)
        now = self.clock()
        entry = self.cache.adopt(token, proofs, now)
        if entry is not None:
            logger.info(
                "took the %s token another process fetched from the token store (expires in %s, "
                "jkt=%s)",
                token.token_type,
                "unknown" if token.expires_at is None else f"{token.expires_at - now:.0f} s",
                proofs.jkt,
            )
        return entry

    def _shared_failure(self, stored: StoredFailure) -> OAuthError:
        """Record another process's failed fetch here (with its backoff); the error to raise."""
        error = stored.to_error()
        if stored.retry_at > self.clock():
            error.retry_after = stored.retry_at - self.clock()
        failure = self.cache.adopt_failure(error, stored.count, stored.retry_at)
        return self.cache.shared(failure)

    def _stored_nonce(self, htu: str) -> Flow[str | None]:
        """On a local miss, the nonce another process shared for ``htu``'s origin (if asked now)."""
        nonces = self.nonces
        store = nonces.store
        origin = nonces.lookup_due(htu)
        if store is None or origin is None:
            return None
        value = yield StoreCall(store.get_nonce, (origin,))
        return nonces.found(htu, value)

    # -- token requests ----------------------------------------------------------------------

    def _fetch_token(self, timeout: object) -> Flow[CachedToken]:
        # One key for the whole fetch: the token is bound to the key of its proofs.
        proofs = self.proofs
        source = self.source
        where = f"token endpoint {source.htu}"
        nonce = self.nonces.get(source.htu)
        if nonce is None and self.nonces.store is not None:
            nonce = yield from self._stored_nonce(source.htu)
        response = yield from self._token_attempt(source, proofs, nonce, timeout)
        try:
            return self._accept(source, proofs, response)
        except TokenEndpointError as exc:
            if exc.error != "use_dpop_nonce":
                raise _with_retry_after(self._with_skew(exc), response) from exc
            nonce = self._demanded_nonce(response.headers.get("dpop-nonce"), nonce, where)
        except OAuthError as exc:
            _with_retry_after(exc, response)
            raise
        logger.info("%s demanded a DPoP nonce; retrying once", where)
        response = yield from self._token_attempt(source, proofs, nonce, timeout)
        try:
            return self._accept(source, proofs, response)
        except TokenEndpointError as exc:
            if exc.error == "use_dpop_nonce":
                raise UseDPoPNonceError(
                    f"{where} demanded a new DPoP nonce again right after one was sent; "
                    "giving up instead of looping (check the server's nonce handling; "
                    f"{self._skew_note()})"
                ) from exc
            raise _with_retry_after(self._with_skew(exc), response) from exc
        except OAuthError as exc:
            _with_retry_after(exc, response)
            raise

    def _token_attempt(
        self,
        source: ClientCredentialsTokenSource,
        proofs: DPoPProofBuilder,
        nonce: str | None,
        timeout: object,
    ) -> Flow[httpx.Response]:
        prepared = proofs.prepare("POST", source.htu, nonce=nonce)
        signature = yield Sign(proofs.signer, prepared.signing_input.encode("ascii"))
        assertion = None
        if source.assertion_signer is not None:
            # A fresh assertion (new jti) per attempt: servers refuse a replayed one.
            unsigned = source.assertion_signing_input(self.clock() + proofs.clock_offset)
            assertion_signature = yield Sign(source.assertion_signer, unsigned.encode("ascii"))
            assertion = source.finish_assertion(unsigned, assertion_signature)
        request = source.build_request(
            proof=proofs.finish(prepared, signature), client_assertion=assertion
        )
        if timeout is not None:
            request.extensions["timeout"] = timeout
        self.token_requests += 1
        response: httpx.Response = yield SendToken(request)
        yield from self._observe(source.htu, answer_of_httpx(response))
        logger.info(
            "token request %d to %s -> %d (jti=%s, jkt=%s)",
            self.token_requests, source.htu, response.status_code, prepared.jti, proofs.jkt,
        )  # fmt: skip
        return response

    def _accept(
        self,
        source: ClientCredentialsTokenSource,
        proofs: DPoPProofBuilder,
        response: httpx.Response,
    ) -> CachedToken:
        now = self.clock()
        token: AccessToken = source.parse(response, now=now)
        entry = self.cache.store(token, proofs, now)
        logger.info(
            "got a %s token (expires in %s, scope %r, jkt=%s)",
            token.token_type,
            "unknown" if token.expires_at is None else f"{token.expires_at - now:.0f} s",
            token.scope, proofs.jkt,
        )  # fmt: skip
        return entry

    def _observe(self, htu: str, answer: Answer) -> Flow[None]:
        nonce = answer.nonce
        if nonce is not None:
            nonces = self.nonces
            origin = nonces.update(htu, nonce)
            if origin is not None and nonces.store is not None:
                # A new nonce (not the one repeated on every response): share it (RFC 9449 §8.2).
                yield StoreCall(nonces.store.put_nonce, (origin, nonce, SHARED_NONCE_TTL))
        date = answer.date
        if date is not None and date != self._last_date and not answer.cached:
            # A cached response (Age) carries an old Date: it says nothing about the clock.
            self._last_date = date
            self._learn_skew(htu, date)

    def _learn_skew(self, htu: str, date: str) -> None:
        try:
            server = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        # Date is truncated to the second: the server's clock is on average half a second on.
        skew = server + 0.5 - self.clock()
        self.skew = skew
        offset = skew if abs(skew) >= _MIN_SKEW else 0.0
        proofs = self.proofs
        if abs(offset - proofs.clock_offset) >= 1.0:
            logger.info(
                "clock offset to %s from its Date header: %+.1f s; using it for DPoP iat",
                htu, offset,
            )  # fmt: skip
        proofs.clock_offset = offset

    def _skew_note(self) -> str:
        if self.skew is None:
            return "no Date header seen, so iat uses the local clock"
        return (
            f"clock offset to the server from its Date header: {self.skew:+.0f} s, "
            f"applied to iat: {self.proofs.clock_offset:+.0f} s"
        )

    def _with_skew(self, exc: TokenEndpointError) -> TokenEndpointError:
        if exc.error != "invalid_dpop_proof":
            return exc
        return TokenEndpointError(
            f"{exc.message}; {self._skew_note()}",
            error=exc.error,
            error_description=exc.error_description,
            status=exc.status,
        )

    def _demanded_nonce(self, nonce: str | None, sent: str | None, where: str) -> str:
        if nonce is None:
            raise UseDPoPNonceError(
                f"{where} demanded a DPoP nonce (use_dpop_nonce) but sent no DPoP-Nonce header "
                "(RFC 9449 §8, §9); the server is misconfigured"
            )
        if not is_nonce(nonce):
            raise UseDPoPNonceError(
                f"{where} demanded a DPoP nonce but its DPoP-Nonce header is not a valid nonce "
                "(RFC 9449 §8.1: 1*NQCHAR)"
            )
        if nonce == sent:
            raise UseDPoPNonceError(
                f"{where} rejected the DPoP nonce it had issued and sent the same one again; "
                f"giving up instead of looping (a proof outside the server's time window is "
                f"one cause: {self._skew_note()})"
            )
        return nonce


# -- drivers: the only code that signs and locks ----------------------------------------------


def drive_sync(flow: Flow[T], gate: SyncGate) -> Generator[Exchange, Any, T]:
    """Carry out a flow's steps in this thread; yield the sends to the client's driver.

    The client's driver replies to `SendToken` with the response (body read) or throws an
    `OAuthError` in when it could not send it, and to `SendApi` with an `Answer`.
    """
    reply: Any = None
    error: OAuthError | None = None  # a failed token request, for the flow to handle
    locked = slot = False
    lease: ReleaseLease | None = None  # a store lease held, released if the flow ends early
    try:
        while True:
            try:
                step = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as stop:
                result: T = stop.value
                return result
            reply = error = None
            kind = type(step)
            if kind is Sign:
                reply = step.signer.sign(step.message)  # type: ignore[union-attr]
            elif kind is TakeAhead:
                reply = step.result()  # type: ignore[union-attr]
            elif kind is SignAhead:
                step.start()  # type: ignore[union-attr]
            elif kind is SendApi:
                reply = yield step  # type: ignore[misc]
            elif kind is SendToken:
                try:
                    reply = yield step  # type: ignore[misc]
                except OAuthError as exc:  # the send failed: the flow records it
                    error = exc
            elif kind is StoreCall:
                reply = step.function(*step.args)  # type: ignore[union-attr]
            elif kind is TakeLease:
                take: TakeLease = step  # type: ignore[assignment]
                reply = take.store.try_lease(take.key, take.ttl)
                lease = None if reply is None else ReleaseLease(take.store, take.key, reply)
            elif kind is ReleaseLease:
                lease = None
                step.store.release(step.key, step.lease)  # type: ignore[union-attr]
            elif kind is AwaitFetch:
                wait: AwaitFetch = step  # type: ignore[assignment]
                reply = wait_for_outcome(
                    wait.store, wait.key, timeout=wait.timeout, clock=wait.clock
                )
            elif step is Lock.ACQUIRE:
                gate.lock.acquire()
                locked = True
            elif step is Lock.TRY_ACQUIRE:
                reply = locked = gate.lock.acquire(blocking=False)
            elif step is Lock.RELEASE:
                gate.lock.release()
                locked = False
            elif gate.slots is not None and not slot:  # Slot.ACQUIRE
                gate.slots.acquire()
                slot = True
    finally:
        if lease is not None:
            lease.store.release(lease.key, lease.lease)
        if locked:
            gate.lock.release()
        if slot and gate.slots is not None:
            gate.slots.release()
        flow.close()


async def drive_async(
    flow: Flow[Any], gate: AsyncGate, result: list[Any] | None = None
) -> AsyncGenerator[Exchange, Any]:
    """`drive_sync` for an event loop: signs through `sign_async`, asyncio lock and slots.

    The flow's return value is appended to ``result`` (an async generator returns nothing).
    """
    reply: Any = None
    error: OAuthError | None = None
    locked = slot = False
    lease: ReleaseLease | None = None
    try:
        while True:
            try:
                step = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as stop:
                if result is not None:
                    result.append(stop.value)
                return
            reply = error = None
            kind = type(step)
            if kind is Sign:
                reply = await sign_async(step.signer, step.message)  # type: ignore[union-attr]
            elif kind is TakeAhead:
                reply = await step.result_async()  # type: ignore[union-attr]
            elif kind is SignAhead:
                step.start_async()  # type: ignore[union-attr]
            elif kind is SendApi:
                reply = yield step  # type: ignore[misc]
            elif kind is SendToken:
                try:
                    reply = yield step  # type: ignore[misc]
                except OAuthError as exc:
                    error = exc
            elif kind is StoreCall:
                call: StoreCall = step  # type: ignore[assignment]
                reply = await asyncio.to_thread(call.function, *call.args)
            elif kind is TakeLease:
                take: TakeLease = step  # type: ignore[assignment]
                # Noted before the await returns: a task cancelled meanwhile still releases it.
                reply = await asyncio.to_thread(take.store.try_lease, take.key, take.ttl)
                lease = None if reply is None else ReleaseLease(take.store, take.key, reply)
            elif kind is ReleaseLease:
                give: ReleaseLease = step  # type: ignore[assignment]
                lease = None
                await asyncio.to_thread(give.store.release, give.key, give.lease)
            elif kind is AwaitFetch:
                wait: AwaitFetch = step  # type: ignore[assignment]
                reply = await await_outcome(
                    wait.store, wait.key, timeout=wait.timeout, clock=wait.clock
                )
            elif step is Lock.ACQUIRE:
                # Flagged only once held: a task cancelled while waiting must not release.
                gate.waiting += 1
                try:
                    await gate.lock.acquire()
                finally:
                    gate.waiting -= 1
                locked = True
            elif step is Lock.TRY_ACQUIRE:
                # No waiter and not held: acquire() returns without suspending.
                reply = not gate.lock.locked() and gate.waiting == 0
                if reply:
                    await gate.lock.acquire()
                    locked = True
            elif step is Lock.RELEASE:
                gate.lock.release()
                locked = False
            elif gate.slots is not None and not slot:  # Slot.ACQUIRE
                await gate.slots.acquire()
                slot = True
    finally:
        if lease is not None:
            await _release_async(lease)
        if locked:
            gate.lock.release()
        if slot and gate.slots is not None:
            gate.slots.release()
        flow.close()


async def _release_async(lease: ReleaseLease) -> None:
    """Give a store lease back from a closing async flow (inline if the thread hop fails)."""
    try:
        await asyncio.to_thread(lease.store.release, lease.key, lease.lease)
    except BaseException:
        # Cancelled (or the loop is closing): one quick call inline rather than leaving the
        # others to wait for the lease to expire.
        lease.store.release(lease.key, lease.lease)
        raise


def cancelling() -> bool:
    """True inside an asyncio task that is being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _require_rewindable(
    rewindable: Callable[[], bool], where: str, error: str, kind: type[OAuthError]
) -> None:
    if rewindable():
        return
    raise kind(
        f"{where} answered 401 {error} and needs the request once more, but its body is a "
        "one-shot stream that was already sent and is not re-sent silently; pass the body as "
        "bytes or read it into memory before sending"
    )


def _lease_ttl(timeout: object) -> float:
    """The fetch lease time for a token request with ``timeout`` (see `_LEASE_MIN`)."""
    seconds = _timeout_seconds(timeout)
    if seconds is None:
        return _LEASE_MAX
    return min(_LEASE_MAX, max(_LEASE_MIN, 2 * seconds + 5))


def _timeout_seconds(timeout: object) -> float | None:
    """The longest phase of a client timeout (httpx dict, requests tuple, aiohttp ``total``)."""
    values: list[object]
    if isinstance(timeout, dict):
        values = list(timeout.values())
    elif isinstance(timeout, tuple | list):
        values = list(timeout)
    else:
        values = [getattr(timeout, "total", timeout)]
    numbers = [
        float(v)
        for v in values
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    ]
    # A phase without a timeout (None) may take any time: the lease then has its longest term.
    return max(numbers) if numbers and len(numbers) == len(values) else None


def _later(stored: StoredToken, current: CachedToken) -> bool:
    """True if ``stored`` is another token than ``current`` and expires later."""
    if stored.value == current.token.value:
        return False
    mine = current.token.expires_at
    return stored.expires_at is None or (mine is not None and stored.expires_at > mine)


def _with_retry_after(error: OAuthError, response: httpx.Response) -> OAuthError:
    """``error`` with the response's ``Retry-After`` (RFC 9110 §10.2.3) in ``retry_after``."""
    seconds = retry_after_seconds(response.headers.get("retry-after"))
    if seconds is not None:
        error.retry_after = seconds
    return error


class FlowClient:
    """What every DPoP client driver shows of its `DPoPFlow`: one facade for all three.

    `dpop_signer.DPoPAuth` (httpx), `dpop_signer.requests.DPoPRequestsAuth` and
    `dpop_signer.aiohttp.DPoPMiddleware` inherit it; each sets ``_flow`` and adds only what its
    HTTP client needs.
    """

    _flow: DPoPFlow

    @property
    def flow(self) -> DPoPFlow:
        """The client-independent protocol state (shared with no other client)."""
        return self._flow

    @property
    def proofs(self) -> DPoPProofBuilder:
        """The current key's proof builder (its ``clock_offset`` follows ``Date`` headers)."""
        return self._flow.proofs

    @property
    def nonces(self) -> NonceCache:
        """The per-origin nonce cache."""
        return self._flow.nonces

    @property
    def jkt(self) -> str:
        """RFC 7638 thumbprint of the DPoP key: what tokens are bound to (``cnf.jkt``)."""
        return self._flow.proofs.jkt

    @property
    def token_source(self) -> ClientCredentialsTokenSource:
        """Builds token requests and parses token responses."""
        return self._flow.source

    @property
    def token(self) -> AccessToken | None:
        """The cached token, fresh or not (None before the first fetch and after `rotate`)."""
        entry = self._flow.cache.entry
        return None if entry is None else entry.token

    @property
    def token_requests(self) -> int:
        """How many token requests this client has sent (retries included)."""
        return self._flow.token_requests

    @property
    def clock_skew(self) -> float | None:
        """Last measured server clock minus local clock, in seconds (None before a ``Date``)."""
        return self._flow.skew

    @property
    def token_store(self) -> str:
        """Where tokens are shared: ``memory``, or the store's URL with credentials masked."""
        return self._flow.store.url if self._flow.shared else "memory"

    def invalidate(self) -> None:
        """Forget the cached token; the next request fetches a new one."""
        self._flow.invalidate()

    def close(self) -> None:
        """Close the token store opened from a ``token_store`` URL (a store object is not)."""
        self._flow.close()

    def __repr__(self) -> str:
        # No secret, token or proof: the token URL as htu (no user info, no query).
        source = self._flow.source
        return (
            f"{type(self).__name__}(token_url={source.htu!r}, client_id={source.client_id!r}, "
            f"client_auth={source.client_auth!r}, jkt={self.jkt!r})"
        )

    def rotate(self, new_signer: Signer) -> str:
        """Make ``new_signer`` the DPoP key from now on; returns its thumbprint (`jkt`).

        Thread- and task-safe, while requests run. The cached token is dropped (it is bound to
        the old key, ``cnf.jkt``) and the next request fetches one for the new key. A request
        that already holds a token finishes with the old key; one that needs a token (first,
        or renewed after ``invalid_token``) gets the new key's token and signs with the new
        key. A proof is never sent with a token bound to another key. The old signer is not
        closed: close it once the requests that started before the rotation are done.
        """
        return self._flow.rotate(new_signer)
