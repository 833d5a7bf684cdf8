"""Fixtures for the second independent server pair: authgent-server, express-oauth2-jwt-bearer.

``authgent_stack`` gives a test an authorization server and a resource server that share no code
with dpop_signer nor with the first pair (oidc-provider and jose, tests/interop_fixtures.py):

- the AS is authgent-server (PyPI, pinned in the Makefile) in its own virtualenv
  ``.venv-authgent`` (``make test`` builds it), because it brings a web stack of its own that
  has no business in ours. It runs from `_LAUNCHER` below on 127.0.0.1 with a port from the OS,
  a throw-away SQLite database and secret, and every outbound feature off (see `_authgent_env`).
  The launcher wraps the unmodified authgent ASGI app in a recorder of token endpoint requests
  (method, URL, DPoP header, status, error, DPoP-Nonce) served on ``/_interop/requests``, so the
  tests can re-check every proof the AS received, also those the ``dpop`` CLI sent.
- the RS is tests/interop/rs2.mjs: Auth0's express-oauth2-jwt-bearer verifying the token and
  the proof, plus a jti replay check of ours that a switch turns off (see that file).

authgent-server has one nonce switch for the whole process (``AUTHGENT_REQUIRE_DPOP``: DPoP
required at the token endpoint and a nonce demanded from every proof), so two AS processes run
per session, ``plain`` and ``nonce``, each with its own RS (the RS trusts one issuer). The
processes start on first use and stop at the end of the session (startup is about a second).

Without the virtualenv, node or ``make node-deps`` the tests skip on a developer machine and
fail under CI (``conftest.require``).

Use (register the module in tests/conftest.py's ``pytest_plugins``)::

    def test_something(authgent_stack):
        stack = authgent_stack("nonce")        # or "plain"
        client_id, secret = stack.client       # a fresh client_credentials client
        ...  # token from stack.authgent.token_url, API calls to stack.rs.url + "anything"
        assert [e["status"] for e in stack.authgent.requests()] == [401, 200]
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, require
from tests.interop_fixtures import INTEROP_DIR, NodeProcess, start_node_server

__all__ = [
    "AUTHGENT_VENV",
    "Authgent",
    "AuthgentStack",
    "ExpressRs",
    "authgent_stack",
]

AUTHGENT_VENV = ROOT / ".venv-authgent"
AUTHGENT_PYTHON = AUTHGENT_VENV / "bin" / "python"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
SCOPE = "api:read api:write"
Mode = str  # "plain" | "nonce"

# Runs inside .venv-authgent. Binds 127.0.0.1:0 itself (the port goes into the AS's issuer URL
# before the app reads its settings), writes one ready line on the descriptor in
# INTEROP_READY_FD once uvicorn is listening (everything authgent prints goes to stderr), and
# exits when stdin closes (the test runner died).
_LAUNCHER = r"""
import json, os, socket, sys, threading, urllib.parse

ready = os.fdopen(int(os.environ.pop("INTEROP_READY_FD")), "w")
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.bind(("127.0.0.1", 0))
port = sock.getsockname()[1]
base = f"http://127.0.0.1:{port}"
os.environ["AUTHGENT_SERVER_URL"] = base
os.environ["AUTHGENT_PORT"] = str(port)

import uvicorn
from authgent_server.app import create_app

inner = create_app()
records = []


async def reply(send, status, body):
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def app(scope, receive, send):
    if scope["type"] != "http":
        return await inner(scope, receive, send)
    if scope["path"] == "/_interop/requests":
        query = urllib.parse.parse_qs(scope["query_string"].decode())
        since = int(query.get("since", ["0"])[0])
        return await reply(send, 200, {"count": len(records), "requests": records[since:]})
    if scope["path"] != "/token":
        return await inner(scope, receive, send)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    entry = {"seq": len(records), "method": scope["method"], "url": f"http://{headers.get('host')}/token",
             "dpop": headers.get("dpop"), "status": None, "error": None, "dpop_nonce": None,
             "www_authenticate": None, "token_type": None}
    records.append(entry)
    body = []

    async def recording_send(message):
        if message["type"] == "http.response.start":
            entry["status"] = message["status"]
            for k, v in message.get("headers", []):
                name = k.decode("latin-1").lower()
                if name == "dpop-nonce":
                    entry["dpop_nonce"] = v.decode("latin-1")
                elif name == "www-authenticate":
                    entry["www_authenticate"] = v.decode("latin-1")
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                try:
                    parsed = json.loads(b"".join(body))
                except ValueError:
                    parsed = {}
                if isinstance(parsed, dict):
                    entry["error"] = parsed.get("error")
                    entry["token_type"] = parsed.get("token_type")
        await send(message)

    await inner(scope, receive, recording_send)


