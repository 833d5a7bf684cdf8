"""``dpop serve`` as a real process on a free loopback port, with the SoftHSM2 key.

Every proof the service hands out is checked by the independent oracle (tests/oracle.py); the
headers of ``/v1/headers`` are taken to the local resource server (whose proofs the
``oracle_check`` fixture re-checks) and to the ``jose`` resource server in front of
oidc-provider.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dpop_signer.testing.servers import LocalServers, start_local_servers
from tests.conftest import SoftHsmToken, require
from tests.interop_fixtures import JoseResourceServer, OidcProvider
from tests.oracle import check_proof, thumbprint
from tests.service_support import ServiceProcess, run_dpop, start_service, write_api_key

pytestmark = pytest.mark.softhsm

ALLOWED = "https://api.example"


@pytest.fixture(scope="module")
def servers() -> Iterator[LocalServers]:
    with start_local_servers() as running:
        yield running


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def key_ref(pkcs11_key_uri: str, softhsm: SoftHsmToken) -> str:
    # The session key, named without its PIN: the PIN comes from DPOP_PIN like in production.
    return softhsm.uri("session-es256")


@pytest.fixture(scope="module")
def svc(
    workdir: Path, key_ref: str, softhsm: SoftHsmToken, servers: LocalServers
) -> Iterator[ServiceProcess]:
    """One service for the read-only tests: API key, origins limited, token endpoint set."""
    key = write_api_key(workdir / "api-key")
    secret_file = workdir / "client-secret"
    secret_file.write_text(str(servers.client_secret))
    service = start_service(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-key-file",
            str(workdir / "api-key"),
            "--key",
            key_ref,
            "--allow-origin",
            ALLOWED,
            "--allow-origin",
            servers.rs_url,
            "--token-url",
            servers.token_url,
            "--client-id",
            servers.client_id,
            "--client-secret-file",
            str(secret_file),
        ],
        workdir / "svc",
        env={"DPOP_PIN": softhsm.pin},
        api_key=key,
    )
    yield service
    assert service.stop() == 0, service.logs()[-2000:]


@pytest.fixture(scope="module")
def public_jwk(svc: ServiceProcess) -> dict[str, Any]:
    with svc.client() as client:
        body = client.get("/v1/jwk").json()
    return dict(body["jwk"])


def _proof(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/proof", json=body)


# -- proofs --------------------------------------------------------------------------------


def test_jwk_is_the_token_key_with_its_thumbprint(svc: ServiceProcess, pkcs11_key_uri: str):
    from dpop_signer import load_signer

    with svc.client() as client:
        body = client.get("/v1/jwk").json()
    assert set(body["jwk"]) == {"kty", "crv", "x", "y"}
    assert body["jkt"] == thumbprint(body["jwk"])  # computed by the oracle, not by us
    signer = load_signer(pkcs11_key_uri)
    try:
        assert body["jwk"] == dict(signer.public_jwk)
    finally:
        getattr(signer, "close", lambda: None)()


@pytest.mark.parametrize(
    ("request_body", "url"),
    [
        ({"htm": "GET", "htu": f"{ALLOWED}/v1/things?page=2#frag"}, f"{ALLOWED}/v1/things"),
        ({"htm": "POST", "htu": "HTTPS://API.example:443/a%2Fb"}, f"{ALLOWED}/a%2Fb"),
        (
            {"htm": "DELETE", "htu": f"{ALLOWED}/x", "access_token": "tok.en-_~+/=="},
            f"{ALLOWED}/x",
        ),
        (
            {"htm": "PUT", "htu": f"{ALLOWED}/n", "nonce": "eyJ7S_zG.eyJH0-Z.HX4w-7v"},
            f"{ALLOWED}/n",
        ),
    ],
)
def test_proofs_pass_the_oracle(
    svc: ServiceProcess, public_jwk: dict[str, Any], request_body: dict[str, Any], url: str
):
    with svc.client() as client:
        response = _proof(client, **request_body)
    assert response.status_code == 200, response.text
    checked = check_proof(
        response.json()["proof"],
        htm=request_body["htm"],
        url=url,
        access_token=request_body.get("access_token"),
        nonce=request_body.get("nonce"),
        expected_jwk=public_jwk,
    )
    assert checked.jkt == thumbprint(public_jwk)


def test_every_proof_leaves_one_audit_line_without_secrets(svc: ServiceProcess):
    token = secrets.token_urlsafe(40)
    with svc.client() as client:
        proof = _proof(client, htm="GET", htu=f"{ALLOWED}/audit?q=1", access_token=token).json()
    jti = check_proof(proof["proof"], htm="GET", url=f"{ALLOWED}/audit", access_token=token)
    deadline = time.monotonic() + 5
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not lines:
        lines = [e for e in svc.events() if e.get("jti") == jti.claims["jti"]]
        time.sleep(0.02)
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "proof"
    assert (line["htm"], line["htu"]) == ("GET", f"{ALLOWED}/audit")
    assert line["caller"].startswith("127.0.0.1:")
    assert line["ts"].endswith("Z")
    logs = svc.logs()
    assert token not in logs
    assert proof["proof"] not in logs
    assert proof["proof"].split(".")[2] not in logs


@pytest.mark.slow
def test_two_concurrent_clients_2000_proofs_each_all_valid_and_unique(
    svc: ServiceProcess, public_jwk: dict[str, Any]
):
    per_client = 2000
    results: list[list[tuple[int, str]]] = [[], []]
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with svc.client() as client:
                for i in range(per_client):
                    r = _proof(client, htm="POST", htu=f"{ALLOWED}/c{index}/{i}")
                    results[index].append((r.status_code, r.text))
        except BaseException as exc:  # reported below, not swallowed
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    jtis = set()
    for index, answers in enumerate(results):
        assert len(answers) == per_client
        for i, (status, text) in enumerate(answers):
            assert status == 200, text
            checked = check_proof(
                json.loads(text)["proof"],
                htm="POST",
                url=f"{ALLOWED}/c{index}/{i}",
                expected_jwk=public_jwk,
            )
            jtis.add(checked.claims["jti"])
    assert len(jtis) == 2 * per_client


# -- /v1/headers ---------------------------------------------------------------------------


def test_headers_are_accepted_by_the_local_resource_server(
    svc: ServiceProcess, servers: LocalServers
):
    url = f"{servers.api_url}/things?x=1"
    before = servers.authorization_server.token_requests
    with svc.client() as client, httpx.Client(trust_env=False) as api:
        for _ in range(3):
            made = client.post("/v1/headers", json={"htm": "GET", "htu": url})
            assert made.status_code == 200, made.text
            headers = made.json()["headers"]
            assert headers["Authorization"].startswith("DPoP ")
            response = api.get(url, headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["jkt"] == made_jkt(svc)
    # The service caches its token: three calls, at most one token request.
    assert servers.authorization_server.token_requests - before <= 1


def test_concurrent_header_requests_share_one_token_request(
    svc_factory: Any, servers: LocalServers, tmp_path: Path
):
    (tmp_path / "secret").write_text(str(servers.client_secret))
    fresh = svc_factory(
        "--token-url", servers.token_url, "--client-id", servers.client_id,
        "--client-secret-file", str(tmp_path / "secret"),
    )  # fmt: skip
    before = servers.authorization_server.token_requests
    url = f"{servers.api_url}/single"
    answers: list[httpx.Response] = []

    def call() -> None:
        with fresh.client() as client:
            answers.append(client.post("/v1/headers", json={"htm": "GET", "htu": url}))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [a.status_code for a in answers] == [200] * 8
    tokens = {a.json()["headers"]["Authorization"] for a in answers}
    assert len(tokens) == 1  # one token, fetched once (single flight)
    assert servers.authorization_server.token_requests - before == 1


def made_jkt(svc: ServiceProcess) -> str:
    with svc.client() as client:
        return str(client.get("/v1/jwk").json()["jkt"])


def test_headers_carry_the_nonce_the_resource_server_demanded(
    svc: ServiceProcess, servers: LocalServers
):
    rs = servers.resource_server
    url = f"{servers.api_url}/nonce"
    rs.require_nonce = True
    try:
        with svc.client() as client, httpx.Client(trust_env=False) as api:
            headers = client.post("/v1/headers", json={"htm": "POST", "htu": url}).json()
            demand = api.post(url, headers=headers["headers"], content=b"{}")
            assert demand.status_code == 401
            assert 'error="use_dpop_nonce"' in demand.headers["www-authenticate"]
            nonce = demand.headers["dpop-nonce"]
            again = client.post("/v1/headers", json={"htm": "POST", "htu": url, "nonce": nonce})
            assert again.status_code == 200, again.text
            ok = api.post(url, headers=again.json()["headers"], content=b"{}")
            assert ok.status_code == 200, ok.text
    finally:
        rs.require_nonce = False


@pytest.mark.interop
def test_headers_from_oidc_provider_tokens_are_accepted_by_the_jose_rs(
    oidc_provider: Any,
    jose_rs: JoseResourceServer,
    key_ref: str,
    softhsm: SoftHsmToken,
    tmp_path: Path,
):
    provider: OidcProvider = oidc_provider(require_nonce=True)
    client_id, client_secret = provider.basic_client
    (tmp_path / "secret").write_text(client_secret)
    key = write_api_key(tmp_path / "api-key")
    service = start_service(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-key-file",
            str(tmp_path / "api-key"),
            "--key",
            key_ref,
            "--token-url",
            provider.token_url,
            "--client-id",
            client_id,
            "--client-secret-file",
            str(tmp_path / "secret"),
            "--resource",
            jose_rs.url,
            "--scope",
            "api:read",
        ],
        tmp_path / "logs",
        env={"DPOP_PIN": softhsm.pin},
        api_key=key,
    )
    try:
        url = jose_rs.url + "things/a%2Fb"
        with service.client() as client, httpx.Client(trust_env=False) as api:
            made = client.post("/v1/headers", json={"htm": "GET", "htu": url + "?x=1"})
            assert made.status_code == 200, made.text
            response = api.get(url + "?x=1", headers=made.json()["headers"])
            assert response.status_code == 200, response.text
            jkt = client.get("/v1/jwk").json()["jkt"]
        # oidc-provider demanded a nonce at the token endpoint; the service met it.
        statuses = [entry["status"] for entry in provider.requests()]
        assert statuses[-1] == 200
        assert 400 in statuses
        for entry in provider.requests():
            claims = json.loads(_b64d(entry["dpop"].split(".")[1]))
            check_proof(
                entry["dpop"],
                htm="POST",
                url=entry["url"],
                nonce=claims.get("nonce"),
                expected_jkt=jkt,
            )
        for seen in jose_rs.seen():
            check_proof(
                seen["proof"],
                htm=seen["method"],
                url=seen["url"],
                access_token=seen["access_token"],
                expected_jkt=jkt,
            )
    finally:
        assert service.stop() == 0


def _b64d(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# -- refusals: 401, 403, 4xx ------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key-0123456789abcdef", "Basic Zm9vOmJhcg==", "Bearer", ""],
)
def test_v1_needs_the_api_key(svc: ServiceProcess, authorization: str | None):
    headers = {} if authorization is None else {"Authorization": authorization}
    with httpx.Client(base_url=svc.url, trust_env=False, headers=headers) as client:
        proof = client.post("/v1/proof", json={"htm": "GET", "htu": f"{ALLOWED}/x"})
        jwk = client.get("/v1/jwk")
        made = client.post("/v1/headers", json={"htm": "GET", "htu": f"{ALLOWED}/x"})
    for response in (proof, jwk, made):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"] == "unauthorized"


def test_the_api_key_scheme_is_case_insensitive(svc: ServiceProcess):
    assert svc.api_key is not None
    headers = {"Authorization": f"bearer {svc.api_key}"}
    with httpx.Client(base_url=svc.url, trust_env=False, headers=headers) as client:
        assert client.get("/v1/jwk").status_code == 200


@pytest.mark.parametrize(
    "htu",
    ["https://other.example/x", "http://api.example/x", "https://api.example:8443/x"],
)
def test_proofs_only_for_allowed_origins(svc: ServiceProcess, htu: str):
    with svc.client() as client:
        proof = _proof(client, htm="GET", htu=htu)
        made = client.post("/v1/headers", json={"htm": "GET", "htu": htu})
    for response in (proof, made):
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "origin_not_allowed"


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"", "application/json", 400),
        (b'{"htm": "GET", "htu": "https://api.example/x"}', "text/plain", 415),
        (b'{"htm": "GET", "htu": "https://api.example/x"}', None, 415),
        (b"[]", "application/json", 422),
        (b'{"htm": "GET"}', "application/json", 422),
        (b'{"htm": 1, "htu": "https://api.example/x"}', "application/json", 422),
        (b'{"htm": "G ET", "htu": "https://api.example/x"}', "application/json", 422),
        (b'{"htm": "GET", "htu": "ftp://api.example/x"}', "application/json", 422),
        (b'{"htm": "GET", "htu": "/relative"}', "application/json", 422),
        (b'{"htm": "GET", "htu": "https://api.example/x", "x": 1}', "application/json", 422),
        (
            b'{"htm": "GET", "htu": "https://api.example/x", "nonce": "a\\"b"}',
            "application/json",
            422,
        ),
        (
            b'{"htm": "GET", "htu": "https://api.example/x", "access_token": "a b"}',
            "application/json",
            422,
        ),
        (b'{"htm": "GET", "htu": "https://api.example/x", "nonce": ""}', "application/json", 422),
        (b"\xff\xfe", "application/json", 400),
        (b"[" * 100_000, "application/json", 413),
    ],
)
def test_malformed_bodies_get_4xx(
    svc: ServiceProcess, content: bytes, content_type: str | None, status: int
):
    headers = {"Content-Type": content_type} if content_type else {}
    with svc.client() as client:
        for path in ("/v1/proof", "/v1/headers"):
            response = client.post(path, content=content, headers=headers)
            assert response.status_code == status, (path, response.text)
            assert response.json()["error"]


def test_oversized_bodies_get_413_with_and_without_content_length(svc: ServiceProcess):
    big = json.dumps({"htm": "GET", "htu": f"{ALLOWED}/x", "access_token": "a" * 70_000})

    def chunks() -> Iterator[bytes]:
        data = big.encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    with svc.client(headers={"Content-Type": "application/json"}) as client:
        assert client.post("/v1/proof", content=big).status_code == 413
        assert client.post("/v1/proof", content=chunks()).status_code == 413
        # The connection and the service are fine afterwards.
        assert _proof(client, htm="GET", htu=f"{ALLOWED}/after").status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8787", "127.0.0.1.nip.io"])
def test_requests_for_other_host_names_are_refused(svc: ServiceProcess, host: str):
    # DNS rebinding: a web page whose name resolves to 127.0.0.1 still sends its own Host.
    with svc.client(headers={"Host": host}) as client:
        for response in (
            client.get("/healthz"),
            client.post("/v1/proof", json={"htm": "GET", "htu": f"{ALLOWED}/x"}),
        ):
            assert response.status_code == 421
            assert response.json()["error"] == "misdirected_request"
    with svc.client(headers={"Host": "localhost"}) as client:
        assert client.get("/healthz").status_code == 200


def test_wrong_methods_and_paths_get_4xx(svc: ServiceProcess):
    with svc.client() as client:
        assert client.get("/v1/proof").status_code == 405
        assert "POST" in client.get("/v1/proof").headers["allow"]
        assert client.delete("/v1/jwk").status_code == 405
        assert client.get("/v1/sign").status_code == 404
        assert client.post("/v1/sign", content=b"anything").status_code == 404


def test_health_metrics_and_openapi_need_no_key(svc: ServiceProcess):
    with httpx.Client(base_url=svc.url, trust_env=False) as anonymous:
        assert anonymous.get("/healthz").json() == {
            "status": "ok",
            "signer": "available",
            "reason": None,
        }
        document = anonymous.get("/openapi.json").json()
        assert document["openapi"].startswith("3.")
        assert {"/v1/proof", "/v1/headers", "/v1/jwk", "/healthz"} <= set(document["paths"])
        metrics = anonymous.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = _samples(metrics.text)
    assert samples["dpop_signatures_total"] >= 1
    assert samples['dpop_proofs_total{endpoint="proof"}'] >= 1
    assert samples["dpop_sign_seconds_count"] == samples["dpop_signatures_total"]
    assert samples['dpop_sign_seconds_bucket{le="+Inf"}'] == samples["dpop_sign_seconds_count"]


def test_metrics_count_signatures_tokens_and_errors(svc: ServiceProcess, servers: LocalServers):
    with httpx.Client(base_url=svc.url, trust_env=False) as anonymous:
        before = _samples(anonymous.get("/metrics").text)
        anonymous.post("/v1/proof", json={})  # 401
        with svc.client() as client:
            for _ in range(3):
                assert _proof(client, htm="GET", htu=f"{ALLOWED}/m").status_code == 200
            _proof(client, htm="GET", htu="https://elsewhere.example/")  # 403
            made = client.post("/v1/headers", json={"htm": "GET", "htu": f"{servers.api_url}/m"})
            assert made.status_code == 200
        after = _samples(anonymous.get("/metrics").text)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta('dpop_proofs_total{endpoint="proof"}') == 3
    assert delta('dpop_proofs_total{endpoint="headers"}') == 1
    assert delta("dpop_signatures_total") >= 4
    assert delta('dpop_errors_total{kind="unauthorized"}') == 1
    assert delta('dpop_errors_total{kind="origin_not_allowed"}') == 1
    assert after.get('dpop_token_requests_total{status="200"}', 0) >= 1


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# -- schema-driven fuzzing ----------------------------------------------------------------


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(
    key_ref: str, softhsm: SoftHsmToken, servers: LocalServers, tmp_path: Path
):
    schemathesis = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    require(schemathesis is not None, "schemathesis is not installed in the venv")
    assert schemathesis is not None
    key = write_api_key(tmp_path / "api-key")
    (tmp_path / "secret").write_text(str(servers.client_secret))
    service = start_service(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-key-file",
            str(tmp_path / "api-key"),
            "--key",
            key_ref,
            "--token-url",
            servers.token_url,
            "--client-id",
            servers.client_id,
            "--client-secret-file",
            str(tmp_path / "secret"),
            "--log-level",
            "warning",
        ],
        tmp_path / "logs",
        env={"DPOP_PIN": softhsm.pin},
        api_key=key,
    )
    try:
        result = subprocess.run(
            [
                schemathesis,
                "run",
                f"{service.url}/openapi.json",
                "--header",
                f"Authorization: Bearer {key}",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance,unsupported_method",
                "--max-examples",
                "60",
                "--workers",
                "2",
                "--seed",
                "20261125",
                "--generation-database",
                "none",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1"},
            check=False,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert service.alive()
        assert not [e for e in service.events() if e.get("event") == "internal_error"]
    finally:
        service.stop()


# -- listening: unix socket, SIGTERM, refusals at start --------------------------------------


def test_unix_socket_is_0600_needs_no_key_and_is_removed_on_sigterm(
    key_ref: str, softhsm: SoftHsmToken, tmp_path: Path
):
    path = tmp_path / "run" / "dpop.sock"
    path.parent.mkdir()
    service = start_service(
        ["serve", "--listen", f"unix:{path}", "--key", key_ref],
        tmp_path / "logs",
        env={"DPOP_PIN": softhsm.pin},
    )
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        with service.client() as client:
            response = _proof(client, htm="GET", htu=f"{ALLOWED}/uds")
        assert response.status_code == 200, response.text
        check_proof(response.json()["proof"], htm="GET", url=f"{ALLOWED}/uds")
        audit = [e for e in service.events() if e.get("event") == "proof"]
        assert audit
        assert audit[-1]["caller"] == "unix"
    finally:
        assert service.stop() == 0
    assert not path.exists()


def test_sigterm_while_busy_exits_cleanly(svc_factory: Any):
    service = svc_factory()
    stop_at = time.monotonic() + 0.5
    statuses: list[int] = []

    def hammer() -> None:
        with service.client() as client:
            while time.monotonic() < stop_at + 5:
                try:
                    statuses.append(_proof(client, htm="GET", htu=f"{ALLOWED}/t").status_code)
                except httpx.HTTPError:
                    return

    thread = threading.Thread(target=hammer)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    code = service.stop(signal.SIGTERM)
    thread.join(15)
    assert code == 0, service.logs()[-2000:]
    assert time.monotonic() - started < 10
    assert statuses
    assert set(statuses) == {200}
    assert "stopped" in [e["event"] for e in service.events()]
    assert not [e for e in service.events() if e.get("level") == "error"]


@pytest.fixture
def svc_factory(key_ref: str, softhsm: SoftHsmToken, tmp_path: Path) -> Iterator[Any]:
    started: list[ServiceProcess] = []

    def make(*extra: str) -> ServiceProcess:
        key = write_api_key(tmp_path / f"api-key-{len(started)}")
        service = start_service(
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--api-key-file",
                str(tmp_path / f"api-key-{len(started)}"),
                "--key",
                key_ref,
                *extra,
            ],
            tmp_path / f"logs-{len(started)}",
            env={"DPOP_PIN": softhsm.pin},
            api_key=key,
        )
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--listen", "127.0.0.1:0"], "needs --api-key-file"),
        (["--listen", "0.0.0.0:0", "--allow-unauthenticated"], "not a loopback address"),
        (["--listen", "0.0.0.0:0", "--allow-remote"], "--allow-remote needs --api-key-file"),
        (["--listen", "example.com:80"], "not a name"),
        (["--listen", "8080"], "not HOST:PORT"),
        (["--listen", "unix:"], "needs a socket path"),
        (["--listen", "127.0.0.1:0", "--api-key-file", "{world}"], "other users"),
        (["--listen", "127.0.0.1:0", "--api-key-file", "{short}"], "shorter than"),
        (["--listen", "127.0.0.1:0", "--api-key-file", "{missing}"], "cannot be read"),
        (["--listen", "unix:{sock}", "--allow-origin", "https://a.example/path"], "has a path"),
    ],
)
def test_unsafe_or_broken_settings_are_refused_before_listening(
    extra: list[str], message: str, tmp_path: Path, pem_key_path: str
):
    world = tmp_path / "world"
    world.write_text(secrets.token_hex(32))
    world.chmod(0o644)
    short = tmp_path / "short"
    short.write_text("tooshort")
    short.chmod(0o600)
    values = {
        "world": str(world),
        "short": str(short),
        "missing": str(tmp_path / "nope"),
        "sock": str(tmp_path / "s.sock"),
    }
    args = ["serve", "--key", pem_key_path, *(a.format(**values) for a in extra)]
    log_dir = tmp_path / "logs"
    process = run_dpop(args, log_dir)
    code = process.wait(30)
    err = (log_dir / "stderr").read_text()
    assert code == 2, err
    assert message in err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert '"event":"listening"' not in err


# -- faults: the HSM goes away and comes back ----------------------------------------------


@pytest.fixture(scope="module")
def private_token(softhsm: SoftHsmToken, workdir: Path) -> tuple[str, str]:
    """A token of this module's own, with a long random PIN (a short one could match a port)."""
    util = shutil.which("softhsm2-util")
    assert util is not None
    label = f"svc-{secrets.token_hex(4)}"
    pin = secrets.token_hex(16)
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "87654321"],
        check=True,
        capture_output=True,
    )
    uri = f"pkcs11:token={label};object=svc-es256?module-path={softhsm.module}"
    process = run_dpop(["keygen", "--key", uri], workdir / "keygen", {"DPOP_PIN": pin})
    assert process.wait(60) == 0, (workdir / "keygen" / "stderr").read_text()
    return label, pin


