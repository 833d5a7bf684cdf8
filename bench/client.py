"""httpx requests per second with `DPoPAuth` against a fixed Bearer header, sync and async.

The server is a loopback uvicorn in a subprocess running `app` below: it issues a token at
``/token`` and answers ``/api`` with ``ok``, verifying nothing, so the only difference between
two clients is what the client does. Every client keeps one persistent connection to the same
server and URL.

* ``httpx.Client``: `DPoPAuth` (token cached, a fresh proof per request) with a `PemSigner`
  and with the SoftHSM2 `Pkcs11Signer`, each against a client that sends a fixed
  ``Authorization: Bearer`` header, in a rotation of just the two (a SoftHSM2 signature in
  between would leave cold caches to the in-memory one). Two more rows, for diagnosis: the
  Bearer header plus a fixed, pre-built ``DPoP`` header (what a proof's ~0.5 KB costs on the
  wire and in the server, without signing), and the same client signing a proof's signing
  input with the same key before each request: the floor for any client that sends a fresh
  proof per request; `DPoPAuth`'s own cost is the gap between it and `DPoPAuth`'s row.
* ``httpx.AsyncClient``: the same pair, one request at a time on one event loop
  (``run_until_complete`` per request; both sides pay for it alike).
* Every `DPoPAuth` row of both runs twice, with ``proofs_ahead`` off and on
  (`dpop_signer.ahead`): repeated GETs of one URL, so from the third call on each request
  takes the proof signed after the previous response, while the client handled that response.
* ``requests`` with `DPoPRequestsAuth` and ``aiohttp`` with `DPoPMiddleware` (PEM key), each
  against the same library sending a fixed Bearer header: every driver's own ratio.
* 1,000 concurrent requests: a fresh `DPoPAuth` on an ``AsyncClient`` and 1,000 tasks started
  together, with no token yet and a token endpoint that takes 20 ms: single flight means
  exactly one token request (counted by the server, and by `DPoPAuth.token_requests`).

    python -m bench client --rounds=9 --seconds=0.3
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bench.hsm import bench_key
from bench.report import Row, Variant, compare, interleave

SECTION = "Client (httpx, loopback server)"
TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"  # RFC 9449 §7.1 example token
ROOT = Path(__file__).resolve().parent.parent
CONCURRENT = 1000
_token_requests = 0


async def _token(request: Request) -> Response:
    global _token_requests
    _token_requests += 1
    await asyncio.sleep(0.02)  # a real AS takes a while: the window in which callers pile up
    return JSONResponse({"access_token": TOKEN, "token_type": "DPoP", "expires_in": 3600})


async def _api(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _stats(request: Request) -> Response:
    return JSONResponse({"token_requests": _token_requests})


app = Starlette(
    routes=[
        Route("/token", _token, methods=["POST"]),
        Route("/api", _api),
        Route("/stats", _stats),
    ]
)
"""The loopback server: ``python -m uvicorn bench.client:app``; verifies nothing on purpose."""


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    """Start `app` on a free loopback port; the process and its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.client:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.terminate()
    process.wait(5)
    raise SystemExit("the loopback server did not start")


class FixedSignature:
    """A stand-in signer that returns one valid signature every time: DPoPAuth minus signing."""

    algorithm = "ES256"

    def __init__(self, signer: Any) -> None:
        self.public_jwk = signer.public_jwk
        self._signature: bytes = signer.sign(b"a proof-sized signing input")

    def sign(self, message: bytes) -> bytes:
        return self._signature


def _auth(signer: Any, base: str, **options: Any) -> Any:
    from dpop_signer import DPoPAuth

    return DPoPAuth(
        signer, token_url=f"{base}/token", client_id="bench", client_secret="x", **options
    )


AHEAD = {False: "proofs ahead off", True: "proofs ahead on"}
"""Each DPoPAuth row runs with ``proofs_ahead`` off and on (`dpop_signer.ahead`)."""


