"""What a shared token store costs on the hot path (a cached token), as ratios from one run.

`DPoPAuth` with ``redis://`` and ``sqlite:`` against ``memory`` (issue 12).

Every variant is a `DPoPAuth` on the same PEM key with its token already cached, making
``Authorization``/``DPoP`` headers (`DPoPAuth.headers`: a proof signed per call) in
interleaved rounds (`bench.report.interleave`). The store is asked only where a process would
fetch or renew, never per request, so the ratios should be ~1.00: a lower one means a store
call leaked onto the hot path. The token comes from the local authorization server; Redis is
a ``redis-server`` started here on a free loopback port (skipped when it is not installed).

    python -m bench stores --rounds=7 --seconds=0.3
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.report import Row, Variant, compare, interleave

SECTION = "Token store on the hot path (cached token)"
URL = "https://api.example/v1/things"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """A ``redis-server`` without persistence on a free loopback port, or None if absent."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    process.terminate()
    process.wait(5.0)
    return None


def main(argv: list[str]) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench stores")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3)
    args, _ = parser.parse_known_args(argv)

    from dpop_signer import DPoPAuth, generate_key, load_signer
    from dpop_signer.testing.servers import start_local_servers

    workdir = Path(tempfile.mkdtemp(prefix="dpop-bench-stores-"))
    redis = start_redis(workdir)
    rows: list[Row] = []
    auths: list[DPoPAuth] = []
    try:
        generate_key(str(workdir / "key.pem"))
        signer = load_signer(str(workdir / "key.pem"))
        stores = {"memory": "memory", "sqlite:": f"sqlite:{workdir / 'tokens.db'}"}
        if redis is not None:
            stores["redis://"] = redis[1]
        with start_local_servers() as servers, httpx.Client(timeout=10.0) as client:
            variants = []
            for name, store in stores.items():
                auth = DPoPAuth(
                    signer,
                    token_url=servers.token_url,
                    client_id=servers.client_id,
                    client_secret=servers.client_secret,
                    token_store=store,
                )
                auths.append(auth)
                auth.get_token(client)

                def make(auth: DPoPAuth = auth) -> object:
                    return auth.headers(client, "GET", URL)

                variants.append(Variant(f"DPoPAuth.headers, token_store={name}", make))
            interleave(variants, args.rounds, args.seconds, budget=60.0)
            requests = servers.authorization_server.token_requests
        memory = variants[0]
        for variant in variants[1:]:
            rows.append(
                compare(
                    SECTION,
                    variant,
                    memory,
                    "headers/s",
                    target=0.90,  # the store is not on this path; noise on a shared box
                    note=f"token requests in the run: {requests} (one per store: cached after)",
                )
            )
        if redis is None:
            rows.append(Row(SECTION, "token_store=redis://", "skipped: no redis-server"))
    finally:
        for auth in auths:
            auth.close()
        if redis is not None:
            redis[0].terminate()
            redis[0].wait(5.0)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    from bench.report import render

    print(render(main(sys.argv[1:])))
