"""DPoP proofs per second, and httpx requests per second with `DPoPAuth`.

Proofs (one thread, the same P-256 key for the three in-memory paths):

* ``DPoPProofBuilder.build`` with a `PemSigner` (an API-request proof: ``ath``, no nonce);
* raw ``cryptography`` sign + DER -> r||s of a signing input of the same length: the floor;
* PyJWT building the same proof (``jwt.encode`` with the key object, header ``typ``/``jwk``,
  ``jti``/``htm``/``htu``/``iat``/``ath``; ``ath`` precomputed, which favours PyJWT);
* ``DPoPProofBuilder.build`` with the SoftHSM2 `Pkcs11Signer` against raw python-pkcs11
  ``key.sign(sha256, mechanism=ECDSA)`` on the same token key.

HTTP: sequential ``httpx.Client.get`` against a loopback server in a subprocess (uvicorn, a
minimal app that does not verify anything, so only the client's cost differs): with `DPoPAuth`
(token cached; a fresh proof per request) against a fixed ``Authorization: Bearer`` header.
Every client keeps one persistent connection to the same server and URL. One more row, for
diagnosis only, sends the Bearer header plus a fixed, pre-built ``DPoP`` header: what a proof's
~0.5 KB costs on the wire and in the server, without signing (the server shares the 2 cores).

Variants run in interleaved rounds; the tables show medians and per-round ratios. Many short
rounds rather than a few long ones: on a shared machine the median of per-round ratios is then
steadier. Every comparison runs in its own rotation (the proofs against their two
baselines, the SoftHSM2 pair, each HTTP variant with the Bearer client). About 50 s.

    python -m bench client --rounds=9 --seconds=0.3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bench.signers import temp_token

URL = "https://api.example.com/v1/things?page=2"
HTU = "https://api.example.com/v1/things"
TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"  # RFC 9449 §7.1 example token
ROOT = Path(__file__).resolve().parent.parent
SLICE = 0.005
"""Seconds per slice of one variant's calls in `interleave`."""


@dataclass
class Variant:
    name: str
    run: Callable[[], object]
    rates: list[float] = field(default_factory=list)


def interleave(variants: list[Variant], rounds: int, seconds: float, budget: float) -> None:
    """Per round, every variant runs ``seconds`` in total, in alternating slices of ~SLICE s.

    Slices of a few milliseconds, not one block per variant: a burst of load from another
    process on a shared machine then hits every variant of the round about equally, so the
    per-round ratios measure the code rather than the neighbours. The order of the slices is
    shuffled on every pass, because the first calls after a switch run with cold caches
    (a SoftHSM2 signature right after ``cryptography`` ones was measured ~6 % slower): in a
    fixed order the same variant would always pay for it.
    """
    clock = time.perf_counter
    began = clock()
    batches = []
    for v in variants:
        v.run()  # warm-up: token fetched, connections open, caches filled
        start = clock()
        for _ in range(10):
            v.run()
        per_call = (clock() - start) / 10
        batches.append(max(1, round(SLICE / per_call)))
    shuffle = random.Random(9449).shuffle  # seeded: the same schedule on every run
    order = list(range(len(variants)))
    for _ in range(rounds):
        spent = [0.0] * len(variants)
        calls = [0] * len(variants)
        while min(spent) < seconds:
            shuffle(order)
            for i in order:
                run, batch = variants[i].run, batches[i]
                start = clock()
                for _ in range(batch):
                    run()
                spent[i] += clock() - start
                calls[i] += batch
        for i, v in enumerate(variants):
            v.rates.append(calls[i] / spent[i])
        if clock() - began > budget:
            break


def table(title: str, unit: str, pairs: list[tuple[Variant, Variant]]) -> None:
    print(f"\n{title}\n")
    print(f"| path | median {unit} | vs | ratio (median of per-round ratios) | per round |")
    print("|---|---|---|---|---|")
    for ours, other in pairs:
        ratios = [a / b for a, b in zip(ours.rates, other.rates, strict=True)]
        print(
            f"| {ours.name} | {statistics.median(ours.rates):,.0f} | {other.name} "
            f"({statistics.median(other.rates):,.0f}) | {statistics.median(ratios):.2f} | "
            f"{' '.join(f'{r:.2f}' for r in ratios)} |"
        )


