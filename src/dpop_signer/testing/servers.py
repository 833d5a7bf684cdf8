"""Local DPoP authorization and resource servers for ``dpop demo`` and for users' own tests.

`LocalAuthorizationServer` issues DPoP-bound JWT access tokens (``cnf.jkt``, RFC 9449 §6.1) for
the client_credentials grant; `LocalResourceServer` serves ``/api/...`` and verifies the token and
the proof on every request (RFC 9449 §7). Both verify proofs with `dpop_signer.verify`, can
demand nonces (§8, §9), and record every proof they receive so a test can run an independent
verifier over all of them. They are well-behaved servers: their switches (``require_nonce``,
``token_lifetime``, ``clock_skew``, ``nonce_rotation``, ``audience``, ``assertion_audience``)
are all conformant behaviours.

Public API (kept stable): `start_local_servers`, `LocalServers`, `LocalAuthorizationServer`,
`LocalResourceServer`, `SeenProof`, `DEMO_CLIENT_ID`, `DEMO_CLIENT_SECRET`. For servers that
misbehave on purpose, subclass the servers and override their hooks (`RecordingServer.on_request`,
`RecordingServer.refusal`, `RecordingServer.on_proof`, `LocalAuthorizationServer.token_type`)
and start them with `LocalServers.start`; this repository's fault modes are built that way, in
``tests/fault_servers.py``. Loopback only, quiet logs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, unquote_plus

from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpop_signer.errors import VerificationError
from dpop_signer.jwk import jwk_thumbprint
from dpop_signer.signers.pem import PemSigner
from dpop_signer.testing.server_thread import ServerThread
from dpop_signer.verify import (
    INVALID_CLIENT,
    INVALID_DPOP_PROOF,
    INVALID_TOKEN,
    JtiReplayCache,
    access_token_claims_unverified,
    issue_access_token,
    verify_access_token,
    verify_client_assertion,
    verify_proof_details,
)

__all__ = [
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "ClientRegistration",
    "LocalAuthorizationServer",
    "LocalResourceServer",
    "LocalServers",
    "NonceBook",
    "RecordingServer",
    "Refusal",
    "SeenProof",
    "ServerThread",
    "received_url",
    "start_local_servers",
]

DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_MAX_FORM_BYTES = 64 * 1024
_STREAM_CHUNK = 64 * 1024


@dataclass(frozen=True)
class SeenProof:
    """One ``DPoP`` header value a local server received, with what it needs to be re-checked.

    ``nonce`` is the nonce the proof carried if this server had issued it (the nonce the server
    expected), else ``None``. ``jkt`` is the ``cnf.jkt`` of the access token sent with it, if any.
    ``received_at`` is the server's clock (clock skew included). ``error`` and ``detail`` are
    the OAuth error code and description the server answered (``None`` when accepted).
    """

    endpoint: Literal["token", "api"]
    method: str
    url: str
    proof: str = field(repr=False)
    access_token: str | None = field(repr=False)
    nonce: str | None = field(repr=False)
    jkt: str | None
    received_at: float
    status: int
    error: str | None
    detail: str | None = None


@dataclass(frozen=True)
class ClientRegistration:
    """A client of the local AS: a secret, a public JWK (``private_key_jwt``), or neither."""

    client_id: str
    secret: str | None = field(default=None, repr=False)
    jwk: Mapping[str, Any] | None = None
    scope: str | None = None
    """Scope granted when the request names none."""


class NonceBook:
    """Server nonces (RFC 9449 §8): a current and a previous one, rotated every ``rotation`` s.

    Both the current and the previous nonce are accepted, so a client that raced a rotation is
    not bounced. Thread-safe; ``rotation=None`` rotates only when `rotate` is called.
    """

    def __init__(self, *, rotation: float | None = 60.0, clock: Callable[[], float] = time.time):
        self.rotation = rotation
        self._clock = clock
        self._lock = threading.Lock()
        self._issued: deque[str] = deque(maxlen=10_000)
        self._issued_set: set[str] = set()
        self._previous: str | None = None
        self._current = self._new()
        self._rotated_at = clock()

    def _new(self) -> str:
        nonce = secrets.token_urlsafe(16)  # base64url: always 1*NQCHAR
        if len(self._issued) == self._issued.maxlen:
            self._issued_set.discard(self._issued[0])
        self._issued.append(nonce)
        self._issued_set.add(nonce)
        return nonce

    def _maybe_rotate(self) -> None:
        if self.rotation is not None and self._clock() - self._rotated_at >= self.rotation:
            self._previous, self._current = self._current, self._new()
            self._rotated_at = self._clock()

    @property
    def current(self) -> str:
        """The nonce to hand out now."""
        with self._lock:
            self._maybe_rotate()
            return self._current

    def accepted(self) -> tuple[str, ...]:
        """The nonces a proof may carry now: current, then previous."""
        with self._lock:
            self._maybe_rotate()
            return tuple(n for n in (self._current, self._previous) if n is not None)

    def rotate(self) -> str:
        """Issue a new current nonce now; the old one stays acceptable as previous."""
        with self._lock:
            self._previous, self._current = self._current, self._new()
            self._rotated_at = self._clock()
            return self._current

    def was_issued(self, nonce: object) -> bool:
        """True if this book ever handed out ``nonce`` (the last 10,000 remembered)."""
        with self._lock:
            return isinstance(nonce, str) and nonce in self._issued_set


@dataclass(frozen=True)
class Refusal:
    """What `RecordingServer.refusal` answers a well-formed request with, instead of serving it.

    ``error`` is the OAuth error code (e.g. ``use_dpop_nonce``, ``invalid_token``), ``description``
    its ``error_description``; ``nonce``, if set, is sent as ``DPoP-Nonce`` (RFC 9449 §8, §9).
    The server renders it as its endpoint does: 400 JSON at the token endpoint, 401 with a
    ``WWW-Authenticate: DPoP`` challenge at the API.
    """

    error: str
    description: str
    nonce: str | None = None


class RecordingServer:
    """Shared state of both servers: the record of proofs, counters, clock, nonces; the hooks.

    The hooks (`on_request`, `refusal`, `on_proof`) do nothing here; a subclass overrides them
    to watch the proofs or to make the server misbehave on purpose (``tests/fault_servers.py``).
    """

    kind = "server"

    def __init__(
        self,
        *,
        require_nonce: bool,
        clock_skew: float,
        nonce_rotation: float | None,
        max_age: float,
        max_future: float,
    ) -> None:
        self.require_nonce = require_nonce
        """Demand a nonce in every proof (switchable at runtime)."""
        self.clock_skew = clock_skew
        """Seconds this server's clock is ahead of the real one (its Date header and checks)."""
        self.max_age = max_age
        self.max_future = max_future
        self.nonces = NonceBook(rotation=nonce_rotation, clock=self.now)
        self.replay = JtiReplayCache(window=max_age + max_future)
        self._lock = threading.Lock()
        self._seen: list[SeenProof] = []
        self._statuses: Counter[int] = Counter()
        self._requests = 0

    def now(self) -> float:
        """This server's clock: real time plus `clock_skew`."""
        return time.time() + self.clock_skew

    async def on_request(self, request: Request) -> Response | None:
        """Hook, called first for every token or API request: a response to send instead.

        ``None`` (the default) serves the request. Runs on the server's event loop, so it may
        ``await`` (a slow or stalled server); the request is still recorded and counted.
        """
        return None

    def refusal(self) -> Refusal | None:
        """Hook: refuse a well-formed request just before its proof is verified.

        Called once the request is otherwise acceptable (token endpoint: client authenticated,
        grant type supported, one ``DPoP`` header; API: a ``DPoP`` token and one ``DPoP``
        header). ``None`` (the default) goes on to verify it.
        """
        return None

    def on_proof(self, seen: SeenProof) -> None:
        """Hook, called with every proof this server records, on the server thread; quick.

        Does nothing by default. A subclass may override it; this repository's test suite sets
        it on the class for the length of each test to re-check every proof any local server
        received with an independent verifier.
        """

    @property
    def seen(self) -> list[SeenProof]:
        """Every proof received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._seen)

    @property
    def statuses(self) -> Counter[int]:
        """Responses sent so far, by HTTP status (a copy)."""
        with self._lock:
            return Counter(self._statuses)

    def clear(self) -> None:
        """Forget recorded proofs and counters (nonces and replay cache are kept)."""
        with self._lock:
            self._seen.clear()
            self._statuses.clear()
            self._requests = 0

    def _count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def _count_status(self, status: int) -> None:
        with self._lock:
            self._statuses[status] += 1

    def _record(self, proofs: list[str], **fields: Any) -> None:
        records = []
        for proof in proofs:
            claims = access_token_claims_unverified(proof) or {}
            presented = claims.get("nonce")
            nonce = presented if self.nonces.was_issued(presented) else None
            records.append(SeenProof(proof=proof, nonce=nonce, **fields))
        with self._lock:
            self._seen.extend(records)
        for record in records:
            self.on_proof(record)

    def _nonce_headers(self, nonce: str | None = None) -> dict[str, str]:
        if nonce is not None:
            return {"DPoP-Nonce": nonce}
        return {"DPoP-Nonce": self.nonces.current} if self.require_nonce else {}

    def _wrap(self, app: ASGIApp) -> ASGIApp:
        return _ServerHeaders(app, self)


class _ServerHeaders:
    """ASGI middleware: ``Date`` from the server's (possibly skewed) clock; status counting."""

    def __init__(self, app: ASGIApp, server: RecordingServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_date(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"date"]
                date = formatdate(self.server.now(), usegmt=True).encode("ascii")
                headers.append((b"date", date))
                message = {**message, "headers": headers}
                self.server._count_status(int(message["status"]))
            await send(message)

        await self.app(scope, receive, send_with_date)


def received_url(request: Request) -> str:
    """The URL a request was sent to, as it came over the wire: scheme, Host header, raw path.

    Starlette's ``request.url`` decodes the path; ``htu`` must be compared with the path as sent
    (RFC 9449 §4.3 check 9), so this uses the ASGI ``raw_path``.
    """
    scope = request.scope
    host = request.headers.get("host")
    if not host:
        server = scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}"
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{scope['scheme']}://{host}{path}" + (f"?{query}" if query else "")


