"""What a running ``dpop serve`` does when its token changes underneath it (real SoftHSM2).

The same faults as tests/test_signer_lifecycle.py, seen as an operator sees them: the proof
endpoint's answers, ``/healthz`` and ``/metrics``. Every 200 proof is checked by the
independent verifier against the JWK the service published at start.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SoftHsmToken
from tests.hsm_faults import FreshToken, P11KitServer, client_module, spy_calls
from tests.oracle import check_proof
from tests.service_support import ServiceProcess, start_service, write_api_key

ALLOWED = "https://api.example"
HEALTH_WAIT = 10.0
"""Longest wait for /healthz to report a fault (each test asserts how long it took)."""


@pytest.fixture
def token(softhsm: SoftHsmToken, tmp_path: Path) -> FreshToken:
    return FreshToken.create(softhsm, tmp_path)


def _serve(
    token: FreshToken,
    tmp_path: Path,
    *,
    module: str | None = None,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> ServiceProcess:
    key = write_api_key(tmp_path / "api-key")
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin)
    return start_service(
        ["serve", "--listen", "127.0.0.1:0", "--api-key-file", str(tmp_path / "api-key"),
         "--key", token.uri(module), "--pin-file", str(pin_file), "--allow-origin", ALLOWED,
         *extra],
        tmp_path / "svc",
        env=env,
        api_key=key,
    )  # fmt: skip


@pytest.fixture
def stopping() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.stop(signal.SIGKILL)


def _proof(client: httpx.Client, jwk: dict[str, Any]) -> httpx.Response:
    url = f"{ALLOWED}/things"
    answer = client.post("/v1/proof", json={"htm": "GET", "htu": url})
    if answer.status_code == 200:
        # A proof the service hands out always verifies against the JWK it published.
        check_proof(answer.json()["proof"], htm="GET", url=url, expected_jwk=jwk)
    return answer


def _health_becomes(client: httpx.Client, state: str) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    while True:
        answer = client.get("/healthz")
        body = answer.json()
        if body["signer"] == state:
            assert answer.status_code == (200 if state == "available" else 503)
            return body, time.monotonic() - started
        assert time.monotonic() - started < HEALTH_WAIT, body
        time.sleep(0.05)


def test_a_replaced_key_is_refused_and_reported(
    token: FreshToken, tmp_path: Path, stopping: list[ServiceProcess]
) -> None:
    service = _serve(token, tmp_path)
    stopping.append(service)
    with service.client() as client:
        jwk = client.get("/v1/jwk").json()["jwk"]
        assert _proof(client, jwk).status_code == 200
        token.reinit(tmp_path, new_key=True)  # same label, same PIN, another key
        answers = [_proof(client, jwk) for _ in range(10)]
        assert [a.status_code for a in answers] == [503] * 10
        assert {a.json()["error"] for a in answers} == {"key_changed"}
        body, _ = _health_becomes(client, "key_changed")
        assert "no longer the key" in body["reason"]
        metrics = client.get("/metrics").text
        assert 'dpop_signer_state{state="key_changed"} 1' in metrics
        assert 'dpop_signer_failures_total{reason="key_changed"} 1' in metrics


def test_a_deleted_key_is_reported_missing(
    token: FreshToken, tmp_path: Path, stopping: list[ServiceProcess]
) -> None:
    service = _serve(token, tmp_path)
    stopping.append(service)
    with service.client() as client:
        jwk = client.get("/v1/jwk").json()["jwk"]
        assert _proof(client, jwk).status_code == 200
        assert client.get("/healthz").json()["signer"] == "available"
        token.delete_key()
        answers = [_proof(client, jwk) for _ in range(5)]
        assert [a.status_code for a in answers] == [503] * 5
        body, _ = _health_becomes(client, "key_missing")
        assert "does not exist" in body["reason"]


def test_a_refused_pin_is_tried_once_behind_a_network_hsm_and_a_reload_cures_it(
    token: FreshToken, tmp_path: Path, stopping: list[ServiceProcess]
) -> None:
    spy_log = tmp_path / "spy.log"
    server = P11KitServer(token, tmp_path, spy_log=spy_log)
    try:
        service = _serve(token, tmp_path, module=client_module(), env=server.env)
        stopping.append(service)
        with service.client() as client:
            jwk = client.get("/v1/jwk").json()["jwk"]
            assert _proof(client, jwk).status_code == 200
            # The PIN changes on the token, then the connection to the HSM drops: the service
            # must log in again, and the token refuses its PIN.
            token.change_pin("87654321")
            server.signal_child(signal.SIGKILL)
            answers = [_proof(client, jwk) for _ in range(20)]
            assert all(a.status_code == 503 for a in answers), [a.text for a in answers]
            assert "signer_pin_refused" in {a.json()["error"] for a in answers}
            body, _ = _health_becomes(client, "pin_refused")
            assert "wrong PIN" in body["reason"]
            assert token.pin not in body["reason"]
            metrics = client.get("/metrics").text
            assert 'dpop_signer_failures_total{reason="pin_refused"}' in metrics
            # Exactly one wrong login reached the token, whatever the number of requests.
            assert spy_calls(spy_log, "C_Login", "CKR_PIN_INCORRECT") == 1
            # The operator writes the new PIN to the PIN file and reloads: the same key signs
            # again, with no restart.
            (tmp_path / "pin").write_text(token.pin)
            service.process.send_signal(signal.SIGHUP)
            _, recovered_in = _health_becomes(client, "available")
            assert recovered_in < HEALTH_WAIT
            assert client.get("/v1/jwk").json()["jwk"] == jwk
            assert _proof(client, jwk).status_code == 200
        assert spy_calls(spy_log, "C_Login", "CKR_PIN_INCORRECT") == 1
    finally:
        server.stop()


def test_a_stalled_hsm_answers_503_at_the_deadline_and_recovers(
    token: FreshToken, tmp_path: Path, stopping: list[ServiceProcess]
) -> None:
    server = P11KitServer(token, tmp_path)
    try:
        service = _serve(
            token, tmp_path, module=client_module(), env={**server.env, "DPOP_SIGN_TIMEOUT": "1"}
        )
        stopping.append(service)
        with service.client() as client:
            jwk = client.get("/v1/jwk").json()["jwk"]
            assert _proof(client, jwk).status_code == 200
            with server.stalled():
                timings = []
                for _ in range(3):
                    started = time.monotonic()
                    answer = _proof(client, jwk)
                    timings.append(time.monotonic() - started)
                    assert answer.status_code == 503, answer.text
                    assert answer.json()["error"] == "signer_timeout"
                assert max(timings) < 1.0 + 0.5, timings
                body, _ = _health_becomes(client, "stalled")
                assert "signing deadline" in body["reason"]
            _, recovered_in = _health_becomes(client, "available")
            assert recovered_in < HEALTH_WAIT
            assert _proof(client, jwk).status_code == 200
    finally:
        server.stop()


def test_health_probes_notice_a_deleted_key_without_traffic(
    token: FreshToken, tmp_path: Path, stopping: list[ServiceProcess]
) -> None:
    service = _serve(token, tmp_path, extra=("--probe-interval", "0.4"))
    stopping.append(service)
    with service.client() as client:
        _health_becomes(client, "available")
        token.delete_key()
        # No proof is asked for: only the service's own probe can find out.
        body, took = _health_becomes(client, "key_missing")
        assert took < 0.4 + 2.0, took  # one probe interval, plus the fault's own detection
        assert "does not exist" in body["reason"]
        assert 'dpop_signer_state{state="key_missing"} 1' in client.get("/metrics").text


def test_sigterm_while_the_hsm_is_stalled_exits_promptly(
    token: FreshToken, tmp_path: Path, stopping: list[ServiceProcess]
) -> None:
    server = P11KitServer(token, tmp_path)
    try:
        service = _serve(
            token, tmp_path, module=client_module(), env={**server.env, "DPOP_SIGN_TIMEOUT": "1"}
        )
        stopping.append(service)
        with service.client() as client:
            jwk = client.get("/v1/jwk").json()["jwk"]
            with server.stalled():
                assert _proof(client, jwk).status_code == 503  # a call is now stuck inside
                started = time.monotonic()
                status = service.stop()
                took = time.monotonic() - started
        assert status == 0, service.logs()[-2000:]
        assert took < 5.0, took  # the stuck call is abandoned, not waited for
        assert "closed without logging out" in service.logs()
    finally:
        server.stop()
