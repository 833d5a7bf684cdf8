"""``dpop proxy`` as a real process in front of the local resource server, SoftHSM2 key.

The resource server checks the token and the proof of every forwarded request (and the
``oracle_check`` fixture re-checks each proof it received); it echoes the SHA-256 of the body
it read, and streams bodies back from ``/api/stream``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dpop_signer.testing.servers import LocalServers, start_local_servers
from tests.conftest import SoftHsmToken
from tests.interop_fixtures import JoseResourceServer, OidcProvider
from tests.oracle import check_proof
from tests.service_support import ServiceProcess, nodelay_transport, start_service, write_api_key

pytestmark = pytest.mark.softhsm

FIVE_MB = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def servers() -> Iterator[LocalServers]:
    with start_local_servers() as running:
        yield running


@pytest.fixture(scope="module")
def key_ref(pkcs11_key_uri: str, softhsm: SoftHsmToken) -> str:
    return softhsm.uri("session-es256")


ProxyFactory = Callable[..., ServiceProcess]


@pytest.fixture(scope="module")
def start_proxy(
    servers: LocalServers,
    key_ref: str,
    softhsm: SoftHsmToken,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyFactory]:
    started: list[ServiceProcess] = []
    workdir = tmp_path_factory.mktemp("proxy")
    secret_file = workdir / "client-secret"
    secret_file.write_text(str(servers.client_secret))

    def start(*extra: str, upstream: str | None = None) -> ServiceProcess:
        n = len(started)
        key = write_api_key(workdir / f"api-key-{n}")
        proxy = start_service(
            [
                "proxy",
                "--upstream",
                upstream or servers.rs_url,
                "--listen",
                "127.0.0.1:0",
                "--api-key-file",
                str(workdir / f"api-key-{n}"),
                "--key",
                key_ref,
                "--token-url",
                servers.token_url,
                "--client-id",
                servers.client_id,
                "--client-secret-file",
                str(secret_file),
                "--leeway",
                "0",
                *extra,
            ],
            workdir / f"logs-{n}",
            env={"DPOP_PIN": softhsm.pin},
            api_key=key,
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        assert proxy.stop() == 0, proxy.logs()[-2000:]


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory) -> ServiceProcess:
    return start_proxy()


def _client(proxy: ServiceProcess, key: str | None = None) -> httpx.Client:
    headers = {"Proxy-Authorization": f"Bearer {proxy.api_key if key is None else key}"}
    return httpx.Client(
        base_url=proxy.url,
        headers=headers,
        trust_env=False,
        timeout=60.0,
        transport=nodelay_transport(),
    )


@pytest.fixture
def reset(servers: LocalServers) -> Iterator[LocalServers]:
    yield servers
    servers.resource_server.require_nonce = False
    servers.authorization_server.require_nonce = False
    servers.authorization_server.token_lifetime = 3600.0


def test_requests_reach_the_upstream_with_token_and_proof(
    proxy: ServiceProcess, reset: LocalServers
):
    with _client(proxy) as client:
        response = client.get("/api/things/a%2Fb?page=2&q=x")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is True
    assert body["client_id"] == reset.client_id
    seen = reset.resource_server.seen[-1]
    assert seen.url.endswith("/api/things/a%2Fb?page=2&q=x")
    assert seen.status == 200


def test_5mb_bodies_pass_both_ways_unchanged_through_a_nonce_demand(
    proxy: ServiceProcess, reset: LocalServers
):
    reset.resource_server.require_nonce = True
    reset.resource_server.rotate_nonce()  # the proxy's cached nonce is stale: a demand follows
    payload = os.urandom(FIVE_MB)
    before = reset.resource_server.api_requests

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]

    with _client(proxy) as client:
        for content in (payload, chunks()):  # with Content-Length, then chunked
            response = client.post("/api/upload", content=content)
            assert response.status_code == 200, response.text
            assert response.json()["body_len"] == FIVE_MB
            assert response.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()
        # The first upload met a nonce demand and was sent again from the replay buffer.
        assert reset.resource_server.api_requests - before >= 3
        with client.stream("GET", f"/api/stream?bytes={FIVE_MB}") as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-length"] == str(FIVE_MB)
            received = b"".join(streamed.iter_raw())
    assert received == b"x" * FIVE_MB


def test_nonce_rotation_and_token_expiry_are_handled(
    start_proxy: ProxyFactory, reset: LocalServers
):
    proxy = start_proxy()  # a fresh proxy: its first token is the short-lived one
    reset.authorization_server.token_lifetime = 1.0
    reset.resource_server.require_nonce = True
    tokens_before = reset.authorization_server.token_requests
    with _client(proxy) as client:
        assert client.post("/api/one", content=b"1").status_code == 200
        reset.resource_server.rotate_nonce()
        time.sleep(1.2)  # the token has expired
        response = client.put("/api/two", content=b"22")
        assert response.status_code == 200, response.text
        assert response.json()["body_len"] == 2
    assert reset.authorization_server.token_requests - tokens_before >= 2


def test_the_proxy_needs_its_api_key(proxy: ServiceProcess):
    for key in ("x", "wrong-" + secrets.token_hex(16)):
        with _client(proxy, key) as client:
            response = client.get("/api/x")
        assert response.status_code == 407
        assert response.headers["proxy-authenticate"].startswith("Bearer")
        assert response.json()["error"] == "unauthorized"
    with httpx.Client(base_url=proxy.url, trust_env=False) as anonymous:
        assert anonymous.get("/api/x").status_code == 407


def test_requests_for_other_host_names_are_refused(proxy: ServiceProcess):
    with _client(proxy) as client:
        response = client.get("/api/x", headers={"Host": "rebound.example"})
    assert response.status_code == 421
    assert response.json()["error"] == "misdirected_request"


def test_a_body_beyond_the_replay_limit_cannot_be_retried_but_the_next_try_works(
    start_proxy: ProxyFactory, reset: LocalServers
):
    small = start_proxy("--replay-limit", "1024")
    reset.resource_server.require_nonce = True
    reset.resource_server.rotate_nonce()
    payload = os.urandom(100_000)
    with _client(small) as client:
        first = client.post("/api/big", content=payload)
        assert first.status_code == 502, first.text
        assert first.json()["error"] == "retry_impossible"
        second = client.post("/api/big", content=payload)
        assert second.status_code == 200, second.text
        assert second.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_an_unreachable_upstream_gives_502(start_proxy: ProxyFactory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    dead = start_proxy(upstream=f"http://127.0.0.1:{closed_port}")
    with _client(dead) as client:
        response = client.get("/anything")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_unreachable"
    assert dead.alive()


def test_hop_by_hop_headers_are_dropped_and_encodings_pass_through(
    proxy: ServiceProcess, reset: LocalServers
):
    with _client(proxy) as client:
        response = client.get(
            "/api/h",
            headers={
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "must-not-arrive",
                "Authorization": "Bearer caller-token-must-not-arrive",
                "DPoP": "caller.proof.dropped",
            },
        )
    assert response.status_code == 200, response.text
    seen = reset.resource_server.seen[-1]
    # The upstream saw the proxy's token and proof, not the caller's.
    assert seen.access_token is not None
    assert seen.access_token != "caller-token-must-not-arrive"
    assert seen.proof != "caller.proof.dropped"
    assert "transfer-encoding" not in {k.lower() for k in response.headers if k == "keep-alive"}


def test_no_token_proof_api_key_or_secret_in_the_proxy_log(
    start_proxy: ProxyFactory, reset: LocalServers
):
    proxy = start_proxy("--log-level", "debug")
    reset.resource_server.require_nonce = True
    before = len(reset.resource_server.seen)
    with _client(proxy) as client:
        for i in range(3):
            assert client.get(f"/api/logged/{i}").status_code == 200
        client.get("/api/x", headers={"Proxy-Authorization": "Bearer " + "w" * 40})
    proxy.stop()
    logs = proxy.logs()
    assert '"event":"proxy"' in logs
    secrets_seen = [str(proxy.api_key), str(reset.client_secret), "w" * 40]
    for seen in reset.resource_server.seen[before:]:
        secrets_seen += [seen.proof, str(seen.access_token)]
        if seen.nonce:
            secrets_seen.append(seen.nonce)
    for value in secrets_seen:
        assert value not in logs
        for part in value.split(".")[1:]:
            if len(part) >= 16:
                assert part not in logs
    lines = [e for e in proxy.events() if e.get("event") == "proxy" and e.get("status") == 200]
    assert len(lines) == 3
    assert all(len(line["jti"]) >= 16 for line in lines)
    assert not Path(proxy.log_dir / "stdout").read_text()


@pytest.mark.interop
def test_through_the_proxy_to_the_jose_rs_with_oidc_provider_tokens(
    oidc_provider: Any,
    jose_rs: JoseResourceServer,
    key_ref: str,
    softhsm: SoftHsmToken,
    tmp_path: Path,
):
    # Independent servers on both sides, each demanding nonces; the RS revokes the first
    # token it sees (401 invalid_token), which forces one renewal inside the proxy.
    provider: OidcProvider = oidc_provider(require_nonce=True)
    jose_rs.configure(require_nonce=True, invalid_token=1)
    client_id, client_secret = provider.basic_client
    (tmp_path / "secret").write_text(client_secret)
    key = write_api_key(tmp_path / "api-key")
    proxy = start_service(
        ["proxy", "--upstream", jose_rs.url, "--listen", "127.0.0.1:0",
         "--api-key-file", str(tmp_path / "api-key"), "--key", key_ref,
         "--token-url", provider.token_url, "--client-id", client_id,
         "--client-secret-file", str(tmp_path / "secret"),
         "--resource", jose_rs.url, "--scope", "api:read"],
        tmp_path / "logs",
        env={"DPOP_PIN": softhsm.pin},
        api_key=key,
    )  # fmt: skip
    try:
        payload = os.urandom(256 * 1024)
        with _client(proxy) as client:
            response = client.post("/things/a%2Fb?x=1", content=payload)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["body_length"] == len(payload)
            expected = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=")
            assert body["body_sha256"] == expected.decode()
            assert body["client_id"] == client_id
        seen = jose_rs.seen()
        assert [entry["status"] for entry in seen][-1] == 200
        assert len({entry["access_token"] for entry in seen}) == 2  # renewed once
        for entry in seen:
            part = entry["proof"].split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
            check_proof(
                entry["proof"],
                htm=entry["method"],
                url=entry["url"],
                access_token=entry["access_token"],
                nonce=claims.get("nonce"),
            )
    finally:
        assert proxy.stop() == 0
