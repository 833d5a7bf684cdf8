"""``dpop proxy``: a reverse proxy that adds the DPoP token and a fresh proof to each request.

``curl http://127.0.0.1:PORT/path?q`` reaches ``UPSTREAM/path?q`` with ``Authorization: DPoP
<token>`` and ``DPoP: <proof>`` made by `DPoPAuth` inside one long-lived `httpx.AsyncClient`,
so token caching and renewal, nonce demands (RFC 9449 §9) and the one forced renewal after a
401 ``invalid_token`` all happen here, invisibly to the caller.

The caller's path stays below the upstream's base path: dot-segments (``..``, ``%2e%2e``,
``.%2E`` ...) are resolved before the join (RFC 3986 §5.2.4) and a path that climbs above the
base is refused with 400 ``path_outside_upstream``, as is a segment that hides ``..`` behind an
encoded ``/`` or a backslash (an upstream may decode either); the joined URL is checked again,
so nothing the URL library normalizes afterwards can leave the base either.

Bodies are streamed both ways: the request body goes upstream as it arrives and the response
comes back chunk by chunk (``aiter_raw``: content encodings pass through untouched). The first
part of the body is read before the upstream is contacted, so a body whose framing the server
rejected (a bad chunk) or a caller gone before sending one never reaches the upstream. A nonce
demand or a token renewal makes `DPoPAuth` send the request again, and a streamed body cannot
be read twice, so the body is also copied into a replay buffer as it streams. Bodies up to
``replay_limit`` bytes (8 MiB by default) are therefore retried transparently, as long as all
buffers together stay within ``replay_total`` (`ReplayBudget`); beyond either, the body streams
without a copy, the retry is impossible, the caller gets 502 ``retry_impossible`` and, because
the nonce or the new token is cached by then, its own retry succeeds.

A token endpoint that cannot be reached is reported as ``token_endpoint_unreachable`` (naming
it), not as the upstream's fault.

Hop-by-hop headers (RFC 9110 §7.6.1) are dropped both ways, as are the caller's
``Authorization``, ``DPoP`` and ``Proxy-Authorization``. With API keys the caller presents one
in ``Proxy-Authorization: Bearer <key>`` (407 otherwise). The proxy has no endpoints of its own:
every path belongs to the upstream.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpop_signer.errors import DPoPSignerError, ServerUnreachableError
from dpop_signer.jose import peek_claims
from dpop_signer.service.http import ApiError, LoopbackHostMiddleware, error_for
from dpop_signer.service.logs import log_event
from dpop_signer.service.metrics import Metrics
from dpop_signer.service.reload import KeyBundle
from dpop_signer.service.security import ApiKeys

__all__ = [
    "DEFAULT_REPLAY_LIMIT",
    "DEFAULT_REPLAY_TOTAL",
    "ProxyState",
    "ReplayBudget",
    "create_proxy_app",
]

DEFAULT_REPLAY_LIMIT = 8 * 1024 * 1024
DEFAULT_REPLAY_TOTAL = 32 * 1024 * 1024

# RFC 9110 §7.6.1 hop-by-hop fields, plus what the proxy itself sets or consumes.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "authorization", "dpop", "expect"}


class RetryImpossibleError(Exception):
    """The request must be sent again but its streamed body was too large to keep."""


class ClientGoneError(Exception):
    """The caller disconnected while its request body was streaming."""


class ReplayBudget:
    """The bytes all replay buffers together may hold (one event loop: no lock needed)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when that would exceed the total."""
        if self.used + size > self.total:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        """Return ``size`` reserved bytes."""
        self.used -= size


class ReplayableBody(httpx.ByteStream):
    """A request body read once from the ASGI ``receive`` and kept for one replay.

    Iterating the first time streams the caller's body and copies it into a buffer while the
    total stays within ``limit`` and ``budget`` grants the bytes; iterating again replays the
    buffer, or raises `RetryImpossibleError` when the body outgrew it. ``first`` is a message
    already received. It is an `httpx.ByteStream` because that is how httpx (and `DPoPAuth`,
    before it retries) recognises a body that can be sent again. `release` returns the
    buffer's bytes to the budget.
    """

    def __init__(
        self, receive: Receive, limit: int, budget: ReplayBudget, first: Message | None = None
    ) -> None:
        super().__init__(b"")
        self._receive = receive
        self._limit = limit
        self._budget = budget
        self._first = first
        self._buffer: list[bytes] | None = []
        self._size = 0
        self._held = 0
        self._started = False
        self._complete = False

    def release(self) -> None:
        """Drop the buffer (no replay after this) and return its bytes to the budget."""
        self._buffer = None
        self._budget.give(self._held)
        self._held = 0

    def __iter__(self) -> Iterator[bytes]:
        """Not for sync clients: the body arrives through an event loop."""
        raise RuntimeError("ReplayableBody is read by httpx.AsyncClient only")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """The body's chunks: from the caller the first time, from the buffer after that."""
        if self._started:
            if not self._complete or self._buffer is None:
                raise RetryImpossibleError
            for chunk in self._buffer:
                yield chunk
            return
        self._started = True
        while True:
            message, self._first = self._first or await self._receive(), None
            if message["type"] == "http.disconnect":
                raise ClientGoneError
            chunk = message.get("body", b"")
            if chunk:
                self._size += len(chunk)
                if self._buffer is not None:
                    if self._size <= self._limit and self._budget.take(len(chunk)):
                        self._held += len(chunk)
                        self._buffer.append(chunk)
                    else:
                        self.release()  # too large to replay: stop holding it
                yield chunk
            if not message.get("more_body", False):
                break
        self._complete = True


