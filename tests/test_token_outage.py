"""Issue 11 item 1: a stalled or unavailable token endpoint, with and without a cached token.

The token endpoint is the local authorization server with the fault switches of
``tests/fault_servers.py``: ``stall_until`` (every token request waits until then, then is
answered) or ``unavailable_retry_after`` (503 with a ``Retry-After``). Required, and measured
here with real sockets and a real ``dpop serve``:

- a failed fetch is shared with every caller that waited for it (no caller tries in turn);
- afterwards the token endpoint is asked again only after a backoff (exponential, jittered,
  capped, at least ``Retry-After``);
- a token that is still valid keeps being used while its renewal fails, and callers that have
  one never wait for the renewal; only a caller without a sendable token waits.

Timing bounds are asserted as ``2 x timeout`` (the issue's figure), never as exact values.
The autouse ``oracle_check`` fixture re-checks every proof the local servers received.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest

from dpop_signer import DPoPAuth
from dpop_signer.errors import (
    OAuthError,
    ServerFailedError,
    ServerUnreachableError,
    TokenEndpointError,
)
from dpop_signer.signers.base import Signer
from dpop_signer.testing.servers import LocalServers
from tests.conftest import SoftHsmToken
from tests.fault_servers import FaultServers
from tests.service_support import ServiceProcess, start_service, write_api_key

Make = Callable[..., FaultServers]

TIMEOUT = 1.0
"""The library tests' client timeout: a stalled token request fails after this long."""
STALL = 3.0
"""How long the library tests' token endpoint stalls."""
SERVICE_TIMEOUT = 2.0
SERVICE_STALL = 5.0
"""The issue's figures: ``dpop serve --timeout 2`` and a token endpoint stalled for 5 s."""
CALLERS = 20
RENEW_TIMEOUT = 2.0
"""The renewal tests' client timeout: callers with a valid token must finish well within it,
which proves they did not wait for the renewal stalled meanwhile (below the stall)."""


class Clock:
    """Real time plus an offset a test moves forward, to make a backoff or a renewal due.

    The local servers' clocks (``clock_skew``) move with it, so time passes for everyone and
    every proof's ``iat`` stays true for the servers and the oracle.
    """

    def __init__(self, servers: LocalServers) -> None:
        self.offset = 0.0
        self._servers = servers

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        for server in self._servers.servers:
            server.clock_skew = self.offset


def auth_for(servers: LocalServers, signer: Signer, **kwargs: Any) -> DPoPAuth:
    return DPoPAuth(
        signer,
        token_url=servers.token_url,
        client_id=servers.client_id,
        client_secret=servers.client_secret,
        **kwargs,
    )


