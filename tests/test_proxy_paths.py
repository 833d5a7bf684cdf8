"""``dpop proxy`` against path tricks, bad framing and outages (issue 11, item 5).

A real ``dpop proxy`` process with the SoftHSM2 key in front of a small echo server on
127.0.0.1 that records every request target it receives, so a test sees exactly what reached
the upstream (and with which token). Requests go out on raw sockets: httpx would remove the
dot-segments before sending, hiding the attack.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dpop_signer.testing.servers import LocalServers, start_local_servers
from tests.conftest import SoftHsmToken
from tests.service_support import (
    ServiceProcess,
    raw_exchange,
    start_service,
    status_of,
    write_api_key,
)

pytestmark = pytest.mark.softhsm

BASE = "/echo/public"


@dataclass
class Echo:
    port: int
    paths: list[str] = field(default_factory=list)
    authorized: list[bool] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def echo() -> Iterator[Echo]:
    record = Echo(0)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            record.paths.append(self.path)  # the raw request target, as received
            record.authorized.append(self.headers.get("Authorization", "").startswith("DPoP "))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield record
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def servers() -> Iterator[LocalServers]:
    with start_local_servers() as running:
        yield running


ProxyFactory = Callable[..., ServiceProcess]


@pytest.fixture(scope="module")
def start_proxy(
    softhsm: SoftHsmToken,
    pkcs11_key_uri: str,
    servers: LocalServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyFactory]:
    started: list[ServiceProcess] = []
    workdir = tmp_path_factory.mktemp("proxy-paths")
    secret_file = workdir / "client-secret"
    secret_file.write_text(str(servers.client_secret))

    def start(upstream: str, *extra: str, token_url: str | None = None) -> ServiceProcess:
        n = len(started)
        key = write_api_key(workdir / f"api-key-{n}")
        proxy = start_service(
            [
                "proxy",
                "--upstream",
                upstream,
                "--listen",
                "127.0.0.1:0",
                "--api-key-file",
                str(workdir / f"api-key-{n}"),
                "--key",
                softhsm.uri("session-es256"),
                "--token-url",
                token_url or servers.token_url,
                "--client-id",
                servers.client_id,
                "--client-secret-file",
                str(secret_file),
                "--timeout",
                "5",
                *extra,
            ],
            Path(workdir / f"logs-{n}"),
            env={"DPOP_PIN": softhsm.pin},
            api_key=key,
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        assert proxy.stop() == 0, proxy.logs()[-2000:]


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, echo: Echo) -> ServiceProcess:
    return start_proxy(echo.url + BASE)


def _get(proxy: ServiceProcess, target: bytes) -> bytes:
    request = (
        b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Proxy-Authorization: Bearer " + str(proxy.api_key).encode() + b"\r\n\r\n"
    )
    return raw_exchange(proxy.address, request)


@pytest.mark.parametrize(
    "target",
    [
        b"/../private/x",
        b"/../../hop",
        b"/..",
        b"/%2e%2e/private/x",
        b"/%2E%2E/private/x",
        b"/.%2E/private/x",
        b"/%2e./private/x",
        b"/a/../../private/x",
        b"/a/./../../private",
        b"/a/..%2f..%2fprivate",
        b"/a/..%5C..%5Cprivate",
        b"/a/..\\..\\private",
        b"/%252e%252e/private",
        b"/../private/x?q=1",
    ],
)
def test_paths_that_climb_above_the_base_are_refused(
    proxy: ServiceProcess, echo: Echo, target: bytes
):
    before = len(echo.paths)
    answer = _get(proxy, target)
    assert status_of(answer) == 400, answer[:300]
    assert b"path_outside_upstream" in answer
    assert echo.paths[before:] == []  # nothing reached the upstream, with or without token


@pytest.mark.parametrize(
    ("target", "received"),
    [
        (b"/x", f"{BASE}/x"),
        (b"/a/../b", f"{BASE}/b"),
        (b"/a/%2e%2e/b?q=1", f"{BASE}/b?q=1"),
        (b"/a/./b/.", f"{BASE}/a/b/"),
        (b"/a/..b/c", f"{BASE}/a/..b/c"),
        (b"/a%2Fb", f"{BASE}/a%2Fb"),
    ],
)
def test_paths_below_the_base_are_resolved_before_the_join(
    proxy: ServiceProcess, echo: Echo, target: bytes, received: str
):
    before = len(echo.paths)
    answer = _get(proxy, target)
    assert status_of(answer) == 200, answer[:300]
    assert echo.paths[before:] == [received]
    assert echo.authorized[-1]


def test_invalid_chunked_body_never_reaches_the_upstream(proxy: ServiceProcess, echo: Echo):
    before = len(echo.paths)
    request = (
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Proxy-Authorization: Bearer " + str(proxy.api_key).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n0\r\n\r\n"
    )
    answer = raw_exchange(proxy.address, request)
    assert status_of(answer) == 400, answer[:300]
    # Give a request that was (wrongly) sent upstream time to arrive, bounded.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and len(echo.paths) == before:
        time.sleep(0.05)
    assert echo.paths[before:] == []
    # A valid chunked body still goes through.
    request = (
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Proxy-Authorization: Bearer " + str(proxy.api_key).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert status_of(raw_exchange(proxy.address, request)) == 200
    assert echo.paths[-1] == f"{BASE}/upload"


def _closed_port() -> int:
    # A port nobody listens on: bound, never listening, so connections are refused.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def test_an_unreachable_token_endpoint_is_named_as_such(start_proxy: ProxyFactory, echo: Echo):
    port = _closed_port()
    proxy = start_proxy(echo.url + BASE, token_url=f"http://127.0.0.1:{port}/token")
    before = len(echo.paths)
    answer = _get(proxy, b"/x")
    assert status_of(answer) in (502, 504), answer[:300]
    body = answer.partition(b"\r\n\r\n")[2]
    assert b"token_endpoint_unreachable" in body
    assert f"127.0.0.1:{port}".encode() in body  # names the token endpoint...
    assert f":{echo.port}".encode() not in body  # ...not the upstream
    assert echo.paths[before:] == []


def test_replay_buffers_have_a_total_cap(start_proxy: ProxyFactory, servers: LocalServers):
    # The resource server demands a nonce, so every request whose nonce is stale is sent
    # twice: only a kept body can be sent again. 768 KiB bodies, each within --replay-limit.
    body = b"x" * (768 * 1024)
    roomy = start_proxy(
        servers.rs_url, "--replay-limit", str(1 << 20), "--replay-total", str(1 << 20)
    )
    tight = start_proxy(
        servers.rs_url, "--replay-limit", str(1 << 20), "--replay-total", str(512 * 1024)
    )
    servers.resource_server.require_nonce = True
    try:
        for proxy, expected in ((roomy, 200), (roomy, 200), (tight, 502)):
            servers.resource_server.rotate_nonce()  # the nonce the proxy holds is stale
            request = (
                b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Proxy-Authorization: Bearer " + str(proxy.api_key).encode() + b"\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            answer = raw_exchange(proxy.address, request, timeout=20)
            assert status_of(answer) == expected, answer[:400]
            if expected == 502:
                assert b"retry_impossible" in answer
    finally:
        servers.resource_server.require_nonce = False
