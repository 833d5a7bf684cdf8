"""``dpop serve --workers N``: N processes on one socket, each with its own HSM session.

Real processes and a real SoftHSM2 key; every proof is checked by the independent verifier.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import SoftHsmToken
from tests.hsm_faults import FreshToken, spy_calls, spy_module
from tests.oracle import check_proof
from tests.service_support import ServiceProcess, run_dpop, start_service

ALLOWED = "https://api.example"
WAIT = 20.0


def _serve(token: FreshToken, tmp_path: Path, workers: int) -> ServiceProcess:
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin)
    return start_service(
        ["serve", "--listen", f"unix:{tmp_path / 'dpop.sock'}", "--key", token.uri(),
         "--pin-file", str(pin_file), "--allow-origin", ALLOWED, "--workers", str(workers)],
        tmp_path / "svc",
    )  # fmt: skip


def _wait_events(service: ServiceProcess, name: str, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + WAIT
    while len(found := [e for e in service.events() if e.get("event") == name]) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {name} lines in {WAIT} s"
        time.sleep(0.05)
    return found


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_two_workers_sign_share_metrics_reload_and_stop_together(
    softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    token = FreshToken.create(softhsm, tmp_path)
    service = _serve(token, tmp_path, workers=2)
    try:
        (workers,) = _wait_events(service, "workers", 1)
        pids = workers["pids"]
        assert isinstance(pids, list)
        assert len(pids) == 2
        _wait_events(service, "listening", 2)
        with service.client() as client:
            jwk = client.get("/v1/jwk").json()["jwk"]
            for n in range(40):
                url = f"{ALLOWED}/n{n}"
                answer = client.post("/v1/proof", json={"htm": "GET", "htu": url})
                assert answer.status_code == 200, answer.text
                check_proof(answer.json()["proof"], htm="GET", url=url, expected_jwk=jwk)
            # Each worker publishes its counters about once a second; any worker's /metrics
            # is the sum over both.
            deadline = time.monotonic() + WAIT
            while _metric(client.get("/metrics").text, 'dpop_proofs_total{endpoint="proof"}') < 40:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        # SIGHUP reaches every worker.
        service.process.send_signal(signal.SIGHUP)
        assert len(_wait_events(service, "reloaded", 2)) == 2
        # A worker that dies is started again.
        os.kill(int(pids[0]), signal.SIGKILL)
        _wait_events(service, "worker_exited", 1)
        _wait_events(service, "listening", 3)
        with service.client() as client:
            assert client.get("/healthz").json()["signer"] == "available"
    finally:
        status = service.stop()
    assert status == 0, service.logs()[-2000:]
    assert not (tmp_path / "dpop.sock").exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie_or_gone(int(pid))


def _zombie_or_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return True
    return state == "Z"


def test_a_wrong_pin_is_tried_once_not_once_per_worker(
    softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    token = FreshToken.create(softhsm, tmp_path)
    right = token.pin
    pin_file = tmp_path / "pin"
    pin_file.write_text("00000000")
    spy_log = tmp_path / "spy.log"
    process = run_dpop(
        ["serve", "--listen", f"unix:{tmp_path / 'dpop.sock'}", "--key",
         token.uri(spy_module()), "--pin-file", str(pin_file), "--workers", "4"],
        tmp_path / "svc",
        env={"PKCS11SPY": token.base.module, "PKCS11SPY_OUTPUT": str(spy_log)},
    )  # fmt: skip
    assert process.wait(WAIT) == 3  # the key or its token (the CLI's exit codes)
    stderr = (tmp_path / "svc" / "stderr").read_text()
    assert [line for line in stderr.splitlines() if "wrong PIN for" in line] != []
    assert right not in stderr
    assert spy_calls(spy_log, "C_Login") == 1  # the parent tried it once; no worker started


def test_the_proxy_runs_two_workers(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    from dpop_signer.testing.servers import start_local_servers

    token = FreshToken.create(softhsm, tmp_path)
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin)
    with start_local_servers() as servers:
        secret = tmp_path / "secret"
        secret.write_text(str(servers.client_secret))
        proxy = start_service(
            ["proxy", "--upstream", servers.rs_url, "--listen", f"unix:{tmp_path / 'p.sock'}",
             "--key", token.uri(), "--pin-file", str(pin_file), "--token-url",
             servers.token_url, "--client-id", servers.client_id, "--client-secret-file",
             str(secret), "--workers", "2"],
            tmp_path / "proxy",
        )  # fmt: skip
        try:
            _wait_events(proxy, "listening", 2)
            with proxy.client() as client:
                answers = [client.get("/api/things") for _ in range(10)]
            assert [a.status_code for a in answers] == [200] * 10
        finally:
            assert proxy.stop() == 0, proxy.logs()[-2000:]