def _token_dir_root(softhsm: SoftHsmToken) -> Path:
    for line in Path(softhsm.conf).read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "directories.tokendir":
            return Path(value.strip())
    raise AssertionError("no directories.tokendir in the SoftHSM2 config")


def test_hsm_unavailable_gives_503_and_the_service_recovers(softhsm: SoftHsmToken, tmp_path: Path):
    # The token disappears underneath the running service (softhsm2-util --delete-token from
    # another process, as when an HSM partition or a USB token goes away) and comes back
    # with the same key (its directory restored): a real outage of the real module.
    util = shutil.which("softhsm2-util")
    assert util is not None
    root = _token_dir_root(softhsm)
    before = set(root.iterdir())
    label, pin = f"gone-{secrets.token_hex(4)}", secrets.token_hex(16)
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "87654321"],
        check=True,
        capture_output=True,
    )
    (token_dir,) = set(root.iterdir()) - before
    uri = f"pkcs11:token={label};object=outage?module-path={softhsm.module}"
    keygen = run_dpop(["keygen", "--key", uri], tmp_path / "keygen", {"DPOP_PIN": pin})
    assert keygen.wait(60) == 0, (tmp_path / "keygen" / "stderr").read_text()
    key = write_api_key(tmp_path / "api-key")
    service = start_service(
        ["serve", "--listen", "127.0.0.1:0", "--api-key-file", str(tmp_path / "api-key"),
         "--key", uri],
        tmp_path / "logs",
        env={"DPOP_PIN": pin},
        api_key=key,
    )  # fmt: skip
    backup = tmp_path / "token-backup"
    try:
        with service.client() as client:
            jwk = client.get("/v1/jwk").json()["jwk"]
            first = _proof(client, htm="GET", htu=f"{ALLOWED}/up")
            assert first.status_code == 200, first.text
            check_proof(first.json()["proof"], htm="GET", url=f"{ALLOWED}/up", expected_jwk=jwk)

            shutil.copytree(token_dir, backup)
            subprocess.run(
                [util, "--delete-token", "--token", label], check=True, capture_output=True
            )
            for _ in range(3):  # the first failure and the fast path while it stays down
                down = _proof(client, htm="GET", htu=f"{ALLOWED}/down")
                assert down.status_code == 503, down.text
                assert down.json()["error"] == "signer_unavailable"
                assert "unavailable" in down.json()["message"]
                assert down.headers["retry-after"] == "1"
            assert client.get("/healthz").status_code == 503
            assert client.get("/v1/jwk").json()["jwk"] == jwk  # still known while down
            time.sleep(1.1)  # one reopen attempt while the token is still gone
            assert _proof(client, htm="GET", htu=f"{ALLOWED}/down").status_code == 503
            assert service.alive()

            shutil.copytree(backup, token_dir)
            deadline = time.monotonic() + 15
            back = down
            while time.monotonic() < deadline:
                back = _proof(client, htm="GET", htu=f"{ALLOWED}/back")
                if back.status_code == 200:
                    break
                assert back.status_code == 503, back.text
                time.sleep(0.2)
            assert back.status_code == 200, service.logs()[-3000:]
            check_proof(back.json()["proof"], htm="GET", url=f"{ALLOWED}/back", expected_jwk=jwk)
            assert client.get("/healthz").json()["signer"] == "available"
        events = [e["event"] for e in service.events()]
        assert "signer_unavailable" in events
        assert "signer_recovered" in events
        assert pin not in service.logs()
    finally:
        assert service.stop() == 0
        if not token_dir.exists() and backup.exists():
            shutil.copytree(backup, token_dir)


