"""``dpop serve``: the ASGI application that lends the key to local programs.

Endpoints (the OpenAPI 3.1 document at ``GET /openapi.json`` is generated from the pydantic
models below):

- ``GET /healthz``: liveness and whether the key is reachable (503 while it is not);
- ``GET /v1/jwk``: the public JWK and its RFC 7638 thumbprint (``jkt``);
- ``POST /v1/proof``: a DPoP proof (RFC 9449 §4) for ``htm``/``htu``, optionally bound to an
  access token (``ath``, §4.2) and carrying a server nonce (§8, §9);
- ``POST /v1/headers``: ``Authorization: DPoP <token>`` and ``DPoP: <proof>`` for one request,
  with a client_credentials token that the service fetches, caches and renews;
- ``GET /metrics``: Prometheus text.

No endpoint signs caller-chosen bytes: the signing input is always a proof this module builds.
``/v1`` requests need ``Authorization: Bearer <api key>`` when the service has API keys; with
``allowed_origins`` set, proofs are made only for those origins (403 otherwise). Bodies are
JSON, at most ``max_body`` bytes (413 beyond), and every proof leaves one audit line (time,
caller, ``htm``, ``htu``, ``jti``) and nothing secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dpop_signer.errors import DPoPSignerError
from dpop_signer.jose import NQCHAR_PATTERN, TOKEN68_PATTERN, peek_claims
from dpop_signer.proof import normalize_htu, origin_of
from dpop_signer.service.http import (
    ApiError,
    LoopbackHostMiddleware,
    RequestLogMiddleware,
    caller_of,
    error_for,
    error_response,
)
from dpop_signer.service.logs import log_event
from dpop_signer.service.metrics import CONTENT_TYPE, Metrics
from dpop_signer.service.reload import KeyBundle
from dpop_signer.service.security import ApiKeys
from dpop_signer.service.signer import PROBE_INTERVAL, SignerState, keep_probing
from dpop_signer.service.workers import SharedMetrics
from dpop_signer.urls import check_http_url

if TYPE_CHECKING:
    pass

__all__ = [
    "DEFAULT_MAX_BODY",
    "ErrorResponse",
    "HeadersRequest",
    "HeadersResponse",
    "HealthResponse",
    "JwkResponse",
    "ProofRequest",
    "ProofResponse",
    "ServiceState",
    "create_signer_app",
    "openapi_document",
]

DEFAULT_MAX_BODY = 64 * 1024
"""Largest accepted request body: room for a large JWT access token, nothing more."""

# RFC 9110 §5.6.2 token: what an HTTP method may be; the token68 and nonce grammars of access
# tokens and nonces are dpop_signer.jose's.
_METHOD = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
# For the OpenAPI document only (check_http_url decides): scheme, then a host of name or
# address characters, then an optional port of 1-5 digits.
_HTTP_URL = (
    r"^[Hh][Tt][Tt][Pp][Ss]?://([^/?#@]*@)?(\[[0-9A-Fa-f:.]+\]|[^\s/?#@:\[\]{}]+)"
    r"(:[0-9]{0,5})?([/?#]|$)"
)


def _http_url(value: str) -> str:
    # ValueError (ProofError is one): pydantic reports its one-line message as a 422. httpx
    # parses URLs no request can go to (port 0, empty labels); check_http_url refuses them.
    check_http_url(value)
    normalize_htu(value)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Target(_Strict):
    """The request a proof or a pair of headers is for."""

    htm: str = Field(
        max_length=32,
        pattern=_METHOD,
        description="HTTP method of the request the proof goes with, e.g. GET",
        examples=["GET"],
    )
    htu: str = Field(
        min_length=1,
        max_length=4096,
        description="absolute http(s) URL of that request, with a valid host and a port of "
        "1-65535 if any; query and fragment are dropped (RFC 9449 §4.2)",
        examples=["https://api.example/v1/things"],
        json_schema_extra={"format": "uri", "pattern": _HTTP_URL},
    )

    @field_validator("htu")
    @classmethod
    def _check_htu(cls, value: str) -> str:
        return _http_url(value)


class ProofRequest(_Target):
    """What a DPoP proof is made for."""

    access_token: str | None = Field(
        default=None,
        max_length=16384,
        pattern=f"^{TOKEN68_PATTERN}$",
        description="DPoP-bound access token to hash into ath (RFC 9449 §4.2)",
    )
    nonce: str | None = Field(
        default=None,
        max_length=1024,
        pattern=f"^{NQCHAR_PATTERN}$",
        description="the server's DPoP-Nonce, when it demanded one (RFC 9449 §8, §9)",
    )


class HeadersRequest(_Target):
    """The request for which the service supplies Authorization and DPoP headers."""

    nonce: str | None = Field(
        default=None,
        max_length=1024,
        pattern=f"^{NQCHAR_PATTERN}$",
        description="a DPoP-Nonce the resource server sent; used in this proof only, never "
        "stored for other requests",
    )


class ProofResponse(BaseModel):
    """A compact-serialized DPoP proof JWT."""

    proof: str


class HeadersResponse(BaseModel):
    """Headers to add to the request: ``Authorization`` and ``DPoP``."""

    headers: dict[str, str]


class PublicJwk(BaseModel):
    """An EC P-256 public key (RFC 7518 §6.2.1), no private member."""

    kty: Literal["EC"]
    crv: Literal["P-256"]
    x: str
    y: str


class JwkResponse(BaseModel):
    """The service key's public JWK and RFC 7638 thumbprint."""

    jwk: PublicJwk
    jkt: str


