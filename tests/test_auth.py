"""DPoPAuth against a fake AS + RS on httpx.MockTransport (tests/fake_oauth.py).

The fake runs the independent oracle over every proof; each test ends by asserting that
``fake.failures`` is empty. Counted requests prove that nothing loops.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dpop_signer import DPoPAuth
from dpop_signer.challenges import dpop_error, parse_challenges
from dpop_signer.errors import (
    ConfigError,
    DPoPSignerError,
    InvalidTokenResponseError,
    OAuthError,
    ServerFailedError,
    ServerUnreachableError,
    TokenEndpointError,
    UseDPoPNonceError,
)
from dpop_signer.nonces import NonceCache
from dpop_signer.signers.base import Signer
from tests import oracle
from tests.fake_oauth import API_URL, CLIENT_ID, CLIENT_SECRET, TOKEN_URL, FakeOAuth, claims_of


def make_auth(signer: Signer, **kwargs: Any) -> DPoPAuth:
    if kwargs.get("client_auth") not in ("none", "private_key_jwt"):
        kwargs.setdefault("client_secret", CLIENT_SECRET)
    return DPoPAuth(signer, token_url=TOKEN_URL, client_id=CLIENT_ID, **kwargs)


@pytest.fixture
def fake() -> Iterator[FakeOAuth]:
    fake = FakeOAuth()
    yield fake
    assert fake.failures == []


def nonce_fake(side: str, mode: str) -> FakeOAuth:
    if side == "token":
        return FakeOAuth(as_nonce=mode)
    return FakeOAuth(rs_nonce=mode)


def client(fake: FakeOAuth, auth: DPoPAuth) -> httpx.Client:
    return httpx.Client(transport=fake.transport(), auth=auth)


def aclient(fake: FakeOAuth, auth: DPoPAuth) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=fake.async_transport(), auth=auth)


# -- the ordinary path -------------------------------------------------------------------------


def test_requests_carry_a_bound_token_and_a_fresh_proof(
    fake: FakeOAuth, pem_signer: Signer
) -> None:
    auth = make_auth(pem_signer, scope="read")
    with client(fake, auth) as http:
        first = http.get(f"{API_URL}/v1/things?page=2")
        second = http.post(f"{API_URL}/v1/things", json={"a": 1})
    assert (first.status_code, second.status_code) == (200, 200)
    assert (fake.token_requests, fake.api_requests) == (1, 2)
    token_proof, *api_proofs = fake.seen
    assert token_proof.kind == "token"
    assert "ath" not in token_proof.claims
    assert [s.accepted for s in fake.seen] == [True, True, True]
    assert api_proofs[0].claims["jti"] != api_proofs[1].claims["jti"]
    assert fake.forms[0]["scope"] == ["read"]
    # The token response was read from the same transport and sits in the response history.
    assert first.history[0].url == TOKEN_URL
    assert auth.token is not None
    assert auth.token_requests == 1
    assert auth.jkt == oracle.thumbprint(dict(pem_signer.public_jwk))


def test_async_client_works_the_same(fake: FakeOAuth, pem_signer: Signer) -> None:
    auth = make_auth(pem_signer)

    async def main() -> list[int]:
        async with aclient(fake, auth) as http:
            return [(await http.get(f"{API_URL}/x/{i}")).status_code for i in range(3)]

    assert asyncio.run(main()) == [200, 200, 200]
    assert (fake.token_requests, fake.api_requests) == (1, 3)


@pytest.mark.parametrize("client_auth", ["client_secret_post", "none", "private_key_jwt"])
def test_other_client_authentication_methods(pem_signer: Signer, client_auth: str) -> None:
    fake = FakeOAuth(
        client_auth=client_auth,
        assertion_jwk=dict(pem_signer.public_jwk),
        as_nonce="require",  # a nonce retry needs a fresh assertion (the fake refuses replays)
    )
    auth = make_auth(pem_signer, client_auth=client_auth)
    with client(fake, auth) as http:
        assert http.get(f"{API_URL}/x").status_code == 200
    assert fake.token_requests == 2
    if client_auth == "private_key_jwt":
        assert len(set(fake.assertion_jtis)) == 2
    assert fake.failures == []


def test_resource_and_audience_reach_the_token_endpoint(
    fake: FakeOAuth, pem_signer: Signer
) -> None:
    auth = make_auth(pem_signer, resource=["https://api.example/"], audience="urn:x")
    with client(fake, auth) as http:
        http.get(f"{API_URL}/x")
    assert fake.forms[0]["resource"] == ["https://api.example/"]
    assert fake.forms[0]["audience"] == ["urn:x"]


def test_flow_driven_by_hand_yields_the_token_request_then_the_api_request(
    pem_signer: Signer,
) -> None:
    # The httpx way of unit-testing an auth flow: no client, no transport.
    auth = make_auth(pem_signer)
    api = httpx.Request("GET", f"{API_URL}/x?y=1")
    flow = auth.sync_auth_flow(api)
    token_request = next(flow)
    assert (token_request.method, str(token_request.url)) == ("POST", TOKEN_URL)
    oracle.check_proof(token_request.headers["dpop"], htm="POST", url=TOKEN_URL)
    token_response = httpx.Response(
        200, json={"access_token": "tok", "token_type": "DPoP", "expires_in": 60}
    )
    assert flow.send(token_response) is api
    assert api.headers["authorization"] == "DPoP tok"
    oracle.check_proof(
        api.headers["dpop"],
        htm="GET",
        url=f"{API_URL}/x",
        access_token="tok",
        expected_jkt=auth.jkt,
    )
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(200))


# -- nonces ------------------------------------------------------------------------------------


def test_token_endpoint_nonce_is_met_with_exactly_one_retry(pem_signer: Signer) -> None:
    fake = FakeOAuth(as_nonce="require")
    auth = make_auth(pem_signer)
    with client(fake, auth) as http:
        assert http.get(f"{API_URL}/x").status_code == 200
        assert fake.token_requests == 2
        auth.invalidate()  # the next fetch uses the cached nonce: no new challenge
        assert http.get(f"{API_URL}/x").status_code == 200
    assert fake.token_requests == 3
    assert [s.accepted for s in fake.seen if s.kind == "token"] == [False, True, True]
    assert fake.failures == []


def test_resource_server_nonce_is_met_with_exactly_one_retry(pem_signer: Signer) -> None:
    fake = FakeOAuth(rs_nonce="require")
    with client(fake, make_auth(pem_signer)) as http:
        assert http.get(f"{API_URL}/x").status_code == 200
        assert fake.api_requests == 2
        assert http.get(f"{API_URL}/y").status_code == 200  # nonce cached for the origin
        assert fake.api_requests == 3
        fake.rotate("api")  # the cached nonce goes stale: one more retry, then fine
        assert http.get(f"{API_URL}/z").status_code == 200
        assert fake.api_requests == 5
    retried = [s for s in fake.seen if s.kind == "api"]
    assert retried[0].claims["jti"] != retried[1].claims["jti"]  # fresh proof for the retry
    assert fake.failures == []


def test_nonce_from_a_success_response_is_learned(pem_signer: Signer) -> None:
    fake = FakeOAuth()

    def handler(request: httpx.Request) -> httpx.Response:
        response = fake(request)
        if request.url.host == "api.example":
            # A server may hand out a nonce on a 200 (RFC 9449 §8.2) and demand it from then on.
            response.headers["DPoP-Nonce"] = fake.current_nonce["api"]
            fake.nonce_mode["api"] = "require"
        return response

    with httpx.Client(transport=httpx.MockTransport(handler), auth=make_auth(pem_signer)) as http:
        assert http.get(f"{API_URL}/x").status_code == 200
        assert http.get(f"{API_URL}/y").status_code == 200
    assert fake.api_requests == 2
    assert [s.accepted for s in fake.seen if s.kind == "api"] == [True, True]
    assert fake.failures == []


@pytest.mark.parametrize("side", ["token", "api"])
def test_a_nonce_demanded_every_time_is_an_error_not_a_loop(pem_signer: Signer, side: str) -> None:
    fake = nonce_fake(side, "always")
    with client(fake, make_auth(pem_signer)) as http, pytest.raises(UseDPoPNonceError) as info:
        http.get(f"{API_URL}/x")
    counts = (fake.token_requests, fake.api_requests)
    assert counts == ((2, 0) if side == "token" else (1, 2))
    assert "again right after" in str(info.value)
    for nonce in (f"{side}-nonce-2", f"{side}-nonce-3"):
        assert nonce not in str(info.value)
    assert fake.failures == []


@pytest.mark.parametrize("side", ["token", "api"])
def test_a_repeated_nonce_is_an_error_not_a_loop(pem_signer: Signer, side: str) -> None:
    fake = nonce_fake(side, "repeat")
    auth = make_auth(pem_signer)
    with client(fake, auth) as http:
        with pytest.raises(UseDPoPNonceError):
            http.get(f"{API_URL}/x")
        before = (fake.token_requests, fake.api_requests)
        # The repeated nonce is cached now: the next attempt is refused at once.
        with pytest.raises(UseDPoPNonceError, match="same one again") as info:
            http.get(f"{API_URL}/x")
    after = (fake.token_requests, fake.api_requests)
    assert after[0] - before[0] + after[1] - before[1] == 1
    assert "the-same-nonce" not in str(info.value)
    assert "Date header" in str(info.value) or "clock" in str(info.value)
    assert fake.failures == []


@pytest.mark.parametrize("side", ["token", "api"])
def test_a_nonce_demand_without_a_nonce_is_an_error(pem_signer: Signer, side: str) -> None:
    fake = nonce_fake(side, "no_header")
    with (
        client(fake, make_auth(pem_signer)) as http,
        pytest.raises(UseDPoPNonceError, match="no DPoP-Nonce header"),
    ):
        http.get(f"{API_URL}/x")
    assert fake.token_requests + fake.api_requests == (1 if side == "token" else 2)
    assert fake.failures == []


def test_async_nonce_retries_at_both_servers(pem_signer: Signer) -> None:
    fake = FakeOAuth(as_nonce="require", rs_nonce="require")
    auth = make_auth(pem_signer)

    async def main() -> int:
        async with aclient(fake, auth) as http:
            return (await http.get(f"{API_URL}/x")).status_code

    assert asyncio.run(main()) == 200
    assert (fake.token_requests, fake.api_requests) == (2, 2)
    assert fake.failures == []


# -- 401 invalid_token and renewal -------------------------------------------------------------


def test_invalid_token_once_renews_once_and_succeeds(pem_signer: Signer) -> None:
    fake = FakeOAuth(invalid_token=1)
    with client(fake, make_auth(pem_signer)) as http:
        assert http.get(f"{API_URL}/x").status_code == 200
    assert (fake.token_requests, fake.api_requests) == (2, 2)
    assert fake.failures == []


def test_invalid_token_twice_is_an_error_after_exactly_one_renewal(pem_signer: Signer) -> None:
    fake = FakeOAuth(invalid_token=-1)
    with client(fake, make_auth(pem_signer)) as http, pytest.raises(OAuthError) as info:
        http.get(f"{API_URL}/x")
    assert (fake.token_requests, fake.api_requests) == (2, 2)
    message = str(info.value)
    assert "invalid_token" in message
    for token in fake.issued:
        assert token not in message
    assert fake.failures == []


def test_async_invalid_token_twice(pem_signer: Signer) -> None:
    fake = FakeOAuth(invalid_token=-1)

    async def main() -> None:
        async with aclient(fake, make_auth(pem_signer)) as http:
            await http.get(f"{API_URL}/x")

    with pytest.raises(OAuthError, match="invalid_token"):
        asyncio.run(main())
    assert (fake.token_requests, fake.api_requests) == (2, 2)


def test_token_is_renewed_before_it_expires(pem_signer: Signer) -> None:
    offset = [0.0]
    fake = FakeOAuth(lifetime=20)
    auth = make_auth(pem_signer, leeway=5, clock=lambda: time.time() + offset[0])
    with client(fake, auth) as http:
        http.get(f"{API_URL}/x")
        offset[0] = 14.0  # 6 s left: still fresh (leeway 5)
        http.get(f"{API_URL}/x")
        assert fake.token_requests == 1
        offset[0] = 16.0  # 4 s left: renewed before the request goes out
        http.get(f"{API_URL}/x")
        assert fake.token_requests == 2
    assert fake.api_requests == 3
    assert fake.failures == []


def test_leeway_is_at_most_half_the_lifetime(pem_signer: Signer) -> None:
    offset = [0.0]
    fake = FakeOAuth(lifetime=10)
    auth = make_auth(pem_signer, leeway=30, clock=lambda: time.time() + offset[0])
    with client(fake, auth) as http:
        http.get(f"{API_URL}/x")
        offset[0] = 4.0
        http.get(f"{API_URL}/x")
        assert fake.token_requests == 1
        offset[0] = 5.5
        http.get(f"{API_URL}/x")
        assert fake.token_requests == 2


# -- token endpoint failures -------------------------------------------------------------------


@pytest.mark.parametrize("token_type", ["Bearer", "bearer"])
def test_bearer_token_is_refused_before_any_api_request(
    pem_signer: Signer, token_type: str
) -> None:
    fake = FakeOAuth(token_type=token_type)
    with (
        client(fake, make_auth(pem_signer)) as http,
        pytest.raises(InvalidTokenResponseError, match="accept_bearer=True"),
    ):
        http.get(f"{API_URL}/x")
    assert (fake.token_requests, fake.api_requests) == (1, 0)


def test_bearer_token_is_used_with_the_opt_in(pem_signer: Signer) -> None:
    fake = FakeOAuth(token_type="Bearer")
    with client(fake, make_auth(pem_signer, accept_bearer=True)) as http:
        response = http.get(f"{API_URL}/x")
    assert response.status_code == 200
    assert response.request.headers["authorization"].startswith("Bearer ")
    assert fake.failures == []


def test_token_type_is_compared_case_insensitively(pem_signer: Signer) -> None:
    fake = FakeOAuth(token_type="dPoP")
    with client(fake, make_auth(pem_signer)) as http:
        response = http.get(f"{API_URL}/x")
    assert response.status_code == 200
    assert response.request.headers["authorization"].startswith("DPoP ")


@pytest.mark.parametrize(
    ("failure", "error", "match"),
    [
        ("500", ServerFailedError, "HTTP 500"),
        ("html", InvalidTokenResponseError, "text/html"),
        ("json_list", InvalidTokenResponseError, "not a JSON object"),
        ("invalid_client", TokenEndpointError, "invalid_client"),
    ],
)
def test_token_endpoint_failures_are_clear_and_keep_secrets(
    pem_signer: Signer, failure: str, error: type[DPoPSignerError], match: str
) -> None:
    fake = FakeOAuth(as_failure=failure)
    with client(fake, make_auth(pem_signer)) as http, pytest.raises(error, match=match) as info:
        http.get(f"{API_URL}/x")
    assert CLIENT_SECRET not in str(info.value)
    assert CLIENT_SECRET not in repr(info.value)
    assert (fake.token_requests, fake.api_requests) == (1, 0)
    if failure == "invalid_client":
        assert isinstance(info.value, TokenEndpointError)
        assert (info.value.error, info.value.status) == ("invalid_client", 401)


def test_wrong_secret_is_invalid_client(pem_signer: Signer) -> None:
    fake = FakeOAuth()
    auth = make_auth(pem_signer, client_secret="wrong-secret-value")
    with client(fake, auth) as http, pytest.raises(TokenEndpointError) as info:
        http.get(f"{API_URL}/x")
    assert info.value.error == "invalid_client"
    assert "wrong-secret-value" not in str(info.value)


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


@pytest.mark.parametrize("mode", ["sync", "get_token", "aget_token"])
def test_transport_error_at_the_token_endpoint(pem_signer: Signer, mode: str) -> None:
    auth = make_auth(pem_signer)
    transport = httpx.MockTransport(_refuse)

    async def run_async() -> None:
        async with httpx.AsyncClient(transport=transport, auth=auth) as http:
            await auth.aget_token(http)

    def run() -> None:
        if mode == "aget_token":
            asyncio.run(run_async())
            return
        with httpx.Client(transport=transport, auth=auth) as http:
            if mode == "sync":
                http.get(f"{API_URL}/x")
            else:
                auth.get_token(http)

    with pytest.raises(ServerUnreachableError, match="cannot reach the token endpoint") as info:
        run()
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert "ConnectError" in str(info.value)
    assert "https://as.example/token" in str(info.value)
    # the lock was released: a later attempt fails the same way instead of hanging
    with httpx.Client(transport=transport) as http, pytest.raises(ServerUnreachableError):
        auth.get_token(http)


def test_transport_error_at_the_token_endpoint_inside_an_async_client(pem_signer: Signer) -> None:
    # Documented: httpx closes an async auth flow without the cause, so its error stays.
    auth = make_auth(pem_signer)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(_refuse), auth=auth) as http:
            with pytest.raises(httpx.ConnectError):
                await asyncio.wait_for(http.get(f"{API_URL}/x"), timeout=10)
            # The failure was recorded: the next request is told to wait (the fetch lock was
            # released, and the endpoint is not asked again before the back-off ends).
            with pytest.raises(ServerUnreachableError) as info:
                await asyncio.wait_for(http.get(f"{API_URL}/x"), timeout=10)
            assert info.value.retry_after is not None

    asyncio.run(main())


def test_transport_error_at_the_api_stays_an_httpx_error(
    fake: FakeOAuth, pem_signer: Signer
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.example":
            raise httpx.ReadTimeout("timed out", request=request)
        return fake(request)

    auth = make_auth(pem_signer)
    with (
        httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.get(f"{API_URL}/x")


# -- clock skew --------------------------------------------------------------------------------


def test_clock_offset_is_learned_from_date_and_used_for_iat(pem_signer: Signer) -> None:
    # The servers' clock is an hour ahead and the AS treats a stale proof like oidc-provider:
    # a use_dpop_nonce demand, whose response's Date header teaches the offset.
    fake = FakeOAuth(skew=3600, as_nonce="require", rs_nonce="require")
    auth = make_auth(pem_signer)
    with client(fake, auth) as http:
        assert http.get(f"{API_URL}/x").status_code == 200
    assert auth.clock_skew is not None
    assert abs(auth.clock_skew - 3600) <= 1.5
    assert abs(auth.proofs.clock_offset - 3600) <= 1.5
    assert [s.accepted for s in fake.seen] == [False, True, False, True]
    assert fake.failures == []


def test_iat_errors_mention_the_measured_skew(pem_signer: Signer) -> None:
    fake = FakeOAuth(skew=-3600)  # no nonces: a stale proof is invalid_dpop_proof
    with client(fake, make_auth(pem_signer)) as http, pytest.raises(TokenEndpointError) as info:
        http.get(f"{API_URL}/x")
    assert info.value.error == "invalid_dpop_proof"
    assert re.search(r"Date header: -(3599|3600|3601) s", str(info.value))


def test_small_offsets_are_ignored(fake: FakeOAuth, pem_signer: Signer) -> None:
    auth = make_auth(pem_signer)
    with client(fake, auth) as http:
        http.get(f"{API_URL}/x")
    assert auth.clock_skew is not None
    assert abs(auth.clock_skew) < 2
    assert auth.proofs.clock_offset == 0.0


def test_cached_responses_do_not_teach_the_clock(pem_signer: Signer) -> None:
    fake = FakeOAuth(skew=-7200)

    def handler(request: httpx.Request) -> httpx.Response:
        response = fake(request)
        response.headers["Age"] = "7200"
        return response

    fake.window = 1e9  # accept any iat; this test is about what the client learns
    auth = make_auth(pem_signer)
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as http:
        http.get(f"{API_URL}/x")
    assert auth.clock_skew is None
    assert auth.proofs.clock_offset == 0.0


# -- single flight -----------------------------------------------------------------------------


def test_threads_share_one_token_fetch(pem_signer: Signer) -> None:
    fake = FakeOAuth(token_delay=0.05)
    auth = make_auth(pem_signer)
    statuses: list[int] = []
    lock = threading.Lock()
    with client(fake, auth) as http:

        def work() -> None:
            for i in range(100):
                status = http.get(f"{API_URL}/t/{i}").status_code
                with lock:
                    statuses.append(status)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert statuses == [200] * 800
    assert (fake.token_requests, fake.api_requests) == (1, 800)
    assert fake.failures == []


def test_async_tasks_share_one_token_fetch(pem_signer: Signer) -> None:
    fake = FakeOAuth(token_delay=0.05)
    auth = make_auth(pem_signer)

    async def main() -> list[int]:
        async with aclient(fake, auth) as http:
            responses = await asyncio.gather(*(http.get(f"{API_URL}/a/{i}") for i in range(1000)))
            return [r.status_code for r in responses]

    assert asyncio.run(main()) == [200] * 1000
    assert (fake.token_requests, fake.api_requests) == (1, 1000)
    # a second event loop gets its own lock and reuses the cached token
    assert asyncio.run(main()) == [200] * 1000
    assert fake.token_requests == 1
    assert fake.failures == []


def test_a_task_cancelled_while_waiting_for_the_fetch_leaves_the_lock_sound(
    pem_signer: Signer,
) -> None:
    fake = FakeOAuth(token_delay=0.2)
    auth = make_auth(pem_signer)

    async def main() -> list[int]:
        async with aclient(fake, auth) as http:
            first = asyncio.create_task(http.get(f"{API_URL}/1"))
            waiting = asyncio.create_task(http.get(f"{API_URL}/2"))
            await asyncio.sleep(0.05)  # first fetches the token, waiting waits for the lock
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            done = await first
            auth.invalidate()  # the lock must be free for the next fetch
            again = await asyncio.wait_for(http.get(f"{API_URL}/3"), timeout=10)
            return [done.status_code, again.status_code]

    assert asyncio.run(main()) == [200, 200]
    assert fake.token_requests == 2
    assert fake.failures == []


def test_get_token_headers_and_their_async_twins(fake: FakeOAuth, pem_signer: Signer) -> None:
    auth = make_auth(pem_signer)
    # The client's own auth is this DPoPAuth: get_token must not recurse into it.
    with client(fake, auth) as http:
        token = auth.get_token(http)
        assert auth.get_token(http) is token
        headers = auth.headers(http, "GET", f"{API_URL}/v1/x?q=1")
    assert fake.token_requests == 1
    assert headers["Authorization"] == f"DPoP {token.value}"
    oracle.check_proof(
        headers["DPoP"],
        htm="GET",
        url=f"{API_URL}/v1/x",
        access_token=token.value,
        expected_jkt=auth.jkt,
    )

    async def main() -> dict[str, str]:
        async with aclient(fake, auth) as http:
            assert await auth.aget_token(http) is token
            return await auth.aheaders(http, "POST", f"{API_URL}/v1/y")

    headers = asyncio.run(main())
    oracle.check_proof(headers["DPoP"], htm="POST", url=f"{API_URL}/v1/y", access_token=token.value)
    assert fake.token_requests == 1


def test_headers_include_a_cached_nonce(fake: FakeOAuth, pem_signer: Signer) -> None:
    auth = make_auth(pem_signer)
    auth.nonces.remember(API_URL, "rs-n")
    with client(fake, auth) as http:
        headers = auth.headers(http, "GET", f"{API_URL}/x")
    assert claims_of(headers["DPoP"])["nonce"] == "rs-n"


# -- request bodies ----------------------------------------------------------------------------


class StreamingTransport(httpx.BaseTransport):
    """Consumes the request body stream as a real transport does (MockTransport reads it)."""

    def __init__(self, fake: FakeOAuth) -> None:
        self.fake = fake
        self.bodies: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join(request.stream)  # type: ignore[arg-type]
        self.bodies.append(body)
        clone = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        clone.read()
        return self.fake.handle(clone)


@pytest.mark.parametrize("nonce", [True, False])
def test_a_streamed_body_is_never_sent_twice(pem_signer: Signer, nonce: bool) -> None:
    fake = FakeOAuth(rs_nonce="require" if nonce else None, invalid_token=0 if nonce else 1)
    transport = StreamingTransport(fake)

    def body() -> Iterator[bytes]:
        yield b"chunk-1,"
        yield b"chunk-2"

    with (
        httpx.Client(transport=transport, auth=make_auth(pem_signer)) as http,
        pytest.raises(OAuthError, match="one-shot stream") as info,
    ):
        http.post(f"{API_URL}/upload", content=body())
    assert isinstance(info.value, UseDPoPNonceError) == nonce
    assert fake.api_requests == 1
    assert transport.bodies[-1] == b"chunk-1,chunk-2"
    assert fake.failures == []


def test_a_bytes_body_is_re_sent_intact_on_a_nonce_retry(pem_signer: Signer) -> None:
    fake = FakeOAuth(rs_nonce="require")
    transport = StreamingTransport(fake)
    with httpx.Client(transport=transport, auth=make_auth(pem_signer)) as http:
        response = http.put(f"{API_URL}/doc", content=b'{"v": 1}')
    assert response.status_code == 200
    assert transport.bodies[1:] == [b'{"v": 1}', b'{"v": 1}']
    assert fake.api_requests == 2


def test_a_multipart_upload_with_in_memory_files_can_be_retried(pem_signer: Signer) -> None:
    fake = FakeOAuth(rs_nonce="require")
    transport = StreamingTransport(fake)
    with httpx.Client(transport=transport, auth=make_auth(pem_signer)) as http:
        response = http.post(f"{API_URL}/files", files={"f": ("a.txt", b"hello")})
    assert response.status_code == 200
    assert transport.bodies[1] == transport.bodies[2]
    assert b"hello" in transport.bodies[2]


# -- logging, repr, settings -------------------------------------------------------------------


def test_logs_carry_jti_jkt_and_status_never_secrets(
    pem_signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeOAuth(as_nonce="require", rs_nonce="require")
    auth = make_auth(pem_signer)
    with caplog.at_level(logging.DEBUG, logger="dpop_signer"), client(fake, auth) as http:
        http.get(f"{API_URL}/x?api_key=QUERYSECRET")
    text = caplog.text
    assert auth.jkt in text
    assert "token request 2" in text
    assert "-> 200" in text
    for seen in fake.seen:
        assert seen.claims["jti"] in text
        assert seen.proof not in text
        assert seen.proof.split(".")[2] not in text
    for secret in [CLIENT_SECRET, *fake.issued, *fake.current_nonce.values(), "QUERYSECRET"]:
        assert secret not in text


def test_repr_hides_secrets(pem_signer: Signer) -> None:
    text = repr(make_auth(pem_signer))
    assert CLIENT_SECRET not in text
    assert CLIENT_ID in text


@pytest.mark.parametrize("leeway", [-1, float("nan"), float("inf"), "30", True])
def test_leeway_must_be_a_non_negative_number(pem_signer: Signer, leeway: Any) -> None:
    with pytest.raises(ConfigError, match="leeway"):
        make_auth(pem_signer, leeway=leeway)


def test_a_shared_nonce_cache_is_used(pem_signer: Signer) -> None:
    cache = NonceCache()
    cache.remember(API_URL, "shared")
    assert make_auth(pem_signer, nonces=cache).nonces is cache
    empty = NonceCache()
    assert make_auth(pem_signer, nonces=empty).nonces is empty  # empty is falsy; still used


def test_private_key_jwt_defaults_to_the_dpop_key(pem_signer: Signer) -> None:
    auth = make_auth(pem_signer, client_auth="private_key_jwt")
    assert auth.token_source.assertion_signer is pem_signer


# -- WWW-Authenticate parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ('DPoP error="use_dpop_nonce", error_description="nonce"', "use_dpop_nonce"),
        ('dpop error="invalid_token"', "invalid_token"),
        ('DPOP algs="ES256 PS256", error=invalid_token', "invalid_token"),
        ('Bearer realm="x", error="invalid_token", DPoP error="use_dpop_nonce"', "use_dpop_nonce"),
        ('Bearer error="invalid_token"', None),
        ('Basic realm="x"', None),
        ('Negotiate abc123==, DPoP error="use_dpop_nonce"', "use_dpop_nonce"),
        (
            'DPoP error_description="a, \\"quoted\\" error=x", error="invalid_token"',
            "invalid_token",
        ),
        ("DPoP", None),
        ("", None),
        ('DPoP error="unterminated', "unterminated"),
        ("=, ,,DPoP error=x", "x"),
    ],
)
def test_dpop_challenge_error(header: str, error: str | None) -> None:
    assert dpop_error([header]) == error


def test_challenges_in_separate_header_lines() -> None:
    headers = httpx.Headers(
        [("WWW-Authenticate", 'Bearer realm="a"'), ("WWW-Authenticate", 'DPoP error="x"')]
    )
    assert dpop_error(headers.get_list("www-authenticate")) == "x"
    assert parse_challenges('DPoP algs="ES256", Bearer') == [
        ("dpop", {"algs": "ES256"}),
        ("bearer", {}),
    ]


def test_401_without_a_dpop_challenge_is_returned_unchanged(pem_signer: Signer) -> None:
    fake = FakeOAuth()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.example":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="x"'})
        return fake(request)

    with httpx.Client(transport=httpx.MockTransport(handler), auth=make_auth(pem_signer)) as http:
        response = http.get(f"{API_URL}/x")
    assert response.status_code == 401
    assert fake.token_requests == 1


def test_api_bodies_stay_streamed(fake: FakeOAuth, pem_signer: Signer) -> None:
    pulled: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(3):
            pulled.append(i)
            yield b"x" * 10

    def handler(request: httpx.Request) -> httpx.Response:
        response = fake(request)
        if request.url.host == "api.example":
            return httpx.Response(200, headers=response.headers, content=chunks())
        return response

    auth = make_auth(pem_signer)
    with (
        httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as http,
        http.stream("GET", f"{API_URL}/x") as response,
    ):
        assert pulled == []  # the auth flow did not read the body
        assert list(response.iter_bytes()) == [b"x" * 10] * 3
    assert pulled == [0, 1, 2]


def test_token_response_body_is_not_in_any_error(pem_signer: Signer) -> None:
    fake = FakeOAuth(as_failure="html")
    with client(fake, make_auth(pem_signer)) as http, pytest.raises(DPoPSignerError) as info:
        http.get(f"{API_URL}/x")
    assert "login" not in str(info.value)
    assert base64.b64encode(CLIENT_SECRET.encode()).decode() not in str(info.value)
