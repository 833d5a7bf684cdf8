"""An echoing server cannot make us print the client secret, a proof or a token (issue 11.4).

The stub on 127.0.0.1 echoes what it received (the Authorization header, the form body, the
DPoP header, and the secret it decoded from them, raw, percent-encoded and base64) into its
``error_description`` and ``WWW-Authenticate``. Real ``dpop token -v``, ``dpop request -v``,
``dpop serve`` and ``dpop proxy`` processes talk to it, and none of what we sent may come back
out in stdout, stderr, a response body or a service log, while the message still says what the
server refused. The unit tests pin the rules of `dpop_signer.redaction` with values built here,
not by the code under test.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus

import pytest

from dpop_signer.config import load_settings
from dpop_signer.errors import ConfigError
from dpop_signer.redaction import Redactor, mask, mask_basic, mask_pin_values, redact_url
from tests.cli_support import Result, dpop
from tests.service_support import ServiceProcess, start_service

# Longer than 24 characters, and changed by form-urlencoding, percent-encoding and JSON.
SECRET = 's3cr3t+/=&%é:"\\ with space-0123456789'
CLIENT_ID = "echo-client"
# Three base64url segments with dots: a JWS (proofs, tokens, assertions), not ours to decide.
JWS_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
FAKE_TOKEN = (
    base64.urlsafe_b64encode(b'{"alg":"ES256","typ":"at+jwt"}').rstrip(b"=").decode()
    + "."
    + base64.urlsafe_b64encode(b'{"sub":"echo-client","scope":"x"}').rstrip(b"=").decode()
    + ".c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
)


def secret_forms(secret: str = SECRET, client_id: str = CLIENT_ID) -> list[str]:
    """Every form the secret travels in, computed here independently of the code under test."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return [
        secret,
        quote_plus(secret, safe=""),
        quote(secret, safe=""),
        base64.b64encode(pair.encode()).decode(),
        base64.b64encode(f"{client_id}:{secret}".encode()).decode(),
        base64.b64encode(secret.encode()).decode(),
        "s3cr3t",  # no prefix of it either
    ]


# -- a token endpoint and resource server that echo what they get ---------------------------


@dataclass
class Echo:
    url: str
    authorizations: list[str] = field(default_factory=list)
    proofs: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)

    def sent(self) -> list[str]:
        """The credentials the clients really sent (a form body's secret is in secret_forms)."""
        return [*self.authorizations, *self.proofs, FAKE_TOKEN]


def _handler(echo: Echo) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _received(self) -> tuple[str, str, str]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("ascii", "replace")
            authorization = self.headers.get("Authorization", "")
            proof = self.headers.get("DPoP", "")
            echo.authorizations.append(authorization)
            echo.proofs.append(proof)
            echo.bodies.append(body)
            return authorization, body, proof

        def do_POST(self) -> None:
            authorization, body, proof = self._received()
            if self.path == "/token-ok":
                answer = {"access_token": FAKE_TOKEN, "token_type": "DPoP", "expires_in": 300}
                self._reply(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})
                return
            # Decode the secret from what arrived, as a careless server's debug output would.
            secret = dict(parse_qsl(body)).get("client_secret", "")
            if authorization.startswith("Basic "):
                pair = base64.b64decode(authorization[6:]).decode()
                secret = unquote_plus(pair.partition(":")[2])
            description = (
                f"client authentication failed; got Authorization: {authorization} "
                f"body: {body} DPoP: {proof} secret: {secret} percent: {quote(secret)} "
                f"base64: {base64.b64encode(secret.encode()).decode()}"
            )
            answer = {"error": "invalid_client", "error_description": description}
            self._reply(
                401,
                json.dumps(answer).encode(),
                {
                    "Content-Type": "application/json",
                    "WWW-Authenticate": f'Basic realm="as", error_description="{authorization}"',
                },
            )

        def do_GET(self) -> None:
            authorization, _, proof = self._received()
            challenge = (
                f'DPoP error="invalid_request", error_description="refused '
                f'{authorization} with proof {proof}", algs="ES256"'
            )
            self._reply(
                401,
                b"denied\n",
                {"Content-Type": "text/plain", "WWW-Authenticate": challenge},
            )

    return Handler