class HealthResponse(BaseModel):
    """Whether the service runs and its key can sign, and if not, why."""

    status: Literal["ok", "unavailable"]
    signer: SignerState = Field(
        description="available; stalled (the HSM has not answered within sign_timeout); "
        "key_missing or unavailable (retried with back-off); pin_refused or key_changed "
        "(until the configuration is reloaded)"
    )
    reason: str | None = Field(default=None, description="one line, when not available")


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: str = Field(description="machine-readable code, e.g. unauthorized, origin_not_allowed")
    message: str = Field(description="one line saying what is wrong and how to fix it")


@dataclass
class ServiceState:
    """Everything the endpoints use; built once by `dpop_signer.service.commands`.

    Attributes:
        key: the key (a `ServiceSigner`, which recovers from HSM outages), the proof builder of
            ``/v1/proof`` and the `DPoPAuth` of ``/v1/headers`` (None when no token endpoint is
            configured), swapped whole on reload; a request takes it once, at its start.
        api_keys: keys a ``/v1`` caller must present; None when none are required.
        allowed_origins: origins proofs may be made for; empty means any.
        max_body: largest request body in bytes.
        metrics: counters shown at ``/metrics``.
        http: the long-lived client for the token endpoint, opened at startup.
        make_client: builds ``http``; tests may swap transports through it.
        loopback_only: refuse requests whose ``Host`` is not a loopback name (TCP without
            ``--allow-remote``: DNS rebinding).
        probe_interval: sign a health probe after this many seconds without a signature
            (0: never), so ``/healthz`` notices a lost key with no traffic.
        shared_metrics: with ``--workers``, every worker's counters, summed at ``/metrics``.
    """

    key: KeyBundle
    api_keys: ApiKeys | None = None
    allowed_origins: frozenset[str] = frozenset()
    max_body: int = DEFAULT_MAX_BODY
    metrics: Metrics = field(default_factory=Metrics)
    http: httpx.AsyncClient | None = None
    make_client: Callable[[], httpx.AsyncClient] | None = None
    loopback_only: bool = False
    probe_interval: float = PROBE_INTERVAL
    shared_metrics: SharedMetrics | None = None