def sync_pairs(
    base: str, signers: dict[str, Any], closers: list[Callable[[], None]]
) -> list[tuple[Variant, Variant, float | None]]:
    """(ours, Bearer baseline, target) for ``httpx.Client``, including the wire-only row."""
    clients: list[httpx.Client] = []

    def getter(client: httpx.Client) -> Callable[[], object]:
        clients.append(client)
        return lambda: client.get(f"{base}/api")

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    pairs: list[tuple[Variant, Variant, float | None]] = []
    for name, (signer, target) in signers.items():
        for ahead, label in AHEAD.items():
            client = httpx.Client(auth=_auth(signer, base, proofs_ahead=ahead))
            ours = Variant(f"httpx.Client + DPoPAuth ({name}, {label})", getter(client))
            baseline = Variant("httpx.Client + fixed Bearer", getter(httpx.Client(headers=bearer)))
            pairs.append((ours, baseline, target))
    # A real proof of the same size, built once: the wire and server share of a proof's cost.
    first = clients[0]
    auth: Any = first.auth
    proof = auth.headers(first, "GET", f"{base}/api")["DPoP"]
    wire = Variant(
        "httpx.Client + fixed Bearer + fixed DPoP header (no signing; diagnosis)",
        getter(httpx.Client(headers={**bearer, "DPoP": proof})),
    )
    pairs.append(
        (wire, Variant("httpx.Client + fixed Bearer", getter(httpx.Client(headers=bearer))), None)
    )
    # The floor for any DPoP client on this machine: the request with the proof-sized header
    # plus one signature of a proof's signing input with the same key, and nothing else.
    signer = signers["PemSigner"][0]
    signed_client = httpx.Client(headers={**bearer, "DPoP": proof})
    clients.append(signed_client)
    message = proof.rsplit(".", 1)[0].encode("ascii")

    def sign_then_get() -> object:
        signer.sign(message)
        return signed_client.get(f"{base}/api")

    pairs.append(
        (
            Variant(
                "httpx.Client + fixed Bearer + fixed DPoP header + one PemSigner.sign (the floor)",
                sign_then_get,
            ),
            Variant("httpx.Client + fixed Bearer", getter(httpx.Client(headers=bearer))),
            None,
        )
    )
    # DPoPAuth without the signature, on the same sockets: its own cost in this loop.
    unsigned = Variant(
        "httpx.Client + DPoPAuth with a fixed signature (diagnosis)",
        getter(httpx.Client(auth=_auth(FixedSignature(signer), base, proofs_ahead=False))),
    )
    pairs.append(
        (
            unsigned,
            Variant("httpx.Client + fixed Bearer", getter(httpx.Client(headers=bearer))),
            None,
        )
    )
    closers.extend(client.close for client in clients)
    return pairs


def async_pairs(
    base: str, signers: dict[str, Any], closers: list[Callable[[], None]]
) -> list[tuple[Variant, Variant, float | None]]:
    """(ours, Bearer baseline, target) for ``httpx.AsyncClient`` on one private event loop."""
    loop = asyncio.new_event_loop()
    clients: list[httpx.AsyncClient] = []

    def getter(client: httpx.AsyncClient) -> Callable[[], object]:
        clients.append(client)
        return lambda: loop.run_until_complete(client.get(f"{base}/api"))

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    pairs: list[tuple[Variant, Variant, float | None]] = []
    for name, (signer, target) in signers.items():
        for ahead, label in AHEAD.items():
            ours = Variant(
                f"httpx.AsyncClient + DPoPAuth ({name}, {label})",
                getter(httpx.AsyncClient(auth=_auth(signer, base, proofs_ahead=ahead))),
            )
            baseline = Variant(
                "httpx.AsyncClient + fixed Bearer", getter(httpx.AsyncClient(headers=bearer))
            )
            pairs.append((ours, baseline, target))

    def close() -> None:
        for client in clients:
            loop.run_until_complete(client.aclose())
        loop.close()

    closers.append(close)
    return pairs


def driver_pairs(
    base: str, signer: Any, closers: list[Callable[[], None]]
) -> list[tuple[Variant, Variant, float | None]]:
    """``requests`` and ``aiohttp`` with their DPoP drivers, each against itself with Bearer."""
    import aiohttp
    import requests

    from dpop_signer.aiohttp import DPoPMiddleware
    from dpop_signer.requests import DPoPRequestsAuth

    options: dict[str, Any] = {
        "token_url": f"{base}/token",
        "client_id": "bench",
        "client_secret": "x",
    }
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{base}/api"
    dpop_session, plain_session = requests.Session(), requests.Session()
    plain_session.headers.update(bearer)
    auth = DPoPRequestsAuth(signer, session=dpop_session, proofs_ahead=False, **options)
    closers += [dpop_session.close, plain_session.close]
    pairs: list[tuple[Variant, Variant, float | None]] = [
        (
            Variant(
                "requests.Session + DPoPRequestsAuth (PemSigner)",
                lambda: dpop_session.get(url, auth=auth),
            ),
            Variant("requests.Session + fixed Bearer", lambda: plain_session.get(url)),
            0.85,
        )
    ]
    loop = asyncio.new_event_loop()

    async def sessions() -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        middleware = DPoPMiddleware(signer, proofs_ahead=False, **options)
        return (
            aiohttp.ClientSession(middlewares=(middleware,)),
            aiohttp.ClientSession(headers=bearer),
        )

    with_dpop, with_bearer = loop.run_until_complete(sessions())

    def fetch(session: aiohttp.ClientSession) -> Callable[[], object]:
        async def get() -> bytes:
            async with session.get(url) as response:
                return await response.read()

        return lambda: loop.run_until_complete(get())

    pairs.append(
        (
            Variant("aiohttp.ClientSession + DPoPMiddleware (PemSigner)", fetch(with_dpop)),
            Variant("aiohttp.ClientSession + fixed Bearer", fetch(with_bearer)),
            0.85,
        )
    )

    def close() -> None:
        loop.run_until_complete(with_dpop.close())
        loop.run_until_complete(with_bearer.close())
        loop.close()

    closers.append(close)
    return pairs


