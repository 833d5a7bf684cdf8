"""Callers during a token endpoint stall: latency percentiles, with and without a cached token.

The local authorization server stalls every token request for ``--stall`` seconds (the
``stall_until`` switch of ``tests/fault_servers.py``; default 5 s, the issue's figure) while
``--callers`` callers (default 20) ask `DPoPAuth.aheaders` for headers in a loop, as
``dpop serve``'s ``/v1/headers`` does, on one `httpx.AsyncClient` with ``--timeout`` seconds
(default 2). Two runs:

* no cached token: every call needs a token; the first fetch times out, its failure is shared,
  and the backoff answers the rest at once (failures are expected; their latency is the point);
* a valid token cached and due for renewal: the renewal fails during the stall, the valid
  token keeps being used; no call may fail.

A row gives p50, and p90/p99/max, calls, failures and token requests in the note. The clock of
the auth and of the servers is moved on 31 s to make a 60 s token due for renewal, instead of
waiting. Bounded: about two stalls plus a second or two.

    python -m bench outage --stall=5 --timeout=2 --callers=20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from tests.fault_servers import start_fault_servers

from bench.report import Row
from dpop_signer import DPoPAuth
from dpop_signer.errors import DPoPSignerError
from dpop_signer.signers.pem import PemSigner
from dpop_signer.testing.servers import LocalServers

SECTION = "Token endpoint stall"


class _Clock:
    """Real time plus an offset; the servers' clocks move with it."""

    def __init__(self, servers: LocalServers) -> None:
        self.offset = 0.0
        self._servers = servers

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        for server in self._servers.servers:
            server.clock_skew = self.offset


async def _callers(
    auth: DPoPAuth, client: httpx.AsyncClient, url: str, callers: int, until: float
) -> tuple[list[float], int]:
    """Latencies (s) of every call until ``until`` (time.time()), and how many failed."""
    latencies: list[float] = []
    failed = 0

    async def caller() -> None:
        nonlocal failed
        for _ in range(100_000):  # bounded; the deadline ends it long before
            started = time.monotonic()
            try:
                await auth.aheaders(client, "GET", url)
            except (DPoPSignerError, httpx.HTTPError):
                failed += 1
            latencies.append(time.monotonic() - started)
            if time.time() >= until:
                return
            await asyncio.sleep(0.02)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies, failed


def _run(cached: bool, stall: float, timeout: float, callers: int) -> Row:
    signer = PemSigner(ec.generate_private_key(ec.SECP256R1()), source="bench key")
    with start_fault_servers(token_lifetime=60) as servers:
        clock = _Clock(servers)
        auth = DPoPAuth(
            signer,
            token_url=servers.token_url,
            client_id=servers.client_id,
            client_secret=servers.client_secret,
            clock=clock,
        )
        url = f"{servers.api_url}/x"

        async def main() -> tuple[list[float], int]:
            async with httpx.AsyncClient(timeout=timeout) as client:
                if cached:
                    await auth.aget_token(client)
                    clock.advance(31.0)  # 60 s token: renewal due after 30 s, valid until 59 s
                until = servers.authorization_server.stall_until = time.time() + stall
                return await _callers(auth, client, url, callers, until)

        latencies, failed = asyncio.run(asyncio.wait_for(main(), stall + 4 * timeout + 30))
        token_requests = servers.authorization_server.token_requests
    ms = sorted(1000 * s for s in latencies)
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    name = "valid token cached, renewal due" if cached else "no cached token"
    return Row(
        section=SECTION,
        name=f"{callers} callers, {name}",
        value=f"p50 {_ms(cuts[49])}",
        note=f"p90 {_ms(cuts[89])}, p99 {_ms(cuts[98])}, max {_ms(ms[-1])}; "
        f"{len(ms)} calls, {failed} failed; {token_requests} token requests "
        f"(stall {stall:g} s, timeout {timeout:g} s)",
    )


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 10 else f"{value:,.0f} ms"


def main(argv: list[str]) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench outage")
    parser.add_argument("--stall", type=float, default=5.0, help="seconds (1-30)")
    parser.add_argument("--timeout", type=float, default=2.0, help="client timeout (0.2-10)")
    parser.add_argument("--callers", type=int, default=20, help="concurrent callers (1-200)")
    args, _ = parser.parse_known_args(argv)
    stall = max(1.0, min(args.stall, 30.0))
    timeout = max(0.2, min(args.timeout, 10.0))
    callers = max(1, min(args.callers, 200))
    rows = [_run(cached, stall, timeout, callers) for cached in (False, True)]
    print(f"outage: 2 runs of {stall:g} s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    from bench.report import render

    print(render(main(sys.argv[1:])))