class Server(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if not self.should_exit:
            ready.write(json.dumps({"ready": True, "issuer": base, "port": port}) + "\n")
            ready.flush()


server = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))


def watch_stdin():
    sys.stdin.buffer.read()
    server.should_exit = True


threading.Thread(target=watch_stdin, daemon=True).start()
server.run(sockets=[sock])
"""


def _require_authgent() -> None:
    require(
        AUTHGENT_PYTHON.exists(),
        "the authgent-server virtualenv .venv-authgent is missing: run `make test` "
        "(or `make .venv-authgent/.installed`)",
    )


def _authgent_env(workdir: Path, *, require_nonce: bool) -> dict[str, str]:
    """The AS's settings (AUTHGENT_*, its config.py): loopback only, nothing outbound."""
    # Only what the process needs from ours: no proxies, no REDIS_URL (authgent reads it), no
    # DPOP_* settings.
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "LANG", "LC_ALL", "TZ"}}
    env.update(
        {
            "AUTHGENT_HOST": "127.0.0.1",
            "AUTHGENT_SECRET_KEY": secrets.token_hex(32),
            "AUTHGENT_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'authgent.db'}",
            "AUTHGENT_REGISTRATION_POLICY": "open",
            # DPoP required at the token endpoint, and with it a nonce in every proof.
            "AUTHGENT_REQUIRE_DPOP": "true" if require_nonce else "false",
            # Its per-IP limits (100 token and 10 registration requests a minute) would throttle
            # a test session.
            "AUTHGENT_TOKEN_RATE_LIMIT": "100000",
            "AUTHGENT_REGISTER_RATE_LIMIT": "100000",
            "AUTHGENT_TELEMETRY": "0",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return env


@dataclass
class AuthgentProcess:
    """One authgent-server process; `stop` ends it by its PID."""

    process: subprocess.Popen[bytes]
    ready: dict[str, Any]
    workdir: Path
    stderr_path: Path

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self.process.stdin is not None:
            self.process.stdin.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_authgent(*, require_nonce: bool, timeout: float = READY_TIMEOUT) -> AuthgentProcess:
    """Start authgent-server on a free loopback port and wait for the launcher's ready line."""
    _require_authgent()
    workdir = Path(tempfile.mkdtemp(prefix="dpop-authgent-"))
    stderr_path = workdir / "stderr.log"
    read_fd, write_fd = os.pipe()
    env = _authgent_env(workdir, require_nonce=require_nonce)
    env["INTEROP_READY_FD"] = str(write_fd)
    with open(stderr_path, "wb") as stderr_file:
        process = subprocess.Popen(
            [str(AUTHGENT_PYTHON), "-c", _LAUNCHER],
            # authgent reads ./.env: the empty work directory has none.
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=stderr_file,
            stderr=stderr_file,
            pass_fds=(write_fd,),
        )
    os.close(write_fd)
    handle = AuthgentProcess(process, {}, workdir, stderr_path)
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector, os.fdopen(read_fd, "rb", buffering=0) as pipe:
        selector.register(pipe, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                break
            if selector.select(min(remaining, 0.5)):
                chunk = pipe.read(4096)
                if not chunk:
                    break
                buffer += chunk
    line = buffer.split(b"\n", 1)[0]
    try:
        ready = json.loads(line) if line else {}
    except ValueError:
        ready = {}
    if not isinstance(ready, dict) or ready.get("ready") is not True:
        stderr = handle.stderr()
        handle.stop()
        pytest.fail(
            f"authgent-server did not become ready within {timeout:.0f} s "
            f"(exit status {process.returncode}); stderr: {stderr[-2000:]}"
        )
    handle.ready = ready
    return handle


def _get(url: str) -> dict[str, Any]:
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        response = client.get(url)
    response.raise_for_status()
    result = response.json()
    assert isinstance(result, dict)
    return result


@dataclass
class Authgent:
    """A handle on one authgent-server process for one test.

    Attributes:
        issuer: ``http://127.0.0.1:PORT`` (its ``issuer`` metadata, no trailing slash).
        token_url: its token endpoint.
        require_nonce: whether it demands a DPoP nonce (``AUTHGENT_REQUIRE_DPOP``).
        since: token requests it had recorded before this test; `requests` starts there.
    """

    issuer: str
    token_url: str
    require_nonce: bool
    process: AuthgentProcess
    since: int = 0

    def requests(self) -> list[dict[str, Any]]:
        """Token requests since this handle was made, oldest first.

        Each: method, url, dpop, status, error, dpop_nonce, www_authenticate, token_type.
        """
        seen = _get(f"{self.issuer}/_interop/requests?since={self.since}")["requests"]
        assert isinstance(seen, list)
        return seen

    def register_client(self, auth_method: str = "client_secret_basic") -> tuple[str, str]:
        """Register a DPoP client_credentials client (RFC 7591); return (client_id, secret)."""
        metadata = {
            "client_name": "dpop-signer interop",
            "grant_types": ["client_credentials"],
            "scope": SCOPE,
            "token_endpoint_auth_method": auth_method,
            "dpop_bound_access_tokens": True,
        }
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            response = client.post(f"{self.issuer}/register", json=metadata)
        assert response.status_code == 201, f"registration failed: {response.status_code}"
        body = response.json()
        return str(body["client_id"]), str(body["client_secret"])


@dataclass
class ExpressRs:
    """A handle on one express-oauth2-jwt-bearer resource server (tests/interop/rs2.mjs).

    Attributes:
        url: ``http://127.0.0.1:PORT/``, also the resource indicator (RFC 8707) and token ``aud``.
        since: requests it had seen before this test; `seen` starts there.
    """

    url: str
    node: NodeProcess
    since: int = 0

    def configure(self, *, replay_check: bool) -> None:
        """Turn rs2.mjs's jti replay check (RFC 9449 §11.1) on or off."""
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            response = client.post(
                self.url + "_interop/config", json={"replay_check": replay_check}
            )
        response.raise_for_status()

    def seen(self) -> list[dict[str, Any]]:
        """API requests since this handle was made: method, url, proof, access_token, status."""
        seen = _get(f"{self.url}_interop/seen?since={self.since}")["seen"]
        assert isinstance(seen, list)
        return seen


@dataclass
class AuthgentStack:
    """One AS, its RS and a client registered for this test."""

    authgent: Authgent
    rs: ExpressRs
    client: tuple[str, str]


def _check_alive(running: bool, what: str, stderr: str) -> None:
    if not running:
        pytest.fail(f"{what} exited: {stderr[-2000:]}")


@pytest.fixture(scope="session")
def _authgent_servers() -> Iterator[dict[Mode, tuple[AuthgentProcess, NodeProcess]]]:
    """authgent-server processes and their resource servers, started on first use per mode."""
    started: dict[Mode, tuple[AuthgentProcess, NodeProcess]] = {}
    yield started
    for as_process, rs_process in started.values():
        rs_process.stop()
        as_process.stop()


def _require_rs2() -> None:
    require(
        (INTEROP_DIR / "node_modules" / "express-oauth2-jwt-bearer").is_dir(),
        "tests/interop/node_modules lacks express-oauth2-jwt-bearer: run `make node-deps`",
    )


@pytest.fixture
def authgent_stack(
    _authgent_servers: dict[Mode, tuple[AuthgentProcess, NodeProcess]],
) -> Iterator[Callable[[Mode], AuthgentStack]]:
    """Factory: ``authgent_stack("plain" | "nonce")`` -> an `AuthgentStack` with a fresh client.

    The RS's replay check is on at the start of the test and again after it.
    """
    used: list[ExpressRs] = []

    def make(mode: Mode) -> AuthgentStack:
        assert mode in ("plain", "nonce"), mode
        _require_authgent()
        _require_rs2()
        if mode not in _authgent_servers:
            as_process = start_authgent(require_nonce=mode == "nonce")
            issuer = str(as_process.ready["issuer"])
            try:
                rs_process = start_node_server(
                    "rs2.mjs",
                    {
                        "RS2_PORT": "0",
                        "RS2_ISSUER": issuer,
                        "RS2_JWKS_URI": f"{issuer}/.well-known/jwks.json",
                    },
                )
            except BaseException:
                as_process.stop()
                raise
            _authgent_servers[mode] = (as_process, rs_process)
        as_process, rs_process = _authgent_servers[mode]
        _check_alive(as_process.process.poll() is None, "authgent-server", as_process.stderr())
        _check_alive(
            rs_process.process.poll() is None, "tests/interop/rs2.mjs", rs_process.stderr()
        )
        issuer = str(as_process.ready["issuer"])
        authgent = Authgent(
            issuer=issuer,
            token_url=f"{issuer}/token",
            require_nonce=mode == "nonce",
            process=as_process,
        )
        client = authgent.register_client()
        authgent.since = int(_get(f"{issuer}/_interop/requests?since=0")["count"])
        rs = ExpressRs(url=str(rs_process.ready["url"]), node=rs_process)
        rs.configure(replay_check=True)
        rs.since = int(_get(f"{rs.url}_interop/seen?since=0")["count"])
        used.append(rs)
        return AuthgentStack(authgent, rs, client)

    yield make
    for rs in used:
        if rs.node.process.poll() is None:
            rs.configure(replay_check=True)
