"""``dpop proxy``: a reverse proxy that adds the DPoP token and a fresh proof to each request.

``curl http://127.0.0.1:PORT/path?q`` reaches ``UPSTREAM/path?q`` with ``Authorization: DPoP
<token>`` and ``DPoP: <proof>`` made by `DPoPAuth` inside one long-lived `httpx.AsyncClient`,
so token caching and renewal, nonce demands (RFC 9449 §9) and the one forced renewal after a
401 ``invalid_token`` all happen here, invisibly to the caller.

Bodies are streamed both ways: the request body goes upstream as it arrives and the response
comes back chunk by chunk (``aiter_raw``: content encodings pass through untouched). A nonce
demand or a token renewal makes `DPoPAuth` send the request again, and a streamed body cannot
be read twice, so the body is also copied into a replay buffer as it streams. Bodies up to
``replay_limit`` bytes (8 MiB by default) are therefore retried transparently; for a larger
body the retry is impossible, the caller gets 502 ``retry_impossible`` and, because the nonce
or the new token is cached by then, its own retry succeeds.

Hop-by-hop headers (RFC 9110 §7.6.1) are dropped both ways, as are the caller's
``Authorization``, ``DPoP`` and ``Proxy-Authorization``. With API keys the caller presents one
in ``Proxy-Authorization: Bearer <key>`` (407 otherwise). The proxy has no endpoints of its own:
every path belongs to the upstream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from dpop_signer.errors import DPoPSignerError
from dpop_signer.service.http import ApiError, LoopbackHostMiddleware, claims_of, error_for
from dpop_signer.service.logs import log_event
from dpop_signer.service.metrics import Metrics
from dpop_signer.service.security import ApiKeys
from dpop_signer.signers.base import close_signer

__all__ = ["DEFAULT_REPLAY_LIMIT", "ProxyState", "create_proxy_app"]

DEFAULT_REPLAY_LIMIT = 8 * 1024 * 1024

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


class ReplayableBody(httpx.ByteStream):
    """A request body read once from the ASGI ``receive`` and kept for one replay.

    Iterating the first time streams the caller's body and copies it into a buffer while the
    total stays within ``limit``; iterating again replays the buffer, or raises
    `RetryImpossibleError` when the body outgrew it. It is an `httpx.ByteStream` because that
    is how httpx (and `DPoPAuth`, before it retries) recognises a body that can be sent again.
    """

    def __init__(self, receive: Receive, limit: int) -> None:
        super().__init__(b"")
        self._receive = receive
        self._limit = limit
        self._buffer: list[bytes] | None = []
        self._size = 0
        self._started = False
        self._complete = False

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
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGoneError
            chunk = message.get("body", b"")
            if chunk:
                self._size += len(chunk)
                if self._buffer is not None:
                    if self._size <= self._limit:
                        self._buffer.append(chunk)
                    else:
                        self._buffer = None  # too large to replay: stop holding it
                yield chunk
            if not message.get("more_body", False):
                break
        self._complete = True


@dataclass
class ProxyState:
    """What the proxy uses; built once by `dpop_signer.service.commands`.

    Attributes:
        upstream: base URL every request is forwarded to (its path is a prefix).
        make_client: builds the `httpx.AsyncClient` (with ``auth=DPoPAuth``) at startup.
        api_keys: keys a caller must present in ``Proxy-Authorization``; None for none.
        replay_limit: largest request body kept for a transparent retry.
        metrics: counters (token requests, errors).
        signer: closed at shutdown, if given.
    """

    upstream: httpx.URL
    make_client: Callable[[], httpx.AsyncClient]
    api_keys: ApiKeys | None = None
    replay_limit: int = DEFAULT_REPLAY_LIMIT
    metrics: Metrics = field(default_factory=Metrics)
    signer: Any = None
    client: httpx.AsyncClient | None = None


def _upstream_url(base: httpx.URL, raw_path: bytes, query: bytes) -> httpx.URL:
    prefix = base.raw_path.partition(b"?")[0].rstrip(b"/")
    target = prefix + raw_path
    if query:
        target += b"?" + query
    return base.copy_with(raw_path=target)


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
                close_signer(self.state.signer)
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
            status = await self._forward(scope, receive, send, request, fields)
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
        body = ReplayableBody(receive, state.replay_limit) if has_body else httpx.ByteStream(b"")
        fields["path"] = scope["path"]
        try:
            upstream_request = state.client.build_request(scope["method"], url, headers=headers)
            # Set after building: passing it as content= would wrap it in a one-shot stream.
            upstream_request.stream = body
            response = await state.client.send(upstream_request, stream=True)
        except RetryImpossibleError:
            raise ApiError(
                502,
                "retry_impossible",
                "the upstream asked for a nonce or a new token after a request body larger "
                f"than {state.replay_limit} bytes had been streamed; both are cached now, "
                "send the request again",
            ) from None
        except ClientGoneError:
            return 499  # nginx's code for "client closed request": nobody reads the answer
        except DPoPSignerError as exc:
            error = error_for(exc)
            fields["error"] = exc.message
            raise error from None
        except httpx.TimeoutException:
            raise ApiError(504, "upstream_timeout", f"the upstream {url.host} timed out") from None
        except httpx.HTTPError as exc:
            raise ApiError(
                502,
                "upstream_unreachable",
                f"cannot reach the upstream {url.host}: {type(exc).__name__}",
            ) from None
        try:
            proof = response.request.headers.get("dpop")
            if proof:
                claims = claims_of(proof)
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
