"""``dpop serve``: ``POST /v1/proof`` against the same server's ``GET /healthz``.

Starts the real service (``python -m dpop_signer serve``) on a loopback port, API key on,
default log level (one audit line per proof, written to a file): first with the SoftHSM2 key
(`bench.hsm.bench_key`), then with an in-memory PEM key, which shows what the service costs
apart from the HSM. The load comes from a small asyncio client in this process that keeps C
connections open and sends pre-built HTTP/1.1 requests, so the client costs far less than the
server it measures. Both endpoints run in interleaved rounds; a row has the median requests per
second, the median of the per-round ratios proof/healthz, p50/p99 latency over all rounds, the
server's CPU time per request (from /proc: the client shares the 2 cores, so the CPU a request
costs the server says more than the rate), and the mean signing time the service itself
measured (``/metrics``). From that comes the ceiling: a /v1/proof that cost one /healthz plus
one signature and nothing else would reach ``1 / (1 + sign x healthz rate)``. About 40 s per key.

    python -m bench service --rounds=3 --seconds=2 --connections=1,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.hsm import bench_key
from bench.report import Row

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Service (dpop serve)"
BUDGET = 40.0
"""Seconds one service run may take; rounds stop early beyond it."""


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


def start_service(
    key: str, pin: str | None, workdir: Path, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start ``dpop serve`` on a free loopback port with ``key``; (process, port, API key)."""
    api_key = secrets.token_urlsafe(32)
    key_file = workdir / "api-key"
    key_file.write_text(api_key)
    key_file.chmod(0o600)
    log = workdir / "service.log"
    env = {k: v for k, v in os.environ.items() if k != "DPOP_PIN"}
    env["PYTHONUNBUFFERED"] = "1"
    if pin:
        env["DPOP_PIN"] = pin
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "dpop_signer", "serve", "--listen", "127.0.0.1:0",
             "--api-key-file", str(key_file), "--key", key, *extra],
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


def sign_seconds(port: int) -> tuple[float, int]:
    """The service's own signing-time sum and count, from ``/metrics``."""
    import httpx

    total, count = 0.0, 0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith("dpop_sign_seconds_sum "):
            total = float(line.split()[1])
        elif line.startswith("dpop_sign_seconds_count "):
            count = int(line.split()[1])
    return total, count


