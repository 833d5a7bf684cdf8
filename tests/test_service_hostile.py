"""``dpop serve`` against hostile callers on the same machine (issue 11, items 3 and 6).

Real ``dpop serve`` processes with the SoftHSM2 key, raw sockets where a well-behaved client
would hide the misbehaviour: idle, slow-header and slow-body connections, more connections than
the open-files limit allows, callers that leave mid-body, absolute-form targets and duplicate
``Host`` headers, ``htu`` values no request can go to, and a caller's nonce on ``/v1/headers``.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from dpop_signer.jwk import b64url_decode
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

READ_TIMEOUT = 1.0
ALLOWED = "https://api.example"


@pytest.fixture(scope="module")
def servers() -> Iterator[LocalServers]:
    with start_local_servers() as running:
        yield running


ServeFactory = Callable[..., ServiceProcess]


@pytest.fixture(scope="module")
def start_serve(
    softhsm: SoftHsmToken,
    pkcs11_key_uri: str,
    servers: LocalServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServeFactory]:
    started: list[ServiceProcess] = []
    workdir = tmp_path_factory.mktemp("hostile")
    secret_file = workdir / "client-secret"
    secret_file.write_text(str(servers.client_secret))

    def start(*extra: str, nofile: int | None = None) -> ServiceProcess:
        n = len(started)
        key = write_api_key(workdir / f"api-key-{n}")
        args = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-key-file",
            str(workdir / f"api-key-{n}"),
            "--key",
            softhsm.uri("session-es256"),
            "--token-url",
            servers.token_url,
            "--client-id",
            servers.client_id,
            "--client-secret-file",
            str(secret_file),
            "--read-timeout",
            str(READ_TIMEOUT),
            *extra,
        ]
        env = {"DPOP_PIN": softhsm.pin}
        log_dir = workdir / f"logs-{n}"
        if nofile is None:
            service = start_service(args, log_dir, env=env, api_key=key)
        else:
            service = start_service(args, log_dir, nofile=nofile, env=env, api_key=key)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def svc(start_serve: ServeFactory) -> ServiceProcess:
    return start_serve()


def _connect(service: ServiceProcess) -> socket.socket:
    host, _, port = service.address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setblocking(False)
    return sock


def _wait_all_closed(socks: list[socket.socket], bound: float) -> float:
    """Seconds until the server closed every socket; fails after ``bound`` seconds."""
    started = time.monotonic()
    open_ = list(socks)
    while open_ and time.monotonic() - started < bound:
        readable, _, _ = select.select(open_, [], [], 0.2)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                open_.remove(sock)
    elapsed = time.monotonic() - started
    assert not open_, f"{len(open_)} of {len(socks)} connections still open after {bound} s"
    return elapsed


def _events(service: ServiceProcess) -> list[dict[str, Any]]:
    return service.events()  # fails on any line that is not JSON


def _proof_request(service: ServiceProcess, htu: str, **fields: Any) -> bytes:
    body = json.dumps({"htm": "GET", "htu": htu, **fields}).encode()
    return (
        b"POST /v1/proof HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer " + str(service.api_key).encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )


# -- item 3: idle sockets ------------------------------------------------------------------


def test_idle_slow_header_and_slow_body_connections_are_closed(svc: ServiceProcess):
    idle = [_connect(svc) for _ in range(20)]
    slow_header = [_connect(svc) for _ in range(10)]
    for sock in slow_header:
        sock.sendall(b"POST /v1/proof HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    slow_body = [_connect(svc) for _ in range(10)]
    key = b"Authorization: Bearer " + str(svc.api_key).encode() + b"\r\n"
    for number, sock in enumerate(slow_body):
        # Half with the API key (the handler waits for the body), half without (answered 401
        # at once; the rest of the body never comes).
        sock.sendall(
            b"POST /v1/proof HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + (key if number % 2 else b"")
            + b'Content-Length: 100\r\n\r\n{"htm":'
        )
    try:
        # The read timeout is 1 s: every one of them is closed well within 4 s.
        elapsed = _wait_all_closed(idle + slow_header + slow_body, bound=4 * READ_TIMEOUT)
        assert elapsed >= READ_TIMEOUT * 0.8  # not before the timeout either
    finally:
        for sock in idle + slow_header + slow_body:
            sock.close()
    with svc.client() as client:
        assert client.get("/healthz").status_code == 200
    levels = {event["level"] for event in _events(svc)}
    assert "error" not in levels


def test_a_body_that_keeps_trickling_is_not_cut(svc: ServiceProcess):
    # The read timeout bounds each pause, not the whole body: 8 parts 0.3 s apart (2.4 s in
    # all, more than twice the timeout) make a normal answer.
    body = json.dumps({"htm": "GET", "htu": f"{ALLOWED}/slow"}).encode()
    parts = [body[i : i + 8] for i in range(0, len(body), 8)]
    head = (
        b"POST /v1/proof HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer " + str(svc.api_key).encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    host, _, port = svc.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        for part in parts:
            time.sleep(0.3)  # the misbehaviour under test: pauses shorter than the timeout
            sock.sendall(part)
        answer = sock.recv(65536)
    assert status_of(answer) == 200, answer[:300]


def test_keep_alive_connections_close_when_idle(svc: ServiceProcess):
    sock = _connect(svc)
    try:
        sock.setblocking(True)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status_of(sock.recv(65536)) == 200
        sock.setblocking(False)
        elapsed = _wait_all_closed([sock], bound=10.0)
        assert 3.0 <= elapsed <= 8.0  # uvicorn's keep-alive timeout is 5 s
    finally:
        sock.close()


def test_300_idle_sockets_under_ulimit_256_do_not_stop_real_requests(start_serve: ServeFactory):
    # --read-timeout 60: the idle sockets are not closed by the timer during this test; only
    # the connection cap can keep the service answering.
    service = start_serve("--read-timeout", "60", nofile=256)
    starting = next(e for e in _events(service) if e["event"] == "starting")
    assert 0 < starting["max_connections"] < 256
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(_connect(service))
        started = time.monotonic()
        for _ in range(5):
            answer = raw_exchange(
                service.address, _proof_request(service, f"{ALLOWED}/x"), timeout=5
            )
            assert status_of(answer) == 200, answer[:300]
        assert time.monotonic() - started < 10
        assert service.alive()
    finally:
        for sock in idle:
            sock.close()
    log = (service.log_dir / "stderr").read_bytes()
    assert len(log) < 200_000, f"{len(log)} bytes of log"
    assert b"Traceback" not in log
    assert all(e["level"] != "error" for e in _events(service))


def test_accept_errors_are_one_json_line_per_interval(start_serve: ServeFactory):
    # 13 open files: the service uses about 7 itself and the minimum cap is 8 connections,
    # so accept() fails with EMFILE. Without the rate limit asyncio writes a traceback per
    # failed accept, thousands a second.
    service = start_serve("--read-timeout", "60", nofile=13)
    socks: list[socket.socket] = []
    try:
        # 20 connections: about 6 descriptors are free, so accept() fails while they wait
        # (the listen queue holds the rest; each retry a second later fails again).
        for _ in range(20):
            socks.append(_connect(service))
        time.sleep(2.5)  # asyncio retries accept() every second: let it fail a few times
        assert service.alive()
    finally:
        for sock in socks:
            sock.close()
    events = _events(service)  # every line is JSON
    loop_errors = [e for e in events if e["event"] == "loop_error"]
    assert loop_errors, "the service never ran out of descriptors; lower nofile in this test"
    kinds = {(e["message"], e.get("exception")) for e in loop_errors}
    assert len(loop_errors) <= len(kinds)  # within 10 s: one line per kind
    assert (service.log_dir / "stderr").stat().st_size < 50_000
    # Once the sockets are gone it answers again.
    with service.client() as client:  # its timeout (30 s) bounds the wait
        assert client.get("/healthz").status_code == 200


def test_a_caller_leaving_mid_body_is_client_gone_at_info(svc: ServiceProcess):
    before = len(_events(svc))
    for _ in range(3):
        sock = _connect(svc)
        sock.setblocking(True)
        sock.sendall(
            b"POST /v1/proof HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + str(svc.api_key).encode() + b"\r\n"
            b'Content-Length: 500\r\n\r\n{"htm": "GET"'
        )
        time.sleep(0.1)  # the body has started streaming into the handler
        sock.close()
    deadline = time.monotonic() + 5
    gone: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(gone) < 3:
        gone = [e for e in _events(svc)[before:] if e["event"] == "client_gone"]
        time.sleep(0.05)
    assert len(gone) == 3
    assert {e["level"] for e in gone} == {"info"}
    new = _events(svc)[before:]
    assert not [e for e in new if e["level"] == "error" or e["event"] == "internal_error"]


def test_sigterm_with_100_half_sent_bodies_exits_cleanly_and_quietly(start_serve: ServeFactory):
    service = start_serve("--read-timeout", "60")
    socks = []
    try:
        for _ in range(100):
            sock = _connect(service)
            sock.setblocking(True)
            sock.sendall(
                b"POST /v1/proof HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b"Authorization: Bearer " + str(service.api_key).encode() + b"\r\n"
                b'Content-Length: 500\r\n\r\n{"htm": "GET"'
            )
            socks.append(sock)
        time.sleep(0.3)  # the requests reached their handlers
        started = time.monotonic()
        assert service.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5  # not the 10 s graceful wait
    finally:
        for sock in socks:
            sock.close()
    events = _events(service)
    assert [e for e in events if e["level"] == "error"] == []
    assert events[-1]["event"] == "exit"


# -- item 6: Host checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"http://evil.example/healthz", 421),
        (b"http://evil.example:8787/healthz", 421),
        (b"http://127.0.0.1.nip.io/healthz", 421),
        (b"http://127.0.0.1/healthz", 200),
        (b"http://localhost:1/healthz", 200),
    ],
)
def test_absolute_form_targets_must_name_loopback(svc: ServiceProcess, target: bytes, status: int):
    request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(svc.address, request)
    assert status_of(answer) == status, answer[:300]
    if status == 421:
        assert b"misdirected_request" in answer


@pytest.mark.parametrize(
    "hosts",
    [
        [b"127.0.0.1", b"evil.example"],
        [b"evil.example", b"127.0.0.1"],
        [b"127.0.0.1", b"127.0.0.1"],
        [],
    ],
)
def test_requests_without_exactly_one_host_are_refused(svc: ServiceProcess, hosts: list[bytes]):
    lines = b"".join(b"Host: " + host + b"\r\n" for host in hosts)
    request = b"GET /healthz HTTP/1.1\r\n" + lines + b"Connection: close\r\n\r\n"
    answer = raw_exchange(svc.address, request)
    assert status_of(answer) == 400, answer[:300]
    assert b"invalid_host" in answer


# -- item 6: htu validity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "htu",
    [
        "https://api.example:0/x",
        "https://api.example:65536/x",
        "https://a..b/",
        "https://xn--/",
        "https://.api.example/",
        "https://api-.example/",
        "https://a b/",
        "https://{a}/",
        "https://a%20b/",
        "ftp://api.example/",
        "/relative",
    ],
)
def test_invalid_htu_gets_422_and_no_proof(svc: ServiceProcess, htu: str):
    with svc.client() as client:
        response = client.post("/v1/proof", json={"htm": "GET", "htu": htu})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"
    assert "proof" not in response.json()


@pytest.mark.parametrize(
    "htu",
    [
        "https://api.example:1/x",
        "https://api.example:65535/x",
        "http://[::1]:8080/x",
        "https://10.0.0.1/x",
        "https://svc_internal.example/x",
        "https://xn--mnchen-3ya.example/x",
        "https://api.example./x",
    ],
)
def test_valid_htu_edge_cases_get_a_proof(svc: ServiceProcess, htu: str):
    with svc.client() as client:
        response = client.post("/v1/proof", json={"htm": "GET", "htu": htu})
    assert response.status_code == 200, response.text


def test_openapi_schema_says_what_htu_must_be(svc: ServiceProcess):
    import re

    with svc.client() as client:
        document = client.get("/openapi.json").json()
    for model in ("ProofRequest", "HeadersRequest"):
        htu = document["components"]["schemas"][model]["properties"]["htu"]
        assert htu["format"] == "uri"
        assert "1-65535" in htu["description"]
        pattern = re.compile(htu["pattern"])
        assert pattern.search("https://api.example/v1/x")
        assert pattern.search("HTTP://[::1]:8080/")
        for bad in ("ftp://a/", "https://a:123456/", "https://{a}/", "https://a b/", "/x"):
            assert not pattern.search(bad), bad


# -- item 6: a caller's nonce -------------------------------------------------------------


def _nonce_of(headers: dict[str, str]) -> object:
    claims = json.loads(b64url_decode(headers["DPoP"].split(".")[1]))
    return claims.get("nonce")


def test_a_callers_nonce_is_used_for_that_request_only(svc: ServiceProcess, servers: LocalServers):
    htu = f"{servers.rs_url}/api/x"
    with svc.client() as client:
        first = client.post("/v1/headers", json={"htm": "GET", "htu": htu, "nonce": "caller-A"})
        assert first.status_code == 200, first.text
        assert _nonce_of(first.json()["headers"]) == "caller-A"
        # Another caller, same origin, no nonce: nothing of caller A's leaks into its proof.
        second = client.post("/v1/headers", json={"htm": "GET", "htu": htu})
        assert second.status_code == 200, second.text
        assert _nonce_of(second.json()["headers"]) is None
        third = client.post("/v1/headers", json={"htm": "GET", "htu": htu, "nonce": "caller-B"})
        assert _nonce_of(third.json()["headers"]) == "caller-B"
        assert (
            _nonce_of(client.post("/v1/headers", json={"htm": "GET", "htu": htu}).json()["headers"])
            is None
        )


def test_the_headers_still_work_at_the_resource_server(svc: ServiceProcess, servers: LocalServers):
    htu = f"{servers.rs_url}/api/x"
    with svc.client() as client:
        headers = client.post("/v1/headers", json={"htm": "GET", "htu": htu}).json()["headers"]
    with httpx.Client(trust_env=False, timeout=10) as plain:
        assert plain.get(htu, headers=headers).status_code == 200
