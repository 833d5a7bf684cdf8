"""The session log that ``dpop request -v``, ``dpop token -v`` and ``dpop demo`` print.

The log reads like ``curl -v``: ``>`` lines are what we sent, ``<`` lines what came back, ``*``
lines are commentary. It is fed by httpx event hooks, so it shows every request the client
really sends, including the token request that `DPoPAuth` makes inside its auth flow and any
nonce retry.

Nothing secret is ever printed (RFC 9449 §11 and the project's logging rule); the rules are in
`dpop_signer.redaction`. Access and refresh tokens, proofs, client secrets, assertions, PINs
and nonces are shown by length only (`mask`). A proof is summarised by its non-secret claims
(``jti``, ``htm``, ``htu``, ``iat``), which is what one needs to debug it. Basic credentials are
shown as ``client_id:…(N chars)``. What the servers send back (header values, JSON bodies) goes
through the log's `Redactor`, because a server may echo the credentials it received.
"""

from __future__ import annotations

import json
import re
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from dpop_signer.jose import peek_claims
from dpop_signer.redaction import Redactor, mask, mask_basic, mask_pin_values, redact_url

if TYPE_CHECKING:
    import httpx

__all__ = ["SessionLog", "mask", "mask_json", "mask_uri", "summarize_proof"]

_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "dpop", "dpop-nonce", "cookie", "set-cookie"}
)
_SECRET_KEY = re.compile(r"token|secret|password|passphrase|assertion|nonce|pin", re.I)
_PUBLIC_KEYS = frozenset({"token_type", "expires_in", "issued_token_type", "token_url"})
# Header values and body strings from servers are cut longer than in one-line messages: the
# log is for debugging, and every value stays on its own line.
_LOG_LIMIT = 2000


def mask_uri(ref: str) -> str:
    """A key reference fit to print: a ``pin-value=`` in a PKCS#11 URI is masked."""
    return mask_pin_values(ref)


def _is_secret_key(key: str) -> bool:
    return key not in _PUBLIC_KEYS and bool(_SECRET_KEY.search(key))


