"""Peak RSS after 10,000 and after 100,000 proofs and requests: bounded caches do not grow.

Each workload runs in a fresh child interpreter (``python -m bench.memory --child NAME``), so
the peak resident set size it reports (``VmHWM``, see `peak_kib`) is its own and not
this process's, nor another workload's. The child first does a warm-up of 1,000 operations
(imports, the token fetch, the first allocations of every path and the caches' first fills are
then out of the way), then reads its peak RSS after 10,000 and after 100,000 operations:

* ``proofs-pem``: `DPoPProofBuilder` with a `PemSigner`, ``access_token`` and ``nonce`` set;
* ``proofs-softhsm2``: the same with the SoftHSM2 key of `bench.hsm.bench_key` (URI and PIN
  reach the child through its environment; the PIN is never printed);
* ``requests``: sequential ``httpx.Client.get`` with `DPoPAuth` (`PemSigner`) on real sockets
  against a loopback uvicorn server in another process, which issues a 20-second token at
  ``/token`` (so it is renewed every ~10 s, each time a new value) and answers ``/api/...``
  with 200 and a fresh ``DPoP-Nonce`` on every response, which the client learns and puts in
  its next proof. Sequential on purpose: on 2 cores an ``httpx.AsyncClient`` with 4 or 16
  tasks was measured slower (~690 and ~450 against ~950 requests/s).

Every operation has an ``htu`` that is new to the last few thousand (path ``i % 5000``, a query
that never repeats, one of 7 hosts for the proofs) and a nonce never seen before, and the access
token changes every 1,000 proofs: a per-URL, per-nonce or per-token cache without a bound would
grow with the count. Fair because only the count differs between the two readings, in the same
process.

Target ("no growth"): the 100,000 peak minus the 10,000 peak is below 2 MiB or below 5 % of the
10,000 peak, whichever is larger: ``growth < max(2 MiB, 0.05 * rss_10k)``. The allowance is for
the allocator (arenas are kept, fragmentation), not for a cache. A workload stops at its time cap
(the requests one at 150 s) and then reports how many operations it did. About 130-180 s.

    python -m bench memory --scale=0.1      # 1,000 and 10,000 operations, ~20 s
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import Row

if TYPE_CHECKING:
    from starlette.applications import Starlette

SECTION = "Memory (peak RSS)"
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"  # RFC 9449 §7.1 example token
WORKLOADS = ("proofs-pem", "proofs-softhsm2", "requests")
LABELS = {
    "proofs-pem": "proofs (PemSigner)",
    "proofs-softhsm2": "proofs (Pkcs11Signer, SoftHSM2)",
    "requests": "httpx requests (DPoPAuth, PemSigner)",
}
CAPS = {"proofs-pem": 30.0, "proofs-softhsm2": 45.0, "requests": 150.0}
"""Seconds a workload may run (its child stops there and reports what it did)."""
KEY_ENV = ("DPOP_BENCH_KEY_URI", "DPOP_BENCH_KEY_PIN")
MIB = 1024.0  # peak_kib is in KiB


def peak_kib() -> int:
    """This process's peak RSS so far, KiB: ``VmHWM`` from /proc, else ``ru_maxrss``.

    Not ``ru_maxrss`` where /proc exists: Linux carries it over ``exec`` from the forked copy
    of the parent, so every child started by a 90 MiB parent reported the same 93.5 MiB.
    ``VmHWM`` is the high-water mark of this program's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# -- the loopback server (its own process; its memory is not measured) -------------------------


