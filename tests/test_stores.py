"""The token stores (issue 12): memory, SQLite and a real Redis server.

Each store is checked for what `DPoPAuth` relies on: tokens with their expiry, exactly one
lease holder among racing processes, a SIGKILLed holder freeing the lease within its TTL, a
failed fetch reaching the processes that waited for it, nonces shared per origin, private
SQLite files, the memory fallback when the engine goes away (and back), and raw contents
holding no secret. Cross-process checks start processes with ``spawn`` (never ``fork``, which
would copy connections) and open the store by URL in each, as workers do.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import signal
import sqlite3
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dpop_signer.errors import ConfigError, ServerUnreachableError, TokenEndpointError
from dpop_signer.stores import (
    FallbackStore,
    MemoryStore,
    Snapshot,
    SqliteStore,
    StoredFailure,
    StoredToken,
    StoreUnavailable,
    TokenStore,
    await_outcome,
    open_store,
    token_key,
    wait_for_outcome,
)
from tests.redis_fixtures import RedisServer, start_redis

KINDS = ["memory", "sqlite", "redis"]
SHARED = ["sqlite", "redis"]
TOKEN_URL = "https://as.example/oauth2/token"
CLIENT_ID = "svc-client-7f3a"
JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
# A DPoP proof as a server might echo it into an error message: never stored.
PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2In0"
    ".eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiUE9TVCJ9"
    ".c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmUtc2lnbmF0dXJl"
)
SPAWN_TIMEOUT = 60.0
WAIT_SLACK = 1.0  # seconds of polling and scheduling allowed on top of a lease TTL


def key_for(name: str) -> str:
    return token_key(TOKEN_URL, CLIENT_ID, scope=name, jkt=JKT)


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "memory":
        return "memory"
    if kind == "sqlite":
        return f"sqlite:{tmp_path}/state/tokens.db"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def store(store_url: str) -> Any:
    opened = open_store(store_url, fallback=False)
    yield opened
    opened.close()


def peer_of(store_url: str, store: TokenStore) -> TokenStore:
    """Another handle on the same store (memory has only the one of its process)."""
    return store if store_url == "memory" else open_store(store_url, fallback=False)


def wait_until(condition: Any, timeout: float) -> float:
    """Poll ``condition`` every 20 ms; return the seconds it took; fail after ``timeout``."""
    started = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - started
        assert elapsed < timeout, f"condition not met within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - started


# -- processes started with spawn (module level: the child imports them by name) -----------


def _race_child(url: str, keys: list[str], barrier: Any, results: Any) -> None:
    store = open_store(url, fallback=False)
    try:
        for key in keys:
            barrier.wait(SPAWN_TIMEOUT)
            results.put((key, os.getpid(), store.try_lease(key, 30.0)))
    finally:
        store.close()


def _holder_child(url: str, key: str, ttl: float, results: Any) -> None:
    store = open_store(url, fallback=False)
    lease = store.try_lease(key, ttl)
    results.put((lease, time.monotonic()))
    time.sleep(SPAWN_TIMEOUT)  # "fetching" until SIGKILLed


def _spawned(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _stop(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        process.join(SPAWN_TIMEOUT)
        if process.is_alive():
            process.kill()
            process.join(5.0)


# -- tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize("store_url", KINDS, indirect=True)
def test_put_get_and_expiry(store_url: str, store: TokenStore) -> None:
    key = key_for("put-get")
    assert store.get(key) is None
    store.put(key, StoredToken("at-1.x_y", "DPoP", 1_900_000_000.5), ttl=60)
    store.put(key_for("short"), StoredToken("at-short", "Bearer", None), ttl=0.4)
    peer = peer_of(store_url, store)
    got = peer.get(key)
    assert got == StoredToken("at-1.x_y", "DPoP", 1_900_000_000.5)
    assert "at-1.x_y" not in repr(got)
    assert peer.get(key_for("short")) == StoredToken("at-short", "Bearer", None)
    took = wait_until(lambda: peer.get(key_for("short")) is None, timeout=5.0)
    assert took < 5.0
    assert peer.get(key) is not None  # the long-lived one stays
    store.put(key, StoredToken("at-2", "DPoP", None), ttl=60)  # a renewal replaces it
    assert peer.get(key) == StoredToken("at-2", "DPoP", None)


@pytest.mark.parametrize("store_url", KINDS, indirect=True)
def test_lease_one_holder_and_compare_and_release(store: TokenStore) -> None:
    key = key_for("lease")
    first = store.try_lease(key, 30)
    assert first is not None
    assert store.try_lease(key, 30) is None
    assert store.snapshot(key).lease == first
    store.release(key, "not-the-holder")  # a stale holder must not free the lease
    assert store.try_lease(key, 30) is None
    store.release(key, first)
    second = store.try_lease(key, 30)
    assert second is not None
    assert second != first
    assert store.try_lease(key_for("other-key"), 30) is not None  # leases are per key


@pytest.mark.parametrize("store_url", SHARED, indirect=True)
def test_lease_race_across_processes_has_one_winner(store_url: str) -> None:
    keys = [key_for(f"race-{i}") for i in range(3)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    results = context.Queue()
    children = [_spawned(_race_child, store_url, keys, barrier, results) for _ in range(4)]
    try:
        outcomes = [results.get(timeout=SPAWN_TIMEOUT) for _ in range(4 * len(keys))]
    finally:
        _stop(children)
    for key in keys:
        leases = [lease for k, _, lease in outcomes if k == key]
        assert len(leases) == 4
        assert sum(lease is not None for lease in leases) == 1, leases
    assert len({pid for _, pid, _ in outcomes}) == 4


@pytest.mark.parametrize("store_url", SHARED, indirect=True)
def test_killed_holder_delays_others_at_most_the_lease_time(
    store_url: str, store: TokenStore
) -> None:
    key = key_for("killed")
    ttl = 3.0
    results = multiprocessing.get_context("spawn").Queue()
    child = _spawned(_holder_child, store_url, key, ttl, results)
    try:
        lease, taken_at = results.get(timeout=SPAWN_TIMEOUT)
        assert lease is not None
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(10.0)
        assert child.exitcode == -signal.SIGKILL
        if time.monotonic() - taken_at < ttl / 2:  # the lease outlives its holder...
            assert store.try_lease(key, 30) is None
            assert store.snapshot(key).lease == lease
        outcome = wait_for_outcome(store, key, timeout=ttl + WAIT_SLACK)
        freed_after = time.monotonic() - taken_at
    finally:
        _stop([child])
    # ...until it expires: the waiter is told the holder went away without an outcome.
    assert outcome.token is None
    assert outcome.failure is None
    assert not outcome.timed_out
    assert freed_after <= ttl + WAIT_SLACK
    assert store.try_lease(key, 30) is not None


# -- failures ------------------------------------------------------------------------------


class _SeenSnapshot:
    """A store whose first ``snapshot`` sets an event: the waiter has seen the lease."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store
        self.seen = threading.Event()

    def snapshot(self, key: str) -> Snapshot:
        snap = self.store.snapshot(key)
        self.seen.set()
        return snap