# -- proofs ------------------------------------------------------------------------------------


def proof_variants(ec_key: ec.EllipticCurvePrivateKey) -> tuple[list[Variant], Any]:
    import jwt

    from dpop_signer import PemSigner
    from dpop_signer.proof import DPoPProofBuilder, access_token_hash

    builder = DPoPProofBuilder(PemSigner(ec_key, source="bench key"))
    sample = builder.build("GET", URL, access_token=TOKEN)
    message = sample.rsplit(".", 1)[0].encode("ascii")
    algorithm = ec.ECDSA(hashes.SHA256())

    def raw() -> bytes:
        r, s = decode_dss_signature(ec_key.sign(message, algorithm))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    headers = {"typ": "dpop+jwt", "jwk": dict(builder.signer.public_jwk)}
    ath = access_token_hash(TOKEN)

    def pyjwt() -> str:
        claims = {
            "jti": secrets.token_urlsafe(16),
            "htm": "GET",
            "htu": HTU,
            "iat": int(time.time()),
            "ath": ath,
        }
        return jwt.encode(claims, ec_key, algorithm="ES256", headers=headers)

    # PyJWT's proof must be the same proof (same header and claim names) to be a fair match.
    decoded = jwt.api_jws.get_unverified_header(pyjwt())
    assert decoded["typ"] == "dpop+jwt", decoded
    assert decoded["jwk"] == headers["jwk"], decoded

    ours = Variant(
        "DPoPProofBuilder.build (PemSigner)", lambda: builder.build("GET", URL, access_token=TOKEN)
    )
    return [
        ours,
        Variant("cryptography raw sign + DER->r||s", raw),
        Variant("PyJWT jwt.encode", pyjwt),
    ], sample


def hsm_variants(uri: str, pin: str | None) -> tuple[list[Variant], Callable[[], None]]:
    from pkcs11 import KeyType, Mechanism, ObjectClass

    from dpop_signer.proof import DPoPProofBuilder
    from dpop_signer.signers.pkcs11 import open_pkcs11_signer
    from dpop_signer.signers.pkcs11_uri import parse_pkcs11_uri

    hsm = open_pkcs11_signer(uri, pin=pin)
    builder = DPoPProofBuilder(hsm)
    message = builder.build("GET", URL, access_token=TOKEN).rsplit(".", 1)[0].encode("ascii")
    module = hsm.module
    opened = parse_pkcs11_uri(hsm.uri)

    def raw_session() -> tuple[Any, Any]:
        # Its own session on the same key (our signer holds the token's login).
        session = module.lib.get_token(token_label=opened.token).open()
        key = session.get_key(
            ObjectClass.PRIVATE_KEY, KeyType.EC, label=opened.object, id=opened.id
        )
        return session, key

    session, raw_key = module.call(raw_session)

    def raw() -> bytes:
        # Variants never overlap, so this thread is the only one in the module.
        return bytes(raw_key.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA))

    def close() -> None:
        module.call(session.close)
        hsm.close()

    variants = [
        Variant(
            "DPoPProofBuilder.build (Pkcs11Signer, SoftHSM2)",
            lambda: builder.build("GET", URL, access_token=TOKEN),
        ),
        Variant("python-pkcs11 raw key.sign", raw),
    ]
    return variants, close


# -- HTTP --------------------------------------------------------------------------------------


async def _token(request: Request) -> Response:
    return JSONResponse({"access_token": TOKEN, "token_type": "DPoP", "expires_in": 3600})


