"""DPoPAuth end to end over real sockets against the local AS + RS (dpop_signer.testing.servers).

The autouse ``oracle_check`` fixture (tests/servers_fixtures.py) re-checks every proof the
servers received with the independent oracle. Counters on the servers, not on the client, prove
how many requests went out.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from dpop_signer import DPoPAuth, load_signer
from dpop_signer.errors import (
    InvalidTokenResponseError,
    OAuthError,
    ServerFailedError,
    ServerUnreachableError,
    TokenEndpointError,
    UseDPoPNonceError,
)
from dpop_signer.signers.base import Signer
from dpop_signer.testing.servers import LocalServers
from tests import oracle
from tests.fake_oauth import claims_of
from tests.fault_servers import FaultServers
from tests.servers_fixtures import OracleCheck

Make = Callable[..., FaultServers]
TIMEOUT = httpx.Timeout(30.0)


def auth_for(servers: LocalServers, signer: Signer, **kwargs: Any) -> DPoPAuth:
    if servers.client_secret is not None:
        kwargs.setdefault("client_secret", servers.client_secret)
    return DPoPAuth(signer, token_url=servers.token_url, client_id=servers.client_id, **kwargs)


@pytest.fixture
def hsm_signer(pkcs11_key_uri: str) -> Iterator[Signer]:
    signer = load_signer(pkcs11_key_uri)
    yield signer
    getattr(signer, "close", lambda: None)()


def test_calls_carry_a_bound_token(local_servers: LocalServers, pem_signer: Signer) -> None:
    auth = auth_for(local_servers, pem_signer, scope="read")
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        responses = [client.get(f"{local_servers.api_url}/things/{i}?q=x") for i in range(3)]
        posted = client.post(f"{local_servers.api_url}/things", content=b"payload")
        with client.stream("GET", f"{local_servers.api_url}/stream?bytes=200000") as streamed:
            size = sum(len(chunk) for chunk in streamed.iter_bytes())
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.json()["jkt"] for r in responses} == {auth.jkt}
    assert posted.json()["body_len"] == 7
    assert size == 200000
    assert local_servers.authorization_server.token_requests == 1
    assert local_servers.resource_server.api_requests == 5
    assert local_servers.authorization_server.last_token_request["scope"] == "read"


def test_pkcs11_key_async_client_with_nonces_at_both_servers(
    local_servers_factory: Make, hsm_signer: Signer
) -> None:
    servers = local_servers_factory(require_nonce=True, nonce_rotation=None)
    auth = auth_for(servers, hsm_signer, client_auth="client_secret_post")

    async def main() -> list[int]:
        async with httpx.AsyncClient(auth=auth, timeout=TIMEOUT) as client:
            first = await client.get(f"{servers.api_url}/a")
            rest = [await client.get(f"{servers.api_url}/b/{i}") for i in range(2)]
            return [first.status_code, *(r.status_code for r in rest)]

    assert asyncio.run(main()) == [200, 200, 200]
    # exactly one retry at each server, then the cached nonces are used
    assert servers.authorization_server.token_requests == 2
    assert servers.resource_server.api_requests == 4


def test_private_key_jwt_gets_a_fresh_assertion_on_the_nonce_retry(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory(
        client_secret=None, client_jwk=dict(pem_signer.public_jwk), as_require_nonce=True
    )
    auth = auth_for(servers, pem_signer, client_auth="private_key_jwt")
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        assert client.get(f"{servers.api_url}/x").status_code == 200
    assert servers.authorization_server.token_requests == 2
    assert servers.authorization_server.last_token_request["auth_method"] == "private_key_jwt"


@pytest.mark.parametrize(
    ("side", "mode"), [(s, m) for s in ("as", "rs") for m in ("nonce_always", "nonce_repeat")]
)
def test_nonce_demands_that_cannot_be_met_end_in_an_error(
    local_servers_factory: Make, pem_signer: Signer, side: str, mode: str
) -> None:
    servers = local_servers_factory(**{f"{side}_mode": mode})
    with (
        httpx.Client(auth=auth_for(servers, pem_signer), timeout=TIMEOUT) as client,
        pytest.raises(UseDPoPNonceError) as info,
    ):
        client.get(f"{servers.api_url}/x")
    counts = (servers.authorization_server.token_requests, servers.resource_server.api_requests)
    assert counts == ((2, 0) if side == "as" else (1, 2))
    server = servers.authorization_server if side == "as" else servers.resource_server
    for seen in server.seen:
        claims_nonce = seen.nonce
        assert claims_nonce is None or claims_nonce not in str(info.value)
    assert server.repeat_nonce not in str(info.value)


def test_invalid_token_twice_after_exactly_one_renewal(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory(rs_mode="invalid_token_always")
    with (
        httpx.Client(auth=auth_for(servers, pem_signer), timeout=TIMEOUT) as client,
        pytest.raises(OAuthError, match="invalid_token"),
    ):
        client.get(f"{servers.api_url}/x")
    assert servers.authorization_server.token_requests == 2
    assert servers.resource_server.api_requests == 2


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("error_500", ServerFailedError, "HTTP 500"),
        ("html", InvalidTokenResponseError, "text/html"),
        ("bearer", InvalidTokenResponseError, "Bearer"),
    ],
)
def test_authorization_server_failures(
    local_servers_factory: Make, pem_signer: Signer, mode: str, error: type[Exception], match: str
) -> None:
    servers = local_servers_factory(as_mode=mode)
    with (
        httpx.Client(auth=auth_for(servers, pem_signer), timeout=TIMEOUT) as client,
        pytest.raises(error, match=match) as info,
    ):
        client.get(f"{servers.api_url}/x")
    assert servers.client_secret is not None
    assert servers.client_secret not in str(info.value)
    assert servers.resource_server.api_requests == 0


def test_rejected_client_secret(local_servers: LocalServers, pem_signer: Signer) -> None:
    auth = auth_for(local_servers, pem_signer, client_secret="not-the-secret")
    with (
        httpx.Client(auth=auth, timeout=TIMEOUT) as client,
        pytest.raises(TokenEndpointError) as info,
    ):
        client.get(f"{local_servers.api_url}/x")
    assert (info.value.error, info.value.status) == ("invalid_client", 401)
    assert "not-the-secret" not in str(info.value)
    assert local_servers.resource_server.api_requests == 0


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_authorization_server_down(closed_port: int, pem_signer: Signer) -> None:
    url = f"http://127.0.0.1:{closed_port}/token"
    auth = DPoPAuth(pem_signer, token_url=url, client_id="c", client_secret="top-secret")
    with httpx.Client(auth=auth, timeout=5) as client:
        with pytest.raises(ServerUnreachableError, match="ConnectError") as info:
            client.get(f"http://127.0.0.1:{closed_port}/api/x")
        assert "top-secret" not in str(info.value)
        with pytest.raises(ServerUnreachableError):
            auth.get_token(client)

    async def main() -> None:
        async with httpx.AsyncClient(auth=auth, timeout=5) as client:
            with pytest.raises(ServerUnreachableError):
                await auth.aget_token(client)
            # The same auth is backing off now: the request is refused before it is sent.
            with pytest.raises(ServerUnreachableError) as info:
                await client.get(f"http://127.0.0.1:{closed_port}/api/x")
            assert info.value.retry_after is not None

    asyncio.run(main())


def test_slow_authorization_server_times_out_with_the_clients_timeout(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory(as_mode="slow", slow_seconds=1.5)
    with (
        httpx.Client(auth=auth_for(servers, pem_signer), timeout=0.3) as client,
        pytest.raises(ServerUnreachableError, match="ReadTimeout"),
    ):
        client.get(f"{servers.api_url}/x")


def test_streamed_request_body_is_not_re_sent(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory(rs_require_nonce=True)

    def body() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 1000

    with (
        httpx.Client(auth=auth_for(servers, pem_signer), timeout=TIMEOUT) as client,
        pytest.raises(UseDPoPNonceError, match="one-shot stream"),
    ):
        client.post(f"{servers.api_url}/upload", content=body())
    assert servers.resource_server.api_requests == 1


def _check_rejected_except_time(servers: LocalServers, oracle_check: OracleCheck) -> int:
    # Proofs the server refused on purpose (stale iat, missing nonce) are left out of the autouse
    # check and checked here on everything else, with the proof's own iat as "now".
    oracle_check.exempt_where(lambda seen: seen.error is not None)
    rejected = [seen for seen in servers.seen() if seen.error is not None]
    for seen in rejected:
        claims = claims_of(seen.proof)
        oracle.check_proof(
            seen.proof,
            htm=seen.method,
            url=seen.url,
            access_token=seen.access_token,
            nonce=claims.get("nonce"),
            now=claims["iat"],
            expected_jkt=seen.jkt,
        )
    return len(rejected)


def test_server_clock_an_hour_ahead(
    local_servers_factory: Make, pem_signer: Signer, oracle_check: OracleCheck
) -> None:
    # Like oidc-provider, the AS answers a stale proof with use_dpop_nonce; the response's Date
    # header teaches the client the offset, so the one retry is in the server's time.
    servers = local_servers_factory(clock_skew=3600.0, require_nonce=True)
    auth = auth_for(servers, pem_signer)
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        assert client.get(f"{servers.api_url}/x").status_code == 200
        assert client.get(f"{servers.api_url}/y").status_code == 200
    assert auth.clock_skew is not None
    assert abs(auth.proofs.clock_offset - 3600) < 2
    assert servers.authorization_server.token_requests == 2
    assert servers.resource_server.api_requests == 3
    assert _check_rejected_except_time(servers, oracle_check) == 2


def test_iat_error_names_the_skew(
    local_servers_factory: Make, pem_signer: Signer, oracle_check: OracleCheck
) -> None:
    servers = local_servers_factory(clock_skew=-3600.0)
    with (
        httpx.Client(auth=auth_for(servers, pem_signer), timeout=TIMEOUT) as client,
        pytest.raises(TokenEndpointError, match=r"Date header: -36\d\d s") as info,
    ):
        client.get(f"{servers.api_url}/x")
    assert info.value.error == "invalid_dpop_proof"
    assert _check_rejected_except_time(servers, oracle_check) == 1


@pytest.mark.slow
def test_threads_share_one_token_request(local_servers_factory: Make, pem_signer: Signer) -> None:
    servers = local_servers_factory(as_mode="slow", slow_seconds=0.3)
    auth = auth_for(servers, pem_signer)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:

        def work(worker: int) -> None:
            for i in range(100):
                status = client.get(f"{servers.api_url}/t/{worker}/{i}").status_code
                with lock:
                    statuses[status] += 1

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert statuses == Counter({200: 800})
    assert servers.authorization_server.token_requests == 1
    assert servers.resource_server.api_requests == 800


@pytest.mark.slow
def test_thousand_async_tasks_share_one_token_request(
    local_servers_factory: Make, hsm_signer: Signer
) -> None:
    servers = local_servers_factory(as_mode="slow", slow_seconds=0.3)
    auth = auth_for(servers, hsm_signer)

    async def main() -> Counter[int]:
        async with httpx.AsyncClient(auth=auth, timeout=TIMEOUT) as client:
            responses = await asyncio.gather(
                *(client.get(f"{servers.api_url}/a/{i}") for i in range(1000))
            )
        return Counter(r.status_code for r in responses)

    assert asyncio.run(main()) == Counter({200: 1000})
    assert servers.authorization_server.token_requests == 1
    assert servers.resource_server.api_requests == 1000


@pytest.mark.slow
def test_three_second_tokens_for_twenty_seconds_of_calls(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory(token_lifetime=3, require_nonce=True, nonce_rotation=2.0)
    auth = auth_for(servers, pem_signer)
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + 20.0
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        for i in range(200_000):  # bounded; the deadline ends it long before
            if time.monotonic() >= deadline:
                break
            statuses[client.get(f"{servers.api_url}/c/{i}").status_code] += 1
            time.sleep(0.02)
    assert set(statuses) == {200}
    assert statuses[200] > 100
    # renewed about every 1.5 s (half the lifetime), never a failed call
    assert 8 <= auth.token_requests <= 40
    assert servers.authorization_server.issued_tokens >= 8
