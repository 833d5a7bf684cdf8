"""HTTP plumbing shared by ``dpop serve`` and ``dpop proxy``: errors, caller checks, request log.

Every error answer is JSON ``{"error": CODE, "message": TEXT}`` (the message is one line from
`dpop_signer.errors` or fixed text, never a secret) and is counted by kind in the metrics.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpop_signer.errors import (
    DPoPSignerError,
    InvalidTokenResponseError,
    KeyChangedError,
    OAuthError,
    PinError,
    ProofError,
    ServerUnreachableError,
    SignerError,
    SignerTimeoutError,
    TokenEndpointError,
    UseDPoPNonceError,
)
from dpop_signer.service.logs import log_event, logger
from dpop_signer.service.metrics import Metrics
from dpop_signer.urls import is_loopback

__all__ = [
    "TARGET_AUTHORITY",
    "ApiError",
    "LoopbackHostMiddleware",
    "RequestLogMiddleware",
    "caller_of",
    "error_for",
    "error_response",
]

RETRY_AFTER_SECONDS = "1"


class ApiError(Exception):
    """An error answer: HTTP ``status``, machine-readable ``code``, one-line ``message``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_for(exc: DPoPSignerError) -> ApiError:
    """Map a library error to the HTTP answer the caller should see."""
    if isinstance(exc, PinError):
        return ApiError(
            503,
            "signer_pin_refused",
            f"{exc.message}; the service will not retry a PIN: fix it and reload (SIGHUP)",
        )
    if isinstance(exc, SignerTimeoutError):
        return ApiError(503, "signer_timeout", exc.message, {"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(exc, KeyChangedError):
        return ApiError(503, "key_changed", exc.message)
    if isinstance(exc, SignerError):
        return ApiError(
            503,
            "signer_unavailable",
            f"the HSM or key is unavailable: {exc.message}",
            {"Retry-After": RETRY_AFTER_SECONDS},
        )
    if isinstance(exc, ProofError):
        return ApiError(422, "invalid_request", exc.message)
    if isinstance(exc, ServerUnreachableError):
        return ApiError(504, "authorization_server_unreachable", exc.message)
    if isinstance(exc, TokenEndpointError | InvalidTokenResponseError | UseDPoPNonceError):
        return ApiError(502, "token_endpoint_error", exc.message)
    if isinstance(exc, OAuthError):
        return ApiError(502, "upstream_error", exc.message)
    return ApiError(500, "internal_error", exc.message)


def error_response(error: ApiError, metrics: Metrics) -> JSONResponse:
    """The JSON answer for ``error``; counts it by kind."""
    metrics.errors[error.code] += 1
    return JSONResponse(
        {"error": error.code, "message": error.message},
        status_code=error.status,
        headers=error.headers,
    )


def caller_of(request: Request) -> str:
    """``host:port`` of a TCP caller, ``unix`` for a unix socket caller."""
    client = request.client
    if client is None or not client.host:
        return "unix"
    return f"{client.host}:{client.port}"


TARGET_AUTHORITY = "dpop_signer.target_authority"
"""Scope ``extensions`` key: the authority of an absolute-form request target (RFC 9112
§3.2.2), set by the server protocol (`dpop_signer.service.runner`); ASGI scopes carry only
the path."""


class LoopbackHostMiddleware:
    """Answer 421 to a request whose ``Host`` is not a loopback name or address.

    A web page can reach a loopback port through DNS rebinding: its own name resolves to
    127.0.0.1 and the browser calls the service "same-origin", JSON and all. The ``Host``
    header still carries the page's name, so a loopback-only service refuses it (RFC 9110
    §7.4, §15.5.20). Not installed with ``--allow-remote`` or on a unix socket.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check ``Host`` (and an absolute-form target's authority), then pass the request on."""
        if scope["type"] == "http":
            refusal = _host_refusal(scope)
            if refusal is not None:
                await _refuse(send, refusal, self.metrics)
                return
        await self.app(scope, receive, send)


def _host_refusal(scope: Scope) -> ApiError | None:
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    if len(hosts) != 1:
        # RFC 9112 §3.2: 400 for a request without Host or with more than one (two hosts let
        # a front end and this service each believe a different one).
        return ApiError(
            400,
            "invalid_host",
            "send exactly one Host header (localhost, 127.0.0.1 or [::1])",
        )
    names = [hosts[0]]
    target = scope.get("extensions", {}).get(TARGET_AUTHORITY)
    if target is not None:
        # RFC 9112 §3.2.2: with an absolute-form target the server uses its authority and
        # ignores Host, so both must be loopback.
        names.append(target)
    if all(_loopback_name(name) for name in names):
        return None
    return ApiError(
        421,
        "misdirected_request",
        "this service answers only requests addressed to localhost, 127.0.0.1 or [::1]",
    )


def _loopback_name(value: bytes) -> bool:
    # A Host value (or absolute-form authority): its user info and port go, the name stays.
    authority = value.decode("latin-1").strip().rpartition("@")[2]
    if not authority or any(c in authority for c in "/?#\\ "):
        return False
    return is_loopback(f"http://{authority}/")


async def _refuse(send: Send, error: ApiError, metrics: Metrics) -> None:
    metrics.errors[error.code] += 1
    body = json.dumps({"error": error.code, "message": error.message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLogMiddleware:
    """One ``request`` line per answered request: method, path (no query), status, time.

    Successful answers are logged at debug level (the audit line already records every proof);
    errors at info, so an operator sees refused callers without raising the level.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on and log its outcome."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            level = logging.DEBUG if 0 < status < 400 else logging.INFO
            if logger.isEnabledFor(level):
                _log_request(scope, status, started, level)


def _log_request(scope: Scope, status: int, started: float, level: int) -> None:
    # Only when the line is written: at the default level a 200 is not, and this is per request.
    fields: dict[str, Any] = {
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "ms": round((time.perf_counter() - started) * 1000, 2),
    }
    client = scope.get("client")
    fields["caller"] = f"{client[0]}:{client[1]}" if client and client[0] else "unix"
    log_event("request", level, **fields)
