"""Real ``dpop serve`` / ``dpop proxy`` processes for the service and proxy tests.

Used by tests/test_service*.py and tests/test_proxy*.py.

The service binds port 0 and logs ``{"event": "listening", "address": "127.0.0.1:PORT"}``;
`start_service` waits for that line, so no port is ever guessed. stdout and stderr go to files
(a pipe nobody drains would block the service once it fills) that `ServiceProcess.logs` reads.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.cli_support import clean_env

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    log_dir: Path
    address: str = ""
    api_key: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        assert not self.address.startswith("unix:"), "a unix socket service has no URL"
        return f"http://{self.address}"

    @property
    def socket_path(self) -> str:
        assert self.address.startswith("unix:")
        return self.address[5:]

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client for this service: API key header set, no proxies from the env."""
        headers = dict(kwargs.pop("headers", {}))
        if self.api_key is not None and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.address.startswith("unix:"):
            kwargs.setdefault("transport", httpx.HTTPTransport(uds=self.socket_path))
            base = "http://dpop"
        else:
            kwargs.setdefault("transport", nodelay_transport())
            base = self.url
        return httpx.Client(base_url=base, headers=headers, trust_env=False, timeout=30.0, **kwargs)

    def logs(self) -> str:
        return "".join(
            (self.log_dir / name).read_text(errors="replace") for name in ("stdout", "stderr")
        )

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line on stderr (a non-JSON line fails the test: logs are structured)."""
        lines = (self.log_dir / "stderr").read_text(errors="replace").splitlines()
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError as exc:
                raise AssertionError(f"service log line is not JSON: {line[:200]!r}") from exc
        return events

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM by default) and wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        return self.process.returncode


def nodelay_transport() -> httpx.HTTPTransport:
    """A transport with TCP_NODELAY, as a latency-sensitive client should use.

    httpx writes headers and body separately; Nagle plus delayed ACKs would add 40 ms.
    """
    return httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


def run_dpop(
    args: list[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    nofile: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``dpop ARGS``; ``nofile`` sets the child's open-files limit (never the runner's)."""

    def limit() -> None:
        import resource

        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "dpop_signer", *args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=clean_env(env),
            preexec_fn=None if nofile is None else limit,
        )


def start_service(
    args: list[str],
    log_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    api_key: str | None = None,
    nofile: int | None = None,
) -> ServiceProcess:
    """Start ``dpop ARGS`` (``serve ...`` or ``proxy ...``) and wait until it listens.

    ``nofile``: the child's open-files limit (soft and hard), set in the child only.
    """
    process = run_dpop(args, log_dir, env, nofile=nofile)
    service = ServiceProcess(process, log_dir, api_key=api_key)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for event in _safe_events(log_dir):
            if event.get("event") == "listening":
                service.address = str(event["address"])
                return service
        if process.poll() is not None:
            raise AssertionError(
                f"dpop {' '.join(args[:1])} exited with {process.returncode} before listening:\n"
                + service.logs()[-3000:]
            )
        time.sleep(0.05)
    service.stop(signal.SIGKILL)
    raise AssertionError(f"dpop did not listen within {START_TIMEOUT} s:\n{service.logs()[-3000:]}")


def _safe_events(log_dir: Path) -> Iterator[dict[str, Any]]:
    try:
        text = (log_dir / "stderr").read_text(errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


def write_api_key(path: Path) -> str:
    key = secrets.token_urlsafe(32)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def raw_exchange(address: str, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``request`` bytes as they are (no client normalizes them) and read until close."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response (0 when there is none)."""
    parts = response.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
