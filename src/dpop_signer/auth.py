"""`DPoPAuth`: an ``httpx.Auth`` that gives every request a DPoP-bound token and a fresh proof.

>>> auth = DPoPAuth(signer, token_url="https://as.example/token", client_id="svc",
...                 client_secret=secret)  # doctest: +SKIP
>>> with httpx.Client(auth=auth, timeout=10) as client:  # doctest: +SKIP
...     client.get("https://api.example/v1/things")

What happens per request:

0. The request takes one of ``max_in_flight`` slots (default 100, httpx's default pool size)
   and keeps it until its response is in. The proof is signed only once the slot is held, so
   it is not signed with the nonce and token of the moment and then left to age in the
   connection pool's queue: 1,000 gathered requests on a 100-connection pool would otherwise
   reach servers with nonces and tokens that expired while they waited.
1. The client_credentials token is taken from the cache, or fetched through the *same* client
   (the token request is yielded from the auth flow, so it goes through the application's
   transport, proxies, mocks and timeouts). One fetch at a time, and its outcome is shared:
   requests that waited for it (a ``threading.Lock`` in `httpx.Client`, an ``asyncio.Lock``
   per event loop in `httpx.AsyncClient`) get its token, or its error, without a fetch of
   their own. The token is renewed ``leeway`` seconds before it expires (at most half its
   lifetime early) by the first request that finds it due; the others keep using it and do
   not wait. Only a request without a token it can still send (none, expired, or rejected
   with ``invalid_token``) waits for a fetch.

   After a failed fetch the token endpoint is not asked again for a while: exponential
   backoff with jitter (about 1, 2, 4 ... s, capped at 60 s), longer if the server sent
   ``Retry-After`` (RFC 9110 §10.2.3; honoured up to 300 s). Meanwhile requests that still
   have a valid token use it; the others fail at once with the last error (its
   ``retry_after`` says when the next attempt is due) instead of each waiting for a timeout.
2. ``Authorization: DPoP <token>`` and ``DPoP: <proof>`` are set; the proof has ``ath`` and the
   origin's nonce if one is known.
3. The response is checked without reading its body (streamed responses stay streamed):
   a ``DPoP-Nonce`` header is remembered for the origin (RFC 9449 §8.2), a ``Date`` header
   teaches the clock offset used for ``iat``, and a ``401`` with ``WWW-Authenticate: DPoP``
   is handled:

   - ``error="use_dpop_nonce"`` with a new ``DPoP-Nonce``: one retry with a fresh proof (§9);
   - ``error="invalid_token"``: the token is renewed once and the request retried once;
   - any other ``401`` (``invalid_dpop_proof`` included, logged with the measured clock
     offset) is returned to the caller as it is.

   At the token endpoint a ``400 {"error": "use_dpop_nonce"}`` gets one retry too (§8). A
   server that asks again right after the retry, repeats the nonce it had issued, or sends no
   ``DPoP-Nonce`` ends in `UseDPoPNonceError`; nothing loops. A request is sent at most three
   times (nonce retry + renewal retry).

Errors: everything raised on purpose is a `DPoPSignerError`. Connection errors and timeouts
(timeouts are the client's: set ``timeout=`` on the client) surface like this:

- token request in `get_token`, `aget_token`, `headers`, `aheaders`, and inside
  ``httpx.Client`` requests: `ServerUnreachableError`, chained from the httpx exception;
- token request inside ``httpx.AsyncClient`` requests: the httpx exception itself
  (``httpx.ConnectError``, ``httpx.ConnectTimeout``, ...) for the request that sent it,
  because httpx closes an async auth flow without telling it why (call `aget_token` first to
  get `ServerUnreachableError`);
- a failure shared with a request that waited for the fetch, or met during the backoff: a new
  error of the failed fetch's class (`ServerUnreachableError` for a transport error), with
  ``retry_after``;
- the API request itself: always the httpx exception, exactly as without this auth.

The renewal of a still-valid token never fails the caller in `get_token`, `aget_token`,
`headers` and `aheaders` (what ``dpop serve`` uses): it gets the valid token. Inside an httpx
request, a renewal whose token request cannot get through fails that one request (httpx ends
an auth flow whose request failed); the failure is shared and backed off all the same, so
every other request keeps using the valid token. A request body that is a one-shot stream (a
generator) is never re-sent: a retry it would need raises `UseDPoPNonceError` or `OAuthError`
instead.

The protocol logic lives in plain generators that do no I/O, do not sign and take no locks:
they yield small steps (sign these bytes, send this request, take or release the fetch lock,
take a request slot). The token cache, the outcome of the last fetch and the backoff are
state of this object, updated only by the generator that holds the fetch lock.
`sync_auth_flow` and `async_auth_flow` are thin drivers that carry the steps out, signing
through ``signer.sign`` or the signer's async path, and reading token-response bodies only.

Logs (``logging.getLogger("dpop_signer")``) carry status codes, ``jti``, ``jkt``, token request
counts and clock offsets; never a token, proof, nonce or secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, TypeVar

import httpx

from dpop_signer.errors import (
    ConfigError,
    OAuthError,
    ServerUnreachableError,
    TokenEndpointError,
    UseDPoPNonceError,
)
from dpop_signer.nonces import NonceCache
from dpop_signer.proof import DPoPProofBuilder, is_nonce, normalize_htu
from dpop_signer.signers.base import Signer, sign_async
from dpop_signer.tokens import AccessToken, ClientAuth, ClientCredentialsTokenSource

__all__ = ["DPoPAuth"]

logger = logging.getLogger("dpop_signer")

T = TypeVar("T")

_MIN_SKEW = 2.0
"""Offsets smaller than this are noise: ``Date`` has one-second resolution, plus latency."""

_BACKOFF_FIRST = 1.0
"""Seconds before the token endpoint is asked again after one failed fetch (before jitter)."""
_BACKOFF_CAP = 60.0
"""The backoff doubles with each failed fetch in a row up to this many seconds."""
_RETRY_AFTER_CAP = 300.0
"""A server's ``Retry-After`` is honoured up to this many seconds (a longer one is a typo or
hostile; five minutes without a token is already an outage)."""
_EXPIRY_MARGIN = 1.0
"""A token is not sent in its last second (at most a quarter of its lifetime): it would expire
on the way or in the server's queue."""

