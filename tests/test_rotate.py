"""``rotate(new_signer)``: the DPoP key changes while requests run, and never mixes with tokens.

Against the real local servers (their RS checks that the proof key is the token's ``cnf.jkt``),
with PEM keys made by `generate_key` and a SoftHSM2 key. The invariant is checked on what the
servers received, independently of the client: every proof's JWK thumbprint (computed by the
oracle) equals the ``cnf.jkt`` of the token sent with it, and no request failed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from dpop_signer import DPoPAuth, generate_key, load_signer
from dpop_signer.jwk import jwk_thumbprint
from dpop_signer.signers.base import Signer
from dpop_signer.signers.pem import PemSigner
from dpop_signer.testing.servers import LocalServers
from tests import oracle
from tests.client_drivers import DRIVERS, driver_for
from tests.fake_oauth import claims_of
from tests.fault_servers import FaultServers

Make = Callable[..., FaultServers]
TIMEOUT = httpx.Timeout(30.0)


@pytest.fixture
def pem_keys(tmp_path: Path) -> list[Signer]:
    keys = []
    for name in ("a", "b", "c"):
        path = tmp_path / f"{name}.pem"
        generate_key(str(path))
        keys.append(load_signer(str(path)))
    return keys


@pytest.fixture
def hsm_key(pkcs11_key_uri: str) -> Iterator[Signer]:
    signer = load_signer(pkcs11_key_uri)
    yield signer
    getattr(signer, "close", lambda: None)()


def auth_for(servers: LocalServers, signer: Signer, **options: object) -> DPoPAuth:
    return DPoPAuth(
        signer,
        token_url=servers.token_url,
        client_id=servers.client_id,
        client_secret=servers.client_secret,
        **options,  # type: ignore[arg-type]
    )


def header_of(proof: str) -> dict[str, Any]:
    """The protected header of a compact JWS, decoded by hand (no dpop_signer code)."""
    segment = proof.split(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))


def mismatches(servers: LocalServers) -> int:
    """API proofs whose key (thumbprint by the oracle) is not the token's ``cnf.jkt``."""
    bad = 0
    for seen in servers.resource_server.seen:
        header = header_of(seen.proof)
        if oracle.thumbprint(header["jwk"]) != seen.jkt:
            bad += 1
    return bad


def proof_jkts(servers: LocalServers) -> Counter[str]:
    return Counter(
        oracle.thumbprint(header_of(seen.proof)["jwk"]) for seen in servers.resource_server.seen
    )


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not met within {seconds} s"
        time.sleep(0.005)


def test_rotate_switches_jkt_and_fetches_a_new_token(
    local_servers: LocalServers, pem_keys: list[Signer]
) -> None:
    first, second = pem_keys[:2]
    auth = auth_for(local_servers, first)
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        before = client.get(f"{local_servers.api_url}/a").json()["jkt"]
        assert auth.rotate(second) == jwk_thumbprint(second.public_jwk)
        assert auth.jkt == jwk_thumbprint(second.public_jwk)
        assert auth.token is None
        after = client.get(f"{local_servers.api_url}/b").json()["jkt"]
        headers = auth.headers(client, "GET", f"{local_servers.api_url}/c")
        with_nonce = auth.headers(client, "GET", f"{local_servers.api_url}/d", nonce="n-1")
    assert before == jwk_thumbprint(first.public_jwk)
    assert after == jwk_thumbprint(second.public_jwk)
    assert oracle.thumbprint(header_of(headers["DPoP"])["jwk"]) == after
    token = headers["Authorization"].split(" ", 1)[1]
    assert claims_of(token)["cnf"]["jkt"] == after
    # A caller's nonce goes into that proof only, with the same key and token.
    assert claims_of(with_nonce["DPoP"])["nonce"] == "n-1"
    assert with_nonce["Authorization"] == headers["Authorization"]
    assert oracle.thumbprint(header_of(with_nonce["DPoP"])["jwk"]) == after
    assert auth.nonces.get(local_servers.api_url) is None
    assert local_servers.authorization_server.token_requests == 2
    assert mismatches(local_servers) == 0