@dataclass
class ProxyState:
    """What the proxy uses; built once by `dpop_signer.service.commands`.

    Attributes:
        upstream: base URL every request is forwarded to (its path is a prefix).
        make_client: builds the `httpx.AsyncClient` at startup.
        key: the key and its `DPoPAuth` (every request is sent with ``auth=key.auth``),
            swapped whole on reload; a request takes it once, at its start.
        api_keys: keys a caller must present in ``Proxy-Authorization``; None for none.
        replay_limit: largest request body kept for a transparent retry.
        replay_budget: bytes all replay buffers together may hold.
        metrics: counters (token requests, errors).
    """

    upstream: httpx.URL
    make_client: Callable[[], httpx.AsyncClient]
    key: KeyBundle
    api_keys: ApiKeys | None = None
    replay_limit: int = DEFAULT_REPLAY_LIMIT
    replay_budget: ReplayBudget = field(default_factory=lambda: ReplayBudget(DEFAULT_REPLAY_TOTAL))
    metrics: Metrics = field(default_factory=Metrics)
    client: httpx.AsyncClient | None = None


_OUTSIDE = ApiError(
    400,
    "path_outside_upstream",
    "the request path climbs above the upstream base path with '..' segments; send a path below it",
)
# A '..' behind an encoded slash or a backslash, or encoded twice: some servers decode again,
# or split on those.
_HIDDEN_DOTS = re.compile(rb"(^|[/\\])\.\.([/\\]|$)")
_DECODE_ROUNDS = 3


def _resolve_dots(raw_path: bytes) -> bytes:
    """``raw_path`` with its dot-segments removed (RFC 3986 §5.2.4), encoded ones included.

    Raises:
        ApiError: a '..' climbs above the root, or one hides inside a segment.
    """
    segments = raw_path.split(b"/")[1:]
    resolved: list[bytes] = []
    for number, segment in enumerate(segments, 1):
        decoded = urllib.parse.unquote_to_bytes(segment) if b"%" in segment else segment
        if decoded in (b".", b".."):
            if decoded == b"..":
                if not resolved:
                    raise _OUTSIDE
                resolved.pop()
            if number == len(segments):
                resolved.append(b"")  # "/a/b/.." is "/a/", a directory, like the RFC's
            continue
        for _ in range(_DECODE_ROUNDS):
            if _HIDDEN_DOTS.search(decoded):
                raise _OUTSIDE
            if b"%" not in decoded:
                break
            decoded = urllib.parse.unquote_to_bytes(decoded)
        else:
            if _HIDDEN_DOTS.search(decoded):
                raise _OUTSIDE
        resolved.append(segment)
    return b"/" + b"/".join(resolved)