_random = random.SystemRandom()


class _Sign(NamedTuple):
    signer: Signer
    message: bytes


class _Send(NamedTuple):
    request: httpx.Request
    token_request: bool


class _Lock(enum.Enum):
    """The token fetch lock. ``TRY_ACQUIRE`` never waits; the driver replies whether it got it."""

    ACQUIRE = "acquire"
    TRY_ACQUIRE = "try_acquire"
    RELEASE = "release"


class _Slot(enum.Enum):
    """One of ``max_in_flight`` request slots, held until the flow ends (the driver frees it)."""

    ACQUIRE = "acquire"


_Step = _Sign | _Send | _Lock | _Slot
_Flow = Generator[_Step, Any, T]


@dataclass(frozen=True)
class _Cached:
    token: AccessToken
    renew_at: float | None  # client clock; None: no expiry known, renewed only on 401
    expire_at: float | None  # client clock; from then on the token is not sent any more
    authorization: str  # the Authorization header value, built once per token


@dataclass(frozen=True)
class _Failure:
    """The outcome of the last token fetch when it failed: shared by everyone who waited."""

    error: OAuthError
    count: int  # failed fetches in a row
    retry_at: float  # client clock: no token request before this


class _AsyncGate:
    """The fetch lock and the request slots of one event loop (asyncio objects are per loop)."""

    def __init__(self, slots: int | None) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0  # tasks waiting in ACQUIRE: a TRY_ACQUIRE must not queue behind them
        self.slots = None if slots is None else asyncio.Semaphore(slots)