@pytest.mark.parametrize("store_url", KINDS, indirect=True)
def test_failed_fetch_reaches_the_waiters_with_its_backoff(
    store_url: str, store: TokenStore
) -> None:
    key = key_for("failure")
    waiter_store = _SeenSnapshot(peer_of(store_url, store))
    lease = store.try_lease(key, 10)
    assert lease is not None
    outcomes: list[Any] = []
    waiter = threading.Thread(
        target=lambda: outcomes.append(
            wait_for_outcome(waiter_store, key, timeout=10.0)  # type: ignore[arg-type]
        )
    )
    waiter.start()
    assert waiter_store.seen.wait(10.0)
    # A refusal with no backoff (retry_at now): waiters learn it only because their lease failed.
    error = TokenEndpointError(
        "token endpoint https://as.example/oauth2/token refused: invalid_client",
        error="invalid_client",
        error_description="client authentication failed",
        status=401,
    )
    store.record_failure(
        key, StoredFailure.from_error(error, retry_at=time.time(), count=3, lease=lease)
    )
    store.release(key, lease)
    waiter.join(15.0)
    assert not waiter.is_alive()
    (outcome,) = outcomes
    assert not outcome.timed_out
    assert outcome.token is None
    assert outcome.failure is not None
    shared = outcome.failure.to_error()
    assert type(shared) is TokenEndpointError
    assert (shared.error, shared.status, outcome.failure.count) == ("invalid_client", 401, 3)
    assert shared.error_description == "client authentication failed"
    assert shared.message == error.message
    # A process that did not wait for that fetch does not take it as its outcome.
    assert wait_for_outcome(store, key, timeout=1.0).failure is None

    # A backoff is shared with everyone until retry_at, whoever's lease failed.
    store.record_failure(
        key,
        StoredFailure("ServerUnreachableError", "cannot reach", time.time() + 30, 4, lease="x"),
    )
    backoff = wait_for_outcome(waiter_store.store, key, timeout=1.0).failure
    assert backoff is not None
    assert backoff.retry_at > time.time() + 20
    assert type(backoff.to_error()) is ServerUnreachableError
    # A token clears the failure.
    store.put(key, StoredToken("at-ok", "DPoP", None), ttl=60)
    snap = waiter_store.store.snapshot(key)
    assert snap.failure is None
    assert snap.token == StoredToken("at-ok", "DPoP", None)