def own_cost_pair(signer: Any, closers: list[Callable[[], None]]) -> tuple[Variant, Variant]:
    """`DPoPAuth`'s own work per request, apart from signing and the network.

    Both clients use ``httpx.MockTransport`` (no sockets); ours signs with a stand-in that
    returns one fixed, valid signature, and the other is a minimal ``httpx.Auth`` that sets the
    same two headers to fixed values. The difference is what `DPoPAuth` adds: the token check,
    ``htu`` normalization, nonce lookup, proof assembly, the I/O-free flow and reading the
    response headers for nonces and ``Date``.
    """
    from dpop_signer import DPoPAuth

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            body = {"access_token": TOKEN, "token_type": "DPoP", "expires_in": 3600}
            return httpx.Response(200, json=body)
        return httpx.Response(200, text="ok")

    transport = httpx.MockTransport(answer)
    auth = DPoPAuth(
        FixedSignature(signer),
        token_url="https://as.test/token",
        client_id="bench",
        client_secret="x",
    )
    ours = httpx.Client(transport=transport, auth=auth)
    proof = auth.headers(ours, "GET", "https://api.test/api")["DPoP"]

    class TwoHeaders(httpx.Auth):
        def auth_flow(self, request: httpx.Request) -> Any:
            request.headers["Authorization"] = f"DPoP {TOKEN}"
            request.headers["DPoP"] = proof
            yield request

    other = httpx.Client(transport=transport, auth=TwoHeaders())
    closers += [ours.close, other.close]
    return (
        Variant(
            "httpx.Client + DPoPAuth, fixed signature, MockTransport (its own cost)",
            lambda: ours.get("https://api.test/api"),
        ),
        Variant(
            "httpx.Auth setting the same two headers, MockTransport",
            lambda: other.get("https://api.test/api"),
        ),
    )


class DelayedSigner:
    """A network HSM stand-in: the PEM signature after a fixed wait (the GIL is free meanwhile)."""

    algorithm = "ES256"

    def __init__(self, signer: Any, delay: float) -> None:
        self.public_jwk = signer.public_jwk
        self._signer = signer
        self._delay = delay

    def sign(self, message: bytes) -> bytes:
        time.sleep(self._delay)
        return self._signer.sign(message)  # type: ignore[no-any-return]


def latency_rows(base: str, signer: Any, calls: int) -> list[Row]:
    """Latency DPoP adds per call with a 2 ms signer, calls 10 ms apart, proofs ahead off/on.

    Three ``httpx.Client`` take turns, one call every 10/3 ms, so each one calls every 10 ms:
    the fixed Bearer header, and `DPoPAuth` on a `DelayedSigner` with ``proofs_ahead`` off and
    on. The added latency is a percentile of a DPoPAuth client minus the same percentile of
    the Bearer client.
    """
    delayed = DelayedSigner(signer, 0.002)
    clients = {
        "bearer": httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}),
        **{
            label: httpx.Client(auth=_auth(delayed, base, proofs_ahead=on))
            for on, label in AHEAD.items()
        },
    }
    times: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for client in clients.values():
            for _ in range(3):
                client.get(f"{base}/api")  # token, connection, the pair seen twice
        step = 0.010 / len(clients)
        next_at = time.perf_counter()
        for _ in range(calls):
            for name, client in clients.items():
                next_at += step
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                began = time.perf_counter()
                client.get(f"{base}/api")
                times[name].append(time.perf_counter() - began)
    finally:
        for client in clients.values():
            client.close()

    def pct(name: str, q: float) -> float:
        ordered = sorted(times[name])
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    rows = []
    for label in AHEAD.values():
        p50 = (pct(label, 0.5) - pct("bearer", 0.5)) * 1e3
        p99 = (pct(label, 0.99) - pct("bearer", 0.99)) * 1e3
        rows.append(
            Row(
                section=SECTION,
                name=f"httpx.Client + DPoPAuth, a signer taking 2 ms, calls 10 ms apart ({label})",
                value=f"p50 +{p50:.2f} ms",
                versus=f"httpx.Client + fixed Bearer (p50 {pct('bearer', 0.5) * 1e3:.2f} ms)",
                target="p50 added < 0.2 ms" if label == AHEAD[True] else "",
                met=p50 < 0.2 if label == AHEAD[True] else None,
                note=f"latency added by DPoP: p50 {p50:+.2f} ms, p99 {p99:+.2f} ms; "
                f"{calls} calls each",
            )
        )
    return rows