def mask_json(value: Any) -> Any:
    """A copy of a JSON value with every string under a secret-looking key masked."""
    if isinstance(value, dict):
        return {
            k: mask(str(v)) if _is_secret_key(str(k)) and isinstance(v, str | int) else mask_json(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_json(v) for v in value]
    return value


def summarize_proof(proof: str) -> str:
    """The non-secret claims of a DPoP proof: ``jti=... htm=POST htu=... iat=...``.

    ``ath`` and ``nonce`` are shown only as present (masked); the rest of the proof is never
    printed. A value that does not decode is described, not echoed.
    """
    claims = peek_claims(proof)
    if claims is None:
        return "(not a decodable JWS with a JSON object of claims)"
    parts = [f"{name}={claims[name]}" for name in ("jti", "htm", "htu", "iat") if name in claims]
    parts += [f"{name}={mask(str(claims[name]))}" for name in ("ath", "nonce") if name in claims]
    return " ".join(parts)


def _mask_header(name: str, value: str) -> str:
    lname = name.lower()
    if lname not in _SECRET_HEADERS:
        return value
    scheme, _, credentials = value.partition(" ")
    if lname in ("authorization", "proxy-authorization") and credentials:
        if scheme.lower() == "basic":
            return f"Basic {mask_basic(credentials)}"
        return f"{scheme} {mask(credentials)}"
    return mask(value)


def _mask_form(body: bytes) -> str:
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        return f"({len(body)} bytes)"
    return "&".join(f"{k}={mask(v) if _is_secret_key(k) else v}" for k, v in pairs)


class SessionLog:
    """Writes a masked, curl-style log of every exchange an httpx client makes.

    Install it with ``httpx.Client(event_hooks=log.hooks())``. ``token_url`` lets the log
    label the token request and show its (masked) form body and JSON response; API bodies are
    left to the caller, which prints them itself. ``redactor`` cleans what the servers send
    back; build it with the client secret so that an echo of it is removed in every encoding.
    """

    def __init__(
        self, out: IO[str], *, token_url: str | None = None, redactor: Redactor | None = None
    ) -> None:
        self._out = out
        self._token_url = token_url
        self._redact = redactor if redactor is not None else Redactor()
        self._exchanges = 0

    def hooks(self) -> dict[str, list[Any]]:
        """Event hooks for `httpx.Client`."""
        return {"request": [self.on_request], "response": [self.on_response]}

    def note(self, text: str) -> None:
        """Write a ``*`` commentary line."""
        self._write(f"* {text}")

    def _write(self, line: str) -> None:
        print(line, file=self._out, flush=True)

    def _is_token_request(self, request: httpx.Request) -> bool:
        if self._token_url is None or request.method != "POST":
            return False
        import httpx

        want = httpx.URL(self._token_url)
        got = request.url
        return (got.scheme, got.host, got.port, got.path) == (
            want.scheme,
            want.host,
            want.port,
            want.path,
        )

    def on_request(self, request: httpx.Request) -> None:
        """Log one outgoing request (httpx ``request`` hook)."""
        self._exchanges += 1
        token = self._is_token_request(request)
        what = "token request (client_credentials)" if token else "API request"
        if self._exchanges > 1:
            self._write("")
        self._write(f"* {what}: {request.method} {redact_url(request.url.copy_with(query=None))}")
        target = request.url.raw_path.decode("ascii", "replace")
        # The query may carry anything; show its length, not its content.
        path, _, query = target.partition("?")
        shown = path + (f"?…({len(query)} chars)" if query else "")
        self._write(f"> {request.method} {shown} HTTP/1.1")
        for raw_name, raw_value in request.headers.raw:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            self._write(f"> {name}: {_mask_header(name, value)}")
            if name.lower() == "dpop":
                self._write(f">   (proof {summarize_proof(value)})")
        body = _request_body(request)
        if body:
            self._write(">")
            if token:
                self._write(f"> {_mask_form(body)}")
            else:
                self._write(f"> ({len(body)} bytes of body)")

    def on_response(self, response: httpx.Response) -> None:
        """Log one response (httpx ``response`` hook); reads token-endpoint bodies."""
        http_version = response.http_version or "HTTP/1.1"
        self._write(f"< {http_version} {response.status_code} {response.reason_phrase}")
        for raw_name, raw_value in response.headers.raw:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            if name.lower() in _SECRET_HEADERS:
                shown = _mask_header(name, value)
            else:  # server text (WWW-Authenticate, Location, ...): it may echo what it got
                shown = self._redact(value, limit=_LOG_LIMIT)
            self._write(f"< {name}: {shown}")
        if self._is_token_request(response.request) or response.status_code >= 400:
            body = response.read()
            if body:
                self._write("<")
                content_type = response.headers.get("content-type")
                self._write(f"< {self._describe_body(body, content_type)}")
            if self._is_token_request(response.request) and response.status_code == 200:
                self._note_binding(body)
        if response.status_code in (400, 401) and "dpop-nonce" in response.headers:
            self.note("the server demands a DPoP nonce: retrying once with the server's nonce")

    def _describe_body(self, body: bytes, content_type: str | None) -> str:
        if content_type and "json" in content_type.lower():
            try:
                value = self._redact.clean_json(mask_json(json.loads(body)), limit=_LOG_LIMIT)
            except ValueError:
                pass
            else:
                return json.dumps(value, ensure_ascii=False)
        return f"({len(body)} bytes of {self._redact(content_type or 'unknown type')})"

    def _note_binding(self, body: bytes) -> None:
        # The token's own claims are not secret to its holder; cnf.jkt shows the binding
        # (RFC 9449 §6.1) without showing the token.
        try:
            claims = peek_claims(json.loads(body).get("access_token", "")) or {}
            jkt = claims["cnf"]["jkt"]
        except (AttributeError, KeyError, TypeError, ValueError):
            return
        self.note(f"the access token is a JWT bound to the key: cnf.jkt={jkt}")


def _request_body(request: httpx.Request) -> bytes:
    try:
        return request.content
    except Exception:  # httpx.RequestNotRead: a streamed upload; its length is unknown
        return b""
