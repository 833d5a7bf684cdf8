"""Fixtures that run the independent node servers of tests/interop/ on free loopback ports.

``oidc_provider`` is panva's oidc-provider (a strict DPoP authorization server,
tests/interop/as.mjs) and ``jose_rs`` a resource server that verifies with the ``jose`` npm
library (tests/interop/rs.mjs). Neither shares code with dpop_signer, so a client bug cannot
hide behind the same bug on the server side.

Each node process starts once per test session (startup costs about half a second) and its
switches (nonce demands, token lifetime, forced ``invalid_token``) change live through its
``/_interop/config`` hook; the function-scoped fixtures set them for one test and reset them
afterwards. Every handle remembers how many requests the server had seen when the test began,
so ``requests()`` / ``seen()`` return exactly what this test caused.

Without node or ``make node-deps`` the tests skip on a developer machine and fail under CI
(``conftest.require``).

Use (the fixtures are registered for every test module by tests/conftest.py)::

    def test_something(oidc_provider, jose_rs):
        provider = oidc_provider(require_nonce=True, ttl=3)   # switches for this test only
        client_id, secret = provider.basic_client             # client_secret_basic
        ...  # token from provider.token_url, API calls to jose_rs.url + "anything"
        assert [e["error"] for e in provider.requests()] == ["use_dpop_nonce", None]
        assert all(e["status"] == 200 for e in jose_rs.seen())

Static clients: ``basic-client``/``basic-secret`` (client_secret_basic) and
``post-client``/``post-secret`` (client_secret_post); ``provider.register_client(jwk=...)``
registers a private_key_jwt client for any public key (RFC 7591). In a test that uses
``jose_rs``, a token request without ``resource`` gets a DPoP-bound JWT for ``jose_rs.url``
(it is the AS's default resource); ``resource=jose_rs.url`` gets one in any case.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require

__all__ = [
    "INTEROP_DIR",
    "JoseResourceServer",
    "NodeProcess",
    "OidcProvider",
    "jose_rs",
    "jose_rs_server",
    "oidc_provider",
    "oidc_provider_server",
    "start_node_server",
]

INTEROP_DIR = Path(__file__).resolve().parent / "interop"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

# Static clients of as.mjs (id -> (secret, token_endpoint_auth_method)).
BASIC_CLIENT = ("basic-client", "basic-secret")
POST_CLIENT = ("post-client", "post-secret")
DEFAULT_TTL = 300


def _require_node() -> str:
    node = shutil.which("node")
    require(node is not None, "node is not installed (Debian: apt-get install nodejs npm)")
    assert node is not None
    require(
        (INTEROP_DIR / "node_modules" / "oidc-provider").is_dir()
        and (INTEROP_DIR / "node_modules" / "jose").is_dir(),
        "tests/interop/node_modules is missing: run `make node-deps`",
    )
    return node


@dataclass
class NodeProcess:
    """One node server started by `start_node_server`; `stop` ends it by its PID."""

    process: subprocess.Popen[bytes]
    ready: dict[str, Any]
    stderr_path: Path

    @property
    def pid(self) -> int:
        """The process id (the only handle used to stop it)."""
        return self.process.pid

    def stderr(self) -> str:
        """What the process wrote on stderr so far (for failure messages)."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process, SIGKILL it when it has not exited after a few seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self.stderr_path.unlink(missing_ok=True)


