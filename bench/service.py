"""``dpop serve``: ``POST /v1/proof`` against the same server's ``GET /healthz``.

Starts the real service (``python -m dpop_signer serve``) on a loopback port with a SoftHSM2 key
(a throw-away token, or ``DPOP_KEY``/``DPOP_PIN`` when they name a ``pkcs11:`` key), API key
on, default log level (one audit line per proof, written to a file). The load comes from a
small asyncio client in this process that keeps C connections open and sends pre-built
HTTP/1.1 requests, so the client costs far less than the server it measures. Both endpoints
run in interleaved rounds; the table shows median requests per second, p50/p99 latency over
all rounds, the median of the per-round ratios proof/healthz, and the server's CPU time per
request (from /proc: on a small shared machine the client competes for the same cores, so the
CPU each request costs the server says more than the rate). Bounded to about 40 s.

    python -m bench service --rounds=3 --seconds=2 --connections=1,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.signers import temp_token

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Endpoint:
    name: str
    request: bytes
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    cpu: list[float] = field(default_factory=list)  # server CPU seconds per request, per round


def build_requests(port: int, api_key: str) -> list[Endpoint]:
    host = f"127.0.0.1:{port}"
    health = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    body = json.dumps(
        {"htm": "GET", "htu": "https://api.example.com/v1/things", "access_token": "Kz~8mXK1E"}
    ).encode()
    proof = (
        f"POST /v1/proof HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    return [Endpoint("GET /healthz", health), Endpoint("POST /v1/proof", proof)]


async def _one_connection(
    port: int, request: bytes, end: float, latencies: list[float], counts: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            started = time.perf_counter()
            if started >= end:
                break
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            counts[0 if status == 200 else 1] += 1
    finally:
        writer.close()


async def load(
    port: int, request: bytes, connections: int, seconds: float
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    counts = [0, 0]
    began = time.perf_counter()
    end = began + seconds
    await asyncio.gather(
        *(_one_connection(port, request, end, latencies, counts) for _ in range(connections))
    )
    return counts[0] / (time.perf_counter() - began), latencies, counts[1]


def start_service(uri: str, pin: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    api_key = secrets.token_urlsafe(32)
    key_file = workdir / "api-key"
    key_file.write_text(api_key)
    key_file.chmod(0o600)
    log = workdir / "service.log"
    env = {**os.environ, "DPOP_PIN": pin, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "dpop_signer", "serve", "--listen", "127.0.0.1:0",
             "--api-key-file", str(key_file), "--key", uri],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"event":"listening"' in line:
                port = int(json.loads(line)["address"].rsplit(":", 1)[1])
                return process, port, api_key
        if process.poll() is not None:
            raise SystemExit(f"dpop serve exited: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    process.kill()
    raise SystemExit("dpop serve did not start within 30 s")


def server_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (Linux /proc; 0.0 elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench service")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per endpoint per round")
    parser.add_argument("--connections", default="1,8", help="comma-separated concurrency levels")
    args = parser.parse_args(argv)
    rounds = max(1, min(args.rounds, 10))
    seconds = max(0.2, min(args.seconds, 5.0))
    levels = [max(1, min(int(c), 64)) for c in args.connections.split(",")]
    budget = 40.0

    key_ref = os.environ.get("DPOP_KEY", "")
    token_dir = None
    if os.environ.get("SOFTHSM2_CONF") and key_ref.startswith("pkcs11:"):
        uri, pin = key_ref, os.environ.get("DPOP_PIN", "")
    else:
        token_dir, uri, pin = temp_token()
    workdir = Path(tempfile.mkdtemp(prefix="dpop-bench-service-"))
    process, port, api_key = start_service(uri, pin, workdir)
    began = time.perf_counter()
    try:
        print(f"\ndpop serve, SoftHSM2 key, {platform.python_implementation()} "
              f"{platform.python_version()}, {os.cpu_count()} CPUs, "
              f"{rounds} rounds x {seconds:g} s per endpoint and level\n")  # fmt: skip
        print(
            "| connections | endpoint | median req/s | p50 ms | p99 ms | errors | proof/healthz "
            "| server CPU µs/req |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for connections in levels:
            endpoints = build_requests(port, api_key)
            for endpoint in endpoints:  # warm-up: connections, the HSM session, caches
                asyncio.run(load(port, endpoint.request, connections, 0.3))
            for _ in range(rounds):
                for endpoint in endpoints:
                    cpu_before = server_cpu(process.pid)
                    rate, latencies, errors = asyncio.run(
                        load(port, endpoint.request, connections, seconds)
                    )
                    cpu = server_cpu(process.pid) - cpu_before
                    endpoint.cpu.append(cpu / max(1, len(latencies)))
                    endpoint.rates.append(rate)
                    endpoint.latencies += latencies
                    endpoint.errors += errors
                if time.perf_counter() - began > budget:
                    break
            health, proof = endpoints
            ratios = [p / h for p, h in zip(proof.rates, health.rates, strict=True)]
            for endpoint in endpoints:
                ratio = f"{statistics.median(ratios):.2f}" if endpoint is proof else ""
                print(
                    f"| {connections} | {endpoint.name} | {statistics.median(endpoint.rates):,.0f}"
                    f" | {pct(endpoint.latencies, 0.5):.2f} | {pct(endpoint.latencies, 0.99):.2f}"
                    f" | {endpoint.errors} | {ratio} | {statistics.median(endpoint.cpu) * 1e6:.0f}"
                    " |"
                )
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        if token_dir is not None:
            shutil.rmtree(token_dir, ignore_errors=True)
    print(f"\n(total {time.perf_counter() - began:.0f} s; exit status {process.returncode})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