def wait_for(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``condition`` (a server counter) until true; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {limit} s"
        time.sleep(0.01)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """(result or exception, seconds taken)."""
    started = time.monotonic()
    try:
        outcome: Any = call()
    except Exception as exc:
        outcome = exc
    return outcome, time.monotonic() - started


def in_threads(calls: list[Callable[[], Any]]) -> list[tuple[Any, float]]:
    """Run ``calls`` at once (a barrier releases them together); (outcome, seconds) each."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> tuple[Any, float]:
        barrier.wait(timeout=10)
        return timed(call)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls, timeout=60))


# -- no token yet: one token request per backoff window, its failure shared -----------------


def test_sync_callers_share_one_failed_fetch_then_back_off(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory()
    as_ = servers.authorization_server
    as_.stall_until = time.time() + STALL
    auth = auth_for(servers, pem_signer)
    with httpx.Client(auth=auth, timeout=TIMEOUT) as client:
        url = f"{servers.api_url}/x"
        results = in_threads([lambda: client.get(url)] * CALLERS)
        assert all(isinstance(r, ServerUnreachableError) for r, _ in results), results
        assert max(seconds for _, seconds in results) <= 2 * TIMEOUT
        assert as_.token_requests == 1  # one request, its failure shared by all 20
        retry_after = [r.retry_after for r, _ in results]
        assert all(a is not None and 0 < a <= 1.0 for a in retry_after), retry_after
        # Within the backoff: refused at once, nothing sent.
        again, seconds = timed(lambda: client.get(url))
        assert isinstance(again, ServerUnreachableError)
        assert seconds < TIMEOUT / 2
        assert "next is sent in" in str(again)
        assert as_.token_requests == 1
        # The stall over and the backoff elapsed, the next caller fetches and succeeds.
        time.sleep(max(0.0, as_.stall_until - time.time(), *(a or 0 for a in retry_after)))
        as_.stall_until = None
        assert client.get(url).status_code == 200
    assert as_.token_requests == 2


def test_async_callers_share_one_failed_fetch(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory()
    as_ = servers.authorization_server
    as_.stall_until = time.time() + STALL
    auth = auth_for(servers, pem_signer)

    async def one(client: httpx.AsyncClient) -> tuple[Any, float]:
        started = time.monotonic()
        try:
            outcome: Any = await client.get(f"{servers.api_url}/x")
        except Exception as exc:
            outcome = exc
        return outcome, time.monotonic() - started

    async def main() -> list[tuple[Any, float]]:
        async with httpx.AsyncClient(auth=auth, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(one(client) for _ in range(CALLERS)))

    results = asyncio.run(asyncio.wait_for(main(), 30))
    kinds = Counter(type(r).__name__ for r, _ in results)
    # The caller that sent the token request gets httpx's own error (httpx closes an async
    # auth flow without its cause); every other caller gets the shared failure.
    assert kinds == Counter({"ReadTimeout": 1, "ServerUnreachableError": CALLERS - 1}), kinds
    assert max(seconds for _, seconds in results) <= 2 * TIMEOUT
    assert as_.token_requests == 1


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(
    local_servers_factory: Make, pem_signer: Signer, form: str
) -> None:
    servers = local_servers_factory()
    as_ = servers.authorization_server
    as_.unavailable_retry_after = "3" if form == "seconds" else formatdate(time.time() + 3.5)
    clock = Clock(servers)
    auth = auth_for(servers, pem_signer, clock=clock)
    with httpx.Client(timeout=TIMEOUT) as client:
        with pytest.raises(ServerFailedError, match="503") as first:
            auth.get_token(client)
        assert first.value.retry_after is not None
        assert 2.0 <= first.value.retry_after <= 3.5
        clock.advance(1.5)  # past any jittered first backoff (<= 1 s), not past Retry-After
        with pytest.raises(ServerFailedError) as second:
            auth.get_token(client)
        assert as_.token_requests == 1
        assert second.value.retry_after is not None
        assert second.value.retry_after <= 2.0
        as_.unavailable_retry_after = None
        clock.advance(second.value.retry_after + 0.01)
        assert auth.get_token(client).value
    assert as_.token_requests == 2


def test_backoff_doubles_with_jitter_up_to_a_cap(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory(as_mode="error_500")
    clock = Clock(servers)
    auth = auth_for(servers, pem_signer, clock=clock)
    delays: list[float] = []
    with httpx.Client(timeout=TIMEOUT) as client:
        for _ in range(10):
            with pytest.raises(ServerFailedError) as info:
                auth.get_token(client)
            assert info.value.retry_after is not None
            delays.append(info.value.retry_after)
            clock.advance(info.value.retry_after + 0.001)
    # Failure n waits between half and all of min(60, 2**(n-1)) seconds.
    for n, delay in enumerate(delays, start=1):
        ceiling = min(60.0, 2.0 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling, (n, delays)
    assert servers.authorization_server.token_requests == 10  # one per window, no more


def test_a_refusal_is_shared_with_waiters_but_not_backed_off(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers = local_servers_factory()
    as_ = servers.authorization_server
    as_.stall_until = time.time() + 1.0  # the waiters queue up behind the first fetch
    auth = DPoPAuth(
        pem_signer, token_url=servers.token_url, client_id=servers.client_id,
        client_secret="not-the-secret",
    )  # fmt: skip
    with httpx.Client(timeout=10.0) as client:
        results = in_threads([lambda: auth.get_token(client)] * 8)
        assert all(isinstance(r, TokenEndpointError) for r, _ in results), results
        assert {r.error for r, _ in results} == {"invalid_client"}
        assert as_.token_requests == 1
        # A refusal is not an outage: the next caller asks again at once.
        with pytest.raises(TokenEndpointError) as info:
            auth.get_token(client)
        assert info.value.retry_after is None
    assert as_.token_requests == 2


# -- a valid token cached: renewal fails, callers carry on -------------------------------------


def _due_for_renewal(local_servers_factory: Make, signer: Signer) -> tuple[FaultServers, Clock]:
    # 60 s tokens renew after 30 s (half the lifetime); the test moves the clock (ours and
    # the servers') 31 s on instead of waiting.
    servers = local_servers_factory(token_lifetime=60)
    return servers, Clock(servers)


def test_sync_renewal_failure_keeps_the_valid_token(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers, clock = _due_for_renewal(local_servers_factory, pem_signer)
    as_ = servers.authorization_server
    auth = auth_for(servers, pem_signer, clock=clock)
    url = f"{servers.api_url}/x"
    with httpx.Client(auth=auth, timeout=RENEW_TIMEOUT) as client:
        token = auth.get_token(client)
        assert client.get(url).status_code == 200
        clock.advance(31.0)
        as_.stall_until = time.time() + STALL
        renewer: list[tuple[Any, float]] = []
        thread = threading.Thread(
            target=lambda: renewer.append(timed(lambda: auth.get_token(client)))
        )
        thread.start()
        wait_for(lambda: as_.token_requests == 2)  # the renewal is stalled at the server now
        # Callers with a valid token do not wait for the stalled renewal.
        results = in_threads([lambda: client.get(url)] * CALLERS)
        assert [r.status_code for r, _ in results] == [200] * CALLERS
        assert max(seconds for _, seconds in results) < RENEW_TIMEOUT
        thread.join(timeout=2 * RENEW_TIMEOUT + 5)
        ((outcome, seconds),) = renewer
        assert outcome is token  # the renewal failed: the valid token it had
        assert seconds <= 2 * RENEW_TIMEOUT
        # During the backoff nothing is sent and every caller still succeeds.
        results = in_threads([lambda: client.get(url)] * CALLERS)
        assert [r.status_code for r, _ in results] == [200] * CALLERS
    assert as_.token_requests == 2


def test_async_renewal_failure_keeps_the_valid_token(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers, clock = _due_for_renewal(local_servers_factory, pem_signer)
    as_ = servers.authorization_server
    auth = auth_for(servers, pem_signer, clock=clock)
    url = f"{servers.api_url}/x"

    async def main() -> None:
        async with httpx.AsyncClient(auth=auth, timeout=RENEW_TIMEOUT) as client:
            token = await auth.aget_token(client)
            assert (await client.get(url)).status_code == 200
            clock.advance(31.0)
            as_.stall_until = time.time() + STALL
            started = time.monotonic()
            renewal = asyncio.create_task(auth.aget_token(client))
            for _ in range(1000):  # until the renewal is stalled at the server (<= 10 s)
                if as_.token_requests == 2:
                    break
                await asyncio.sleep(0.01)
            assert as_.token_requests == 2
            responses = await asyncio.gather(*(client.get(url) for _ in range(CALLERS)))
            assert [r.status_code for r in responses] == [200] * CALLERS
            assert not renewal.done()  # they were all answered while the renewal hung
            assert await asyncio.wait_for(renewal, 2 * RENEW_TIMEOUT) is token
            assert time.monotonic() - started <= 2 * RENEW_TIMEOUT
            responses = await asyncio.gather(*(client.get(url) for _ in range(CALLERS)))
            assert [r.status_code for r in responses] == [200] * CALLERS

    asyncio.run(asyncio.wait_for(main(), 30))
    assert as_.token_requests == 2


def test_an_expired_token_is_not_sent_during_the_backoff(
    local_servers_factory: Make, pem_signer: Signer
) -> None:
    servers, clock = _due_for_renewal(local_servers_factory, pem_signer)
    as_ = servers.authorization_server
    auth = auth_for(servers, pem_signer, clock=clock)
    with httpx.Client(timeout=TIMEOUT) as client:
        auth.get_token(client)
        as_.unavailable_retry_after = "100"  # a backoff longer than the token's life
        clock.advance(31.0)
        assert auth.get_token(client) is auth.token  # renewal failed: still valid
        clock.advance(29.0)  # expired now, and still inside the backoff
        with pytest.raises(OAuthError) as info:
            auth.get_token(client)
        assert info.value.retry_after is not None
    assert as_.token_requests == 2


# -- dpop serve: the figures ---------------------------------------------------------


@pytest.fixture
def serve(
    pkcs11_key_uri: str, softhsm: SoftHsmToken, tmp_path: Path
) -> Iterator[Callable[[LocalServers], ServiceProcess]]:
    started: list[ServiceProcess] = []

    def make(servers: LocalServers) -> ServiceProcess:
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
                softhsm.uri("session-es256"),
                "--timeout",
                str(SERVICE_TIMEOUT),
                "--token-url",
                servers.token_url,
                "--client-id",
                servers.client_id,
                "--client-secret-file",
                str(tmp_path / "secret"),
            ],
            tmp_path / "logs",
            env={"DPOP_PIN": softhsm.pin},
            api_key=key,
        )
        started.append(service)
        return service

    yield make
    for service in started:
        assert service.stop() == 0, service.logs()[-2000:]


def _headers_callers(
    service: ServiceProcess, url: str, until: float | None = None
) -> list[tuple[int, float]]:
    """``CALLERS`` concurrent callers of ``/v1/headers``: once each, or in a loop ``until``."""
    barrier = threading.Barrier(CALLERS)

    def caller() -> list[tuple[int, float]]:
        answers: list[tuple[int, float]] = []
        with service.client() as client:
            barrier.wait(timeout=10)
            for _ in range(10_000):  # bounded; ``until`` ends it long before
                started = time.monotonic()
                status = client.post("/v1/headers", json={"htm": "GET", "htu": url}).status_code
                answers.append((status, time.monotonic() - started))
                if until is None or time.time() >= until:
                    break
        return answers

    with ThreadPoolExecutor(CALLERS) as pool:
        futures = [pool.submit(caller) for _ in range(CALLERS)]
        return [answer for future in futures for answer in future.result(timeout=60)]


@pytest.mark.softhsm
@pytest.mark.slow
def test_service_callers_during_a_stall_without_a_token(
    local_servers_factory: Make, serve: Callable[[LocalServers], ServiceProcess]
) -> None:
    servers = local_servers_factory()
    as_ = servers.authorization_server
    service = serve(servers)
    stall_end = as_.stall_until = time.time() + SERVICE_STALL
    answers = _headers_callers(service, f"{servers.api_url}/x")
    # Before: one 504 after another, 2, 4 ... 40 s, and 20 token requests.
    assert [status for status, _ in answers] == [504] * CALLERS
    assert max(seconds for _, seconds in answers) <= 2 * SERVICE_TIMEOUT
    assert as_.token_requests == 1
    # Callers keep coming through the stall: at most 2 token requests per backoff window
    # (measured: one per window, the windows 0.5-1 s, then 1-2 s after the 2 s timeouts).
    answers = _headers_callers(service, f"{servers.api_url}/x", until=stall_end)
    assert max(seconds for _, seconds in answers) <= 2 * SERVICE_TIMEOUT
    assert as_.token_requests <= 3
    # After the stall, within a backoff window or two, callers get headers again.
    deadline = time.monotonic() + 20.0
    with service.client() as client:
        while True:
            made = client.post("/v1/headers", json={"htm": "GET", "htu": f"{servers.api_url}/x"})
            if made.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert made.status_code == 200, made.text
    assert as_.token_requests <= 4


@pytest.mark.softhsm
@pytest.mark.slow
def test_service_callers_with_a_valid_token_never_fail_during_a_stall(
    local_servers_factory: Make, serve: Callable[[LocalServers], ServiceProcess]
) -> None:
    # 14 s tokens: renewal is due after 7 s, they are sent until 13 s; a 5 s stall from 7 s.
    servers = local_servers_factory(token_lifetime=14)
    as_ = servers.authorization_server
    service = serve(servers)
    url = f"{servers.api_url}/x"
    with service.client() as client:
        assert client.post("/v1/headers", json={"htm": "GET", "htu": url}).status_code == 200
    issued = max(seen.received_at for seen in as_.seen if seen.endpoint == "token")
    time.sleep(max(0.0, issued + 7.2 - time.time()))  # until the renewal is due: a clock matter
    stall_end = as_.stall_until = time.time() + SERVICE_STALL
    answers = _headers_callers(service, url, until=stall_end)
    statuses = Counter(status for status, _ in answers)
    assert statuses == Counter({200: len(answers)}), statuses  # 0 callers fail
    assert len(answers) >= CALLERS
    assert max(seconds for _, seconds in answers) <= 2 * SERVICE_TIMEOUT
    # Renewal attempts during the stall: one per backoff window, so at most 3 in 5 s.
    assert 2 <= as_.token_requests <= 4
