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

The protocol logic lives in `dpop_signer.flow`: plain generators that do no I/O, do not sign
and take no locks, shared with the ``requests`` and ``aiohttp`` drivers
(`dpop_signer.requests`, `dpop_signer.aiohttp`). The token cache, the outcome of the last
fetch and the backoff are a `dpop_signer.tokens.TokenCache`, updated only by the generator that
holds the fetch lock. `drive_sync` and `drive_async` sign and lock; this module only sends
through httpx: `sync_auth_flow`, `get_token` and `headers` over the one sync driver,
`async_auth_flow`, `aget_token` and `aheaders` over the one async driver.

`rotate` swaps the DPoP key while requests run: tokens are cached with the key they are bound
to, and every proof is signed with the key of the token it goes with (see `dpop_signer.flow`).

Logs (``logging.getLogger("dpop_signer")``) carry status codes, ``jti``, ``jkt``, token request
counts and clock offsets; never a token, proof, nonce or secret.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from typing import Any, TypeVar

import httpx

from dpop_signer.errors import OAuthError
from dpop_signer.flow import (
    DPoPFlow,
    Exchange,
    Flow,
    FlowClient,
    SendApi,
    answer_of_httpx,
    cancelling,
    drive_async,
    drive_sync,
)
from dpop_signer.nonces import NonceCache
from dpop_signer.signers.base import Signer
from dpop_signer.stores import TokenStore
from dpop_signer.tokens import (
    AccessToken,
    AssertionAudience,
    CachedToken,
    ClientAuth,
)

__all__ = ["DPoPAuth"]

logger = logging.getLogger("dpop_signer")

T = TypeVar("T")

_MAX_TOKEN_SENDS = 8
"""A token fetch sends at most two requests (nonce retry); the loops are bounded anyway."""