def measure_service(
    label: str, key: str, pin: str | None, levels: list[int], rounds: int, seconds: float
) -> list[Row]:
    """Interleaved rounds of /healthz and /v1/proof on one ``dpop serve`` with ``key``."""
    workdir = Path(tempfile.mkdtemp(prefix="dpop-bench-service-"))
    process, port, api_key = start_service(key, pin, workdir)
    began = time.perf_counter()
    rows: list[Row] = []
    try:
        for connections in levels:
            print(f"  {label}, {connections} connection(s) ...", file=sys.stderr, flush=True)
            health, proof = build_requests(port, api_key)
            for endpoint in (health, proof):  # warm-up: connections, the HSM session, caches
                asyncio.run(load(port, endpoint.request, connections, 0.3))
            signed = sign_seconds(port)
            for _ in range(rounds):
                for endpoint in (health, proof):
                    cpu_before = server_cpu(process.pid)
                    rate, latencies, errors = asyncio.run(
                        load(port, endpoint.request, connections, seconds)
                    )
                    cpu = server_cpu(process.pid) - cpu_before
                    endpoint.cpu.append(cpu / max(1, len(latencies)))
                    endpoint.rates.append(rate)
                    endpoint.latencies += latencies
                    endpoint.errors += errors
                if time.perf_counter() - began > BUDGET:
                    break
            total, count = sign_seconds(port)
            sign = (total - signed[0]) / max(1, count - signed[1])
            ratios = [p / h for p, h in zip(proof.rates, health.rates, strict=True)]
            # If /v1/proof cost exactly one /healthz plus one signature on the event loop, the
            # ratio would be 1 / (1 + sign x healthz rate): the limit the key itself sets.
            ceiling = 1 / (1 + sign * statistics.median(health.rates))
            rows.append(
                Row(
                    section=SECTION,
                    name=f"POST /v1/proof, {label}, {connections} connection(s)",
                    value=f"{statistics.median(proof.rates):,.0f} req/s",
                    versus=f"GET /healthz ({statistics.median(health.rates):,.0f} req/s)",
                    ratio=statistics.median(ratios),
                    rounds=ratios,
                    target="≥ 0.70",
                    met=statistics.median(ratios) >= 0.70,
                    note=(
                        f"proof p50 {pct(proof.latencies, 0.5):.2f} / p99 "
                        f"{pct(proof.latencies, 0.99):.2f} ms, healthz p50 "
                        f"{pct(health.latencies, 0.5):.2f} / p99 "
                        f"{pct(health.latencies, 0.99):.2f} ms; server CPU "
                        f"{statistics.median(proof.cpu) * 1e6:.0f} vs "
                        f"{statistics.median(health.cpu) * 1e6:.0f} µs/req; "
                        f"sign {sign * 1e6:.0f} µs in the server, ceiling {ceiling:.2f}; "
                        f"errors {proof.errors + health.errors}"
                    ),
                )
            )
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def measure_workers(key: str, pin: str | None, rounds: int, seconds: float) -> Row:
    """``--workers 2`` against one worker, /v1/proof at 8 connections, interleaved rounds."""
    print("  --workers 2 against 1 ...", file=sys.stderr, flush=True)
    services = []
    try:
        for workers in (1, 2):
            workdir = Path(tempfile.mkdtemp(prefix="dpop-bench-workers-"))
            process, port, api_key = start_service(
                key, pin, workdir, ("--workers", str(workers), "--log-level", "warning")
            )
            services.append((process, port, build_requests(port, api_key)[1], workdir))
        for _, port, proof, _ in services:
            asyncio.run(load(port, proof.request, 8, 0.5))  # warm-up, every worker's session
        for _ in range(rounds):
            for _, port, proof, _ in services:
                rate, _, errors = asyncio.run(load(port, proof.request, 8, seconds))
                proof.rates.append(rate)
                proof.errors += errors
        one, two = services[0][2], services[1][2]
        ratios = [b / a for a, b in zip(one.rates, two.rates, strict=True)]
        return Row(
            section=SECTION,
            name="POST /v1/proof, SoftHSM2 key, --workers 2, 8 connections",
            value=f"{statistics.median(two.rates):,.0f} req/s",
            versus=f"--workers 1 ({statistics.median(one.rates):,.0f} req/s)",
            ratio=statistics.median(ratios),
            rounds=ratios,
            target="≥ 1.60",
            met=statistics.median(ratios) >= 1.6,
            note=f"errors {one.errors + two.errors}; the load client shares the 2 cores; "
            "audit lines off (--log-level warning) in both",
        )
    finally:
        for process, _, _, workdir in services:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str]) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench service")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per endpoint per round")
    parser.add_argument("--connections", default="1,8", help="comma-separated concurrency levels")
    parser.add_argument("--no-pem", action="store_true", help="skip the PEM-key service")
    args, _ = parser.parse_known_args(argv)
    rounds = max(1, min(args.rounds, 10))
    seconds = max(0.2, min(args.seconds, 5.0))
    levels = [max(1, min(int(c), 64)) for c in args.connections.split(",")]

    key = bench_key()
    try:
        rows = measure_service("SoftHSM2 key", key.uri, key.pin, levels, rounds, seconds)
        rows.append(measure_workers(key.uri, key.pin, rounds, seconds))
    finally:
        key.cleanup()
    if not args.no_pem:
        # The same service with an in-memory key: what the service costs apart from the HSM.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        pem_dir = Path(tempfile.mkdtemp(prefix="dpop-bench-pem-"))
        try:
            pem = pem_dir / "key.pem"
            pem.write_bytes(
                ec.generate_private_key(ec.SECP256R1()).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            pem.chmod(0o600)
            rows += measure_service("PEM key", str(pem), None, levels, rounds, seconds)
        finally:
            shutil.rmtree(pem_dir, ignore_errors=True)
    for row in rows:
        if "PEM key" in row.name:
            row.target, row.met = "", None  # the aim is for the HSM-backed service
    return rows
