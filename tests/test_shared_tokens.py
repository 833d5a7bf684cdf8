"""One token for many processes: `DPoPAuth(token_store=...)` against real processes (issue 12).

Every client here is a separate process (``multiprocessing`` spawn: nothing inherited) with
its own `DPoPAuth` on the same PEM key, sharing a real ``redis-server`` (tests.redis_fixtures)
or a SQLite file. The authorization and resource servers are the local ones, in this process;
the assertions read their own counters (``token_requests``, ``statuses``), never the clients'.

The issue's figure is 8 processes x 8 threads for 60 s with 5 s tokens. Here the runs are
shortened to `RUN_SECONDS` so the suite stays quick: with 5 s tokens renewed at half their
lifetime that is still several renewals, enough to tell one process's worth of token
requests from eight processes' worth.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dpop_signer import DPoPAuth, load_signer
from dpop_signer.errors import OAuthError
from dpop_signer.stores import open_store
from dpop_signer.testing.servers import LocalServers, start_local_servers
from tests.fault_servers import start_fault_servers
from tests.redis_fixtures import RedisServer, start_redis

SPAWN_TIMEOUT = 60.0
"""Seconds a spawned client may take to start (imports on a busy 2-core machine)."""
RUN_SECONDS = 8.0
"""How long the many-process runs call the API (the issue's 60 s, shortened: see above)."""
TOKEN_LIFETIME = 5.0
RENEW_EVERY = TOKEN_LIFETIME / 2
"""DPoPAuth renews at most half a token's lifetime early (leeway 30 s > 2.5 s)."""
PACE = 0.01
"""Seconds each client thread rests between API calls (keeps 2 cores usable for the servers)."""

CTX = multiprocessing.get_context("spawn")


# -- the client processes (module level: a spawned child imports them by name) ---------------


def _auth(spec: dict[str, Any]) -> DPoPAuth:
    return DPoPAuth(
        load_signer(spec["key"]),
        token_url=spec["token_url"],
        client_id=spec["client_id"],
        client_secret=spec["client_secret"],
        scope=spec.get("scope"),
        token_store=spec["store"],
    )


def _caller(spec: dict[str, Any], ready: Any, start: Any, results: Any) -> None:
    """Call the API from ``spec["threads"]`` threads for ``spec["seconds"]``; report counts."""
    auth = _auth(spec)
    ok = failed = 0
    errors: list[str] = []
    guard = threading.Lock()
    ready.put(os.getpid())
    if not start.wait(SPAWN_TIMEOUT):
        results.put({"pid": os.getpid(), "error": "never started"})
        return
    deadline = time.monotonic() + spec["seconds"]

    def run() -> None:
        nonlocal ok, failed
        with httpx.Client(auth=auth, timeout=10.0) as client:
            for _ in range(1_000_000):  # bounded; the deadline ends it far sooner
                if time.monotonic() >= deadline:
                    return
                try:
                    status = client.get(spec["api_url"]).status_code
                except Exception as exc:  # every failure counts, whatever its kind
                    status, detail = 0, f"{type(exc).__name__}: {exc}"
                else:
                    detail = f"HTTP {status}"
                with guard:
                    if status == 200:
                        ok += 1
                    else:
                        failed += 1
                        if len(errors) < 5:
                            errors.append(detail)
                time.sleep(PACE)

    threads = [threading.Thread(target=run) for _ in range(spec["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(spec["seconds"] + 30.0)
    results.put(
        {
            "pid": os.getpid(),
            "ok": ok,
            "failed": failed,
            "errors": errors,
            "token_requests": auth.token_requests,
        }
    )
    auth.close()


def _token_getter(spec: dict[str, Any], ready: Any, start: Any, results: Any) -> None:
    """Get one token (after ``start``); report when it arrived (monotonic, host-wide)."""
    auth = _auth(spec)
    ready.put(os.getpid())
    if not start.wait(SPAWN_TIMEOUT):
        results.put({"pid": os.getpid(), "error": "never started"})
        return
    with httpx.Client(timeout=spec["timeout"]) as client:
        try:
            auth.get_token(client)
        except Exception as exc:
            results.put({"pid": os.getpid(), "error": f"{type(exc).__name__}: {exc}"})
            return
    results.put({"pid": os.getpid(), "at": time.monotonic(), "sent": auth.token_requests})
    auth.close()


class Clients:
    """Spawned client processes: started, released together, collected, stopped by PID."""

    def __init__(self) -> None:
        self.ready = CTX.Queue()
        self.results = CTX.Queue()
        self.processes: list[Any] = []

    def spawn(self, target: Any, spec: dict[str, Any], start: Any) -> Any:
        process = CTX.Process(
            target=target, args=(spec, self.ready, start, self.results), daemon=True
        )
        process.start()
        self.processes.append(process)
        return process

    def wait_ready(self, count: int) -> None:
        for _ in range(count):
            self.ready.get(timeout=SPAWN_TIMEOUT)

    def collect(self, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        found = [
            self.results.get(timeout=max(0.1, deadline - time.monotonic())) for _ in range(count)
        ]
        for result in found:
            assert "error" not in result, result
        return found

    def stop(self) -> None:
        for process in self.processes:
            process.join(10.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)


@pytest.fixture
def servers() -> Any:
    with start_local_servers(token_lifetime=TOKEN_LIFETIME) as started:
        yield started


@pytest.fixture
def clients() -> Any:
    group = Clients()
    try:
        yield group
    finally:
        group.stop()


def _spec(servers: LocalServers, key: str, store: str, **extra: Any) -> dict[str, Any]:
    return {
        "key": key,
        "token_url": servers.token_url,
        "client_id": servers.client_id,
        "client_secret": servers.client_secret,
        "api_url": servers.api_url + "/things",
        "store": store,
        **extra,
    }


def _one_process_worth(seconds: float) -> int:
    """Token requests one process makes in ``seconds``: the first, then one per renewal."""
    return 1 + math.ceil(seconds / RENEW_EVERY)


def _run_many(
    servers: LocalServers, clients: Clients, spec: dict[str, Any], processes: int
) -> list[dict[str, Any]]:
    start = CTX.Event()
    for _ in range(processes):
        clients.spawn(_caller, spec, start)
    clients.wait_ready(processes)
    servers.authorization_server.clear()
    begun = time.monotonic()
    start.set()
    results = clients.collect(processes, spec["seconds"] + SPAWN_TIMEOUT)
    took = time.monotonic() - begun
    assert took <= spec["seconds"] + SPAWN_TIMEOUT
    return results


def _assert_one_process_worth(
    servers: LocalServers, results: list[dict[str, Any]], processes: int, seconds: float
) -> None:
    requests = servers.authorization_server.token_requests
    bound = _one_process_worth(seconds + 1.0)  # a second of start-up skew between processes
    assert len(results) == processes
    assert all(r["ok"] > 0 for r in results), results
    assert sum(r["failed"] for r in results) == 0, [r["errors"] for r in results]
    # As many token requests as one process makes, not `processes` times as many...
    assert 1 <= requests <= bound, (requests, bound)
    assert requests < processes * _one_process_worth(seconds) / 2
    # ...and the servers' count agrees with what the clients say they sent.
    assert sum(r["token_requests"] for r in results) == requests


# -- the figures ---------------------------------------------------------------------------


def test_eight_processes_on_redis_make_one_processs_token_requests(
    servers: LocalServers, clients: Clients, redis_url: str, pem_key_path: str
) -> None:
    spec = _spec(servers, pem_key_path, redis_url, threads=8, seconds=RUN_SECONDS)
    results = _run_many(servers, clients, spec, 8)
    _assert_one_process_worth(servers, results, 8, RUN_SECONDS)


def test_four_processes_on_sqlite_make_one_processs_token_requests(
    servers: LocalServers, clients: Clients, tmp_path: Path, pem_key_path: str
) -> None:
    store = f"sqlite:{tmp_path / 'store' / 'tokens.db'}"
    spec = _spec(servers, pem_key_path, store, threads=8, seconds=RUN_SECONDS)
    results = _run_many(servers, clients, spec, 4)
    _assert_one_process_worth(servers, results, 4, RUN_SECONDS)


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_killed_lease_holder_delays_the_others_at_most_the_lease_time(
    kind: str, clients: Clients, tmp_path: Path, pem_key_path: str, request: pytest.FixtureRequest
) -> None:
    store = (
        request.getfixturevalue("redis_url")
        if kind == "redis"
        else f"sqlite:{tmp_path / 'store' / 'tokens.db'}"
    )
    timeout = 2.0
    lease_ttl = max(10.0, 2 * timeout + 5)  # DPoPAuth's lease for a 2 s client timeout
    one_fetch = 3.0  # a token request to the local AS, spawn-time noise included
    with start_fault_servers(token_lifetime=60.0) as servers:
        authorization_server = servers.authorization_server
        spec = _spec(servers, pem_key_path, store, timeout=timeout)
        holder_start, others_start = CTX.Event(), CTX.Event()
        for _ in range(2):
            clients.spawn(_token_getter, spec, others_start)
        holder = clients.spawn(_token_getter, spec, holder_start)
        clients.wait_ready(3)
        authorization_server.clear()
        # The holder's token request hangs at the AS until it is killed.
        authorization_server.stall_until = time.time() + 30.0
        holder_start.set()
        peer = open_store(store, fallback=False)
        try:
            deadline = time.monotonic() + SPAWN_TIMEOUT
            while authorization_server.token_requests == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert authorization_server.token_requests == 1
            leased_by = time.monotonic()  # the lease was taken before the request was sent
            probe = _auth(spec)
            key = probe.flow.store_key(probe.flow.proofs)
            assert peer.snapshot(key).lease is not None
            others_start.set()
            os.kill(holder.pid, signal.SIGKILL)
            holder.join(10.0)
            assert holder.exitcode == -signal.SIGKILL
            authorization_server.stall_until = None  # the next fetch is answered at once
            results = clients.collect(2, lease_ttl + one_fetch + SPAWN_TIMEOUT)
        finally:
            peer.close()
        latest = max(r["at"] for r in results) - leased_by
        # Within the lease time plus one fetch of the moment the holder took the lease...
        assert latest <= lease_ttl + 1.0 + one_fetch, latest
        # ...and with one fetch between them: the killed one, then one more.
        assert authorization_server.token_requests == 2
        assert sorted(r["sent"] for r in results) == [0, 1]


def test_redis_stopped_mid_run_fails_no_api_call(
    clients: Clients, tmp_path: Path, pem_key_path: str, redis_factory: list[RedisServer]
) -> None:
    seconds = 9.0
    outage = 3.0
    server = start_redis(tmp_path)
    redis_factory.append(server)  # stopped by its PID after the test, restarted ones too
    with start_local_servers(token_lifetime=2.0) as servers:
        spec = _spec(servers, pem_key_path, server.url(), threads=4, seconds=seconds)
        start = CTX.Event()
        for _ in range(2):
            clients.spawn(_caller, spec, start)
        clients.wait_ready(2)
        start.set()
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while servers.resource_server.api_requests < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert servers.resource_server.api_requests >= 20
        server.stop()  # mid-run, with 2 s tokens renewed meanwhile
        stopped_at = time.monotonic()
        time.sleep(outage)  # the outage itself is the scenario: it lasts this long
        server = server.restart()
        redis_factory.append(server)
        assert time.monotonic() - stopped_at < seconds
        results = clients.collect(2, seconds + SPAWN_TIMEOUT)
        served_after = servers.resource_server.api_requests
    assert sum(r["failed"] for r in results) == 0, [r["errors"] for r in results]
    assert all(r["ok"] > 0 for r in results)
    assert served_after > 20


def _nonce_user(spec: dict[str, Any], ready: Any, start: Any, results: Any) -> None:
    """One API call; report how many sends it took (as the servers will count them)."""
    auth = _auth(spec)
    ready.put(os.getpid())
    if not start.wait(SPAWN_TIMEOUT):
        results.put({"pid": os.getpid(), "error": "never started"})
        return
    with httpx.Client(auth=auth, timeout=10.0) as client:
        status = client.get(spec["api_url"]).status_code
    results.put({"pid": os.getpid(), "status": status, "token_requests": auth.token_requests})
    auth.close()


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_a_second_process_does_not_pay_for_a_nonce_the_first_learned(
    kind: str, clients: Clients, tmp_path: Path, pem_key_path: str, request: pytest.FixtureRequest
) -> None:
    store = (
        request.getfixturevalue("redis_url")
        if kind == "redis"
        else f"sqlite:{tmp_path / 'store' / 'tokens.db'}"
    )
    with start_local_servers(require_nonce=True, nonce_rotation=None) as servers:
        first = _spec(servers, pem_key_path, store)
        # Another scope: its own token (a token request of its own), the same servers' nonces.
        second = _spec(servers, pem_key_path, store, scope="other")
        results = []
        for spec in (first, second):
            start = CTX.Event()
            clients.spawn(_nonce_user, spec, start)
            clients.wait_ready(1)
            start.set()
            results += clients.collect(1, SPAWN_TIMEOUT)
        as_statuses = servers.authorization_server.statuses
        rs_statuses = servers.resource_server.statuses
    assert [r["status"] for r in results] == [200, 200]
    # The first paid one use_dpop_nonce at each server; the second paid none.
    assert (as_statuses[400], as_statuses[200]) == (1, 2), as_statuses
    assert (rs_statuses[401], rs_statuses[200]) == (1, 2), rs_statuses
    assert [r["token_requests"] for r in results] == [2, 1]


# -- in one process: the async driver, rejected tokens, masking ------------------------------


def test_async_clients_on_one_store_fetch_once(tmp_path: Path, pem_key_path: str) -> None:
    store = f"sqlite:{tmp_path / 'tokens.db'}"
    with start_local_servers() as servers:
        auths = [_auth(_spec(servers, pem_key_path, store)) for _ in range(3)]

        async def main() -> list[int]:
            async def one(auth: DPoPAuth) -> list[int]:
                async with httpx.AsyncClient(auth=auth, timeout=10.0) as client:
                    replies = await asyncio.gather(
                        *(client.get(servers.api_url + "/x") for _ in range(5))
                    )
                return [r.status_code for r in replies]

            groups = await asyncio.gather(*(one(a) for a in auths))
            return [s for group in groups for s in group]

        statuses = asyncio.run(main())
        requests = servers.authorization_server.token_requests
        for auth in auths:
            auth.close()
    assert statuses == [200] * 15
    assert requests == 1
    assert sorted(a.token_requests for a in auths) == [0, 0, 1]


def test_a_rejected_token_is_not_taken_back_from_the_store(
    tmp_path: Path, pem_key_path: str
) -> None:
    store = f"sqlite:{tmp_path / 'tokens.db'}"
    with start_fault_servers() as servers:
        first, second = (_auth(_spec(servers, pem_key_path, store)) for _ in range(2))
        with httpx.Client(timeout=10.0) as client:
            token = first.get_token(client)
            assert second.get_token(client).value == token.value  # adopted, not fetched
            assert servers.authorization_server.token_requests == 1
            servers.resource_server.mode = "invalid_token_always"
            with pytest.raises(OAuthError, match="freshly issued token too"):
                client.get(servers.api_url + "/x", auth=second)
            # The renewal after invalid_token fetched a new token instead of re-adopting.
            assert servers.authorization_server.token_requests == 2
            renewed = second.token
            assert renewed is not None
            assert renewed.value != token.value
            first.invalidate()
            assert first.get_token(client).value == renewed.value
        first.close()
        second.close()


def test_the_store_url_is_masked(redis_server: RedisServer, pem_signer: Any) -> None:
    auth = DPoPAuth(
        pem_signer,
        token_url="http://127.0.0.1:9/token",
        client_id="svc",
        client_auth="none",
        token_store=redis_server.url(userinfo="user:s3cret-pass"),
    )
    try:
        assert "s3cret" not in auth.token_store
        assert auth.token_store.startswith("redis://")
        assert (
            DPoPAuth(
                pem_signer,
                token_url="http://127.0.0.1:9/token",
                client_id="svc",
                client_auth="none",
            ).token_store
            == "memory"
        )
    finally:
        auth.close()