# -- nothing secret in any log line ---------------------------------------------------------


def test_no_token_proof_api_key_secret_or_pin_in_any_log_line(
    private_token: tuple[str, str], softhsm: SoftHsmToken, tmp_path: Path
):
    label, pin = private_token
    client_secret = secrets.token_urlsafe(24)
    with start_local_servers(
        client_id="log-client", client_secret=client_secret, rs_require_nonce=True
    ) as servers:
        key = write_api_key(tmp_path / "api-key")
        (tmp_path / "secret").write_text(client_secret)
        uri = f"pkcs11:token={label};object=svc-es256?module-path={softhsm.module}"
        service = start_service(
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--api-key-file",
                str(tmp_path / "api-key"),
                "--key",
                uri,
                "--token-url",
                servers.token_url,
                "--client-id",
                "log-client",
                "--client-secret-file",
                str(tmp_path / "secret"),
                "--log-level",
                "debug",
            ],
            tmp_path / "logs",
            env={"DPOP_PIN": pin},
            api_key=key,
        )
        secrets_seen: list[str] = [pin, key, client_secret]
        try:
            access_token = secrets.token_urlsafe(48)
            nonce = secrets.token_urlsafe(24)
            url = f"{servers.api_url}/logged"
            with service.client() as client, httpx.Client(trust_env=False) as api:
                proof = _proof(
                    client, htm="GET", htu=url, access_token=access_token, nonce=nonce
                ).json()["proof"]
                secrets_seen += [access_token, nonce, proof]
                made = client.post("/v1/headers", json={"htm": "GET", "htu": url}).json()
                demand = api.get(url, headers=made["headers"])
                rs_nonce = demand.headers["dpop-nonce"]
                again = client.post(
                    "/v1/headers", json={"htm": "GET", "htu": url, "nonce": rs_nonce}
                ).json()
                assert api.get(url, headers=again["headers"]).status_code == 200
                for headers in (made["headers"], again["headers"]):
                    secrets_seen += [headers["Authorization"].split(" ", 1)[1], headers["DPoP"]]
                secrets_seen.append(rs_nonce)
                # Refused callers and bad input are logged too; their secrets must not be.
                wrong = "Bearer " + secrets.token_urlsafe(32)
                client.get("/v1/jwk", headers={"Authorization": wrong})
                secrets_seen.append(wrong.split(" ")[1])
                client.post("/v1/proof", json={"htm": "GET", "htu": url, "access_token": "a b"})
        finally:
            assert service.stop() == 0
        logs = service.logs()
        assert '"event":"proof"' in logs
        for value in secrets_seen:
            assert value not in logs
            # and no signature, claims or token fragment either
            for part in value.split(".")[1:]:
                if len(part) >= 16:
                    assert part not in logs
