"""Proofs made ahead of time (dpop_signer.ahead): each rule of issue 16, over real sockets.

Every proof the local servers receive is re-checked by the independent oracle (the autouse
``oracle_check``), and the local resource server refuses a replayed ``jti`` (401
``invalid_dpop_proof``), as does the jose resource server next to oidc-provider in the interop
tests at the end. Which proofs were made ahead is read off the thread that signed them: the
`Recording` signer wraps a real key and notes, per ``jti``, the thread its signature was made
on (``dpop-proofs-ahead`` for the cache's signing thread).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

from dpop_signer import DPoPAuth, PemSigner, load_signer
from dpop_signer.ahead import ProofsAhead
from dpop_signer.cli_options import client_options, key_options, settings_from_context
from dpop_signer.config import build_auth, load_settings
from dpop_signer.errors import SignerTimeoutError
from dpop_signer.signers.base import Signer
from dpop_signer.testing.servers import LocalServers
from tests.interop_fixtures import JoseResourceServer, OidcProvider

Make = Callable[..., LocalServers]
AHEAD_THREAD = "dpop-proofs-ahead"
WAIT = 10.0


def _claims(jws: str | bytes) -> dict[str, Any]:
    text = jws.decode("ascii") if isinstance(jws, bytes) else jws
    part = text.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(claims, dict)
    return claims


class Recording:
    """A real key that notes, per proof ``jti``, the name of the thread that signed it."""

    algorithm = "ES256"

    def __init__(self, inner: Signer, fail_ahead: int = 0) -> None:
        self.inner = inner
        self.threads: dict[str, str] = {}
        self.fail_ahead = fail_ahead  # this many signatures on the ahead thread time out
        self._lock = threading.Lock()

    @property
    def public_jwk(self) -> Any:  # the inner key's, whatever its type
        return self.inner.public_jwk

    def sign(self, message: bytes) -> bytes:
        name = threading.current_thread().name
        with self._lock:
            self.threads[_claims(message)["jti"]] = name
            if name == AHEAD_THREAD and self.fail_ahead > 0:
                self.fail_ahead -= 1
                raise SignerTimeoutError("the test signer timed out (on purpose)")
        return self.inner.sign(message)

    def ahead(self, proof: str) -> bool:
        """Whether ``proof`` was signed on the cache's signing thread."""
        return self.threads[_claims(proof)["jti"]] == AHEAD_THREAD


def _auth(servers: LocalServers, signer: Signer, **options: Any) -> DPoPAuth:
    return DPoPAuth(
        signer,
        token_url=servers.token_url,
        client_id=servers.client_id,
        client_secret=servers.client_secret,
        **options,
    )


def _ahead(auth: DPoPAuth) -> ProofsAhead:
    ahead = auth.flow.ahead
    assert ahead is not None
    return ahead