class DPoPAuth(httpx.Auth):
    """DPoP (RFC 9449) with client_credentials tokens for `httpx.Client` and `httpx.AsyncClient`.

    Args:
        signer: The DPoP key (PKCS#11 or PEM); it signs every proof.
        token_url: The authorization server's token endpoint.
        client_id: The OAuth client id.
        client_secret: For ``client_secret_basic`` / ``client_secret_post``.
        scope: Space-separated scopes to ask for.
        client_auth: ``client_secret_basic`` (default), ``client_secret_post``,
            ``private_key_jwt`` or ``none`` (see `dpop_signer.tokens`).
        assertion_signer: Signs ``private_key_jwt`` assertions; defaults to ``signer``.
        resource: RFC 8707 resource indicator(s) for the token request.
        audience: An ``audience`` token request parameter.
        leeway: Renew this many seconds before the token expires (at most half its lifetime).
            Renewal does not hold up requests while the token is still valid.
        accept_bearer: Accept a ``Bearer`` token from the token endpoint (sent with the
            ``Bearer`` scheme, still with a proof). Off: a downgrade is an error.
        nonces: A shared `NonceCache`; by default each auth has its own.
        clock: Seconds since the epoch, for expiry, backoff, ``iat`` and clock offsets.
        max_in_flight: Requests of this auth that may be past signing at once; the others
            wait before they sign, not after. Set it to the client's
            ``limits.max_connections`` (httpx's default is 100); ``None``: no bound.

    Raises:
        ConfigError: missing or contradictory settings.
    """

    requires_request_body = False
    requires_response_body = False  # API bodies stay streamed; token bodies are read by us.

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
        leeway: float = 30.0,
        accept_bearer: bool = False,
        nonces: NonceCache | None = None,
        clock: Callable[[], float] = time.time,
        max_in_flight: int | None = 100,
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
        if client_auth == "private_key_jwt" and assertion_signer is None:
            assertion_signer = signer
        self._signer = signer
        self._source = ClientCredentialsTokenSource(
            token_url,
            client_id,
            client_secret=client_secret,
            client_auth=client_auth,
            assertion_signer=assertion_signer,
            scope=scope,
            resource=resource,
            audience=audience,
            accept_bearer=accept_bearer,
        )
        self._proofs = DPoPProofBuilder(signer, clock=clock)
        self._nonces = NonceCache() if nonces is None else nonces
        self._clock = clock
        self._leeway = float(leeway)
        self._cached: _Cached | None = None
        self._failure: _Failure | None = None
        self._fetches = 0  # finished fetches, failed or not: tells a waiter its fetch is done
        self._token_requests = 0
        self._skew: float | None = None
        self._last_date: str | None = None
        self._max_in_flight = max_in_flight
        self._sync_lock = threading.Lock()
        self._sync_slots = (
            None if max_in_flight is None else threading.BoundedSemaphore(max_in_flight)
        )
        self._async_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncGate] = (
            weakref.WeakKeyDictionary()
        )
        self._async_gates_guard = threading.Lock()

    # -- public surface ---------------------------------------------------------------------

    @property
    def proofs(self) -> DPoPProofBuilder:
        """The proof builder (its ``clock_offset`` follows the servers' ``Date`` headers)."""
        return self._proofs

    @property
    def nonces(self) -> NonceCache:
        """The per-origin nonce cache."""
        return self._nonces

    @property
    def jkt(self) -> str:
        """RFC 7638 thumbprint of the DPoP key: what tokens are bound to (``cnf.jkt``)."""
        return self._proofs.jkt

    @property
    def token_source(self) -> ClientCredentialsTokenSource:
        """Builds token requests and parses token responses."""
        return self._source

    @property
    def token(self) -> AccessToken | None:
        """The cached token, fresh or not (None before the first fetch)."""
        cached = self._cached
        return None if cached is None else cached.token

    @property
    def token_requests(self) -> int:
        """How many token requests this auth has sent (retries included)."""
        return self._token_requests

    @property
    def clock_skew(self) -> float | None:
        """Last measured server clock minus local clock, in seconds (None before a ``Date``)."""
        return self._skew

    def invalidate(self) -> None:
        """Forget the cached token; the next request fetches a new one."""
        self._cached = None

    def get_token(self, client: httpx.Client) -> AccessToken:
        """The current token: cached, or fetched through ``client`` (one fetch at a time).

        A token that is due for renewal but still valid is returned when the renewal fails.

        Raises:
            OAuthError: the token endpoint refused, failed or could not be reached, now or in
                the fetch this call waited for, or it is backing off after such a failure
                (``retry_after`` says for how long).
            SignerError: the signer failed.
        """
        runner = self._run_sync(self._token(None, _timeout_of(client)))
        try:
            request = next(runner)
            for _ in range(8):  # a fetch sends at most two requests; bound it anyway
                try:
                    # auth=None: the token request must not go through this auth (or any other).
                    response = client.send(request, auth=None)
                except httpx.TransportError as exc:
                    # Into the flow: it records the failure for everyone and may still answer
                    # with a token that has not expired.
                    request = runner.throw(self._unreachable(exc))
                    continue
                request = runner.send(response)
            raise OAuthError("token fetch did not finish; this is a bug in dpop-signer")
        except StopIteration as stop:
            token: AccessToken = stop.value
            return token
        finally:
            runner.close()

    async def aget_token(self, client: httpx.AsyncClient) -> AccessToken:
        """`get_token` for `httpx.AsyncClient` (signs through the signer's async path)."""
        result: list[AccessToken] = []
        runner = self._run_async(self._token(None, _timeout_of(client)), result)
        try:
            request = await anext(runner)
            for _ in range(8):
                try:
                    response = await client.send(request, auth=None)
                except httpx.TransportError as exc:
                    request = await runner.athrow(self._unreachable(exc))
                    continue
                request = await runner.asend(response)
            raise OAuthError("token fetch did not finish; this is a bug in dpop-signer")
        except StopAsyncIteration:
            return result[0]
        finally:
            await runner.aclose()

    def headers(self, client: httpx.Client, htm: str, htu: str) -> dict[str, str]:
        """``Authorization`` and ``DPoP`` headers for one request sent by someone else.

        The proof has ``ath`` and the nonce known for ``htu``'s origin. Nonce challenges and
        401s of that request are the caller's to handle (this is what ``dpop token`` and the
        service's ``/v1/headers`` use).

        Raises:
            ProofError: ``htm`` or ``htu`` is malformed.
            OAuthError: the token could not be obtained.
        """
        nonce = self._nonces.get(htu)
        token = self.get_token(client)
        proof = self._proofs.build(htm, htu, access_token=token.value, nonce=nonce)
        return {"Authorization": f"{token.scheme} {token.value}", "DPoP": proof}

    async def aheaders(self, client: httpx.AsyncClient, htm: str, htu: str) -> dict[str, str]:
        """`headers` for `httpx.AsyncClient`."""
        nonce = self._nonces.get(htu)
        token = await self.aget_token(client)
        proof = await self._proofs.build_async(htm, htu, access_token=token.value, nonce=nonce)
        return {"Authorization": f"{token.scheme} {token.value}", "DPoP": proof}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """The synchronous flow (httpx calls `sync_auth_flow` / `async_auth_flow` instead)."""
        return self._run_sync(self._request_flow(request))

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Drive the flow for `httpx.Client`: sign inline, a thread lock around token fetches."""
        return self._run_sync(self._request_flow(request))

    def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Drive the flow for `httpx.AsyncClient`: async signing, a per-loop asyncio lock."""
        return self._run_async(self._request_flow(request), None)

    def __repr__(self) -> str:
        return (
            f"DPoPAuth(token_url={self._source.htu!r}, client_id={self._source.client_id!r}, "
            f"client_auth={self._source.client_auth!r}, jkt={self.jkt!r})"
        )

    # -- drivers: the only code that signs, sends, reads bodies and locks --------------------

    def _run_sync(self, flow: _Flow[T]) -> Generator[httpx.Request, httpx.Response, T]:
        reply: Any = None
        error: OAuthError | None = None  # a failed token request, for the flow to handle
        locked = slot = False
        try:
            while True:
                try:
                    step = flow.send(reply) if error is None else flow.throw(error)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
                reply = error = None
                if isinstance(step, _Sign):
                    reply = step.signer.sign(step.message)
                elif isinstance(step, _Send):
                    try:
                        reply = yield step.request
                    except GeneratorExit as exit_:
                        # The client closes the flow when sending failed; a transport error on
                        # the token request is the token endpoint being unreachable.
                        cause = exit_.__context__
                        if step.token_request and isinstance(cause, httpx.TransportError):
                            unreachable = self._unreachable(cause)
                            _record(flow, unreachable)
                            raise unreachable from cause
                        raise
                    except OAuthError as exc:  # thrown in by get_token: the send failed
                        if not step.token_request:
                            raise
                        error = exc
                        continue
                    if step.token_request:
                        try:
                            reply.read()
                        except httpx.TransportError as exc:
                            error = self._unreachable(exc)
                elif step is _Lock.ACQUIRE:
                    self._sync_lock.acquire()
                    locked = True
                elif step is _Lock.TRY_ACQUIRE:
                    reply = locked = self._sync_lock.acquire(blocking=False)
                elif step is _Lock.RELEASE:
                    self._sync_lock.release()
                    locked = False
                elif self._sync_slots is not None and not slot:  # _Slot.ACQUIRE
                    self._sync_slots.acquire()
                    slot = True
        finally:
            if locked:
                self._sync_lock.release()
            if slot and self._sync_slots is not None:
                self._sync_slots.release()
            flow.close()

    async def _run_async(
        self, flow: _Flow[Any], result: list[Any] | None
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        reply: Any = None
        error: OAuthError | None = None
        gate = self._async_gate()
        locked = slot = False
        try:
            while True:
                try:
                    step = flow.send(reply) if error is None else flow.throw(error)
                except StopIteration as stop:
                    if result is not None:
                        result.append(stop.value)
                    return
                reply = error = None
                if isinstance(step, _Sign):
                    reply = await sign_async(step.signer, step.message)
                elif isinstance(step, _Send):
                    try:
                        reply = yield step.request
                    except GeneratorExit:
                        # Unlike the sync driver, the cause cannot be seen here: aclose()
                        # throws GeneratorExit into an async generator without the exception
                        # that caused it, so httpx's own error reaches the caller unchanged.
                        # Not a cancellation: the send failed, and the waiters must know.
                        if step.token_request and not _cancelling():
                            _record(flow, self._token_request_failed())
                        raise
                    except OAuthError as exc:  # thrown in by aget_token: the send failed
                        if not step.token_request:
                            raise
                        error = exc
                        continue
                    if step.token_request:
                        try:
                            await reply.aread()
                        except httpx.TransportError as exc:
                            error = self._unreachable(exc)
                elif step is _Lock.ACQUIRE:
                    # Flagged only once held: a task cancelled while waiting must not release.
                    gate.waiting += 1
                    try:
                        await gate.lock.acquire()
                    finally:
                        gate.waiting -= 1
                    locked = True
                elif step is _Lock.TRY_ACQUIRE:
                    # No waiter and not held: acquire() returns without suspending.
                    reply = not gate.lock.locked() and gate.waiting == 0
                    if reply:
                        await gate.lock.acquire()
                        locked = True
                elif step is _Lock.RELEASE:
                    gate.lock.release()
                    locked = False
                elif gate.slots is not None and not slot:  # _Slot.ACQUIRE
                    await gate.slots.acquire()
                    slot = True
        finally:
            if locked:
                gate.lock.release()
            if slot and gate.slots is not None:
                gate.slots.release()
            flow.close()

    def _async_gate(self) -> _AsyncGate:
        # asyncio objects belong to one event loop; a client per loop gets its own.
        loop = asyncio.get_running_loop()
        with self._async_gates_guard:
            gate = self._async_gates.get(loop)
            if gate is None:
                gate = self._async_gates[loop] = _AsyncGate(self._max_in_flight)
            return gate

    def _unreachable(self, cause: httpx.TransportError) -> ServerUnreachableError:
        detail = str(cause) or "no detail"
        error = ServerUnreachableError(
            f"cannot reach the token endpoint {self._source.htu}: {type(cause).__name__} "
            f"({detail}); check the token URL and that the authorization server is up "
            "(timeouts are the httpx client's timeout= setting)"
        )
        error.__cause__ = cause
        return error

    def _token_request_failed(self) -> ServerUnreachableError:
        return ServerUnreachableError(
            f"the token request to {self._source.htu} failed or timed out (httpx raised the "
            "error to the request that sent it); check the token URL and that the "
            "authorization server is up (timeouts are the httpx client's timeout= setting)"
        )

    # -- protocol logic: plain generators, no I/O -------------------------------------------

    def _request_flow(self, request: httpx.Request) -> _Flow[None]:
        # The token request gets the API request's timeouts (the client's timeout= setting).
        timeout = request.extensions.get("timeout")
        # Before the token and the nonce are read and the proof is signed: what waits for a
        # connection then is this step, not a proof going stale (see step 0 above).
        yield _Slot.ACQUIRE
        token = self._fresh(None)
        if token is None:
            token = yield from self._token(None, timeout)
        # Normalized once: the nonce cache and the builder then hit their caches by string.
        htu = normalize_htu(request.url)
        nonce = self._nonces.get(htu)
        nonce_retried = renewed = False
        # Each retry spends a flag that forbids its own kind, so the third send is the last.
        for _ in range(3):
            prepared = self._proofs.prepare(
                request.method, htu, access_token=token.value, nonce=nonce
            )
            signature = yield _Sign(self._signer, prepared.signing_input.encode("ascii"))
            request.headers["Authorization"] = self._authorization(token)
            request.headers["DPoP"] = self._proofs.finish(prepared, signature)
            response: httpx.Response = yield _Send(request, token_request=False)
            self._observe(htu, response)
            status = response.status_code
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s %s -> %d (jti=%s, jkt=%s)",
                    request.method, htu, status, prepared.jti, self.jkt,
                )  # fmt: skip
            if status != 401:
                return
            error = _dpop_challenge_error(response.headers)
            where = f"{request.method} {htu}"
            if error == "use_dpop_nonce":
                if nonce_retried:
                    raise UseDPoPNonceError(
                        f"{where} demanded a new DPoP nonce again right after one was sent; "
                        "giving up instead of looping (check the server's nonce handling; "
                        f"{self._skew_note()})"
                    )
                nonce = self._demanded_nonce(response, nonce, where)
                _require_rewindable(request, where, "use_dpop_nonce", UseDPoPNonceError)
                nonce_retried = True
                logger.info("%s demanded a DPoP nonce; retrying once", where)
            elif error == "invalid_token":
                if renewed:
                    raise OAuthError(
                        f"{where} rejected a freshly issued token too (401 invalid_token); "
                        "check that the token's audience/resource and scope fit this API and "
                        f"that the API trusts the authorization server {self._source.htu}"
                    )
                _require_rewindable(request, where, "invalid_token", OAuthError)
                renewed = True
                logger.info("%s answered 401 invalid_token; renewing the token once", where)
                token = yield from self._token(token, timeout)
                nonce = self._nonces.get(htu)
            else:
                if error == "invalid_dpop_proof":
                    logger.warning(
                        "%s rejected the DPoP proof (jti=%s, jkt=%s; %s)",
                        where, prepared.jti, self.jkt, self._skew_note(),
                    )  # fmt: skip
                return

    def _token(self, rejected: AccessToken | None, timeout: object) -> _Flow[AccessToken]:
        token = self._fresh(rejected)
        if token is not None:
            return token
        current = self._usable(rejected)
        if current is not None:
            token = yield from self._renew(current, rejected, timeout)
            return token
        # No token we can send: wait for the fetch in progress, or make one.
        seen = self._fetches
        self._raise_while_backing_off()
        yield _Lock.ACQUIRE
        # Whoever held the lock before us may have fetched a token already: single flight.
        token = self._usable(rejected)
        if token is None:
            failure = self._failure
            if failure is not None and self._fetches != seen:
                # The fetch we waited for failed: single flight for failures too, or each
                # waiter would try in turn, one timeout after another.
                raise self._shared(failure)
            self._raise_while_backing_off()
            token = yield from self._fetch_shared(timeout)
        yield _Lock.RELEASE
        return token

    def _renew(
        self, current: AccessToken, rejected: AccessToken | None, timeout: object
    ) -> _Flow[AccessToken]:
        """Renew a token that is due but still valid; whatever happens, return a valid one."""
        if self._backing_off():
            return current
        # Never wait here: whoever holds the lock is fetching, and ``current`` is still good.
        if not (yield _Lock.TRY_ACQUIRE):
            return current
        token = self._fresh(rejected)
        if token is None and not self._backing_off():
            try:
                token = yield from self._fetch_shared(timeout)
            except OAuthError as exc:
                cached = self._cached
                left = (
                    "unknown"
                    if cached is None or cached.expire_at is None
                    else f"{cached.expire_at - self._clock():.0f} s"
                )
                logger.warning(
                    "renewing the token failed; using the current one (valid for %s more): %s",
                    left, exc.message,
                )  # fmt: skip
        yield _Lock.RELEASE
        return current if token is None else token

    def _authorization(self, token: AccessToken) -> str:
        cached = self._cached
        if cached is not None and cached.token is token:
            return cached.authorization
        return f"{token.scheme} {token.value}"

    def _fresh(self, rejected: AccessToken | None) -> AccessToken | None:
        """The cached token if it is not due for renewal (and not ``rejected``)."""
        cached = self._cached
        if cached is None or cached.token is rejected:
            return None
        if cached.renew_at is not None and self._clock() >= cached.renew_at:
            return None
        return cached.token

    def _usable(self, rejected: AccessToken | None) -> AccessToken | None:
        """The cached token if it can still be sent, due for renewal or not."""
        cached = self._cached
        if cached is None or cached.token is rejected:
            return None
        if cached.expire_at is not None and self._clock() >= cached.expire_at:
            return None
        return cached.token

    def _backing_off(self) -> bool:
        failure = self._failure
        return failure is not None and self._clock() < failure.retry_at

    def _raise_while_backing_off(self) -> None:
        failure = self._failure
        if failure is not None and self._clock() < failure.retry_at:
            raise self._shared(failure)

    def _shared(self, failure: _Failure) -> OAuthError:
        """A new error like ``failure.error`` for one more caller (one instance per raise)."""
        wait = max(0.0, failure.retry_at - self._clock())
        original = failure.error
        message = (
            f"{original.message} (the token request this waited for failed)"
            if wait <= 0
            else f"{original.message} (the last token request failed; {failure.count} in a "
            f"row; the next is sent in {wait:.1f} s at the earliest)"
        )
        error: OAuthError
        if isinstance(original, TokenEndpointError):
            error = TokenEndpointError(
                message,
                error=original.error,
                error_description=original.error_description,
                status=original.status,
            )
        else:
            error = type(original)(message)
        error.retry_after = wait if original.retry_after is not None else None
        error.__cause__ = original
        return error

    def _fetch_shared(self, timeout: object) -> _Flow[AccessToken]:
        """`_fetch_token`, its outcome recorded for the callers waiting on the lock."""
        try:
            token = yield from self._fetch_token(timeout)
        except OAuthError as exc:
            self._failed(exc)
            raise
        self._failure = None
        self._fetches += 1
        return token

    def _failed(self, error: OAuthError) -> None:
        previous = self._failure
        count = 1 if previous is None else previous.count + 1
        hint = error.retry_after  # the server's Retry-After, set by _fetch_token
        delay = 0.0
        if hint is not None or _unavailable(error):
            # Exponential backoff with "equal jitter": half the ceiling plus up to half at
            # random, so that clients that failed together do not come back together.
            ceiling = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2.0 ** min(count - 1, 16))
            delay = ceiling / 2 + _random.uniform(0.0, ceiling / 2)
            if hint is not None:
                delay = max(delay, min(hint, _RETRY_AFTER_CAP))
            error.retry_after = delay
        # A refusal (bad credentials, a nonce or clock problem) is shared with the requests
        # that waited for this fetch but not backed off: the next attempt carries what this
        # one taught (nonce, clock offset), and asking again is how such errors clear.
        self._failure = _Failure(error, count, self._clock() + delay)
        self._fetches += 1
        logger.warning(
            "token request to %s failed (%d in a row); the next one in %.1f s at the earliest",
            self._source.htu, count, delay,
        )  # fmt: skip

    def _fetch_token(self, timeout: object) -> _Flow[AccessToken]:
        where = f"token endpoint {self._source.htu}"
        nonce = self._nonces.get(self._source.htu)
        response = yield from self._token_attempt(nonce, timeout)
        try:
            return self._accept(response)
        except TokenEndpointError as exc:
            if exc.error != "use_dpop_nonce":
                raise _with_retry_after(self._with_skew(exc), response) from exc
            nonce = self._demanded_nonce(response, nonce, where)
        except OAuthError as exc:
            _with_retry_after(exc, response)
            raise
        logger.info("%s demanded a DPoP nonce; retrying once", where)
        response = yield from self._token_attempt(nonce, timeout)
        try:
            return self._accept(response)
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

    def _token_attempt(self, nonce: str | None, timeout: object) -> _Flow[httpx.Response]:
        source = self._source
        prepared = self._proofs.prepare("POST", source.htu, nonce=nonce)
        signature = yield _Sign(self._signer, prepared.signing_input.encode("ascii"))
        assertion = None
        if source.assertion_signer is not None:
            # A fresh assertion (new jti) per attempt: servers refuse a replayed one.
            unsigned = source.assertion_signing_input(self._clock() + self._proofs.clock_offset)
            assertion_signature = yield _Sign(source.assertion_signer, unsigned.encode("ascii"))
            assertion = source.finish_assertion(unsigned, assertion_signature)
        request = source.build_request(
            proof=self._proofs.finish(prepared, signature), client_assertion=assertion
        )
        if timeout is not None:
            request.extensions["timeout"] = timeout
        self._token_requests += 1
        response: httpx.Response = yield _Send(request, token_request=True)
        self._observe(source.htu, response)
        logger.info(
            "token request %d to %s -> %d (jti=%s, jkt=%s)",
            self._token_requests, source.htu, response.status_code, prepared.jti, self.jkt,
        )  # fmt: skip
        return response

    def _accept(self, response: httpx.Response) -> AccessToken:
        now = self._clock()
        token = self._source.parse(response, now=now)
        renew_at = expire_at = None
        if token.expires_at is not None:
            lifetime = token.expires_at - now
            expire_at = token.expires_at - min(_EXPIRY_MARGIN, lifetime / 4)
            renew_at = min(expire_at, token.expires_at - min(self._leeway, lifetime / 2))
        self._cached = _Cached(token, renew_at, expire_at, f"{token.scheme} {token.value}")
        logger.info(
            "got a %s token (expires in %s, scope %r, jkt=%s)",
            token.token_type,
            "unknown" if token.expires_at is None else f"{token.expires_at - now:.0f} s",
            token.scope, self.jkt,
        )  # fmt: skip
        return token

    def _observe(self, htu: str, response: httpx.Response) -> None:
        # One pass over the raw headers: each httpx Headers lookup scans them all anyway, and
        # this runs for every response.
        nonce = date = None
        cached = False
        for key, value in response.headers.raw:
            name = key.lower()
            if name == b"dpop-nonce":
                nonce = value.decode("latin-1")
            elif name == b"date":
                date = value.decode("latin-1")
            elif name == b"age":
                cached = True
        if nonce is not None:
            self._nonces.learn(htu, {"dpop-nonce": nonce})
        if date is not None and date != self._last_date and not cached:
            # A cached response (Age) carries an old Date: it says nothing about the clock.
            self._last_date = date
            self._learn_skew(htu, date)

    def _learn_skew(self, htu: str, date: str) -> None:
        try:
            server = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        # Date is truncated to the second: the server's clock is on average half a second on.
        skew = server + 0.5 - self._clock()
        self._skew = skew
        offset = skew if abs(skew) >= _MIN_SKEW else 0.0
        if abs(offset - self._proofs.clock_offset) >= 1.0:
            logger.info(
                "clock offset to %s from its Date header: %+.1f s; using it for DPoP iat",
                htu, offset,
            )  # fmt: skip
        self._proofs.clock_offset = offset

    def _skew_note(self) -> str:
        if self._skew is None:
            return "no Date header seen, so iat uses the local clock"
        return (
            f"clock offset to the server from its Date header: {self._skew:+.0f} s, "
            f"applied to iat: {self._proofs.clock_offset:+.0f} s"
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

    def _demanded_nonce(self, response: httpx.Response, sent: str | None, where: str) -> str:
        nonce: str | None = response.headers.get("dpop-nonce")
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


def _record(flow: _Flow[Any], error: OAuthError) -> None:
    """Hand a flow that is being closed the failure of its token request, to be recorded.

    The flow records it (shared with waiters, backoff) and re-raises it, or carries on with a
    still-valid token; either way the driver ends the flow and raises its own error.
    """
    with contextlib.suppress(OAuthError, StopIteration):
        flow.throw(error)


def _unavailable(error: OAuthError) -> bool:
    """True if ``error`` says the token endpoint is down or overloaded: worth backing off."""
    if isinstance(error, ServerUnreachableError):  # transport error, timeout, bare 5xx
        return True
    return isinstance(error, TokenEndpointError) and (error.status == 429 or error.status >= 500)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _with_retry_after(error: OAuthError, response: httpx.Response) -> OAuthError:
    """``error`` with the response's ``Retry-After`` (RFC 9110 §10.2.3) in ``retry_after``."""
    value = response.headers.get("retry-after")
    if value is None:
        return error
    value = value.strip()
    seconds: float | None = None
    if value.isdigit():  # delay-seconds = 1*DIGIT
        seconds = float(min(int(value[:9]), 10**8))
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            seconds = None
    if seconds is not None:
        error.retry_after = max(0.0, seconds)
    return error


def _timeout_of(client: httpx.Client | httpx.AsyncClient) -> dict[str, float | None]:
    # What client.build_request would attach; client.send of a ready Request does not.
    return client.timeout.as_dict()


def _dpop_challenge_error(headers: httpx.Headers) -> str | None:
    """The ``error`` of a ``DPoP`` challenge in ``WWW-Authenticate`` (RFC 9449 §7.1), or None."""
    for value in headers.get_list("www-authenticate"):
        for scheme, params in _challenges(value):
            if scheme == "dpop":
                return params.get("error")
    return None


def _challenges(value: str) -> list[tuple[str, dict[str, str]]]:
    """Parse RFC 9110 §11.6.1 challenges: ``scheme [token68 | #auth-param]`` separated by ``,``.

    Tolerant by design: anything unparseable ends the current challenge, never raises.
    Scheme names come back lower-cased (they are case-insensitive, RFC 9110 §11.1).
    """
    result: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(value)
    params: dict[str, str] = {}
    while i < n:
        while i < n and value[i] in " \t,":
            i += 1
        start = i
        while i < n and value[i] not in " \t,=":
            i += 1
        word = value[start:i]
        j = i
        while j < n and value[j] in " \t":
            j += 1
        if not word:
            i = j + 1
            continue
        if j < n and value[j] == "=" and result:
            # name=value inside the current challenge
            j += 1
            while j < n and value[j] in " \t":
                j += 1
            if j < n and value[j] == '"':
                j += 1
                chars: list[str] = []
                while j < n and value[j] != '"':
                    if value[j] == "\\" and j + 1 < n:
                        j += 1
                    chars.append(value[j])
                    j += 1
                params[word.lower()] = "".join(chars)
                i = j + 1
            else:
                start = j
                while j < n and value[j] not in " \t,":
                    j += 1
                params[word.lower()] = value[start:j]
                i = j
            continue
        # a new challenge (or a token68 after a scheme, which carries no error param)
        if i < n and value[i] == "=":
            while i < n and value[i] == "=":
                i += 1
            continue
        params = {}
        result.append((word.lower(), params))
        i = j
    return result


def _require_rewindable(
    request: httpx.Request, where: str, error: str, kind: type[OAuthError]
) -> None:
    if _rewindable(request.stream):
        return
    raise kind(
        f"{where} answered 401 {error} and needs the request once more, but its body is a "
        "one-shot stream that was already sent and is not re-sent silently; pass the body as "
        "bytes (content=...) or call request.read() before sending"
    )


def _rewindable(stream: object) -> bool:
    if isinstance(stream, httpx.ByteStream):
        return True
    # httpx re-renders multipart bodies from the start each time (it seeks file objects back),
    # which works when every file is in memory or seekable.
    fields = getattr(stream, "fields", None)
    if type(stream).__name__ != "MultipartStream" or not isinstance(fields, list):
        return False
    for field in fields:
        file = getattr(field, "file", None)
        if file is None or isinstance(file, bytes | str):
            continue
        seekable = getattr(file, "seekable", None)
        if not (callable(seekable) and seekable()):
            return False
    return True
