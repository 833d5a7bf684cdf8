"""``SIGHUP``: the key, PIN, client secret and API keys are read again, nothing is dropped.

``dpop serve`` and ``dpop proxy`` swap them without a restart (real SoftHSM2, real local
servers).

Every pair of headers is taken to the local resource server, which accepts a DPoP token only
with a proof by the key its ``cnf.jkt`` names (RFC 9449 §6.1, §7); the autouse oracle re-checks
every proof it receives.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dpop_signer.testing.servers import LocalServers, start_local_servers
from tests.conftest import SoftHsmToken
from tests.hsm_faults import FreshToken, run
from tests.oracle import thumbprint
from tests.service_support import ServiceProcess, start_service, write_api_key

RELOAD_WAIT = 20.0
"""Longest wait for a ``reloaded`` or ``reload_failed`` log line."""


@pytest.fixture(scope="module")
def servers() -> Iterator[LocalServers]:
    with start_local_servers() as running:
        yield running


@pytest.fixture
def token(softhsm: SoftHsmToken, tmp_path: Path) -> FreshToken:
    made = FreshToken.create(softhsm, tmp_path)
    env = {"DPOP_PIN": made.pin}
    second = made.uri().replace(f"object={made.key_label}", "object=rotated")
    run([sys.executable, "-m", "dpop_signer", "keygen", "--key", second], {**os.environ, **env})
    return made


def _config(path: Path, key: str, secret_file: Path, pin_file: Path) -> None:
    path.write_text(
        f'key = "{key}"\npin_file = "{pin_file}"\nclient_secret_file = "{secret_file}"\n'
    )


def _events(service: ServiceProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in service.events() if e.get("event") == name]


def _wait_for(service: ServiceProcess, name: str, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + RELOAD_WAIT
    while len(found := _events(service, name)) < count:
        assert time.monotonic() < deadline, f"no {name} line within {RELOAD_WAIT} s"
        time.sleep(0.02)
    return found[count - 1]


@pytest.fixture
def setup(token: FreshToken, servers: LocalServers, tmp_path: Path) -> Iterator[dict[str, Any]]:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(str(servers.client_secret))
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin)
    config = tmp_path / "dpop.toml"
    rotated = token.uri().replace(f"object={token.key_label}", "object=rotated")
    _config(config, token.uri(), secret_file, pin_file)
    api_key_file = tmp_path / "api-key"
    api_key = write_api_key(api_key_file)
    service = start_service(
        ["serve", "--listen", "127.0.0.1:0", "--config", str(config),
         "--api-key-file", str(api_key_file), "--allow-origin", servers.rs_url,
         "--token-url", servers.token_url, "--client-id", servers.client_id],
        tmp_path / "svc",
        api_key=api_key,
    )  # fmt: skip
    try:
        yield {
            "service": service,
            "config": config,
            "rotated": rotated,
            "secret_file": secret_file,
            "pin_file": pin_file,
            "api_key_file": api_key_file,
        }
    finally:
        assert service.stop() == 0, service.logs()[-2000:]


def test_a_new_key_under_load_fails_no_request_and_never_mixes_keys(
    setup: dict[str, Any], servers: LocalServers
) -> None:
    service: ServiceProcess = setup["service"]
    url = f"{servers.api_url}/things"
    with service.client() as client:
        old_jkt = client.get("/v1/jwk").json()["jkt"]
    outcomes: list[tuple[int, str | None, str | None]] = []
    stop = threading.Event()

    def caller() -> None:
        with service.client() as client, httpx.Client(trust_env=False, timeout=30) as api:
            for _ in range(400):  # bounded; the test stops it sooner
                if stop.is_set():
                    return
                made = client.post("/v1/headers", json={"htm": "GET", "htu": url})
                if made.status_code != 200:
                    outcomes.append((made.status_code, None, made.text))
                    continue
                headers = made.json()["headers"]
                proof_jkt = _proof_jkt(headers["DPoP"])
                answer = api.get(url, headers=headers)
                outcomes.append((answer.status_code, proof_jkt, answer.json().get("jkt")))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + RELOAD_WAIT
        while len(outcomes) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _config(setup["config"], setup["rotated"], setup["secret_file"], setup["pin_file"])
        service.process.send_signal(signal.SIGHUP)
        reloaded = _wait_for(service, "reloaded", 1)
        assert reloaded["key_changed"] is True
        seen = len(outcomes)
        while len(outcomes) < seen + 40:
            assert time.monotonic() < deadline + RELOAD_WAIT
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    failures = [o for o in outcomes if o[0] != 200]
    assert failures == []
    # The resource server names the key the token is bound to; the proof's key is the same.
    assert all(proof_jkt == bound for _, proof_jkt, bound in outcomes)
    used = {proof_jkt for _, proof_jkt, _ in outcomes}
    with service.client() as client:
        new_jkt = client.get("/v1/jwk").json()["jkt"]
    assert new_jkt != old_jkt
    assert used == {old_jkt, new_jkt}
    assert outcomes[-1][1] == new_jkt


def test_a_broken_configuration_keeps_the_running_one(setup: dict[str, Any]) -> None:
    service: ServiceProcess = setup["service"]
    with service.client() as client:
        before = client.get("/v1/jwk").json()
    missing = setup["rotated"].replace("object=rotated", "object=not-there")
    _config(setup["config"], missing, setup["secret_file"], setup["pin_file"])
    service.process.send_signal(signal.SIGHUP)
    failed = _wait_for(service, "reload_failed", 1)
    assert "not-there" in failed["error"]
    assert len(_events(service, "reload_failed")) == 1
    with service.client() as client:
        assert client.get("/v1/jwk").json() == before
        answer = client.post("/v1/proof", json={"htm": "GET", "htu": "http://127.0.0.1/x"})
    assert answer.status_code in (200, 403)  # signs (or refuses the origin), never 5xx


def test_a_refused_pin_is_cured_by_a_reload_with_the_right_one(
    setup: dict[str, Any], token: FreshToken, tmp_path: Path
) -> None:
    service: ServiceProcess = setup["service"]
    setup["pin_file"].write_text("00000000")
    service.process.send_signal(signal.SIGHUP)
    failed = _wait_for(service, "reload_failed", 1)
    assert "wrong PIN" in failed["error"]
    assert "00000000" not in service.logs()
    setup["pin_file"].write_text(token.pin)
    service.process.send_signal(signal.SIGHUP)
    _wait_for(service, "reloaded", 1)
    with service.client() as client:
        assert client.get("/healthz").json()["signer"] == "available"


def test_a_new_api_key_file_replaces_the_old_keys(setup: dict[str, Any]) -> None:
    service: ServiceProcess = setup["service"]
    old_key = service.api_key
    new_key = write_api_key(setup["api_key_file"])
    service.process.send_signal(signal.SIGHUP)
    _wait_for(service, "reloaded", 1)
    with httpx.Client(base_url=service.url, trust_env=False) as client:
        assert (
            client.get("/v1/jwk", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
        )
        assert (
            client.get("/v1/jwk", headers={"Authorization": f"Bearer {old_key}"}).status_code == 401
        )


def _proof_jkt(proof: str) -> str:
    import base64
    import json

    header = proof.split(".")[0]
    decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    return thumbprint(decoded["jwk"])


def test_the_proxy_switches_keys_on_sighup(
    setup: dict[str, Any], servers: LocalServers, tmp_path: Path
) -> None:
    key = write_api_key(tmp_path / "proxy-api-key")
    proxy = start_service(
        ["proxy", "--upstream", servers.rs_url, "--listen", "127.0.0.1:0",
         "--config", str(setup["config"]), "--api-key-file", str(tmp_path / "proxy-api-key"),
         "--token-url", servers.token_url, "--client-id", servers.client_id],
        tmp_path / "proxy",
        api_key=key,
    )  # fmt: skip
    try:
        with httpx.Client(
            base_url=proxy.url, trust_env=False, headers={"Proxy-Authorization": f"Bearer {key}"}
        ) as client:
            first = client.get("/api/things")
            assert first.status_code == 200, first.text
            _config(setup["config"], setup["rotated"], setup["secret_file"], setup["pin_file"])
            proxy.process.send_signal(signal.SIGHUP)
            assert _wait_for(proxy, "reloaded", 1)["key_changed"] is True
            second = client.get("/api/things")
            assert second.status_code == 200, second.text
        assert first.json()["jkt"] != second.json()["jkt"]
    finally:
        assert proxy.stop() == 0, proxy.logs()[-2000:]