class _Handlers:
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    # -- checks shared by the /v1 endpoints --------------------------------------------------

    def _authenticate(self, request: Request) -> int | None:
        keys = self.state.api_keys
        if keys is None:
            return None
        number = keys.match(request.headers.get("authorization"))
        if number is None:
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key; send 'Authorization: Bearer <key from the API key "
                "file>'",
                {"WWW-Authenticate": 'Bearer realm="dpop-signer"'},
            )
        return number

    async def _read_json(self, request: Request, model: type[_Strict]) -> Any:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            # Also keeps browsers out: a cross-site form or text/plain POST is not JSON.
            raise ApiError(415, "unsupported_media_type", "send the body as application/json")
        limit = self.state.max_body
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, "body_too_large", f"the request body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            # pydantic's own JSON parser: half the cost of json.loads + model_validate.
            return model.model_validate_json(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if any(e["type"] == "json_invalid" for e in errors):
            # Not JSON to pydantic (bad UTF-8, a BOM, UTF-16, deep nesting...): decide exactly as
            # json.loads always did here, so the fast path changes no answer.
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise ApiError(400, "invalid_json", "the request body is not valid JSON") from exc
            try:
                return model.model_validate(data)
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_input=False, include_context=False)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in errors
        )
        raise ApiError(422, "invalid_request", problems) from None

    def _check_origin(self, htu: str) -> None:
        allowed = self.state.allowed_origins
        if not allowed:
            return
        origin = origin_of(htu)
        if origin not in allowed:
            raise ApiError(
                403,
                "origin_not_allowed",
                f"this service makes proofs only for {', '.join(sorted(allowed))}, "
                f"not for {origin}",
            )

    def _audit(
        self,
        request: Request,
        bundle: KeyBundle,
        key: int | None,
        endpoint: str,
        htm: object,
        htu: object,
        jti: object,
    ) -> None:
        log_event(
            "proof",
            caller=caller_of(request),
            api_key=key,
            endpoint=endpoint,
            htm=htm,
            htu=htu,
            jti=jti,
            jkt=bundle.jkt,
        )
        self.state.metrics.proofs[endpoint] += 1

    # -- endpoints --------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        signer = self.state.key.signer
        state = signer.state
        available = state == "available"
        body = HealthResponse(
            status="ok" if available else "unavailable", signer=state, reason=signer.reason
        )
        return JSONResponse(body.model_dump(), status_code=200 if available else 503)

    async def jwk(self, request: Request) -> Response:
        self._authenticate(request)
        bundle = self.state.key
        return JSONResponse({"jwk": dict(bundle.signer.public_jwk), "jkt": bundle.jkt})

    async def proof(self, request: Request) -> Response:
        key = self._authenticate(request)
        body: ProofRequest = await self._read_json(request, ProofRequest)
        self._check_origin(body.htu)
        # prepare/sign/finish rather than build_async: the jti comes back for the audit line,
        # and the service's own signer is called directly (no Protocol isinstance per proof).
        with self.state.key.in_use() as bundle:
            proofs = bundle.proofs
            prepared = proofs.prepare(
                body.htm, body.htu, access_token=body.access_token, nonce=body.nonce
            )
            signature = await bundle.signer.sign_async(prepared.signing_input.encode("ascii"))
            proof = proofs.finish(prepared, signature)
        self._audit(request, bundle, key, "proof", body.htm, normalize_htu(body.htu), prepared.jti)
        # A compact JWS is base64url and dots: nothing in it needs JSON escaping, so the body
        # is the same bytes JSONResponse would render, without an encoder per proof.
        return Response(b'{"proof":"%s"}' % proof.encode("ascii"), media_type="application/json")

    async def headers(self, request: Request) -> Response:
        key = self._authenticate(request)
        if self.state.key.auth is None or self.state.http is None:
            raise ApiError(
                404,
                "not_configured",
                "this service has no token endpoint; start it with --token-url and --client-id "
                "to use /v1/headers",
            )
        body: HeadersRequest = await self._read_json(request, HeadersRequest)
        self._check_origin(body.htu)
        with self.state.key.in_use() as bundle:
            auth = bundle.auth
            assert auth is not None  # every bundle of a service with a token endpoint has one
            # A caller's nonce goes into this proof only: stored in the shared cache, any caller
            # could set or evict the nonce of other callers' proofs for an origin.
            headers: dict[str, str] = await auth.aheaders(
                self.state.http, body.htm, body.htu, nonce=body.nonce
            )
        claims = peek_claims(headers.get("DPoP", "")) or {}
        self._audit(
            request, bundle, key, "headers", claims.get("htm"), claims.get("htu"), claims.get("jti")
        )
        return JSONResponse({"headers": headers})

    async def metrics(self, request: Request) -> Response:
        self.state.metrics.signer_state = self.state.key.signer.state
        shared = self.state.shared_metrics
        text = shared.render() if shared is not None else self.state.metrics.render()
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