class DPoPAuth(FlowClient, httpx.Auth):
    """DPoP (RFC 9449) with client_credentials tokens for `httpx.Client` and `httpx.AsyncClient`.

    Args:
        signer: The DPoP key (PKCS#11 or PEM); it signs every proof.
        token_url: The authorization server's token endpoint.
        client_id: The OAuth client id.
        client_secret: For ``client_secret_basic`` / ``client_secret_post``.
        scope: Space-separated scopes to ask for.
        client_auth: ``client_secret_basic`` (default), ``client_secret_post``,
            ``private_key_jwt`` or ``none`` (see `dpop_signer.tokens`).
        assertion_signer: Signs ``private_key_jwt`` assertions; defaults to ``signer`` (and
            then follows `rotate`).
        resource: RFC 8707 resource indicator(s) for the token request.
        audience: An ``audience`` token request parameter.
        issuer: The authorization server's issuer identifier (RFC 8414 §2), e.g. from
            `dpop_signer.discovery.discover`; the ``aud`` of ``private_key_jwt`` assertions.
        assertion_audience: ``"issuer"`` (default, draft-ietf-oauth-rfc7523bis) or
            ``"token_endpoint"`` for servers that still demand the token endpoint URL.
        leeway: Renew this many seconds before the token expires (at most half its lifetime).
            Renewal does not hold up requests while the token is still valid.
        accept_bearer: Accept a ``Bearer`` token from the token endpoint (sent with the
            ``Bearer`` scheme, still with a proof). Off: a downgrade is an error.
        nonces: A shared `NonceCache`; by default each auth has its own.
        clock: Seconds since the epoch, for expiry, backoff, ``iat`` and clock offsets.
        max_in_flight: Requests of this auth that may be past signing at once; the others
            wait before they sign, not after. Set it to the client's
            ``limits.max_connections`` (httpx's default is 100); ``None``: no bound.
        token_store: Where the token, its fetch lease and failures, and the nonces are shared:
            ``memory`` (this auth only, the default), ``sqlite:PATH`` (the processes of one
            host), ``redis://[user:password@]host:port/db`` or ``rediss://...?ca=PATH`` (many
            hosts), or a `dpop_signer.stores.TokenStore` object (shared by the auths given
            it, closed by its owner). One token fetch at a time across every process using the
            store; the others take its token or its failure (see `dpop_signer.flow`). A store
            that goes away never fails a request (`dpop_signer.stores.FallbackStore`).
        proofs_ahead: Make the next proof for a repeated (method, URL) ahead of time, while
            the caller does other work, so that a request does not wait for its signature
            (`dpop_signer.ahead` has the rules: used once, for the same token, nonce and key,
            within 2 s). ``None`` (default): on for a PKCS#11 key, off for a PEM key.

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
        issuer: str | None = None,
        assertion_audience: AssertionAudience = "issuer",
        leeway: float = 30.0,
        accept_bearer: bool = False,
        nonces: NonceCache | None = None,
        clock: Callable[[], float] = time.time,
        max_in_flight: int | None = 100,
        proofs_ahead: bool | None = None,
        token_store: str | TokenStore = "memory",
    ) -> None:
        self._flow = DPoPFlow(
            signer,
            token_url=token_url,
            client_id=client_id,
            client_secret=client_secret,
            scope=scope,
            client_auth=client_auth,
            assertion_signer=assertion_signer,
            resource=resource,
            audience=audience,
            issuer=issuer,
            assertion_audience=assertion_audience,
            leeway=leeway,
            accept_bearer=accept_bearer,
            nonces=nonces,
            clock=clock,
            max_in_flight=max_in_flight,
            proofs_ahead=proofs_ahead,
            token_store=token_store,
        )

    # -- public surface ---------------------------------------------------------------------

    def get_token(self, client: httpx.Client) -> AccessToken:
        """The current token: cached, or fetched through ``client`` (one fetch at a time).

        A token that is due for renewal but still valid is returned when the renewal fails.

        Raises:
            OAuthError: the token endpoint refused, failed or could not be reached, now or in
                the fetch this call waited for, or it is backing off after such a failure
                (``retry_after`` says for how long).
            SignerError: the signer failed.
        """
        flow = self._flow
        return self._exchange(client, flow.token_flow(None, client.timeout.as_dict())).token

    async def aget_token(self, client: httpx.AsyncClient) -> AccessToken:
        """`get_token` for `httpx.AsyncClient` (signs through the signer's async path)."""
        flow = self._flow
        entry: CachedToken = await self._aexchange(
            client, flow.token_flow(None, client.timeout.as_dict())
        )
        return entry.token

    def headers(
        self, client: httpx.Client, htm: str, htu: str, *, nonce: str | None = None
    ) -> dict[str, str]:
        """``Authorization`` and ``DPoP`` headers for one request sent by someone else.

        The proof has ``ath`` and the nonce known for ``htu``'s origin (or ``nonce``, used for
        this proof only and not remembered), and is signed with the key of the token it goes
        with, also across a `rotate`. Nonce challenges and 401s of that request are the
        caller's to handle (this is what ``dpop token`` and the service's ``/v1/headers`` use).

        Raises:
            ProofError: ``htm`` or ``htu`` is malformed.
            OAuthError: the token could not be obtained.
        """
        flow = self._flow.headers_flow(htm, htu, client.timeout.as_dict(), nonce)
        return self._exchange(client, flow)

    async def aheaders(
        self, client: httpx.AsyncClient, htm: str, htu: str, *, nonce: str | None = None
    ) -> dict[str, str]:
        """`headers` for `httpx.AsyncClient`."""
        flow = self._flow.headers_flow(htm, htu, client.timeout.as_dict(), nonce)
        headers: dict[str, str] = await self._aexchange(client, flow)
        return headers

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """The synchronous flow (httpx calls `sync_auth_flow` / `async_auth_flow` instead)."""
        return self.sync_auth_flow(request)

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Drive the flow for `httpx.Client`: sign inline, a thread lock around token fetches."""
        flow = self._api_flow(request)
        return self._httpx_sync(drive_sync(flow, self._flow.sync_gate), request)

    def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Drive the flow for `httpx.AsyncClient`: async signing, a per-loop asyncio lock."""
        runner = drive_async(self._api_flow(request), self._flow.async_gate())
        return self._httpx_async(runner, request)

    # -- httpx drivers: send, read token bodies, translate answers --------------------------

    def _api_flow(self, request: httpx.Request) -> Flow[None]:
        # The token request gets the API request's timeouts (the client's timeout= setting).
        return self._flow.request_flow(
            request.method,
            request.url,
            lambda: _rewindable(request.stream),
            request.extensions.get("timeout"),
        )

    def _exchange(self, client: httpx.Client, flow: Flow[T]) -> T:
        """Run a flow whose only sends are token requests through ``client``."""
        runner = self._httpx_sync(drive_sync(flow, self._flow.sync_gate), None)
        try:
            request = next(runner)
            for _ in range(_MAX_TOKEN_SENDS):
                try:
                    # auth=None: the token request must not go through this auth (or any other).
                    response = client.send(request, auth=None)
                except httpx.TransportError as exc:
                    # Into the flow: it records the failure for everyone and may still answer
                    # with a token that has not expired.
                    request = runner.throw(self._flow.unreachable(exc))
                    continue
                request = runner.send(response)
            raise RuntimeError("token fetch did not finish; this is a bug in dpop-signer")
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            runner.close()

    async def _aexchange(self, client: httpx.AsyncClient, flow: Flow[Any]) -> Any:
        """`_exchange` for `httpx.AsyncClient`."""
        result: list[Any] = []
        runner = self._httpx_async(drive_async(flow, self._flow.async_gate(), result), None)
        try:
            request = await anext(runner)
            for _ in range(_MAX_TOKEN_SENDS):
                try:
                    response = await client.send(request, auth=None)
                except httpx.TransportError as exc:
                    request = await runner.athrow(self._flow.unreachable(exc))
                    continue
                request = await runner.asend(response)
            raise RuntimeError("token fetch did not finish; this is a bug in dpop-signer")
        except StopAsyncIteration:
            return result[0]
        finally:
            await runner.aclose()

    def _httpx_sync(
        self, runner: Generator[Exchange, Any, T], request: httpx.Request | None
    ) -> Generator[httpx.Request, httpx.Response, T]:
        """Send what ``runner`` asks for as httpx requests (``request`` is the API request)."""
        try:
            step = next(runner)
            while True:
                if isinstance(step, SendApi):
                    assert request is not None  # only request flows send the API request
                    request.headers["Authorization"] = step.authorization
                    request.headers["DPoP"] = step.proof
                    response = yield request
                    step = runner.send(answer_of_httpx(response))
                    continue
                try:
                    response = yield step.request
                except GeneratorExit as exit_:
                    # The client closes the flow when sending failed; a transport error on
                    # the token request is the token endpoint being unreachable.
                    cause = exit_.__context__
                    if isinstance(cause, httpx.TransportError):
                        unreachable = self._flow.unreachable(cause)
                        _record(runner, unreachable)
                        raise unreachable from cause
                    raise
                except OAuthError as exc:  # thrown in by _exchange: the send failed
                    step = runner.throw(exc)
                    continue
                try:
                    response.read()
                except httpx.TransportError as exc:
                    step = runner.throw(self._flow.unreachable(exc))
                    continue
                step = runner.send(response)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            runner.close()

    async def _httpx_async(
        self, runner: AsyncGenerator[Exchange, Any], request: httpx.Request | None
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """`_httpx_sync` for `httpx.AsyncClient`."""
        try:
            step = await anext(runner)
            while True:
                if isinstance(step, SendApi):
                    assert request is not None
                    request.headers["Authorization"] = step.authorization
                    request.headers["DPoP"] = step.proof
                    response = yield request
                    step = await runner.asend(answer_of_httpx(response))
                    continue
                try:
                    response = yield step.request
                except GeneratorExit:
                    # Unlike the sync driver, the cause cannot be seen here: aclose() throws
                    # GeneratorExit into an async generator without the exception that caused
                    # it, so httpx's own error reaches the caller unchanged. Not a
                    # cancellation: the send failed, and the waiters must know.
                    if not cancelling():
                        with contextlib.suppress(OAuthError, StopAsyncIteration):
                            await runner.athrow(self._flow.token_request_failed())
                    raise
                except OAuthError as exc:  # thrown in by _aexchange: the send failed
                    step = await runner.athrow(exc)
                    continue
                try:
                    await response.aread()
                except httpx.TransportError as exc:
                    step = await runner.athrow(self._flow.unreachable(exc))
                    continue
                step = await runner.asend(response)
        except StopAsyncIteration:
            return
        finally:
            await runner.aclose()


def _record(runner: Generator[Exchange, Any, Any], error: OAuthError) -> None:
    """Hand a flow that is being closed the failure of its token request, to be recorded.

    The flow records it (shared with waiters, backoff) and re-raises it, or carries on with a
    still-valid token; either way the driver ends the flow and raises its own error.
    """
    with contextlib.suppress(OAuthError, StopIteration):
        runner.throw(error)


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