def test_a_request_in_flight_finishes_with_the_old_key(
    local_servers_factory: Make, pem_keys: list[Signer]
) -> None:
    servers = local_servers_factory(rs_mode="slow", slow_seconds=0.5)
    old, new = pem_keys[:2]
    auth = auth_for(servers, old)
    results: list[httpx.Response] = []
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        thread = threading.Thread(
            target=lambda: results.append(client.get(f"{servers.api_url}/slow"))
        )
        thread.start()
        wait_for(lambda: servers.resource_server.api_requests == 1)
        auth.rotate(new)
        thread.join(timeout=20)
        assert not thread.is_alive()
        servers.resource_server.mode = "ok"
        later = client.get(f"{servers.api_url}/later")
    assert results[0].status_code == 200
    assert results[0].json()["jkt"] == jwk_thumbprint(old.public_jwk)
    assert later.json()["jkt"] == jwk_thumbprint(new.public_jwk)
    assert mismatches(servers) == 0


def test_a_nonce_retry_after_rotation_stays_with_the_old_key(
    local_servers_factory: Make, pem_keys: list[Signer]
) -> None:
    # The request has its token and has been sent once when the key changes; the RS then
    # demands a nonce, and the retry still carries the old key's token: it must be signed
    # with the old key (the RS refuses a proof whose key is not the token's cnf.jkt).
    servers = local_servers_factory(rs_require_nonce=True, rs_mode="slow", slow_seconds=0.5)
    old, new = pem_keys[:2]
    auth = auth_for(servers, old)
    results: list[httpx.Response] = []
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        thread = threading.Thread(
            target=lambda: results.append(client.put(f"{servers.api_url}/n", content=b"x"))
        )
        thread.start()
        wait_for(lambda: servers.resource_server.api_requests == 1)
        auth.rotate(new)
        thread.join(timeout=20)
        assert not thread.is_alive()
    assert results[0].status_code == 200
    assert results[0].json()["jkt"] == jwk_thumbprint(old.public_jwk)
    assert servers.resource_server.api_requests == 2
    assert servers.authorization_server.token_requests == 1
    assert mismatches(servers) == 0


def test_a_renewal_after_rotation_re_signs_with_the_new_key(
    local_servers_factory: Make, pem_keys: list[Signer]
) -> None:
    servers = local_servers_factory()
    old, new = pem_keys[:2]
    auth = auth_for(servers, old)
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        assert client.get(f"{servers.api_url}/a").status_code == 200
        # The next request holds the old key's token; while the (slow) RS has it, the key is
        # rotated and the AS's signing key changed, so the RS answers invalid_token: the
        # renewal gets the new key's token and the retry is signed with the new key.
        servers.resource_server.mode = "slow"
        servers.resource_server.slow_seconds = 0.5
        authorization_server = servers.authorization_server
        authorization_server._signer = PemSigner(ec.generate_private_key(ec.SECP256R1()))
        authorization_server.kid = jwk_thumbprint(authorization_server._signer.public_jwk)
        results: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: results.append(client.post(f"{servers.api_url}/b", content=b"body"))
        )
        thread.start()
        wait_for(lambda: servers.resource_server.api_requests == 2)
        auth.rotate(new)
        servers.resource_server.mode = "ok"
        thread.join(timeout=20)
        assert not thread.is_alive()
    assert results[0].status_code == 200
    assert results[0].json()["jkt"] == jwk_thumbprint(new.public_jwk)
    assert results[0].json()["body_len"] == 4
    assert servers.resource_server.statuses[401] == 1
    assert authorization_server.token_requests == 2
    assert mismatches(servers) == 0


def _rotate_under_load(
    servers: LocalServers, rotate: Callable[[Signer], str], keys: list[Signer]
) -> list[str]:
    """Rotate through ``keys`` while requests run, each after 30 more requests arrived."""
    jkts = []
    for key in keys:
        seen = servers.resource_server.api_requests
        target = seen + 30
        wait_for(lambda: servers.resource_server.api_requests >= target)  # noqa: B023
        jkts.append(rotate(key))
    return jkts