def _guard(
    handler: Callable[[Request], Awaitable[Response]], metrics: Metrics
) -> Callable[[Request], Awaitable[Response]]:
    """Turn `ApiError` and library errors into JSON answers; nothing escapes as a bare 500."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc, metrics)
        except ClientDisconnect:
            # The caller left mid-body (or the service closed a stalled one): nobody reads an
            # answer, and it is the caller's doing, not a fault of ours.
            log_event("client_gone", logging.INFO, path=request.url.path)
            return Response(status_code=499)
        except DPoPSignerError as exc:
            error = error_for(exc)
            log_event(
                "error",
                logging.WARNING,
                path=request.url.path,
                kind=error.code,
                error=exc.message,
            )
            return error_response(error, metrics)

    return endpoint


async def _publish(shared: SharedMetrics) -> None:
    # About once a second, so the other workers' /metrics include this one's counters.
    while True:
        await asyncio.sleep(1.0)
        shared.write()


def create_signer_app(state: ServiceState) -> Starlette:
    """The ``dpop serve`` application for ``state``."""
    handlers = _Handlers(state)
    metrics = state.metrics

    def route(path: str, handler: Callable[[Request], Awaitable[Response]], method: str) -> Route:
        return Route(path, _guard(handler, metrics), methods=[method], include_in_schema=False)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if state.key.auth is not None and state.http is None and state.make_client is not None:
            state.http = state.make_client()
        tasks = []
        if state.probe_interval > 0:
            tasks.append(
                asyncio.create_task(keep_probing(lambda: state.key.signer, state.probe_interval))
            )
        if state.shared_metrics is not None:
            tasks.append(asyncio.create_task(_publish(state.shared_metrics)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if state.http is not None:
                await state.http.aclose()
            state.key.close()
            log_event("stopped")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # exc.headers carries Allow on a 405 (RFC 9110 §15.5.6).
        error = ApiError(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
        return error_response(error, metrics)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log_event(
            "internal_error", logging.ERROR, path=request.url.path, exception=type(exc).__name__
        )
        return error_response(
            ApiError(500, "internal_error", "unexpected error; see the service log"), metrics
        )

    app = Starlette(
        routes=[
            route("/healthz", handlers.healthz, "GET"),
            route("/v1/jwk", handlers.jwk, "GET"),
            route("/v1/proof", handlers.proof, "POST"),
            route("/v1/headers", handlers.headers, "POST"),
            route("/metrics", handlers.metrics, "GET"),
            route("/openapi.json", handlers.openapi, "GET"),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    if state.loopback_only:
        app.add_middleware(LoopbackHostMiddleware, metrics=metrics)
    app.add_middleware(RequestLogMiddleware)
    return app


# -- OpenAPI ------------------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


_ERRORS = {
    "400": "the body is not JSON",
    "401": "missing or wrong API key",
    "403": "htu is outside the allowed origins",
    "413": "the body is too large",
    "415": "the body is not application/json",
    "422": "the body does not match the schema",
    "503": "the HSM or key is unavailable; retry after Retry-After seconds",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _json(ErrorResponse, _ERRORS[code]) for code in codes}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, with schemas generated from the pydantic models."""
    models: list[type[BaseModel]] = [
        ProofRequest,
        ProofResponse,
        HeadersRequest,
        HeadersResponse,
        JwkResponse,
        HealthResponse,
        ErrorResponse,
    ]
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    secured: list[dict[str, list[str]]] = [{"apiKey": []}]
    v1_post_errors = _errors("400", "401", "403", "413", "415", "422", "503")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dpop-signer service",
            "version": "1",
            "description": "Mints RFC 9449 DPoP proofs with a key held in an HSM. "
            "No endpoint signs arbitrary bytes.",
        },
        "paths": {
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "responses": {
                        "200": _json(HealthResponse, "running, key reachable"),
                        "503": _json(HealthResponse, "running, key unreachable"),
                    },
                }
            },
            "/v1/jwk": {
                "get": {
                    "operationId": "getJwk",
                    "security": secured,
                    "responses": {
                        "200": _json(JwkResponse, "the public key"),
                        **_errors("401"),
                    },
                }
            },
            "/v1/proof": {
                "post": {
                    "operationId": "createProof",
                    "security": secured,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(ProofRequest)}},
                    },
                    "responses": {"200": _json(ProofResponse, "a DPoP proof"), **v1_post_errors},
                }
            },
            "/v1/headers": {
                "post": {
                    "operationId": "createHeaders",
                    "security": secured,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(HeadersRequest)}},
                    },
                    "responses": {
                        "200": _json(HeadersResponse, "Authorization and DPoP headers"),
                        **v1_post_errors,
                        "404": _json(ErrorResponse, "no token endpoint configured"),
                        "502": _json(ErrorResponse, "the authorization server refused"),
                        "504": _json(ErrorResponse, "the authorization server is unreachable"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from the service's --api-key-file",
                }
            },
        },
    }