def _upstream_url(base: httpx.URL, raw_path: bytes, query: bytes) -> httpx.URL:
    prefix = base.raw_path.partition(b"?")[0].rstrip(b"/")
    target = prefix + _resolve_dots(raw_path)
    if query:
        target += b"?" + query
    url = base.copy_with(raw_path=target)
    # Whatever the URL library normalized, the result must still be below the base path.
    joined = url.raw_path.partition(b"?")[0]
    if not (joined == prefix or joined.startswith(prefix + b"/")):
        raise _OUTSIDE
    return url


def _filter_headers(
    raw: list[tuple[bytes, bytes]], excluded: frozenset[str]
) -> list[tuple[bytes, bytes]]:
    # Hop-by-hop headers end at this hop (RFC 9110 §7.6.1), and so does every header the
    # Connection header names.
    named_in_connection = {
        token.strip().lower()
        for name, value in raw
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [
        (name, value)
        for name, value in raw
        if name.lower().decode("latin-1") not in excluded
        and name.lower() not in named_in_connection
    ]


class ProxyApp:
    """The ASGI application of ``dpop proxy``."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve lifespan and HTTP; anything else is not for us."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.state.client = self.state.make_client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.state.client is not None:
                    await self.state.client.aclose()
                self.state.key.close()
                log_event("stopped")
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request(scope)
        client = scope.get("client")
        caller = f"{client[0]}:{client[1]}" if client and client[0] else "unix"
        fields: dict[str, Any] = {"caller": caller, "method": scope["method"]}
        try:
            with self.state.key.in_use() as bundle:
                status = await self._forward(scope, receive, send, request, fields, bundle)
        except ApiError as error:
            self.state.metrics.errors[error.code] += 1
            status = error.status
            await _send_error(send, error)
        fields["status"] = status
        fields["ms"] = round((time.perf_counter() - started) * 1000, 2)
        log_event("proxy", logging.INFO, **fields)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: Request,
        fields: dict[str, Any],
        bundle: KeyBundle,
    ) -> int:
        state = self.state
        if state.api_keys is not None:
            fields["api_key"] = state.api_keys.match(request.headers.get("proxy-authorization"))
            if fields["api_key"] is None:
                raise ApiError(
                    407,
                    "unauthorized",
                    "missing or wrong API key; send 'Proxy-Authorization: Bearer <key from the "
                    "API key file>'",
                    {"Proxy-Authenticate": 'Bearer realm="dpop-proxy"'},
                )
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("ascii")
        if not raw_path.startswith(b"/"):
            raise ApiError(400, "invalid_request", "the request target must be a path (/...)")
        assert state.client is not None
        url = _upstream_url(state.upstream, raw_path, scope.get("query_string", b""))
        headers = _filter_headers(list(scope["headers"]), _NOT_FORWARDED)
        if not any(name.lower() == b"accept-encoding" for name, _ in headers):
            # httpx would ask for gzip on our behalf and the caller would get bytes it did
            # not ask for: the body is passed through raw.
            headers.append((b"accept-encoding", b"identity"))
        chunked = "transfer-encoding" in request.headers
        has_body = chunked or request.headers.get("content-length", "0") != "0"
        if chunked and "content-length" not in request.headers:
            # The caller's framing is hop-by-hop and was dropped; frame the stream again.
            headers.append((b"transfer-encoding", b"chunked"))
        fields["path"] = scope["path"]
        body: httpx.ByteStream = httpx.ByteStream(b"")
        if has_body:
            # The first part of the body before the upstream hears of the request: a caller
            # whose framing the server refused (a bad chunk) is gone by then, and a caller gone
            # is not worth a request upstream.
            first = await receive()
            if first["type"] == "http.disconnect":
                fields["error"] = "client_gone"
                return 499
            body = ReplayableBody(receive, state.replay_limit, state.replay_budget, first)
        try:
            response = await self._send(url, scope["method"], headers, body, fields, bundle)
        except ClientGoneError:
            fields["error"] = "client_gone"
            return 499  # nginx's code for "client closed request": nobody reads the answer
        finally:
            if isinstance(body, ReplayableBody):
                body.release()  # the auth flow is over: no replay can be needed any more
        try:
            proof = response.request.headers.get("dpop")
            if proof:
                claims = peek_claims(proof) or {}
                fields.update(htu=claims.get("htu"), jti=claims.get("jti"))
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": _filter_headers(response.headers.raw, _HOP_BY_HOP),
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            # Too late for an error answer: the status line is out. Returning unfinished makes
            # the server close the connection, which tells the caller the body is cut short.
            fields["error"] = f"upstream body interrupted: {type(exc).__name__}"
            self.state.metrics.errors["upstream_interrupted"] += 1
        finally:
            await response.aclose()
        return response.status_code

    async def _send(
        self,
        url: httpx.URL,
        method: str,
        headers: list[tuple[bytes, bytes]],
        body: httpx.ByteStream,
        fields: dict[str, Any],
        bundle: KeyBundle,
    ) -> httpx.Response:
        """Send the request through the bundle's `DPoPAuth`; every failure is an `ApiError`."""
        state = self.state
        assert state.client is not None
        try:
            upstream_request = state.client.build_request(method, url, headers=headers)
            # Set after building: passing it as content= would wrap it in a one-shot stream.
            upstream_request.stream = body
            return await state.client.send(upstream_request, stream=True, auth=bundle.auth)
        except RetryImpossibleError:
            raise ApiError(
                502,
                "retry_impossible",
                "the upstream asked for a nonce or a new token after a request body larger "
                f"than {state.replay_limit} bytes (or than the replay buffers' total) had been "
                "streamed; both are cached now, send the request again",
            ) from None
        except ServerUnreachableError as exc:
            fields["error"] = exc.message
            raise ApiError(504, "token_endpoint_unreachable", exc.message) from None
        except DPoPSignerError as exc:
            error = error_for(exc)
            fields["error"] = exc.message
            raise error from None
        except httpx.HTTPError as exc:
            failed = _failed_url(exc)
            if failed is not None and not _same_resource(failed, url):
                # DPoPAuth sends only two kinds of request: the caller's and the token
                # request. httpx reports the token request's transport error unchanged.
                # netloc is host and port only: no user info, and no query either.
                where = f"{failed.scheme}://{failed.netloc.decode('ascii', 'replace')}"
                where += failed.path
                raise ApiError(
                    504 if isinstance(exc, httpx.TimeoutException) else 502,
                    "token_endpoint_unreachable",
                    f"cannot reach the token endpoint {where}: {type(exc).__name__}; check "
                    "--token-url and that the authorization server is up",
                ) from None
            if isinstance(exc, httpx.TimeoutException):
                raise ApiError(
                    504, "upstream_timeout", f"the upstream {url.host} timed out"
                ) from None
            raise ApiError(
                502,
                "upstream_unreachable",
                f"cannot reach the upstream {url.host}: {type(exc).__name__}",
            ) from None


def _failed_url(exc: httpx.HTTPError) -> httpx.URL | None:
    try:
        return exc.request.url
    except RuntimeError:  # an error raised outside a request
        return None


def _same_resource(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port, a.path) == (b.scheme, b.host, b.port, b.path)


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps({"error": error.code, "message": error.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_proxy_app(state: ProxyState, *, loopback_only: bool = False) -> ASGIApp:
    """The ``dpop proxy`` application for ``state``.

    With ``loopback_only``, requests whose ``Host`` is not a loopback name get 421 (DNS
    rebinding; see `LoopbackHostMiddleware`).
    """
    app = ProxyApp(state)
    return LoopbackHostMiddleware(app, state.metrics) if loopback_only else app