def server_app() -> Starlette:
    """``uvicorn --factory bench.memory:server_app``: tokens, and a fresh nonce per response."""
    import itertools
    import secrets

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    prefix = secrets.token_urlsafe(6)
    nonces = itertools.count()
    tokens = itertools.count()

    async def token(request: Request) -> Response:
        # Short-lived, so the client renews it (a new value each time) during the run.
        value = f"{TOKEN}{next(tokens)}"
        return JSONResponse({"access_token": value, "token_type": "DPoP", "expires_in": 20})

    async def api(request: Request) -> Response:
        return PlainTextResponse("ok", headers={"DPoP-Nonce": f"{prefix}.{next(nonces)}"})

    return Starlette(routes=[Route("/token", token, methods=["POST"]), Route("/api/{n}", api)])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    # Not bench.client.start_server: that one serves bench.client:app, which sends no nonces.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "bench.memory:server_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
         "--no-access-log"],
        cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    stop(process)
    raise RuntimeError("the loopback server did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


# -- the child: one workload, its own peak RSS ---------------------------------------------------


def proof_op(signer: Any) -> Callable[[int], object]:
    from dpop_signer import DPoPProofBuilder

    builder = DPoPProofBuilder(signer)

    def op(i: int) -> object:
        url = f"https://api{i % 7}.example.com/v1/things/{i % 5000}?page={i}"
        token = f"{TOKEN}{i // 1000}"
        return builder.build("GET", url, access_token=token, nonce=f"n-{i}")

    return op


def workload_op(
    workload: str, base: str
) -> tuple[Callable[[int], object], Callable[[], str], list[Callable[[], None]]]:
    """The operation number ``i`` of ``workload``, a one-line summary, and what to close."""
    if workload == "proofs-softhsm2":
        from dpop_signer.signers.pkcs11 import open_pkcs11_signer

        hsm = open_pkcs11_signer(os.environ[KEY_ENV[0]], pin=os.environ.get(KEY_ENV[1]))
        return proof_op(hsm), lambda: "", [hsm.close]

    from cryptography.hazmat.primitives.asymmetric import ec

    from dpop_signer import PemSigner

    pem = PemSigner(ec.generate_private_key(ec.SECP256R1()), source="bench key")
    if workload == "proofs-pem":
        return proof_op(pem), lambda: "", []

    import httpx

    from dpop_signer import DPoPAuth

    auth = DPoPAuth(pem, token_url=f"{base}/token", client_id="bench", client_secret="x")
    client = httpx.Client(auth=auth, timeout=10)

    def op(i: int) -> object:
        response = client.get(f"{base}/api/{i % 5000}?q={i}")
        response.raise_for_status()
        return response

    return op, lambda: f"{auth.token_requests} token requests", [client.close]


def child(argv: list[str]) -> int:
    """Run one workload and print its peak RSS readings as one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory --child")
    parser.add_argument("--child", choices=WORKLOADS, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--checkpoint", type=int, required=True)
    parser.add_argument("--total", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--base", default="")
    args = parser.parse_args(argv)
    op, summary, closers = workload_op(args.child, args.base)

    start = time.perf_counter()
    deadline = start + args.seconds
    clock = time.perf_counter
    done = 0

    def run_to(count: int) -> None:
        nonlocal done
        while done < count and clock() < deadline:
            op(done)
            done += 1

    try:
        setup = peak_kib()
        run_to(args.warmup)
        run_to(args.warmup + args.checkpoint)
        at_checkpoint = (done - args.warmup, peak_kib())
        run_to(args.warmup + args.total)
        result = {
            "setup_kib": setup,
            "checkpoint": at_checkpoint[0],
            "checkpoint_kib": at_checkpoint[1],
            "done": max(0, done - args.warmup),
            "done_kib": peak_kib(),
            "seconds": clock() - start,
            "capped": done < args.warmup + args.total,
            "extra": summary(),
        }
    finally:
        for close in closers:
            close()
    print(json.dumps(result))
    return 0


# -- the parent ----------------------------------------------------------------------------------


@dataclass
class Plan:
    warmup: int
    checkpoint: int
    total: int


def mib(kib: float) -> str:
    return f"{kib / MIB:.1f} MiB"


def run_child(
    workload: str, plan: Plan, seconds: float, env: dict[str, str], base: str = ""
) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "bench.memory", "--child", workload,
        "--warmup", str(plan.warmup), "--checkpoint", str(plan.checkpoint),
        "--total", str(plan.total), "--seconds", f"{seconds:.1f}",
    ]  # fmt: skip
    if base:
        command += ["--base", base]
    # The child's stderr is ours (progress, tracebacks); stdout carries its one JSON line.
    done = subprocess.run(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"child exited with status {done.returncode} (see stderr)")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def row(workload: str, plan: Plan, r: dict[str, Any]) -> Row:
    first, last = r["checkpoint_kib"], r["done_kib"]
    growth = last - first
    allowed = max(2 * MIB, 0.05 * first)
    reached = r["checkpoint"] == plan.checkpoint
    noun = "requests" if workload == "requests" else "proofs"
    notes = [
        f"growth {growth / MIB:+.1f} MiB (met when < max(2 MiB, 5 % of {mib(first)}) = "
        f"{allowed / MIB:.1f} MiB)",
        f"after setup {mib(r['setup_kib'])}, then {plan.warmup:,} warm-up {noun}",
        f"{r['seconds']:.0f} s",
    ]
    if r["extra"]:
        notes.append(r["extra"])
    if r["capped"]:
        notes.append(f"time cap hit: {r['done']:,} of {plan.total:,} done")
    if not reached:
        notes.append(f"cap hit before the {plan.checkpoint:,} reading: no verdict")
    return Row(
        section=SECTION,
        name=f"peak RSS, {r['done']:,} {LABELS[workload]}",
        value=mib(last),
        versus=f"after {r['checkpoint']:,} ({mib(first)})",
        ratio=last / first,
        target="< +2 MiB or +5 %",
        met=(growth < allowed) if reached else None,
        note="; ".join(notes),
    )


def failed(workload: str, why: str) -> Row:
    return Row(section=SECTION, name=f"peak RSS, {LABELS[workload]}", value="—", note=why)


def main(argv: list[str]) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench memory")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="operation counts times this (0.01-1)"
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {','.join(WORKLOADS)}"
    )
    parser.add_argument("--budget", type=float, default=200.0, help="seconds for all (30-300)")
    parser.add_argument("--no-hsm", action="store_true", help="skip proofs-softhsm2")
    args, _ = parser.parse_known_args(argv)
    scale = max(0.01, min(args.scale, 1.0))
    budget = max(30.0, min(args.budget, 300.0))
    chosen = [w for w in args.workloads.split(",") if w in WORKLOADS]
    if args.no_hsm and "proofs-softhsm2" in chosen:
        chosen.remove("proofs-softhsm2")
    plan = Plan(
        warmup=max(100, round(1_000 * scale)),
        checkpoint=max(1_000, round(10_000 * scale)),
        total=max(10_000, round(100_000 * scale)),
    )

    began = time.monotonic()
    rows: list[Row] = []
    for workload in chosen:
        left = budget - (time.monotonic() - began)
        # Keep ~15 s for the children's start-up and the server, and a later workload's share.
        later = sum(min(CAPS[w], 10.0) for w in chosen[chosen.index(workload) + 1 :])
        seconds = min(CAPS[workload], left - 15 - later)
        if seconds < 5:
            rows.append(failed(workload, "skipped: the time budget is spent"))
            continue
        print(f"memory: {workload}, up to {plan.total:,} ops, cap {seconds:.0f} s", file=sys.stderr)
        env = dict(os.environ)
        try:
            if workload == "proofs-softhsm2":
                rows.append(run_hsm(plan, seconds))
            elif workload == "requests":
                server, base = start_server()
                try:
                    rows.append(row(workload, plan, run_child(workload, plan, seconds, env, base)))
                finally:
                    stop(server)
            else:
                rows.append(row(workload, plan, run_child(workload, plan, seconds, env)))
        except (RuntimeError, SystemExit, subprocess.TimeoutExpired, ValueError) as exc:
            rows.append(failed(workload, f"failed: {exc}"))
    return rows


def run_hsm(plan: Plan, seconds: float) -> Row:
    from bench.hsm import bench_key

    key = bench_key()
    try:
        # bench_key may have set SOFTHSM2_CONF for a temporary token: pass it on too.
        env = {**os.environ, KEY_ENV[0]: key.uri, KEY_ENV[1]: key.pin}
        result = run_child("proofs-softhsm2", plan, seconds, env)
    finally:
        key.cleanup()
    r = row("proofs-softhsm2", plan, result)
    r.note += f"; {key.source}"
    return r


if __name__ == "__main__":
    if "--child" in sys.argv:
        sys.exit(child(sys.argv[1:]))
    from bench.report import render

    print(render(main(sys.argv[1:])))
