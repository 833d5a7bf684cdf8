"""A small fake authorization server + resource server for ``httpx.MockTransport``.

It is a plain callable (``FakeOAuth(...)`` is the transport's handler), written for the client
tests only: it shares no code with ``dpop_signer`` and runs ``tests/oracle.check_proof`` on every
proof it receives. A proof the fake accepts is checked on every RFC 9449 §4.3 check with the
server's clock and nonce; a proof it challenges on purpose (missing or stale nonce, ``iat``
outside its window) is checked on everything but the property being exercised. Every oracle
failure lands in ``fake.failures``; tests assert it stays empty.

Switches: ``as_nonce`` / ``rs_nonce`` = None | "require" | "always" | "repeat" | "no_header";
``as_failure`` = None | "500" | "html" | "invalid_client" | "json_list"; ``token_type``;
``lifetime``; ``invalid_token`` (how many API calls answer 401 invalid_token; -1 = always);
``skew`` (seconds the servers' clock is ahead); ``token_delay`` (seconds the token endpoint
takes, to make concurrent callers pile up).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import httpx

from tests import oracle

AS_URL = "https://as.example"
TOKEN_URL = f"{AS_URL}/token"
API_URL = "https://api.example"
CLIENT_ID = "svc client"
CLIENT_SECRET = "s3cr3t:%+/é-TOPSECRET"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def claims_of(proof: str) -> dict[str, Any]:
    return json.loads(_b64d(proof.split(".")[1]))


@dataclass
class Seen:
    kind: str  # "token" or "api"
    method: str
    url: str
    proof: str = field(repr=False)
    claims: dict[str, Any]
    accepted: bool = False


class FakeOAuth:
    def __init__(
        self,
        *,
        client_auth: str = "client_secret_basic",
        client_secret: str = CLIENT_SECRET,
        assertion_jwk: Any = None,
        token_type: str = "DPoP",
        lifetime: int | None = 3600,
        as_nonce: str | None = None,
        rs_nonce: str | None = None,
        as_failure: str | None = None,
        invalid_token: int = 0,
        skew: float = 0.0,
        window: float = 60.0,
        token_delay: float = 0.0,
        nonce_on_success: bool = True,
    ) -> None:
        self.client_auth = client_auth
        self.client_secret = client_secret
        self.assertion_jwk = assertion_jwk
        self.token_type = token_type
        self.lifetime = lifetime
        self.nonce_mode = {"token": as_nonce, "api": rs_nonce}
        self.as_failure = as_failure
        self.invalid_token = invalid_token
        self.skew = skew
        self.window = window
        self.token_delay = token_delay
        self.nonce_on_success = nonce_on_success
        self.current_nonce = {"token": "as-nonce-1", "api": "rs-nonce-1"}
        self._counter = itertools.count(2)
        self._lock = threading.Lock()
        self.token_requests = 0
        self.api_requests = 0
        self.seen: list[Seen] = []
        self.failures: list[str] = []
        self.forms: list[dict[str, list[str]]] = []
        self.basic: list[str | None] = []
        self.tokens: dict[str, tuple[str, float | None, str]] = {}  # value -> (jkt, exp, type)
        self.issued: list[str] = []
        self.assertion_jtis: list[str] = []
        self.api_bodies: list[bytes] = []

    # -- transports -------------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def async_transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.ahandle)

    async def ahandle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token" and self.token_delay:
            await asyncio.sleep(self.token_delay)
        return self.handle(request)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token" and self.token_delay:
            time.sleep(self.token_delay)
        return self.handle(request)

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            if request.url.host == "as.example":
                return self._token(request)
            return self._api(request)

    def rotate(self, kind: str) -> str:
        self.current_nonce[kind] = f"{kind}-nonce-{next(self._counter)}"
        return self.current_nonce[kind]

    def now(self) -> float:
        return time.time() + self.skew

    # -- shared proof handling --------------------------------------------------------------

    def _headers(self, kind: str, nonce: str | None = None, **extra: str) -> dict[str, str]:
        headers = {"Date": formatdate(self.now(), usegmt=True), **extra}
        if nonce is not None:
            headers["DPoP-Nonce"] = nonce
        elif self.nonce_mode[kind] == "require" and self.nonce_on_success:
            headers["DPoP-Nonce"] = self.current_nonce[kind]
        return headers

    def _challenge_nonce(self, kind: str) -> str | None:
        mode = self.nonce_mode[kind]
        if mode == "always":
            return self.rotate(kind)
        if mode == "repeat":
            return "the-same-nonce"
        if mode == "no_header":
            return None
        return self.current_nonce[kind]

    def _check(
        self, kind: str, request: httpx.Request, access_token: str | None, jkt: str | None
    ) -> tuple[str, Seen | None]:
        """Return ("ok" | "nonce" | "stale" | "bad", seen)."""
        proofs = request.headers.get_list("dpop")
        if len(proofs) != 1:
            self.failures.append(f"{kind}: {len(proofs)} DPoP headers")
            return "bad", None
        proof = proofs[0]
        try:
            claims = claims_of(proof)
        except ValueError:
            self.failures.append(f"{kind}: undecodable proof")
            return "bad", None
        seen = Seen(kind, request.method, str(request.url), proof, claims)
        self.seen.append(seen)
        now = self.now()
        mode = self.nonce_mode[kind]
        sent = claims.get("nonce")
        stale = not isinstance(claims.get("iat"), int) or abs(claims["iat"] - now) > self.window
        wants_nonce = mode is not None and (mode != "require" or sent != self.current_nonce[kind])
        exercised = stale or wants_nonce
        try:
            oracle.check_proof(
                proof,
                htm=request.method,
                url=str(request.url),
                access_token=access_token,
                nonce=sent if exercised else (self.current_nonce[kind] if mode else None),
                now=claims.get("iat") if stale else now,
                max_age=self.window,
                max_future=self.window,
                expected_jkt=jkt,
            )
        except (oracle.OracleError, TypeError) as exc:
            self.failures.append(f"{kind} {request.method} {request.url}: {exc}")
            return "bad", seen
        if stale and mode is None:
            return "stale", seen
        if exercised:
            return "nonce", seen
        seen.accepted = True
        return "ok", seen

    # -- authorization server ---------------------------------------------------------------

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests += 1
        form = parse_qs(request.content.decode("ascii"), keep_blank_values=True)
        self.forms.append(form)
        self.basic.append(request.headers.get("authorization"))
        failure = self.as_failure
        if failure == "500":
            return httpx.Response(
                500,
                text=f"stack trace: secret={self.client_secret}",
                headers=self._headers("token"),
            )
        if failure == "html":
            return httpx.Response(
                200,
                html=f"<html><body>login {self.client_secret}</body></html>",
                headers=self._headers("token"),
            )
        if failure == "json_list":
            return httpx.Response(200, json=["not", "an", "object"])
        if failure == "invalid_client" or not self._client_ok(request, form):
            return httpx.Response(
                401,
                json={
                    "error": "invalid_client",
                    "error_description": "client authentication failed",
                },
                headers=self._headers("token", **{"WWW-Authenticate": 'Basic realm="as"'}),
            )
        if form.get("grant_type") != ["client_credentials"]:
            self.failures.append(f"grant_type {form.get('grant_type')}")
        verdict, seen = self._check("token", request, None, None)
        if verdict == "bad":
            return httpx.Response(400, json={"error": "invalid_dpop_proof"})
        if verdict == "stale":
            return httpx.Response(
                400,
                json={"error": "invalid_dpop_proof", "error_description": "iat out of window"},
                headers=self._headers("token"),
            )
        if verdict == "nonce":
            return httpx.Response(
                400,
                json={"error": "use_dpop_nonce", "error_description": "nonce required"},
                headers=self._headers("token", self._challenge_nonce("token")),
            )
        assert seen is not None
        jkt = oracle.thumbprint(json.loads(_b64d(seen.proof.split(".")[0]))["jwk"])
        value = secrets.token_urlsafe(24) + "~.+/"
        expires_at = None if self.lifetime is None else self.now() + self.lifetime
        self.tokens[value] = (jkt, expires_at, self.token_type)
        self.issued.append(value)
        body: dict[str, Any] = {"access_token": value, "token_type": self.token_type}
        if self.lifetime is not None:
            body["expires_in"] = self.lifetime
        if form.get("scope"):
            body["scope"] = form["scope"][0]
        return httpx.Response(200, json=body, headers=self._headers("token"))

    def _client_ok(self, request: httpx.Request, form: dict[str, list[str]]) -> bool:
        auth = self.client_auth
        if auth == "client_secret_basic":
            header = request.headers.get("authorization", "")
            if not header.startswith("Basic ") or "client_secret" in form:
                return False
            user, _, password = base64.b64decode(header[6:]).decode("ascii").partition(":")
            # RFC 6749 §2.3.1: both halves are form-urlencoded before base64
            return unquote_plus(user) == CLIENT_ID and unquote_plus(password) == self.client_secret
        if "authorization" in request.headers:
            return False
        if form.get("client_id") != [CLIENT_ID]:
            return False
        if auth == "client_secret_post":
            return form.get("client_secret") == [self.client_secret]
        if auth == "none":
            return "client_secret" not in form and "client_assertion" not in form
        if auth == "private_key_jwt":
            return self._assertion_ok(form)
        return False

    def _assertion_ok(self, form: dict[str, list[str]]) -> bool:
        if form.get("client_assertion_type") != [ASSERTION_TYPE] or self.assertion_jwk is None:
            return False
        (assertion,) = form.get("client_assertion", [""])
        h64, c64, s64 = assertion.split(".")
        header = json.loads(_b64d(h64))
        claims = json.loads(_b64d(c64))
        try:
            oracle.verify_es256(self.assertion_jwk, f"{h64}.{c64}".encode(), _b64d(s64))
        except oracle.OracleError:
            return False
        now = self.now()
        if claims["jti"] in self.assertion_jtis:
            self.failures.append("client assertion jti replayed")
            return False
        self.assertion_jtis.append(claims["jti"])
        return (
            header.get("alg") == "ES256"
            and claims.get("iss") == CLIENT_ID
            and claims.get("sub") == CLIENT_ID
            and claims.get("aud") == TOKEN_URL
            and abs(claims["iat"] - now) <= self.window
            and now < claims["exp"] <= now + 600
        )

    # -- resource server --------------------------------------------------------------------

    def _api(self, request: httpx.Request) -> httpx.Response:
        self.api_requests += 1
        self.api_bodies.append(request.content)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        binding = self.tokens.get(token)
        # The scheme must match the token type: DPoP for DPoP tokens (RFC 9449 §7.2).
        if binding is None or scheme.lower() != binding[2].lower():
            return self._rs_challenge("invalid_token")
        if self.invalid_token:
            self.invalid_token -= 1
            return self._rs_challenge("invalid_token")
        jkt, expires_at, _ = binding
        if expires_at is not None and self.now() >= expires_at:
            return self._rs_challenge("invalid_token")
        verdict, seen = self._check("api", request, token, jkt)
        if verdict == "nonce":
            return self._rs_challenge("use_dpop_nonce", self._challenge_nonce("api"))
        if verdict != "ok":
            return self._rs_challenge("invalid_dpop_proof")
        assert seen is not None
        return httpx.Response(
            200, json={"ok": True, "jti": seen.claims["jti"]}, headers=self._headers("api")
        )

    def _rs_challenge(self, error: str, nonce: str | None = None) -> httpx.Response:
        challenge = f'Bearer realm="api", DPoP algs="ES256", error="{error}"'
        headers = self._headers("api", nonce, **{"WWW-Authenticate": challenge})
        return httpx.Response(401, json={"error": error}, headers=headers)