def _oauth_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An RFC 6749 §5.2 error response."""
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


class LocalAuthorizationServer(RecordingServer):
    """A DPoP authorization server for the client_credentials grant (RFC 6749 §4.4, RFC 9449 §5).

    Endpoints: ``POST /token``, ``GET /.well-known/oauth-authorization-server`` (RFC 8414),
    ``GET /jwks``. Client authentication: ``client_secret_basic``, ``client_secret_post``,
    ``private_key_jwt`` (RFC 7523, ES256 against the registered JWK) and ``none`` for a client
    registered with neither. Every token request needs a valid DPoP proof; the token is an ES256
    JWT (RFC 9068) signed by an in-memory key, bound to the proof key by ``cnf.jkt``, with ``aud``
    = ``resource`` or ``audience`` if given, else the issuer. Attributes that are switches
    (``require_nonce``, ``token_lifetime``, ``clock_skew``, ``assertion_audience``) may be
    changed while it runs.
    """

    kind = "authorization server"

    def __init__(
        self,
        *,
        clients: Mapping[str, str | None] | None = None,
        require_nonce: bool = False,
        token_lifetime: float = 3600.0,
        clock_skew: float = 0.0,
        nonce_rotation: float | None = 60.0,
        issuer: str | None = None,
        max_age: float = 300.0,
        max_future: float = 60.0,
        assertion_audience: Literal["issuer", "issuer_or_token_endpoint"] = (
            "issuer_or_token_endpoint"
        ),
    ) -> None:
        """Create the server (not started: serve `app`, e.g. with `ServerThread`).

        Args:
            clients: ``client_id -> secret`` (``None``: public client); default the demo client
                ``demo-client`` / ``demo-secret``. Use `register_client` for ``private_key_jwt``.
            require_nonce: Demand a DPoP nonce (400 ``use_dpop_nonce``).
            token_lifetime: Seconds until issued tokens expire (``expires_in``).
            clock_skew: Seconds this server's clock is ahead (Date header and proof checks).
            nonce_rotation: Seconds between nonce rotations (``None``: only on `rotate_nonce`).
            issuer: Issuer URL; default the URL the server is reached at, set by
                `start_local_servers`.
            max_age: How old a proof's ``iat`` may be.
            max_future: How far ahead a proof's ``iat`` may be.
            assertion_audience: The ``aud`` a ``private_key_jwt`` assertion may have: ``issuer``
                only, as draft-ietf-oauth-rfc7523bis demands of servers, or also the token
                endpoint URL (the default, RFC 7523 §3 as first published). Always one string.
        """
        super().__init__(
            require_nonce=require_nonce,
            clock_skew=clock_skew,
            nonce_rotation=nonce_rotation,
            max_age=max_age,
            max_future=max_future,
        )
        self.token_lifetime = token_lifetime
        self.assertion_audience = assertion_audience
        """Which assertion ``aud`` values are accepted (switchable at runtime)."""
        self.issuer = issuer
        self._signer = PemSigner(ec.generate_private_key(ec.SECP256R1()), source="local AS key")
        self.kid = jwk_thumbprint(self._signer.public_jwk)
        self.clients: dict[str, ClientRegistration] = {}
        for client_id, secret in (clients or {DEMO_CLIENT_ID: DEMO_CLIENT_SECRET}).items():
            self.register_client(client_id, secret=secret)
        self.assertion_replay = JtiReplayCache(window=900.0)
        self.issued_tokens = 0
        self.last_token_request: dict[str, str | None] = {}
        """Parameters of the last successful token request (never the secret or assertion)."""
        self.app: ASGIApp = self._wrap(
            Starlette(
                routes=[
                    Route("/token", self._token, methods=["POST"]),
                    Route("/.well-known/oauth-authorization-server", self._metadata),
                    Route("/jwks", self._jwks),
                ]
            )
        )

    @property
    def token_requests(self) -> int:
        """``POST /token`` requests received so far, whatever their outcome."""
        with self._lock:
            return self._requests

    @property
    def public_jwk(self) -> dict[str, str]:
        """The public JWK that verifies issued access tokens."""
        return {name: str(value) for name, value in self._signer.public_jwk.items()}

    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        jwk: Mapping[str, Any] | None = None,
        scope: str | None = None,
    ) -> None:
        """Register (or replace) a client.

        A client has a secret (``client_secret_basic``/``_post``), a public JWK
        (``private_key_jwt``), or neither (a public client, ``none``).
        """
        self.clients[client_id] = ClientRegistration(client_id, secret, jwk, scope)

    def rotate_nonce(self) -> str:
        """Start handing out a new nonce (the previous one stays valid)."""
        return self.nonces.rotate()

    def token_type(self) -> str:
        """Hook: the ``token_type`` of a token response; ``DPoP`` (RFC 9449 §5)."""
        return "DPoP"

    def _issuer_for(self, request: Request) -> str:
        if self.issuer is not None:
            return self.issuer
        return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"

    async def _metadata(self, request: Request) -> Response:
        issuer = self._issuer_for(request)
        return JSONResponse(
            {
                "issuer": issuer,
                "token_endpoint": f"{issuer}/token",
                "jwks_uri": f"{issuer}/jwks",
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "private_key_jwt",
                    "none",
                ],
                "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
                "dpop_signing_alg_values_supported": ["ES256"],
            }
        )

    async def _jwks(self, request: Request) -> Response:
        key = {**self.public_jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}
        return JSONResponse({"keys": [key]})

    async def _token(self, request: Request) -> Response:
        self._count_request()
        now = self.now()
        url = received_url(request)
        proofs = request.headers.getlist("dpop")
        status: int = 500
        error: str | None = "server_error"
        detail: str | None = None
        try:
            response = await self._token_response(request, url, proofs, now)
            status = response.status_code
            error, detail = _error_of(response)
            return response
        finally:
            self._record(
                proofs,
                endpoint="token",
                method=request.method,
                url=url,
                access_token=None,
                jkt=None,
                received_at=now,
                status=status,
                error=error,
                detail=detail,
            )

    async def _token_response(
        self, request: Request, url: str, proofs: list[str], now: float
    ) -> Response:
        early = await self.on_request(request)
        if early is not None:
            return early
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != (
            "application/x-www-form-urlencoded"
        ):
            return _oauth_error(400, "invalid_request", "use application/x-www-form-urlencoded")
        body = await request.body()
        if len(body) > _MAX_FORM_BYTES:
            return _oauth_error(400, "invalid_request", "request body too large")
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        form = dict(pairs)
        if len(form) != len(pairs):  # RFC 6749 §3.2: no parameter more than once
            return _oauth_error(400, "invalid_request", "a parameter is repeated")

        issuer = self._issuer_for(request)
        client = self._authenticate(request, form, issuer, now)
        if isinstance(client, Response):
            return client
        registration, auth_method = client

        if form.get("grant_type") != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", "this server supports client_credentials only"
            )

        # RFC 9449 §4.3 check 1: exactly one DPoP header.
        if len(proofs) != 1:
            return _oauth_error(
                400,
                INVALID_DPOP_PROOF,
                "send exactly one DPoP header"
                if proofs
                else "a DPoP proof is required at this token endpoint",
                self._nonce_headers(),
            )
        refusal = self.refusal()
        if refusal is not None:
            headers = {"DPoP-Nonce": refusal.nonce} if refusal.nonce else self._nonce_headers()
            return _oauth_error(400, refusal.error, refusal.description, headers)
        try:
            proof = verify_proof_details(
                proofs[0],
                htm=request.method,
                htu=url,
                nonce=self.nonces.accepted() if self.require_nonce else None,
                now=now,
                max_age=self.max_age,
                max_future=self.max_future,
                replay=self.replay,
            )
        except VerificationError as exc:
            return _oauth_error(400, exc.error, exc.message, self._nonce_headers())

        scope = form.get("scope") or registration.scope
        audience = form.get("resource") or form.get("audience") or issuer
        token = issue_access_token(
            self._signer,
            issuer=issuer,
            audience=audience,
            client_id=registration.client_id,
            jkt=proof.jkt,
            lifetime=self.token_lifetime,
            scope=scope,
            kid=self.kid,
            now=now,
        )
        with self._lock:
            self.issued_tokens += 1
            self.last_token_request = {
                "client_id": registration.client_id,
                "auth_method": auth_method,
                "grant_type": form.get("grant_type"),
                "scope": form.get("scope"),
                "resource": form.get("resource"),
                "audience": form.get("audience"),
                "jkt": proof.jkt,
            }
        lifetime = self.token_lifetime
        payload: dict[str, Any] = {
            "access_token": token,
            "token_type": self.token_type(),
            "expires_in": int(lifetime) if float(lifetime).is_integer() else lifetime,
        }
        if scope:
            payload["scope"] = scope
        return JSONResponse(
            payload,
            headers={"Cache-Control": "no-store", "Pragma": "no-cache", **self._nonce_headers()},
        )

    def _authenticate(
        self, request: Request, form: dict[str, str], issuer: str, now: float
    ) -> tuple[ClientRegistration, str] | Response:
        """RFC 6749 §2.3 client authentication; a 401 ``invalid_client`` response on failure."""
        authorization = request.headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        used_basic = scheme.lower() == "basic"
        methods = [
            name
            for name, used in (
                ("client_secret_basic", used_basic),
                ("client_secret_post", "client_secret" in form),
                ("private_key_jwt", "client_assertion" in form),
            )
            if used
        ]

        def refuse(description: str) -> Response:
            headers = {"WWW-Authenticate": 'Basic realm="local-as"'} if used_basic else {}
            return _oauth_error(401, INVALID_CLIENT, description, headers)

        if len(methods) > 1:
            return _oauth_error(
                400, "invalid_request", f"use one client authentication method, not {methods}"
            )
        method = methods[0] if methods else "none"
        if method == "client_secret_basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except ValueError:
                return refuse("malformed Basic credentials")
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                return refuse("malformed Basic credentials")
            # RFC 6749 §2.3.1: id and secret are form-urlencoded before base64.
            client_id = unquote_plus(raw_id)
            secret: str | None = unquote_plus(raw_secret)
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret")
        if method == "private_key_jwt":
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                return refuse(f"client_assertion_type must be {ASSERTION_TYPE}")
            if not client_id:
                claims = access_token_claims_unverified(form["client_assertion"]) or {}
                client_id = str(claims.get("sub", ""))
        if form.get("client_id") not in (None, client_id):
            return refuse("client_id parameter does not match the authenticated client")

        registration = self.clients.get(client_id)
        if registration is None:
            return refuse("unknown client")
        if registration.secret is not None:
            if method not in ("client_secret_basic", "client_secret_post"):
                return refuse("this client authenticates with its client secret")
            if secret is None or not secrets.compare_digest(
                secret.encode("utf-8"), registration.secret.encode("utf-8")
            ):
                return refuse("client authentication failed")
        elif registration.jwk is not None:
            if method != "private_key_jwt":
                return refuse("this client authenticates with private_key_jwt")
            try:
                verify_client_assertion(
                    form["client_assertion"],
                    client_id=client_id,
                    issuer=issuer,
                    token_endpoint=(
                        f"{issuer}/token"
                        if self.assertion_audience == "issuer_or_token_endpoint"
                        else None
                    ),
                    key=registration.jwk,
                    now=now,
                    replay=self.assertion_replay,
                )
            except VerificationError as exc:
                return refuse(exc.message)
        elif method != "none":
            return refuse("this public client sends no credentials")
        return registration, method


class LocalResourceServer(RecordingServer):
    """A resource server that requires DPoP-bound tokens from a `LocalAuthorizationServer`.

    ``GET|POST|PUT|PATCH|DELETE /api/<anything>`` answers ``{"ok": true, "method", "path",
    "client_id", "jkt", "jti", "body_sha256", "body_len"}`` after checking ``Authorization: DPoP
    <token>`` (signature against the AS key, ``exp``, ``iss``, ``cnf.jkt``) and the ``DPoP``
    proof (RFC 9449 §4.3 against the URL as received, ``ath``, the key binding, the nonce when
    on, ``jti`` replay). ``GET /api/stream?bytes=N`` streams N bytes back. Errors are 401 with
    ``WWW-Authenticate: DPoP error="invalid_token" | "invalid_dpop_proof" | "use_dpop_nonce"``
    (RFC 9449 §7.1, §9) and ``algs="ES256"``. Bodies are read as a stream (large bodies are
    fine). ``GET /.well-known/oauth-protected-resource`` gives RFC 9728 metadata. Switches
    (``require_nonce``, ``clock_skew``, ``audience``) may be changed while it runs.
    """

    kind = "resource server"

    def __init__(
        self,
        authorization_server: LocalAuthorizationServer,
        *,
        require_nonce: bool = False,
        clock_skew: float = 0.0,
        nonce_rotation: float | None = 60.0,
        audience: str | None = None,
        max_age: float = 300.0,
        max_future: float = 60.0,
    ) -> None:
        """Create the server (not started: serve `app`, e.g. with `ServerThread`).

        Args:
            authorization_server: Whose tokens to accept (its key and `issuer`).
            require_nonce: Demand a DPoP nonce (401 ``use_dpop_nonce``).
            clock_skew: Seconds this server's clock is ahead (Date header and checks).
            nonce_rotation: Seconds between nonce rotations (``None``: only on `rotate_nonce`).
            audience: If set, tokens must carry it in ``aud``.
            max_age: How old a proof's ``iat`` may be.
            max_future: How far ahead a proof's ``iat`` may be.
        """
        super().__init__(
            require_nonce=require_nonce,
            clock_skew=clock_skew,
            nonce_rotation=nonce_rotation,
            max_age=max_age,
            max_future=max_future,
        )
        self.authorization_server = authorization_server
        self.audience = audience
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        self.app: ASGIApp = self._wrap(
            Starlette(
                routes=[
                    Route("/.well-known/oauth-protected-resource", self._metadata),
                    Route("/api", self._api, methods=methods),
                    Route("/api/{rest:path}", self._api, methods=methods),
                ]
            )
        )

    @property
    def api_requests(self) -> int:
        """Requests to ``/api/...`` received so far, whatever their outcome."""
        with self._lock:
            return self._requests

    def rotate_nonce(self) -> str:
        """Start handing out a new nonce (the previous one stays valid)."""
        return self.nonces.rotate()

    async def _metadata(self, request: Request) -> Response:
        base = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
        issuer = self.authorization_server.issuer
        return JSONResponse(
            {
                "resource": f"{base}/api",
                "authorization_servers": [issuer] if issuer else [],
                "dpop_signing_alg_values_supported": ["ES256"],
                "dpop_bound_access_tokens_required": True,
            }
        )

    def _challenge(self, error: str | None, description: str, nonce: str | None = None) -> Response:
        """401 with an RFC 9449 §7.1 ``WWW-Authenticate: DPoP`` challenge."""
        params = []
        if error is not None:
            # A quoted-string in a latin-1 header: no quotes, backslashes or non-ASCII.
            safe = description.replace("\\", "/").replace('"', "'")
            safe = safe.encode("ascii", "replace").decode("ascii")
            params += [f'error="{error}"', f'error_description="{safe}"']
        params.append('algs="ES256"')
        headers = {"WWW-Authenticate": "DPoP " + ", ".join(params), **self._nonce_headers(nonce)}
        return JSONResponse(
            {"error": error or "unauthorized", "error_description": description},
            status_code=401,
            headers=headers,
        )

    async def _api(self, request: Request) -> Response:
        self._count_request()
        now = self.now()
        url = received_url(request)
        proofs = request.headers.getlist("dpop")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        token_claims = access_token_claims_unverified(token) if token else None
        cnf = (token_claims or {}).get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        status: int = 500
        error: str | None = "server_error"
        detail: str | None = None
        try:
            response = await self._api_response(request, url, proofs, scheme, token, now)
            status = response.status_code
            error, detail = _error_of(response)
            if status >= 400:
                await _drain(request)
            return response
        finally:
            self._record(
                proofs,
                endpoint="api",
                method=request.method,
                url=url,
                access_token=token or None,
                jkt=jkt if isinstance(jkt, str) else None,
                received_at=now,
                status=status,
                error=error,
                detail=detail,
            )

    async def _api_response(
        self, request: Request, url: str, proofs: list[str], scheme: str, token: str, now: float
    ) -> Response:
        early = await self.on_request(request)
        if early is not None:
            return early
        if not scheme:
            return self._challenge(None, "DPoP-bound access token required")
        if scheme.lower() != "dpop" or not token:
            # §7.2: a DPoP-bound token must not be accepted as a Bearer token (downgrade).
            return self._challenge(INVALID_TOKEN, "use the DPoP authorization scheme")
        if len(proofs) != 1:
            return self._challenge(INVALID_DPOP_PROOF, "send exactly one DPoP header")
        refusal = self.refusal()
        if refusal is not None:
            return self._challenge(refusal.error, refusal.description, refusal.nonce)
        issuer_server = self.authorization_server
        try:
            claims = verify_access_token(
                token,
                key=issuer_server.public_jwk,
                issuer=issuer_server.issuer,
                audience=self.audience,
                now=now,
            )
            proof = verify_proof_details(
                proofs[0],
                htm=request.method,
                htu=url,
                access_token=token,
                nonce=self.nonces.accepted() if self.require_nonce else None,
                now=now,
                max_age=self.max_age,
                max_future=self.max_future,
                jkt=claims["cnf"]["jkt"],
                replay=self.replay,
            )
        except VerificationError as exc:
            return self._challenge(exc.error, exc.message)

        nonce_headers = self._nonce_headers()
        path = request.scope["path"]
        if path == "/api/stream" and request.method == "GET":
            try:
                size = int(request.query_params.get("bytes", str(1024 * 1024)))
            except ValueError:
                size = -1
            if not 0 <= size <= 1 << 30:
                return JSONResponse({"error": "bytes must be 0..2**30"}, status_code=400)
            return StreamingResponse(
                _stream_bytes(size),
                media_type="application/octet-stream",
                headers={"Content-Length": str(size), **nonce_headers},
            )
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.stream():
            digest.update(chunk)
            length += len(chunk)
        return JSONResponse(
            {
                "ok": True,
                "method": request.method,
                "path": path,
                "client_id": claims.get("client_id"),
                "jkt": proof.jkt,
                "jti": proof.jti,
                "body_sha256": digest.hexdigest(),
                "body_len": length,
            },
            headers=nonce_headers,
        )


async def _drain(request: Request, limit: int = 64 * 1024 * 1024) -> None:
    """Read and drop an unread request body before answering an error.

    A client still uploading when the server answers and closes would see a broken pipe
    instead of the 401 (and so never learn the nonce); reading the body first lets it see the
    answer. Bounded: past ``limit`` bytes the connection is left to be closed.
    """
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                return
    except (RuntimeError, ClientDisconnect):  # already consumed, or the client went away
        return


async def _stream_bytes(size: int) -> AsyncIterator[bytes]:
    chunk = b"x" * _STREAM_CHUNK
    remaining = size
    while remaining > 0:
        piece = chunk[: min(remaining, _STREAM_CHUNK)]
        remaining -= len(piece)
        yield piece


def _error_of(response: Response) -> tuple[str | None, str | None]:
    """The OAuth error code and description a response carries, for the proof record."""
    if response.status_code < 400:
        return None, None
    try:
        body = json.loads(bytes(getattr(response, "body", b"")))
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"], body.get("error_description")
    return f"http_{response.status_code}", None


@dataclass
class LocalServers:
    """A running authorization server and resource server; see `start_local_servers`."""

    authorization_server: LocalAuthorizationServer
    resource_server: LocalResourceServer
    as_thread: ServerThread
    rs_thread: ServerThread
    client_id: str = DEMO_CLIENT_ID
    client_secret: str | None = field(default=DEMO_CLIENT_SECRET, repr=False)

    @classmethod
    def start(
        cls,
        authorization_server: LocalAuthorizationServer,
        resource_server: LocalResourceServer,
        *,
        client_id: str = DEMO_CLIENT_ID,
        client_secret: str | None = DEMO_CLIENT_SECRET,
    ) -> Self:
        """Serve two server objects on 127.0.0.1 free ports, the AS's issuer set to its URL.

        `start_local_servers` uses it; so can a test that built (subclasses of) the servers
        itself. ``client_id``/``client_secret`` are only reported back (register the client on
        the AS). Raises ``RuntimeError`` if a server did not start.
        """
        as_thread = ServerThread(authorization_server.app, name="local-as", date_header=False)
        rs_thread = ServerThread(resource_server.app, name="local-rs", date_header=False)
        authorization_server.issuer = as_thread.url
        try:
            as_thread.start()
            rs_thread.start()
        except BaseException:
            rs_thread.stop()
            as_thread.stop()
            raise
        return cls(
            authorization_server,
            resource_server,
            as_thread,
            rs_thread,
            client_id=client_id,
            client_secret=client_secret,
        )

    @property
    def as_url(self) -> str:
        """The authorization server's base URL (its issuer), e.g. ``http://127.0.0.1:40123``."""
        return self.as_thread.url

    @property
    def token_url(self) -> str:
        """``<as_url>/token``."""
        return f"{self.as_thread.url}/token"

    @property
    def rs_url(self) -> str:
        """The resource server's base URL."""
        return self.rs_thread.url

    @property
    def api_url(self) -> str:
        """``<rs_url>/api``: append any path, e.g. ``api_url + "/things"``."""
        return f"{self.rs_thread.url}/api"

    @property
    def servers(self) -> tuple[LocalAuthorizationServer, LocalResourceServer]:
        """Both servers (for looping over their records)."""
        return self.authorization_server, self.resource_server

    def seen(self) -> list[SeenProof]:
        """Every proof both servers received, token endpoint first, then API."""
        return self.authorization_server.seen + self.resource_server.seen

    def stop(self) -> None:
        """Stop both servers (idempotent)."""
        self.rs_thread.stop(wait=False)
        self.as_thread.stop(wait=False)
        self.rs_thread.stop()
        self.as_thread.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_local_servers(
    *,
    require_nonce: bool = False,
    as_require_nonce: bool | None = None,
    rs_require_nonce: bool | None = None,
    token_lifetime: float = 3600.0,
    clock_skew: float = 0.0,
    nonce_rotation: float | None = 60.0,
    client_id: str = DEMO_CLIENT_ID,
    client_secret: str | None = DEMO_CLIENT_SECRET,
    client_jwk: Mapping[str, Any] | None = None,
    audience: str | None = None,
) -> LocalServers:
    """Start a local DPoP authorization server and resource server on 127.0.0.1 free ports.

    The one helper ``dpop demo`` and users' tests use::

        servers = start_local_servers(require_nonce=True, token_lifetime=3)
        try:
            auth = DPoPAuth(signer, token_url=servers.token_url,
                            client_id=servers.client_id, client_secret=servers.client_secret)
            httpx.get(servers.api_url + "/things", auth=auth)
        finally:
            servers.stop()

    (or ``with start_local_servers() as servers:``). The returned `LocalServers` has
    ``as_url`` (issuer), ``token_url``, ``rs_url``, ``api_url`` (``<rs_url>/api``; any path
    below it works, ``/api/stream?bytes=N`` streams N bytes), ``authorization_server`` and
    ``resource_server`` (`LocalAuthorizationServer`, `LocalResourceServer`), ``client_id``,
    ``client_secret``, ``seen()`` and ``stop()``.

    Switches, also attributes of the server objects that a test may flip while they run:
    ``require_nonce`` (``.require_nonce`` on each; ``as_require_nonce``/``rs_require_nonce``
    set one side only), ``token_lifetime`` (seconds; AS ``.token_lifetime``), ``clock_skew``
    (seconds both servers' clocks, and so their ``Date`` headers, are ahead), ``nonce_rotation``
    (seconds; ``None``: rotate only on ``.rotate_nonce()``), AS ``.assertion_audience``.

    Clients: by default ``demo-client`` / ``demo-secret`` (basic or post). Pass
    ``client_secret=None, client_jwk=<public JWK>`` for a ``private_key_jwt`` client, or
    neither for a public client; more with ``authorization_server.register_client``.
    ``audience`` makes the RS require that ``aud`` (tokens carry the ``resource`` or
    ``audience`` parameter, else the issuer).

    Records: each server's ``.seen`` lists a `SeenProof` (endpoint, method, url as received,
    proof, access_token, nonce the server expected, jkt of the token, received_at, status,
    error, detail) for every ``DPoP`` header received; counters ``.token_requests`` (AS),
    ``.api_requests`` (RS), ``.statuses`` (a Counter by HTTP status), AS ``.issued_tokens`` and
    ``.last_token_request``; ``.clear()`` forgets them. To watch proofs as they arrive, or to
    make a server misbehave, subclass the servers (see their hooks) and use `LocalServers.start`.

    Raises:
        RuntimeError: a server did not start.
    """
    authorization_server = LocalAuthorizationServer(
        clients={},
        require_nonce=require_nonce if as_require_nonce is None else as_require_nonce,
        token_lifetime=token_lifetime,
        clock_skew=clock_skew,
        nonce_rotation=nonce_rotation,
    )
    authorization_server.register_client(client_id, secret=client_secret, jwk=client_jwk)
    resource_server = LocalResourceServer(
        authorization_server,
        require_nonce=require_nonce if rs_require_nonce is None else rs_require_nonce,
        clock_skew=clock_skew,
        nonce_rotation=nonce_rotation,
        audience=audience,
    )
    return LocalServers.start(
        authorization_server, resource_server, client_id=client_id, client_secret=client_secret
    )
