"""A real ``redis-server`` for the token store tests, on a free loopback port.

``redis_server`` starts one for the session; ``redis_url`` gives each test an emptied database
on it; ``redis_factory`` starts private servers a test may stop and restart (the fallback
tests). Every server runs without persistence (``--save '' --appendonly no``) in a temporary
directory and is stopped by its PID.

Redis cannot listen on port 0 and report the port, so a free port is taken from the OS by
binding and closing a socket; another process may take it before Redis binds, so a start that
fails is retried on a new port, at most `PORT_TRIES` times.

Without ``redis-server`` (Debian: ``apt-get install redis-server``; ``make system-deps``
installs it) or the ``redis`` client (``pip install 'dpop-signer[redis]'``) the tests skip on a
developer machine and fail under CI (``conftest.require``).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require

__all__ = ["RedisServer", "redis_factory", "redis_server", "redis_url", "start_redis"]

PORT_TRIES = 5
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


@dataclass
class RedisServer:
    """One ``redis-server`` started by `start_redis`."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    args: tuple[str, ...] = field(default=())

    @property
    def pid(self) -> int:
        """The process id (the only handle used to stop it)."""
        return self.process.pid

    def url(self, db: int = 0, *, userinfo: str = "") -> str:
        """``redis://[userinfo@]127.0.0.1:PORT/db``."""
        return f"redis://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/{db}"

    def log(self) -> str:
        """What the server wrote so far (for failure messages)."""
        try:
            return (self.workdir / f"redis-{self.port}.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL it when it has not exited after a few seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)

    def restart(self) -> RedisServer:
        """A new server on the same port with the same arguments (one try: the port was ours)."""
        self.stop()
        return _start_on(self.port, self.workdir, self.args)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int, ca_file: str | None) -> bool:
    """True once the server answers ``PING`` (``-NOAUTH`` counts: it is up, with a password)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw:
            if ca_file is None:
                raw.sendall(b"PING\r\n")
                reply = raw.recv(64)
            else:
                context = ssl.create_default_context(cafile=ca_file)
                context.check_hostname = False  # readiness only; the tests check names
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"PING\r\n")
                    reply = tls.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


def _tls_ca(args: tuple[str, ...]) -> str | None:
    """The CA file when ``args`` configure TLS (then the free port is the TLS port)."""
    if "--tls-ca-cert-file" not in args:
        return None
    return args[args.index("--tls-ca-cert-file") + 1]


def _start_on(port: int, workdir: Path, args: tuple[str, ...]) -> RedisServer:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    log = workdir / f"redis-{port}.log"
    ca_file = _tls_ca(args)
    # With TLS the plain port is off (0) and the free port serves TLS only.
    ports = ("--port", str(port)) if ca_file is None else ("--port", "0", "--tls-port", str(port))
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                server,
                *ports,
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
                "--daemonize", "no",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    started = RedisServer(process, port, workdir, args)
    deadline = time.monotonic() + READY_TIMEOUT
    while not _answers(port, ca_file):
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}: {started.log()}")
        if time.monotonic() > deadline:
            started.stop()
            raise RuntimeError(f"redis-server not ready within {READY_TIMEOUT} s: {started.log()}")
        time.sleep(0.02)
    return started


def start_redis(workdir: Path, *args: str) -> RedisServer:
    """Start ``redis-server`` on a free loopback port with extra ``args``; wait until it answers.

    With ``--tls-ca-cert-file`` (and the certificate options) in ``args`` the port serves TLS.

    Raises:
        RuntimeError: it would not start on any of `PORT_TRIES` ports, or not within
            `READY_TIMEOUT` seconds.
    """
    last: Exception | None = None
    for _ in range(PORT_TRIES):
        try:
            return _start_on(_free_port(), workdir, args)
        except RuntimeError as exc:  # most likely the port was taken meanwhile
            last = exc
    raise RuntimeError(f"redis-server did not start on {PORT_TRIES} free ports: {last}")


def _require_redis() -> None:
    require(
        shutil.which("redis-server") is not None,
        "redis-server is not installed (Debian: apt-get install redis-server)",
    )
    require(
        importlib.util.find_spec("redis") is not None,
        "the redis client is not installed (pip install 'dpop-signer[redis]')",
    )


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A ``redis-server`` for the whole session."""
    _require_redis()
    workdir = Path(tempfile.mkdtemp(prefix="dpop-redis-"))
    server = start_redis(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of database 0 of the session's server, emptied for this test."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5.0)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Start private servers with ``start_redis(tmp_path, ...)`` and append them here.

    Every server in the list (restarted ones too) is stopped by its PID after the test.
    """
    _require_redis()
    servers: list[RedisServer] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