@pytest.fixture
def echo() -> Iterator[Echo]:
    state = Echo("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))  # port 0: the OS picks
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        assert not thread.is_alive()


def env_for(key: str, token_url: str, **extra: str) -> dict[str, str]:
    return {
        "DPOP_KEY": key,
        "DPOP_TOKEN_URL": token_url,
        "DPOP_CLIENT_ID": CLIENT_ID,
        "DPOP_CLIENT_SECRET": SECRET,
        **extra,
    }


def assert_clean(text: str, echo: Echo) -> None:
    """None of the secret's forms, nothing we sent, no JWS shape is in ``text``."""
    for value in [*secret_forms(), *echo.sent()]:
        if len(value) >= 6:  # an empty body or header says nothing
            assert value not in text, f"{value[:12]!r}… leaked"
    found = JWS_LIKE.search(text)
    assert found is None, f"JWS-shaped text leaked: {found.group(0)[:20]!r}…"


def error_line(result: Result) -> str:
    lines = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.err
    return lines[0]


# -- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["client_secret_basic", "client_secret_post"])
def test_token_v_against_an_echoing_token_endpoint_leaks_nothing(
    echo: Echo, pem_key_path: str, client_auth: str
) -> None:
    result = dpop(
        "token",
        "-v",
        env=env_for(pem_key_path, echo.url + "/token", DPOP_CLIENT_AUTH=client_auth),
    )
    assert result.code == 4, result.err
    assert "Traceback" not in result.both
    assert len(echo.proofs) == 1
    assert echo.proofs[0].count(".") == 2
    assert_clean(result.both, echo)
    line = error_line(result)
    # Still says who refused what, and how to fix it.
    assert "refused the token request with HTTP 401 invalid_client" in line
    assert "client authentication failed" in line
    assert "client secret" in line  # the hint
    assert "***" in line
    assert "[JWS removed]" in line
    if client_auth == "client_secret_basic":
        # -v shows the Basic credentials by the id and the secret's length only.
        form_encoded_length = len(quote_plus(SECRET, safe=""))
        assert f"Authorization: Basic {CLIENT_ID}:…({form_encoded_length} chars)" in result.err
    else:
        assert f"client_secret=…({len(quote_plus(SECRET, safe=''))} chars)" not in result.err
        assert "client_secret=…(" in result.err


def test_request_v_against_an_echoing_token_endpoint_leaks_nothing(
    echo: Echo, pem_key_path: str
) -> None:
    result = dpop(
        "request", "-v", echo.url + "/api", env=env_for(pem_key_path, echo.url + "/token")
    )
    assert result.code == 4, result.err
    assert_clean(result.both, echo)
    line = error_line(result)
    assert "HTTP 401 invalid_client" in line
    assert "client authentication failed" in line
    assert '< WWW-Authenticate: Basic realm="as", error_description="Basic ***"' in result.err


def test_request_v_against_an_echoing_resource_server_leaks_nothing(
    echo: Echo, pem_key_path: str
) -> None:
    result = dpop(
        "request", "-v", echo.url + "/api?q=1", env=env_for(pem_key_path, echo.url + "/token-ok")
    )
    assert result.code == 1, result.err
    # The token request and the API request were both made, with the token and a proof.
    assert any(a.startswith("DPoP " + FAKE_TOKEN) for a in echo.authorizations)
    assert_clean(result.both, echo)
    assert "answered 401" in error_line(result)
    challenge = [
        line for line in result.err.splitlines() if line.lower().startswith("< www-authenticate")
    ]
    assert len(challenge) == 1, result.err
    assert 'error="invalid_request"' in challenge[0]
    assert "[JWS removed]" in challenge[0]


# -- dpop serve and dpop proxy ---------------------------------------------------------------


def _service(kind: str, echo: Echo, key: str, tmp_path: Path, *extra: str) -> ServiceProcess:
    return start_service(
        [
            kind,
            "--listen",
            f"unix:{tmp_path / 'run' / 'dpop.sock'}",
            "--key",
            key,
            "--token-url",
            echo.url + "/token",
            "--client-id",
            CLIENT_ID,
            *extra,
        ],
        tmp_path / "logs",
        env={"DPOP_CLIENT_SECRET": SECRET},
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    return tmp_path


def test_serve_502_body_and_log_leak_nothing(echo: Echo, pem_key_path: str, run_dir: Path):
    service = _service("serve", echo, pem_key_path, run_dir, "--allow-origin", echo.url)
    try:
        with service.client() as client:
            answer = client.post("/v1/headers", json={"htm": "GET", "htu": echo.url + "/api"})
    finally:
        assert service.stop() == 0, service.logs()[-2000:]
    assert answer.status_code == 502, answer.text
    assert echo.proofs, "the service never asked the token endpoint"
    body = answer.json()
    assert body["error"] == "token_endpoint_error"
    assert "HTTP 401 invalid_client" in body["message"]
    assert "client authentication failed" in body["message"]
    assert_clean(answer.text, echo)
    assert_clean(service.logs(), echo)


def test_proxy_502_body_and_log_leak_nothing(echo: Echo, pem_key_path: str, run_dir: Path):
    service = _service("proxy", echo, pem_key_path, run_dir, "--upstream", echo.url)
    try:
        with service.client() as client:
            answer = client.get("/api")
    finally:
        assert service.stop() == 0, service.logs()[-2000:]
    assert answer.status_code == 502, answer.text
    assert echo.proofs, "the proxy never asked the token endpoint"
    assert "HTTP 401 invalid_client" in answer.json()["message"]
    assert_clean(answer.text, echo)
    assert_clean(service.logs(), echo)


# -- the rules, value by value ---------------------------------------------------------------


def test_every_form_of_the_secret_and_every_jws_is_removed() -> None:
    proof = FAKE_TOKEN.replace("c2ln", "cHJv")
    forms = secret_forms()[:-1]
    urlsafe = base64.urlsafe_b64encode(f"xy{SECRET}z".encode()).decode()  # at an odd offset
    text = " | ".join([*forms, urlsafe, proof, FAKE_TOKEN, "invalid_client: try again"])
    cleaned = Redactor([SECRET], client_id=CLIENT_ID)(text, limit=None)
    for value in [*forms, urlsafe, proof, FAKE_TOKEN, "s3cr3t"]:
        assert value not in cleaned
    assert cleaned.count("[JWS removed]") == 2
    assert cleaned.endswith("invalid_client: try again")


def test_server_text_is_flattened_and_capped() -> None:
    cleaned = Redactor()("line one\r\nforged: log line\u202e" + "x" * 5000)
    assert "\n" not in cleaned
    assert "\r" not in cleaned
    assert "\u202e" not in cleaned
    assert len(cleaned) == 300 + 1
    assert cleaned.endswith("…")
    assert "line one forged: log line" in cleaned


def test_ordinary_text_with_dots_and_urls_is_kept() -> None:
    text = "token endpoint http://127.0.0.1:8080/token at as.example.com v1.2.3 refused"
    assert Redactor([SECRET])(text) == text


def test_mask_never_shows_a_prefix() -> None:
    assert mask("x" * 100) == "…(100 chars)"
    credentials = base64.b64encode(f"{CLIENT_ID}:{'y' * 30}".encode()).decode()
    assert mask_basic(credentials) == f"{CLIENT_ID}:…(30 chars)"


def test_urls_lose_user_info_query_and_fragment() -> None:
    url = "https://svc:hunter22@as.example:8443/oauth/token?client_secret=abc#frag"
    assert redact_url(url) == "https://…@as.example:8443/oauth/token?…(17 chars)#…(4 chars)"


def test_a_pin_value_in_a_key_uri_never_shows(tmp_path: Path) -> None:
    uri = "pkcs11:token=t;object=k?pin-value=pin-7xq93&module-path=/x.so"
    assert mask_pin_values(uri) == "pkcs11:token=t;object=k?pin-value=***&module-path=/x.so"
    settings = load_settings({"key": uri, "assertion_key": uri}, env={})
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert "pin-7xq93" not in shown
        assert "pin-value=***" in shown
    assert "pin-7xq93" not in json.dumps(settings.model_dump())
    # The real value is still what the signer gets, also after a late value was added.
    assert settings.with_values("the prompt", scope="s").key == uri


def test_config_errors_show_urls_redacted() -> None:
    with pytest.raises(ConfigError, match="token_url") as info:
        load_settings({"token_url": "ftp://u:pw-93kq@h/x?client_secret=zz7"}, env={})
    assert "pw-93kq" not in str(info.value)
    assert "zz7" not in str(info.value)


def test_key_with_pin_value_on_the_command_line_warns_like_pin(tmp_path: Path) -> None:
    uri = f"pkcs11:token=t;object=k?pin-value=pin-7xq93&module-path={tmp_path}/none.so"
    result = dpop("thumbprint", "--key", uri)
    assert result.code != 0
    assert "warning: --key with pin-value= on the command line can be read by other" in result.err
    assert "pin-7xq93" not in result.both
    assert "Traceback" not in result.both


def test_doctor_masks_the_token_url_query_and_user_info(pem_key_path: str, echo: Echo) -> None:
    url = echo.url.replace("http://", "http://svc:pw-93kq@") + "/token?client_secret=zz7"
    result = dpop("doctor", env=env_for(pem_key_path, url))
    assert "token endpoint reachable" in result.out
    assert "pw-93kq" not in result.both
    assert "zz7" not in result.both
    assert "?…(17 chars)" in result.out
    assert_clean(result.both, echo)