@pytest.mark.parametrize("store_url", ["memory", "sqlite"], indirect=True)
def test_await_outcome_returns_the_token_from_an_event_loop(store: TokenStore) -> None:
    key = key_for("async")
    lease = store.try_lease(key, 10)
    assert lease is not None

    async def scenario() -> Any:
        waiting = asyncio.create_task(await_outcome(store, key, timeout=10.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # it waits for the lease, the loop keeps running
        await asyncio.to_thread(store.put, key, StoredToken("at-async", "DPoP", None), 60)
        await asyncio.to_thread(store.release, key, lease)
        return await asyncio.wait_for(waiting, 10.0)

    outcome = asyncio.run(scenario())
    assert outcome.token == StoredToken("at-async", "DPoP", None)
    assert outcome.failure is None
    assert not outcome.timed_out


# -- nonces ----------------------------------------------------------------------------------


@pytest.mark.parametrize("store_url", KINDS, indirect=True)
def test_nonces_are_shared_per_origin(store_url: str, store: TokenStore) -> None:
    peer = peer_of(store_url, store)
    assert peer.get_nonce("https://as.example:443") is None
    store.put_nonce("https://as.example:443", "eyJ7S_zG.eyJH0-Z.HX4w-7v", ttl=60)
    store.put_nonce("https://rs.example:8443", "n-rs-1", ttl=0.4)
    assert peer.get_nonce("https://as.example:443") == "eyJ7S_zG.eyJH0-Z.HX4w-7v"
    assert peer.get_nonce("https://rs.example:8443") == "n-rs-1"
    store.put_nonce("https://as.example:443", 'bad "nonce"', ttl=60)  # not 1*NQCHAR: ignored
    assert peer.get_nonce("https://as.example:443") == "eyJ7S_zG.eyJH0-Z.HX4w-7v"
    wait_until(lambda: peer.get_nonce("https://rs.example:8443") is None, timeout=5.0)


# -- SQLite files ----------------------------------------------------------------------------


def test_sqlite_file_and_directory_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "tokens.db"
    store = SqliteStore(path)
    assert not path.exists()  # nothing is created before the first use
    store.put(key_for("modes"), StoredToken("at", "DPoP", None), ttl=60)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for side in ("tokens.db-wal", "tokens.db-shm"):
        assert stat.S_IMODE((path.parent / side).stat().st_mode) == 0o600, side
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store.close()

    loose = tmp_path / "loose.db"
    loose.touch(mode=0o644)
    os.chmod(loose, 0o644)
    SqliteStore(loose).put_nonce("https://as.example:443", "n1", ttl=60)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600

    planted = tmp_path / "planted.db"
    planted.symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(StoreUnavailable, match=r"token store sqlite:.*planted\.db"):
        SqliteStore(planted).get(key_for("x"))
    assert not (tmp_path / "elsewhere.db").exists()


def test_sqlite_unusable_file_falls_back_and_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.db"
    path.write_bytes(b"this is not a database, it is a broken file " * 100)
    store = FallbackStore(SqliteStore(path), retry_interval=0.2)
    key = key_for("broken")
    with caplog.at_level(logging.INFO, logger="dpop_signer"):
        for i in range(20):
            store.put(key, StoredToken(f"at-{i}", "DPoP", None), ttl=60)
            assert store.get(key) == StoredToken(f"at-{i}", "DPoP", None)
            lease = store.try_lease(key, 5)
            assert lease is not None
            store.release(key, lease)
        assert not store.sharing
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "token store unavailable" in warnings[0].getMessage()
        path.unlink()  # repaired: the next probe creates a fresh database
        wait_until(lambda: (store.get(key), store.sharing)[1], timeout=5.0)
        store.put(key, StoredToken("at-shared", "DPoP", None), ttl=60)
    assert SqliteStore(path).get(key) == StoredToken("at-shared", "DPoP", None)
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    assert sum("sharing tokens and nonces again" in r.getMessage() for r in caplog.records) == 1


# -- Redis: outage, credentials, TLS -----------------------------------------------------------


def test_redis_stopped_falls_back_to_memory_and_shares_again(
    redis_factory: list[RedisServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_redis(tmp_path)
    redis_factory.append(server)
    store = FallbackStore(open_store(server.url(), fallback=False), retry_interval=0.2)
    key = key_for("outage")
    store.put(key, StoredToken("at-before", "DPoP", None), ttl=60)
    assert store.sharing
    with caplog.at_level(logging.INFO, logger="dpop_signer"):
        server.stop()
        # Every operation keeps working from this process's memory.
        assert store.get(key) == StoredToken("at-before", "DPoP", None)  # mirrored earlier
        for i in range(30):
            store.put(key, StoredToken(f"at-{i}", "DPoP", None), ttl=60)
            assert store.get(key) == StoredToken(f"at-{i}", "DPoP", None)
            lease = store.try_lease(key, 5)
            assert lease is not None
            assert store.snapshot(key).lease == lease
            store.release(key, lease)
            store.put_nonce("https://as.example:443", f"n-{i}", ttl=60)
            assert store.get_nonce("https://as.example:443") == f"n-{i}"
            time.sleep(0.01)  # spans retry intervals: the probes fail quietly
        assert not store.sharing
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "token store unavailable" in warnings[0].getMessage()

        restarted = server.restart()
        redis_factory.append(restarted)
        took = wait_until(lambda: (store.get_nonce("https://as.example:443"), store.sharing)[1], 5)
        assert took < 5
        store.put(key, StoredToken("at-after", "DPoP", None), ttl=60)
        store.put_nonce("https://as.example:443", "n-after", ttl=60)
    other = open_store(server.url(), fallback=False)  # another process's view
    assert other.get(key) == StoredToken("at-after", "DPoP", None)
    assert other.get_nonce("https://as.example:443") == "n-after"
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    assert sum("sharing tokens and nonces again" in r.getMessage() for r in caplog.records) == 1


def test_redis_password_is_used_and_never_shown(
    redis_factory: list[RedisServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password = "pw-Zq81-very-secret"
    server = start_redis(tmp_path, "--requirepass", password)
    redis_factory.append(server)
    good = open_store(server.url(userinfo=f":{password}"), fallback=False)
    good.put(key_for("auth"), StoredToken("at", "DPoP", None), ttl=60)
    assert good.get(key_for("auth")) == StoredToken("at", "DPoP", None)
    assert password not in repr(good)
    assert password not in good.url
    assert good.url == f"redis://…@127.0.0.1:{server.port}/0"

    wrong = open_store(server.url(userinfo=":wrong-Zq81-password"), fallback=False)
    with pytest.raises(StoreUnavailable) as info:
        wrong.get(key_for("auth"))
    assert "wrong-Zq81-password" not in str(info.value)
    assert "\n" not in str(info.value)
    with caplog.at_level(logging.INFO, logger="dpop_signer"):
        fallback = open_store(server.url(userinfo=f"user:{password}x"))
        fallback.put(key_for("auth"), StoredToken("at-2", "DPoP", None), ttl=60)
        assert fallback.get(key_for("auth")) == StoredToken("at-2", "DPoP", None)  # memory
        assert password not in repr(fallback)
    assert len(caplog.records) == 1
    assert password not in caplog.text
    assert "//user" not in caplog.text
    assert f"token store redis://…@127.0.0.1:{server.port}/0" in caplog.text


def test_rediss_with_a_ca_file(redis_factory: list[RedisServer], tmp_path: Path) -> None:
    ca_pem, cert_pem, key_pem = _tls_files(tmp_path)
    server = start_redis(
        tmp_path,
        "--tls-cert-file", str(cert_pem),
        "--tls-key-file", str(key_pem),
        "--tls-ca-cert-file", str(ca_pem),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    redis_factory.append(server)
    url = f"rediss://127.0.0.1:{server.port}/0"
    store = open_store(f"{url}?ca={ca_pem}", fallback=False)
    store.put(key_for("tls"), StoredToken("at-tls", "DPoP", None), ttl=60)
    assert store.get(key_for("tls")) == StoredToken("at-tls", "DPoP", None)
    assert store.url == f"{url}?…({len('ca=' + str(ca_pem))} chars)"
    by_keyword = open_store(url, ca_file=str(ca_pem), fallback=False)
    assert by_keyword.get(key_for("tls")) == StoredToken("at-tls", "DPoP", None)
    untrusted = open_store(url, fallback=False)  # the system trust store lacks our CA
    with pytest.raises(StoreUnavailable, match=r"rediss://127\.0\.0\.1"):
        untrusted.get(key_for("tls"))
    plain = open_store(f"redis://127.0.0.1:{server.port}/0", fallback=False)
    with pytest.raises(StoreUnavailable):  # TLS only: a plain client is refused
        plain.get(key_for("tls"))


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpop test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


# -- what is stored --------------------------------------------------------------------------


def _raw_sqlite(path: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}"):  # noqa: S608 - our own table names
                rows.append((f"{table}:{row[0]}", repr(row[1:])))
    return rows


def _raw_redis(url: str) -> list[tuple[str, str]]:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        items = []
        for key in client.scan_iter(count=100):
            assert client.pttl(key) > 0, f"{key} has no TTL"
            items.append((key, str(client.get(key))))
        return items
    finally:
        client.close()


@pytest.mark.parametrize("store_url", SHARED, indirect=True)
def test_nothing_secret_is_stored(store_url: str, store: TokenStore) -> None:
    key = token_key(
        TOKEN_URL, CLIENT_ID, scope="read write", resources=["https://api.example/"], jkt=JKT
    )
    store.put(key, StoredToken("opaque-access-token-123", "DPoP", time.time() + 60), ttl=60)
    lease = store.try_lease(key, 30)
    assert lease is not None
    store.record_failure(
        key,
        StoredFailure(
            "TokenEndpointError",
            f"server said: bad proof {PROOF} for pkcs11:object=k?pin-value=1234",
            time.time() + 5,
            1,
            "invalid_dpop_proof",
            f"proof {PROOF} rejected",
            400,
            lease,
        ),
    )
    store.put_nonce("https://as.example:443", "nonce-abc", ttl=60)
    raw = (
        _raw_redis(store_url)
        if store_url.startswith("redis")
        else _raw_sqlite(Path(store_url[len("sqlite:") :]))
    )
    dump = repr(raw)
    for secret in (PROOF, PROOF.split(".")[1], "pin-value=1234", CLIENT_ID, TOKEN_URL, JKT):
        assert secret not in dump, secret
    assert "read write" not in dump
    assert "api.example" not in dump
    names = [name for name, _ in raw]
    pattern = re.compile(
        r"^(dpop-signer:v1:)?(tok|tokens|fail|failures|lease|leases):[0-9a-f]{64}$"
        r"|^(dpop-signer:v1:nonce|nonces):https://as\.example:443$"
    )
    assert all(pattern.match(name) for name in names), names
    assert len(names) == 4
    assert [v for _, v in raw if "opaque-access-token-123" in v] == [
        v for n, v in raw if "tok" in n
    ]
    failure = store.snapshot(key).failure
    assert failure is not None
    assert "[JWS removed]" in failure.message
    assert failure.error_description == "proof [JWS removed] rejected"


def test_token_key_ignores_order_and_separates_everything_else() -> None:
    base = {"scope": "a b", "resources": ["https://r1/", "https://r2/"], "audience": "x"}
    one = token_key(TOKEN_URL, CLIENT_ID, jkt=JKT, **base)  # type: ignore[arg-type]
    same = token_key(
        TOKEN_URL, CLIENT_ID, scope="b  a", resources=["https://r2/", "https://r1/"],
        audience="x", jkt=JKT,
    )  # fmt: skip
    assert one == same
    assert re.fullmatch(r"[0-9a-f]{64}", one)
    others = {
        token_key(TOKEN_URL + "2", CLIENT_ID, jkt=JKT, **base),  # type: ignore[arg-type]
        token_key(TOKEN_URL, CLIENT_ID + "2", jkt=JKT, **base),  # type: ignore[arg-type]
        token_key(TOKEN_URL, CLIENT_ID, jkt=JKT + "2", **base),  # type: ignore[arg-type]
        token_key(TOKEN_URL, CLIENT_ID, scope="a", resources=base["resources"], audience="x",
                  jkt=JKT),
        token_key(TOKEN_URL, CLIENT_ID, scope="a b", resources=["https://r1/"], audience="x",
                  jkt=JKT),
        token_key(TOKEN_URL, CLIENT_ID, scope="a b", resources=base["resources"], jkt=JKT),
    }  # fmt: skip
    assert one not in others
    assert len(others) == 6


# -- open_store ------------------------------------------------------------------------------


def test_open_store_forms(tmp_path: Path) -> None:
    assert isinstance(open_store("memory"), MemoryStore)
    shared = open_store(f"sqlite:{tmp_path}/a/t.db")
    assert isinstance(shared, FallbackStore)
    assert isinstance(shared.primary, SqliteStore)
    assert shared.primary.path == tmp_path / "a" / "t.db"
    bare = open_store(f"sqlite://{tmp_path}/b.db", fallback=False)
    assert isinstance(bare, SqliteStore)
    assert bare.path == tmp_path / "b.db"
    mine = MemoryStore()
    assert open_store(mine) is mine
    wrapped = open_store(SqliteStore(tmp_path / "c.db"))
    assert isinstance(wrapped, FallbackStore)
    redis_store = open_store("redis://user:p4ss-w0rd@127.0.0.1:1/3")
    assert "p4ss-w0rd" not in repr(redis_store)
    assert "p4ss-w0rd" not in str(redis_store)
    assert redis_store.url == "redis://…@127.0.0.1:1/3"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("mem", "token_store must be memory, sqlite:PATH"),
        ("http://u:s3cr3t-x@h/", "not 'http://…@h/'"),
        ("sqlite:", "needs a file path"),
        ("redis://h:99999/0", "port is not a number"),
        ("redis://h:6379/db1", "database must be a number"),
        ("redis://h:6379/0?tls=yes", "unknown URL option 'tls'"),
        ("redis://h:6379/0?ca=/x.pem", "needs a rediss:// URL"),
        ("redis:///0", "names no host"),
    ],
)
def test_open_store_refuses_bad_settings(setting: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(setting)
    assert message in str(info.value)
    assert "s3cr3t-x" not in str(info.value)


def test_redis_without_the_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what an absent package looks like
    with pytest.raises(ConfigError, match=r"pip install 'dpop-signer\[redis\]'"):
        open_store("redis://127.0.0.1:6379/0")