def concurrent_run(base: str, signer: Any) -> Row:
    """1,000 requests started together on a cold `DPoPAuth`: how many token requests."""
    before = httpx.get(f"{base}/stats").json()["token_requests"]
    auth = _auth(signer, base)

    async def run() -> tuple[list[int], float]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(auth=auth, limits=limits, timeout=60) as client:
            began = time.perf_counter()
            responses = await asyncio.gather(
                *(client.get(f"{base}/api", params={"i": i}) for i in range(CONCURRENT))
            )
            return [r.status_code for r in responses], time.perf_counter() - began

    statuses, seconds = asyncio.run(run())
    served = httpx.get(f"{base}/stats").json()["token_requests"] - before
    ok = statuses.count(200)
    return Row(
        section=SECTION,
        name=f"httpx.AsyncClient + DPoPAuth (PemSigner), {CONCURRENT:,} concurrent requests, "
        "no token yet",
        value=f"{served} token request(s)",
        versus="",
        target="exactly 1 token request",
        met=served == 1 and auth.token_requests == 1 and ok == CONCURRENT,
        note=f"{ok:,}/{CONCURRENT:,} answered 200 in {seconds:.2f} s "
        f"({CONCURRENT / seconds:,.0f} req/s, 100 connections); "
        f"DPoPAuth.token_requests = {auth.token_requests}",
    )


def main(argv: list[str]) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench client")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.3, help="per variant per round")
    parser.add_argument("--no-hsm", action="store_true", help="skip the SoftHSM2 variants")
    args, _ = parser.parse_known_args(argv)
    rounds = max(1, min(args.rounds, 20))
    seconds = max(0.05, min(args.seconds, 2.0))

    from cryptography.hazmat.primitives.asymmetric import ec

    from dpop_signer import PemSigner
    from dpop_signer.signers.pkcs11 import open_pkcs11_signer

    pem = PemSigner(ec.generate_private_key(ec.SECP256R1()), source="bench key")
    # The aim (≥ 0.85× Bearer) is for the in-memory key; the SoftHSM2 rows show what
    # a ~100 µs C_Sign adds, against the same baseline.
    signers: dict[str, tuple[Any, float | None]] = {"PemSigner": (pem, 0.85)}
    closers: list[Callable[[], None]] = []
    key = None if args.no_hsm else bench_key()
    rows: list[Row] = []
    server = None
    try:
        if key is not None:
            hsm = open_pkcs11_signer(key.uri, pin=key.pin)
            closers.append(hsm.close)
            signers["Pkcs11Signer, SoftHSM2"] = (hsm, None)
        server, base = start_server()
        pairs = sync_pairs(base, signers, closers) + async_pairs(base, signers, closers)
        pairs += driver_pairs(base, pem, closers)
        for ours, baseline, target in pairs:
            print(f"  {ours.name} ...", file=sys.stderr, flush=True)
            interleave([ours, baseline], rounds, seconds * 2, budget=15)
            rows.append(compare(SECTION, ours, baseline, "req/s", target=target))
        ours, other = own_cost_pair(pem, closers)
        print(f"  {ours.name} ...", file=sys.stderr, flush=True)
        interleave([ours, other], rounds, seconds, budget=10)
        extra = 1e6 / ours.median - 1e6 / other.median
        rows.append(compare(SECTION, ours, other, "req/s", note=f"{extra:.1f} µs per request"))
        print("  latency with a 2 ms signer ...", file=sys.stderr, flush=True)
        rows += latency_rows(base, pem, 300)
        print("  1,000 concurrent requests ...", file=sys.stderr, flush=True)
        rows.append(concurrent_run(base, pem))
    finally:
        for close in reversed(closers):
            close()
        if server is not None:
            server.terminate()
            server.wait(10)
        if key is not None:
            key.cleanup()
    return rows