def start_node_server(
    script: str, env: dict[str, str], *, timeout: float = READY_TIMEOUT
) -> NodeProcess:
    """Start ``node tests/interop/<script>`` and wait for its ``{"ready": true, ...}`` line.

    Args:
        script: file name in tests/interop/ (``as.mjs`` or ``rs.mjs``).
        env: variables added to this process's environment for the child.
        timeout: seconds to wait for the ready line before killing the child.

    Returns:
        The running process and its parsed ready line.
    """
    node = _require_node()
    fd, name = tempfile.mkstemp(prefix=f"dpop-interop-{script}-", suffix=".stderr")
    stderr_path = Path(name)
    with os.fdopen(fd, "wb") as stderr_file:
        process = subprocess.Popen(
            [node, str(INTEROP_DIR / script)],
            cwd=INTEROP_DIR,
            # Node exits when this pipe closes, so a killed test run leaves no server behind.
            env={**os.environ, "INTEROP_EXIT_ON_STDIN_EOF": "1", **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
    handle = NodeProcess(process, {}, stderr_path)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                break
            if selector.select(min(remaining, 0.5)):
                chunk = os.read(process.stdout.fileno(), 4096)
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
            f"tests/interop/{script} did not become ready within {timeout:.0f} s "
            f"(exit status {process.returncode}); stdout: {buffer[:500]!r}; "
            f"stderr: {stderr[-2000:]}"
        )
    handle.ready = ready
    return handle


def _control(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        if body is None:
            response = client.get(base.rstrip("/") + path)
        else:
            response = client.post(base.rstrip("/") + path, json=body)
    response.raise_for_status()
    result = response.json()
    assert isinstance(result, dict)
    return result


@dataclass
class OidcProvider:
    """A handle on the session's oidc-provider, configured for one test.

    Attributes:
        issuer: ``http://127.0.0.1:PORT`` (no trailing slash, as oidc-provider spells it).
        token_url: its token endpoint.
        node: the running process.
        since: requests the server had seen before this test; `requests` starts there.
    """

    issuer: str
    token_url: str
    node: NodeProcess
    since: int = 0
    basic_client: tuple[str, str] = BASIC_CLIENT
    post_client: tuple[str, str] = POST_CLIENT
    registered: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        return int(self.node.ready["port"])

    def configure(self, *, require_nonce: bool | None = None, ttl: int | None = None) -> None:
        """Change the live switches: nonce demands at the token endpoint and token lifetime."""
        body: dict[str, Any] = {}
        if require_nonce is not None:
            body["require_nonce"] = require_nonce
        if ttl is not None:
            body["ttl"] = ttl
        _control(self.issuer, "/_interop/config", body)

    def requests(self) -> list[dict[str, Any]]:
        """Token endpoint requests since this handle was made: dpop, status, error, dpop_nonce."""
        seen = _control(self.issuer, f"/_interop/requests?since={self.since}")["requests"]
        assert isinstance(seen, list)
        return seen

    def register_client(
        self,
        *,
        jwk: dict[str, Any] | None = None,
        auth_method: str = "private_key_jwt",
    ) -> dict[str, Any]:
        """Register a DPoP-bound client_credentials client (RFC 7591) and return its metadata.

        Args:
            jwk: public key for ``private_key_jwt`` (registered as the client's ``jwks``).
            auth_method: ``token_endpoint_auth_method`` (secret methods get a generated secret).

        Returns:
            The registration response (``client_id``, ``client_secret`` when one was issued).
        """
        metadata: dict[str, Any] = {
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
            "scope": "api:read api:write",
            "token_endpoint_auth_method": auth_method,
            "dpop_bound_access_tokens": True,
        }
        if jwk is not None:
            metadata["jwks"] = {"keys": [jwk]}
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            response = client.post(f"{self.issuer}/reg", json=metadata)
        assert response.status_code == 201, f"registration failed: {response.text}"
        result = response.json()
        assert isinstance(result, dict)
        self.registered.append(result["client_id"])
        return result


@dataclass
class JoseResourceServer:
    """A handle on the session's jose resource server, configured for one test.

    Attributes:
        url: ``http://127.0.0.1:PORT/``, also the resource indicator (RFC 8707) and token ``aud``.
        node: the running process.
        since: requests the server had seen before this test; `seen` starts there.
    """

    url: str
    node: NodeProcess
    since: int = 0

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        return int(self.node.ready["port"])

    def configure(
        self,
        *,
        require_nonce: bool | None = None,
        rotate_nonce: bool | None = None,
        invalid_token: int | None = None,
    ) -> None:
        """Change the live switches (see tests/interop/rs.mjs)."""
        body: dict[str, Any] = {}
        if require_nonce is not None:
            body["require_nonce"] = require_nonce
        if rotate_nonce is not None:
            body["rotate_nonce"] = rotate_nonce
        if invalid_token is not None:
            body["invalid_token"] = invalid_token
        _control(self.url, "/_interop/config", body)

    def seen(self) -> list[dict[str, Any]]:
        """API requests since this handle was made: method, url, proof, access_token, status."""
        seen = _control(self.url, f"/_interop/seen?since={self.since}")["seen"]
        assert isinstance(seen, list)
        return seen


def _check_alive(node: NodeProcess, what: str) -> None:
    if node.process.poll() is not None:
        pytest.fail(f"{what} exited with status {node.process.returncode}: {node.stderr()[-2000:]}")


@pytest.fixture(scope="session")
def oidc_provider_server() -> Iterator[NodeProcess]:
    """The session's oidc-provider process (tests/interop/as.mjs) on a free loopback port."""
    node = start_node_server("as.mjs", {"AS_PORT": "0", "AS_REQUIRE_NONCE": "off"})
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def jose_rs_server(oidc_provider_server: NodeProcess) -> Iterator[NodeProcess]:
    """The session's jose resource server (tests/interop/rs.mjs), trusting the session's AS.

    It also becomes the AS's default resource, so a token request without ``resource`` (the CLI,
    the service) still gets a JWT access token bound to the proof key and meant for this RS.
    """
    issuer = str(oidc_provider_server.ready["issuer"])
    node = start_node_server("rs.mjs", {"RS_PORT": "0", "RS_ISSUER": issuer})
    try:
        _control(issuer, "/_interop/config", {"default_resource": node.ready["url"]})
        yield node
    finally:
        node.stop()


@pytest.fixture
def oidc_provider(oidc_provider_server: NodeProcess) -> Iterator[Callable[..., OidcProvider]]:
    """Factory: ``oidc_provider(require_nonce=False, ttl=300)`` -> a configured `OidcProvider`.

    The process is shared by the session; the switches are reset after the test.
    """
    node = oidc_provider_server
    issuer = str(node.ready["issuer"])

    def configure(*, require_nonce: bool = False, ttl: int = DEFAULT_TTL) -> OidcProvider:
        _check_alive(node, "oidc-provider (tests/interop/as.mjs)")
        handle = OidcProvider(issuer=issuer, token_url=str(node.ready["token_endpoint"]), node=node)
        handle.configure(require_nonce=require_nonce, ttl=ttl)
        handle.since = int(_control(issuer, "/_interop/requests?since=0")["count"])
        return handle

    yield configure
    if node.process.poll() is None:
        _control(issuer, "/_interop/config", {"require_nonce": False, "ttl": DEFAULT_TTL})


@pytest.fixture
def jose_rs(jose_rs_server: NodeProcess) -> Iterator[JoseResourceServer]:
    """The jose resource server with every switch off, counting from this test's first request."""
    node = jose_rs_server
    _check_alive(node, "jose resource server (tests/interop/rs.mjs)")
    url = str(node.ready["url"])
    reset = {"require_nonce": False, "rotate_nonce": False, "invalid_token": 0}
    _control(url, "/_interop/config", reset)
    handle = JoseResourceServer(url=url, node=node)
    handle.since = int(_control(url, "/_interop/seen?since=0")["count"])
    yield handle
    if node.process.poll() is None:
        _control(url, "/_interop/config", reset)
