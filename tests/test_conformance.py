"""One suite for every DPoP driver: httpx sync and async, requests and aiohttp.

Each test runs once per driver (tests/client_drivers.py) against the real local servers on
127.0.0.1 (`dpop_signer.testing.servers`), and the autouse ``oracle_check`` fixture re-checks
every proof the servers received with the independent verifier (tests/oracle.py). Counts come
from the servers, not from the client. A behaviour one driver lacks fails here.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from dpop_signer.errors import (
    InvalidTokenResponseError,
    OAuthError,
    ServerFailedError,
    ServerUnreachableError,
    TokenEndpointError,
    UseDPoPNonceError,
)
from dpop_signer.jwk import jwk_thumbprint
from dpop_signer.signers.base import Signer
from dpop_signer.signers.pem import PemSigner
from dpop_signer.testing.servers import LocalServers
from tests.client_drivers import DRIVERS, Driver, driver_for, open_driver
from tests.servers_fixtures import OracleCheck

Make = Callable[..., LocalServers]
OpenFor = Callable[..., Driver]


@pytest.fixture(params=DRIVERS)
def open_for(request: pytest.FixtureRequest, pem_signer: Signer) -> Iterator[OpenFor]:
    """``open_for(servers, **options)``: the parametrized driver for ``servers``."""
    opened: list[Generator[Driver, None, None]] = []

    def make(servers: LocalServers, signer: Signer = pem_signer, **options: Any) -> Driver:
        gen = driver_for(request.param, signer, servers, **options)
        opened.append(gen)
        return next(gen)

    yield make
    for gen in opened:
        gen.close()


def test_calls_carry_a_bound_token(local_servers: LocalServers, open_for: OpenFor) -> None:
    driver = open_for(local_servers, scope="read")
    body = b"payload" * 100
    got = [driver.call("GET", f"{local_servers.api_url}/things/{i}?q=x") for i in range(3)]
    posted = driver.call("POST", f"{local_servers.api_url}/things", content=body)
    streamed = driver.call("GET", f"{local_servers.api_url}/stream?bytes=200000", stream=True)
    assert [r.status for r in got] == [200, 200, 200]
    assert {r.body["jkt"] for r in got} == {driver.auth.jkt}
    assert (posted.status, posted.body["body_len"]) == (200, len(body))
    assert posted.body["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert (streamed.status, streamed.body) == (200, 200_000)
    assert local_servers.authorization_server.token_requests == 1
    assert local_servers.resource_server.api_requests == 5
    assert local_servers.authorization_server.last_token_request["scope"] == "read"


def test_nonces_at_both_servers(local_servers_factory: Make, open_for: OpenFor) -> None:
    servers = local_servers_factory(require_nonce=True)
    driver = open_for(servers)
    first = driver.call("GET", f"{servers.api_url}/a")
    second = driver.call("POST", f"{servers.api_url}/b", content=b"x")
    assert (first.status, second.status) == (200, 200)
    assert servers.authorization_server.token_requests == 2  # the nonce retry, once
    assert servers.resource_server.api_requests == 3  # the first call retried once
    # requests keeps the replaced response in history, as its own digest auth does.
    assert first.history == (1 if driver.name == "requests" else 0)


@pytest.mark.parametrize(
    ("side", "mode"), [(s, m) for s in ("as", "rs") for m in ("nonce_always", "nonce_repeat")]
)
def test_nonce_demands_that_cannot_be_met_end_in_an_error(
    local_servers_factory: Make, open_for: OpenFor, side: str, mode: str
) -> None:
    servers = local_servers_factory(**{f"{side}_mode": mode})
    driver = open_for(servers)
    with pytest.raises(UseDPoPNonceError, match="giving up instead of looping"):
        driver.call("GET", f"{servers.api_url}/x")
    counts = (servers.authorization_server.token_requests, servers.resource_server.api_requests)
    assert counts == ((2, 0) if side == "as" else (1, 2))


def test_invalid_token_renewed_once(local_servers_factory: Make, open_for: OpenFor) -> None:
    servers = local_servers_factory(rs_mode="invalid_token_always")
    driver = open_for(servers)
    with pytest.raises(OAuthError, match="invalid_token"):
        driver.call("GET", f"{servers.api_url}/x")
    assert servers.authorization_server.token_requests == 2
    assert servers.resource_server.api_requests == 2


def test_a_revoked_token_is_renewed_and_the_call_succeeds(
    local_servers_factory: Make, open_for: OpenFor
) -> None:
    servers = local_servers_factory()
    driver = open_for(servers)
    assert driver.call("GET", f"{servers.api_url}/a").status == 200
    # A new AS signing key: every token issued so far fails the RS's check (invalid_token).
    authorization_server = servers.authorization_server
    authorization_server._signer = PemSigner(ec.generate_private_key(ec.SECP256R1()))
    authorization_server.kid = jwk_thumbprint(authorization_server._signer.public_jwk)
    result = driver.call("POST", f"{servers.api_url}/b", content=b"again")
    assert (result.status, result.body["body_len"]) == (200, 5)
    assert authorization_server.token_requests == 2
    assert servers.resource_server.api_requests == 3
    assert servers.resource_server.statuses[401] == 1


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("error_500", ServerFailedError, "HTTP 500"),
        ("html", InvalidTokenResponseError, "text/html"),
        ("bearer", InvalidTokenResponseError, "Bearer"),
    ],
)
def test_authorization_server_failures(
    local_servers_factory: Make,
    open_for: OpenFor,
    mode: str,
    error: type[Exception],
    match: str,
) -> None:
    servers = local_servers_factory(as_mode=mode)
    driver = open_for(servers)
    with pytest.raises(error, match=match) as info:
        driver.call("GET", f"{servers.api_url}/x")
    assert servers.client_secret is not None
    assert servers.client_secret not in str(info.value)
    assert servers.resource_server.api_requests == 0


def test_rejected_client_secret(local_servers: LocalServers, open_for: OpenFor) -> None:
    driver = open_for(local_servers, client_secret="not-the-secret")
    with pytest.raises(TokenEndpointError) as info:
        driver.call("GET", f"{local_servers.api_url}/x")
    assert (info.value.error, info.value.status) == ("invalid_client", 401)
    assert "not-the-secret" not in str(info.value)
    assert local_servers.resource_server.api_requests == 0


def test_authorization_server_down(
    local_servers: LocalServers, open_for: OpenFor, request: pytest.FixtureRequest
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    # Nothing listens on the port any more: connections are refused.
    local = LocalServersAt(local_servers, f"http://127.0.0.1:{port}/token")
    driver = open_for(local)
    # httpx closes an async auth flow without telling it why (see dpop_signer.auth): that
    # driver's request gets httpx's own error; every other driver's gets ours.
    expected: tuple[type[Exception], ...] = (
        (httpx.ConnectError,) if driver.name == "httpx_async" else (ServerUnreachableError,)
    )
    with pytest.raises(expected):
        driver.call("GET", f"{local_servers.api_url}/x")
    # The failure is shared and backed off: the next call fails at once with ours.
    started = time.monotonic()
    with pytest.raises(ServerUnreachableError) as info:
        driver.call("GET", f"{local_servers.api_url}/y")
    assert time.monotonic() - started < 5.0
    assert info.value.retry_after is not None
    assert info.value.retry_after > 0
    assert local_servers.resource_server.api_requests == 0


class LocalServersAt:
    """The demo client of ``servers`` with another token URL."""

    def __init__(self, servers: LocalServers, token_url: str) -> None:
        self.token_url = token_url
        self.client_id = servers.client_id
        self.client_secret = servers.client_secret


def test_streamed_request_body_is_not_re_sent(
    local_servers_factory: Make, open_for: OpenFor
) -> None:
    servers = local_servers_factory(rs_require_nonce=True)
    driver = open_for(servers)
    with pytest.raises(UseDPoPNonceError, match="one-shot stream"):
        driver.call("POST", f"{servers.api_url}/upload", chunks=[b"a" * 1000, b"b" * 1000])
    assert servers.resource_server.api_requests == 1


def test_in_memory_body_is_re_sent_on_a_nonce_demand(
    local_servers_factory: Make, open_for: OpenFor
) -> None:
    servers = local_servers_factory(rs_require_nonce=True)
    driver = open_for(servers)
    body = bytes(range(256)) * 40
    result = driver.call("PUT", f"{servers.api_url}/upload", content=body)
    assert result.status == 200
    assert result.body["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert servers.resource_server.api_requests == 2


def test_server_clock_an_hour_ahead(
    local_servers_factory: Make, open_for: OpenFor, oracle_check: OracleCheck
) -> None:
    servers = local_servers_factory(clock_skew=3600.0, require_nonce=True)
    driver = open_for(servers)
    # Proofs refused for their iat are the point of this test; the rest are checked.
    oracle_check.exempt_where(lambda seen: seen.error is not None)
    assert driver.call("GET", f"{servers.api_url}/x").status == 200
    assert driver.call("GET", f"{servers.api_url}/y").status == 200
    assert abs(driver.auth.proofs.clock_offset - 3600) < 2
    assert servers.authorization_server.token_requests == 2
    assert servers.resource_server.api_requests == 3


def test_concurrent_requests_share_one_token_request(
    local_servers_factory: Make, open_for: OpenFor
) -> None:
    servers = local_servers_factory(as_mode="slow", slow_seconds=0.3)
    driver = open_for(servers)
    results = driver.gather([f"{servers.api_url}/c/{i}" for i in range(40)])
    assert Counter(r.status for r in results) == Counter({200: 40})
    assert servers.authorization_server.token_requests == 1
    assert servers.resource_server.api_requests == 40


def test_short_tokens_are_renewed_without_a_failed_call(
    local_servers_factory: Make, open_for: OpenFor
) -> None:
    servers = local_servers_factory(token_lifetime=2)
    driver = open_for(servers, leeway=1.0)
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + 3.0
    for i in range(10_000):  # bounded; the deadline ends it long before
        if time.monotonic() >= deadline:
            break
        statuses[driver.call("GET", f"{servers.api_url}/s/{i}").status] += 1
        time.sleep(0.02)
    assert set(statuses) == {200}
    assert statuses[200] > 20
    # renewed about every second (half the lifetime)
    assert 2 <= servers.authorization_server.token_requests <= 8


def test_bearer_token_is_sent_as_bearer_when_accepted(
    local_servers_factory: Make, open_for: OpenFor
) -> None:
    servers = local_servers_factory(as_mode="bearer")
    driver = open_for(servers, accept_bearer=True)
    # The local RS wants DPoP-bound tokens: it answers invalid_token to the Bearer scheme,
    # once per token (one renewal, then the error).
    with pytest.raises(OAuthError, match="freshly issued token too"):
        driver.call("GET", f"{servers.api_url}/x")
    assert driver.auth.token is not None
    assert driver.auth.token.scheme == "Bearer"
    assert servers.authorization_server.token_requests == 2
    assert servers.resource_server.api_requests == 2


@pytest.mark.softhsm
def test_pkcs11_key_with_nonces(
    local_servers_factory: Make, pkcs11_key_uri: str, request: pytest.FixtureRequest
) -> None:
    from dpop_signer import load_signer

    servers = local_servers_factory(require_nonce=True)
    signer = load_signer(pkcs11_key_uri)
    try:
        for name in DRIVERS:
            driver = open_driver(
                name,
                signer,
                token_url=servers.token_url,
                client_id=servers.client_id,
                client_secret=servers.client_secret,
            )
            try:
                results = driver.gather([f"{servers.api_url}/{name}/{i}" for i in range(20)])
            finally:
                driver.close()
            assert {r.status for r in results} == {200}, name
            assert {r.body["jkt"] for r in results} == {driver.auth.jkt}
    finally:
        getattr(signer, "close", lambda: None)()