@pytest.mark.softhsm
def test_threads_with_httpx_client_under_rotation(
    local_servers: LocalServers, pem_keys: list[Signer], hsm_key: Signer
) -> None:
    auth = auth_for(local_servers, pem_keys[0])
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:

        def work(worker: int) -> None:
            for i in range(5000):  # bounded; stop ends it long before
                if stop.is_set():
                    return
                status = client.get(f"{local_servers.api_url}/t/{worker}/{i}").status_code
                with lock:
                    statuses[status] += 1

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        try:
            keys = [pem_keys[1], hsm_key, pem_keys[2], pem_keys[0]]
            jkts = _rotate_under_load(local_servers, auth.rotate, keys)
            seen = local_servers.resource_server.api_requests
            wait_for(lambda: local_servers.resource_server.api_requests >= seen + 30)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert set(statuses) == {200}
    assert mismatches(local_servers) == 0
    used = proof_jkts(local_servers)
    assert set(jkts) <= set(used)
    assert auth.jkt == jkts[-1]
    assert local_servers.authorization_server.token_requests == 5


@pytest.mark.softhsm
def test_tasks_with_httpx_async_client_under_rotation(
    local_servers: LocalServers, pem_keys: list[Signer], hsm_key: Signer
) -> None:
    auth = auth_for(local_servers, pem_keys[0])
    keys = [hsm_key, pem_keys[1], hsm_key]

    async def main() -> tuple[Counter[int], list[str]]:
        statuses: Counter[int] = Counter()
        stop = asyncio.Event()
        async with httpx.AsyncClient(auth=auth, timeout=TIMEOUT) as client:

            async def work(worker: int) -> None:
                for i in range(5000):  # bounded; stop ends it long before
                    if stop.is_set():
                        return
                    response = await client.get(f"{local_servers.api_url}/a/{worker}/{i}")
                    statuses[response.status_code] += 1

            async def rotator() -> list[str]:
                jkts = []
                for key in keys:
                    seen = local_servers.resource_server.api_requests
                    deadline = time.monotonic() + 20
                    while local_servers.resource_server.api_requests < seen + 30:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.005)
                    jkts.append(auth.rotate(key))
                seen = local_servers.resource_server.api_requests
                deadline = time.monotonic() + 20
                while local_servers.resource_server.api_requests < seen + 30:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.005)
                stop.set()
                return jkts

            workers = [asyncio.create_task(work(n)) for n in range(50)]
            jkts = await asyncio.wait_for(rotator(), timeout=60)
            await asyncio.wait_for(asyncio.gather(*workers), timeout=60)
        return statuses, jkts

    statuses, jkts = asyncio.run(main())
    assert set(statuses) == {200}
    assert sum(statuses.values()) >= 4 * 30
    assert mismatches(local_servers) == 0
    assert set(jkts) <= set(proof_jkts(local_servers))
    assert auth.jkt == jwk_thumbprint(hsm_key.public_jwk)
    assert local_servers.authorization_server.token_requests == 4


@pytest.mark.parametrize("driver_name", DRIVERS)
def test_every_driver_rotates_under_load(
    local_servers: LocalServers, pem_keys: list[Signer], driver_name: str
) -> None:
    gen = driver_for(driver_name, pem_keys[0], local_servers)
    driver = next(gen)
    results: list[int] = []
    try:
        urls = [f"{local_servers.api_url}/d/{i}" for i in range(400)]
        thread = threading.Thread(
            target=lambda: results.extend(r.status for r in driver.gather(urls))
        )
        thread.start()
        jkts = _rotate_under_load(local_servers, driver.auth.rotate, pem_keys[1:])
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        gen.close()
    assert Counter(results) == Counter({200: 400})
    assert mismatches(local_servers) == 0
    assert driver.auth.jkt == jkts[-1]
    assert set(jkts) <= set(proof_jkts(local_servers))