def _settled(ahead: ProofsAhead) -> None:
    """Wait (bounded) until every proof made ahead has its signature (or was dropped)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        pending = [p for p in list(ahead._table.values()) if p is not None]
        if all(p.signature.done() for p in pending):
            return
        time.sleep(0.005)
    pytest.fail(f"proofs made ahead were not signed within {WAIT} s")


def _api_proofs(servers: LocalServers) -> list[str]:
    return [seen.proof for seen in servers.resource_server.seen]


@pytest.fixture
def hsm_signer(pkcs11_key_uri: str) -> Iterator[Signer]:
    signer = load_signer(pkcs11_key_uri)
    yield signer
    getattr(signer, "close", lambda: None)()


# --- the setting --------------------------------------------------------------------------


def test_on_by_default_for_pkcs11_keys_off_for_pem(
    local_servers: LocalServers, hsm_signer: Signer, pem_signer: Signer
) -> None:
    assert _auth(local_servers, hsm_signer).flow.ahead is not None
    assert _auth(local_servers, pem_signer).flow.ahead is None
    assert _auth(local_servers, hsm_signer, proofs_ahead=False).flow.ahead is None
    assert _auth(local_servers, pem_signer, proofs_ahead=True).flow.ahead is not None


def test_setting_from_option_environment_and_toml(
    tmp_path: Path, pem_key_path: str, pem_signer: Signer
) -> None:
    base = {"token_url": "http://127.0.0.1:9/token", "client_id": "c", "client_secret": "s"}
    # Default: decided by the key reference (the service wraps its signer).
    assert (
        build_auth(load_settings({**base, "key": pem_key_path}, env={}), pem_signer).flow.ahead
        is None
    )
    hsm_ref = "pkcs11:token=t;object=k"
    assert (
        build_auth(load_settings({**base, "key": hsm_ref}, env={}), pem_signer).flow.ahead
        is not None
    )
    on = load_settings({**base, "key": pem_key_path}, env={"DPOP_PROOFS_AHEAD": "true"})
    assert (on.proofs_ahead, on.source_of("proofs_ahead")) == (True, "DPOP_PROOFS_AHEAD")
    assert build_auth(on, pem_signer).flow.ahead is not None
    config = tmp_path / "config.toml"
    config.write_text("proofs_ahead = false\n")
    off = load_settings({**base, "key": hsm_ref}, config_file=config, env={})
    assert off.proofs_ahead is False
    assert build_auth(off, pem_signer).flow.ahead is None
    # The option beats the environment.
    both = load_settings({**base, "proofs_ahead": False}, env={"DPOP_PROOFS_AHEAD": "1"})
    assert (both.proofs_ahead, both.source_of("proofs_ahead")) == (False, "--proofs-ahead")

    @click.command()
    @key_options
    @client_options
    @click.pass_context
    def show(ctx: click.Context, /, **_: object) -> None:
        click.echo(repr(settings_from_context(ctx).proofs_ahead))

    runner = CliRunner()
    env = {"XDG_CONFIG_HOME": str(tmp_path / "none"), "DPOP_PROOFS_AHEAD": ""}
    assert runner.invoke(show, ["--no-proofs-ahead"], env=env).output.strip() == "False"
    assert runner.invoke(show, ["--proofs-ahead"], env=env).output.strip() == "True"
    assert runner.invoke(show, [], env=env).output.strip() == "None"


# --- the rules ---------------------------------------------------------------------------


def test_repeated_calls_use_proofs_signed_ahead_each_once(
    local_servers: LocalServers, hsm_signer: Signer
) -> None:
    signer = Recording(hsm_signer)
    auth = _auth(local_servers, signer, proofs_ahead=True)
    url = f"{local_servers.api_url}/things?page=1"
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        statuses = []
        for _ in range(8):
            statuses.append(client.get(url).status_code)
            _settled(_ahead(auth))
    assert statuses == [200] * 8
    proofs = _api_proofs(local_servers)
    # First sight registers the pair, the second response makes the first proof ahead.
    assert [signer.ahead(p) for p in proofs] == [False, False] + [True] * 6
    assert len({_claims(p)["jti"] for p in proofs}) == 8  # and the server refuses a replay
    ahead = _ahead(auth)
    assert (ahead.used, ahead.discarded) == (6, 0)
    assert ahead.made == 7  # the last one waits for a ninth call that never comes


def test_never_made_for_a_pair_not_seen_before(
    local_servers: LocalServers, pem_signer: Signer
) -> None:
    signer = Recording(pem_signer)
    auth = _auth(local_servers, signer, proofs_ahead=True)
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        for i in range(5):
            assert client.get(f"{local_servers.api_url}/new/{i}").status_code == 200
        # Seen as GET only: a POST to the same URL is another pair.
        assert client.post(f"{local_servers.api_url}/new/0", content=b"x").status_code == 200
    assert _ahead(auth).made == 0
    assert AHEAD_THREAD not in signer.threads.values()


def test_bounded_lru_of_pairs(local_servers: LocalServers, pem_signer: Signer) -> None:
    def made(size: int) -> int:
        auth = _auth(local_servers, pem_signer, proofs_ahead=True)
        _ahead(auth).size = size
        with httpx.Client(auth=auth, timeout=WAIT) as client:
            for _ in range(2):
                for i in range(5):
                    assert client.get(f"{local_servers.api_url}/lru/{i}").status_code == 200
        assert _ahead(auth).pairs <= size
        assert _ahead(auth).waiting <= size
        return _ahead(auth).made

    # Five pairs in a round robin: with room for three, each was dropped before it came back.
    assert made(3) == 0
    assert made(5) == 5


def test_token_renewal_discards_the_proof(local_servers: LocalServers, pem_signer: Signer) -> None:
    signer = Recording(pem_signer)
    auth = _auth(local_servers, signer, proofs_ahead=True)
    url = f"{local_servers.api_url}/renewed"
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        for _ in range(2):
            client.get(url)
        assert _ahead(auth).waiting == 1
        auth.invalidate()  # the next request fetches a new token
        after = client.get(url)
    assert after.status_code == 200
    assert local_servers.authorization_server.token_requests == 2
    last = local_servers.resource_server.seen[-1]
    assert not signer.ahead(last.proof)
    assert last.access_token != local_servers.resource_server.seen[0].access_token
    assert _ahead(auth).discarded == 1


def test_key_rotation_discards_the_proof(local_servers: LocalServers, pem_signer: Signer) -> None:
    signer = Recording(pem_signer)
    auth = _auth(local_servers, signer, proofs_ahead=True)
    url = f"{local_servers.api_url}/rotated"
    new_key = Recording(PemSigner(ec.generate_private_key(ec.SECP256R1())))
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        for _ in range(2):
            client.get(url)
        assert _ahead(auth).waiting == 1
        new_jkt = auth.rotate(new_key)
        after = client.get(url)
    assert after.status_code == 200
    assert after.json()["jkt"] == new_jkt
    last = local_servers.resource_server.seen[-1].proof
    assert _claims(last)["jti"] in new_key.threads
    assert not new_key.ahead(last)
    assert _ahead(auth).discarded == 1


def test_a_changed_nonce_discards_the_proof(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory(rs_require_nonce=True, nonce_rotation=None)
    signer = Recording(pem_signer)
    auth = _auth(servers, signer, proofs_ahead=True)
    a, b = f"{servers.api_url}/a", f"{servers.api_url}/b"
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        for url in (a, b, a, b):
            assert client.get(url).status_code == 200
        _settled(_ahead(auth))
        fresh = servers.resource_server.rotate_nonce()
        assert client.get(a).status_code == 200  # its proof carries the previous nonce
        assert client.get(b).status_code == 200  # the answer to a taught the new one
    *_, to_a, to_b = _api_proofs(servers)
    assert signer.ahead(to_a)
    assert _claims(to_a)["nonce"] != fresh
    assert not signer.ahead(to_b)
    assert _claims(to_b)["nonce"] == fresh
    assert _ahead(auth).discarded >= 1


def test_an_old_proof_is_discarded(local_servers: LocalServers, pem_signer: Signer) -> None:
    signer = Recording(pem_signer)
    offset = [0.0]
    auth = _auth(local_servers, signer, proofs_ahead=True, clock=lambda: time.time() + offset[0])
    _ahead(auth).max_age = 0.5
    url = f"{local_servers.api_url}/aged"
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        for _ in range(2):
            client.get(url)
        _settled(_ahead(auth))
        offset[0] = 1.0  # the clock moves on: the waiting proof is older than max_age
        assert client.get(url).status_code == 200
    last = _api_proofs(local_servers)[-1]
    assert not signer.ahead(last)
    assert _ahead(auth).discarded == 1


def test_nonce_demand_retry_signs_fresh(local_servers_factory: Make, pem_signer: Signer) -> None:
    servers = local_servers_factory(rs_require_nonce=True, nonce_rotation=None)
    signer = Recording(pem_signer)
    auth = _auth(servers, signer, proofs_ahead=True)
    url = f"{servers.api_url}/demand"
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        for _ in range(2):
            assert client.get(url).status_code == 200
        _settled(_ahead(auth))
        servers.resource_server.rotate_nonce()
        demanded = servers.resource_server.rotate_nonce()  # the known nonce is refused now
        assert client.get(url).status_code == 200
    seen = servers.resource_server.seen
    assert [(s.status, s.error) for s in seen[-2:]] == [(401, "use_dpop_nonce"), (200, None)]
    assert signer.ahead(seen[-2].proof)
    assert not signer.ahead(seen[-1].proof)
    assert _claims(seen[-1].proof)["nonce"] == demanded


def test_a_failed_signature_ahead_signs_fresh(
    local_servers: LocalServers, pem_signer: Signer
) -> None:
    signer = Recording(pem_signer, fail_ahead=1)
    auth = _auth(local_servers, signer, proofs_ahead=True)
    url = f"{local_servers.api_url}/stalled"
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        statuses = [client.get(url).status_code for _ in range(3)]
        _settled(_ahead(auth))
        statuses.append(client.get(url).status_code)
    assert statuses == [200] * 4
    proofs = _api_proofs(local_servers)
    assert [signer.ahead(p) for p in proofs] == [False, False, False, True]


def test_threads_never_share_a_proof(local_servers: LocalServers, hsm_signer: Signer) -> None:
    auth = _auth(local_servers, hsm_signer, proofs_ahead=True)
    url = f"{local_servers.api_url}/shared"
    statuses: list[int] = []
    with httpx.Client(auth=auth, timeout=WAIT) as client:

        def calls() -> None:
            for _ in range(15):
                statuses.append(client.get(url).status_code)

        threads = [threading.Thread(target=calls) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
    assert statuses == [200] * 60  # a replayed jti would be 401 invalid_dpop_proof
    proofs = _api_proofs(local_servers)
    assert len({_claims(p)["jti"] for p in proofs}) == 60
    assert _ahead(auth).used > 0


def test_async_client_on_the_pkcs11_worker(local_servers: LocalServers, hsm_signer: Signer) -> None:
    auth = _auth(local_servers, hsm_signer)  # on by default for a PKCS#11 key
    url = f"{local_servers.api_url}/async"

    async def main() -> list[int]:
        async with httpx.AsyncClient(auth=auth, timeout=WAIT) as client:
            statuses = []
            for _ in range(6):
                statuses.append((await client.get(url)).status_code)
                await asyncio.sleep(0)
            return statuses

    assert asyncio.run(main()) == [200] * 6
    assert _ahead(auth).used == 4
    assert len({_claims(p)["jti"] for p in _api_proofs(local_servers)}) == 6


def test_headers_for_the_service_use_the_same_mechanism(
    local_servers: LocalServers, pem_signer: Signer
) -> None:
    signer = Recording(pem_signer)
    auth = _auth(local_servers, signer, proofs_ahead=True)
    url = f"{local_servers.api_url}/headers"
    with httpx.Client(timeout=WAIT) as client:
        sent = []
        for _ in range(4):
            headers = auth.headers(client, "GET", url)
            _settled(_ahead(auth))
            sent.append(headers["DPoP"])
            assert client.get(url, headers=headers).status_code == 200
    assert [signer.ahead(p) for p in sent] == [False, False, True, True]


def test_proofs_ahead_never_logged(
    local_servers: LocalServers, pem_signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    auth = _auth(local_servers, Recording(pem_signer, fail_ahead=1), proofs_ahead=True)
    url = f"{local_servers.api_url}/quiet"
    caplog.set_level(logging.DEBUG)
    with httpx.Client(auth=auth, timeout=WAIT) as client:
        for _ in range(6):
            client.get(url)
            _settled(_ahead(auth))
    ahead = _ahead(auth)
    assert ahead.used >= 2
    texts = caplog.text + repr(ahead) + "".join(repr(p) for p in ahead._table.values())
    for seen in local_servers.resource_server.seen:
        assert seen.proof not in texts
        assert seen.proof.rsplit(".", 1)[1] not in texts  # nor its signature
    for pending in ahead._table.values():
        if pending is not None:
            assert pending.prepared.signing_input not in texts


# --- against independent servers ----------------------------------------------------------


@pytest.mark.interop
def test_oidc_provider_and_jose_accept_proofs_made_ahead_once(
    oidc_provider: Callable[..., OidcProvider], jose_rs: JoseResourceServer, hsm_signer: Signer
) -> None:
    from tests.oracle import check_proof, thumbprint

    provider = oidc_provider()
    auth = DPoPAuth(
        hsm_signer,
        token_url=provider.token_url,
        client_id=provider.basic_client[0],
        client_secret=provider.basic_client[1],
        resource=jose_rs.url,
        scope="api:read",
    )
    url = jose_rs.url + "ahead"
    with httpx.Client(auth=auth, trust_env=False, timeout=WAIT) as client:
        statuses = []
        for _ in range(6):
            statuses.append(client.get(url).status_code)
            _settled(_ahead(auth))
        jose_rs.configure(invalid_token=1)  # the next call meets a renewal: it signs afresh
        statuses.append(client.get(url).status_code)
    assert statuses == [200] * 7
    seen = jose_rs.seen()
    assert [(e["status"], e["error"]) for e in seen] == [(200, None)] * 6 + [
        (401, "invalid_token"),
        (200, None),
    ]
    assert len({_claims(e["proof"])["jti"] for e in seen}) == len(seen)  # jose refuses replays
    assert seen[-1]["access_token"] != seen[-2]["access_token"]
    ahead = _ahead(auth)
    assert ahead.used == 5  # the fifth was taken by the call the renewal retried
    jkt = thumbprint(dict(hsm_signer.public_jwk))
    for entry in seen:
        check_proof(
            entry["proof"],
            htm=entry["method"],
            url=entry["url"],
            access_token=entry["access_token"],
            expected_jkt=jkt,
        )
    assert [e["status"] for e in provider.requests()] == [200, 200]


def test_requests_and_aiohttp_drivers_take_the_keyword(
    local_servers: LocalServers, pem_signer: Signer
) -> None:
    import aiohttp
    import requests

    from dpop_signer.aiohttp import DPoPMiddleware
    from dpop_signer.requests import DPoPRequestsAuth

    options: dict[str, Any] = {
        "token_url": local_servers.token_url,
        "client_id": local_servers.client_id,
        "client_secret": local_servers.client_secret,
    }
    assert DPoPRequestsAuth(pem_signer, **options).flow.ahead is None
    with_requests = DPoPRequestsAuth(pem_signer, proofs_ahead=True, **options)
    url = f"{local_servers.api_url}/drivers"
    with requests.Session() as session:
        session.auth = with_requests
        statuses = [session.get(url, timeout=WAIT).status_code for _ in range(4)]
    middleware = DPoPMiddleware(pem_signer, proofs_ahead=True, **options)

    async def main() -> list[int]:
        async with aiohttp.ClientSession(middlewares=(middleware,)) as session:
            got = []
            for _ in range(4):
                async with session.get(url) as response:
                    got.append(response.status)
            return got

    statuses += asyncio.run(main())
    assert statuses == [200] * 8
    assert with_requests.flow.ahead is not None
    assert with_requests.flow.ahead.used == 2
    assert middleware.flow.ahead is not None
    assert middleware.flow.ahead.used == 2
    assert len({_claims(p)["jti"] for p in _api_proofs(local_servers)}) == 8