async def _api(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/token", _token, methods=["POST"]), Route("/api", _api)])
"""The loopback server: ``python -m uvicorn bench.client:app``; verifies nothing on purpose."""


def start_server() -> tuple[subprocess.Popen[bytes], str]:
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


def http_variants(
    base: str, signers: dict[str, Any]
) -> tuple[list[Variant], Variant, Callable[[], None]]:
    import httpx

    from dpop_signer import DPoPAuth

    def getter(client: httpx.Client) -> Callable[[], object]:
        return lambda: client.get(f"{base}/api")

    clients: list[httpx.Client] = []
    variants = []
    for name, signer in signers.items():
        auth = DPoPAuth(signer, token_url=f"{base}/token", client_id="bench", client_secret="x")
        clients.append(httpx.Client(auth=auth))
        variants.append(Variant(f"httpx + DPoPAuth ({name})", getter(clients[-1])))
    clients.append(httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}))
    variants.append(Variant("httpx + fixed Bearer header", getter(clients[-1])))
    # A real proof of the same size, built once: the wire and server share of a proof's cost.
    first = clients[0]
    assert isinstance(first.auth, DPoPAuth)
    proof = first.auth.headers(first, "GET", f"{base}/api")["DPoP"]
    clients.append(httpx.Client(headers={"Authorization": f"Bearer {TOKEN}", "DPoP": proof}))
    wire = Variant("httpx + fixed Bearer + fixed DPoP header (no signing)", getter(clients[-1]))

    def close() -> None:
        for client in clients:
            client.close()

    return variants, wire, close


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench client")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.3, help="per variant per round")
    parser.add_argument("--no-hsm", action="store_true", help="skip the SoftHSM2 variants")
    args = parser.parse_args(argv)
    rounds = max(1, min(args.rounds, 20))
    seconds = max(0.05, min(args.seconds, 2.0))

    from dpop_signer import PemSigner

    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = PemSigner(ec_key, source="bench key")
    workdir = None
    closers: list[Callable[[], None]] = []
    hsm_pairs: list[Variant] = []
    http_pairs: list[tuple[Variant, Variant]] = []
    signers: dict[str, Any] = {"PemSigner": pem}
    server = None
    try:
        proofs, sample = proof_variants(ec_key)
        if not args.no_hsm:
            key_ref = os.environ.get("DPOP_KEY", "")
            if os.environ.get("SOFTHSM2_CONF") and key_ref.startswith("pkcs11:"):
                uri, pin = key_ref, os.environ.get("DPOP_PIN")
            else:
                workdir, uri, pin = temp_token()
            hsm_pairs, close = hsm_variants(uri, pin)
            closers.append(close)
            from dpop_signer.signers.pkcs11 import open_pkcs11_signer

            http_hsm = open_pkcs11_signer(uri, pin=pin)
            closers.append(http_hsm.close)
            signers["Pkcs11Signer, SoftHSM2"] = http_hsm
        # Each comparison in its own rotation: like with like, no third party in between.
        interleave(proofs, rounds, seconds, budget=20)
        if hsm_pairs:
            interleave(hsm_pairs, rounds, seconds, budget=15)

        server, base = start_server()
        http, wire, close = http_variants(base, signers)
        closers.append(close)
        bearer = http[-1]
        for ours in [*http[:-1], wire]:
            # Each against its own Bearer measurements, in a rotation of just the two: a
            # SoftHSM2 signature in between would leave cold caches to the in-memory one.
            baseline = Variant(bearer.name, bearer.run)
            interleave([ours, baseline], rounds, seconds * 2, budget=15)
            http_pairs.append((ours, baseline))
    finally:
        for close in reversed(closers):
            close()
        if server is not None:
            server.terminate()
            server.wait(10)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\n{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{len(proofs[0].rates)} interleaved rounds; proof size {len(sample)} bytes"
    )
    ours, raw, pyjwt = proofs
    pairs = [(ours, raw), (ours, pyjwt)]
    if hsm_pairs:
        pairs.append((hsm_pairs[0], hsm_pairs[1]))
    table("DPoP proofs per second (one thread)", "proofs/s", pairs)
    table(
        "httpx requests per second, sequential, loopback server in a subprocess",
        "req/s",
        http_pairs,
    )
    return 0
