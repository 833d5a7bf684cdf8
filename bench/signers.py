"""Signatures per second: our signers against the raw library calls they wrap, on the same key.

* ``PemSigner.sign`` vs ``cryptography``'s ``key.sign(ECDSA(SHA256))`` + DER -> r||s, same key.
* ``Pkcs11Signer.sign`` vs python-pkcs11's ``key.sign(sha256, mechanism=ECDSA)`` on the same token
  key. With 4 threads the raw path takes a lock around each call: without one, two threads in
  SoftHSM2 corrupt memory (DESIGN.md), so "raw + lock" is the fastest safe raw baseline. Ours
  holds the module's lock the same way.

Variants run in interleaved rounds (each round runs every variant once, for a fixed time), so
drift in machine load hits all of them alike; the table shows medians and the per-round ratios.
Uses the development token when ``SOFTHSM2_CONF`` and ``DPOP_KEY`` are set (``make bench``
sources ``.softhsm/dev.env``), else a throw-away token in a temporary directory.

    python -m bench signers --rounds=5 --seconds=0.5
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

MESSAGE = b"eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2In0.eyJqdGkiOiJ4In0"  # a short signing input
THREADS = (1, 4)


@dataclass
class Variant:
    name: str
    threads: int
    sign: Callable[[], object]
    rates: list[float] = field(default_factory=list)


def measure(sign: Callable[[], object], threads: int, seconds: float) -> float:
    """Signatures per second of ``sign`` called in a loop by ``threads`` threads."""
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def loop(slot: int) -> None:
        start.wait()
        n = 0
        end = deadline[0]
        while True:
            for _ in range(20):  # check the clock every 20 signatures
                sign()
            n += 20
            if time.perf_counter() >= end:
                break
        counts[slot] = n

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for worker in workers:
        worker.join(timeout=seconds + 30)
    return sum(counts) / (time.perf_counter() - began)


def measure_async(signer: Any, tasks: int, seconds: float) -> float:
    """Signatures per second of ``tasks`` asyncio tasks awaiting ``signer.sign_async``."""

    async def main() -> int:
        end = time.perf_counter() + seconds
        done = 0

        async def task() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await signer.sign_async(MESSAGE)
                done += 1

        await asyncio.gather(*(task() for _ in range(tasks)))
        return done

    began = time.perf_counter()
    done = asyncio.run(main())
    return done / (time.perf_counter() - began)


def raw_cryptography(key: ec.EllipticCurvePrivateKey) -> Callable[[], bytes]:
    algorithm = ec.ECDSA(hashes.SHA256())

    def sign() -> bytes:
        r, s = decode_dss_signature(key.sign(MESSAGE, algorithm))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def temp_token() -> tuple[str, str, str]:
    """A throw-away SoftHSM2 token with a key made by our generate_key: (dir, uri, pin)."""
    from dpop_signer.signers.pkcs11_uri import find_softhsm2_module

    module = find_softhsm2_module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        raise SystemExit("SoftHSM2 is not installed (apt-get install softhsm2)")
    workdir = tempfile.mkdtemp(prefix="dpop-bench-")
    Path(workdir, "tokens").mkdir()
    conf = Path(workdir, "softhsm2.conf")
    conf.write_text(
        f"directories.tokendir = {workdir}/tokens\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            "dpop-bench",
            "--pin",
            "1234",
            "--so-pin",
            "12345678",
        ],
        check=True,
        capture_output=True,
    )
    uri = f"pkcs11:token=dpop-bench;object=bench-es256?module-path={module}"
    from dpop_signer import generate_key

    generate_key(uri, pin="1234").close()  # type: ignore[attr-defined]
    return workdir, uri, "1234"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench signers")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="per variant per round")
    args = parser.parse_args(argv)
    rounds = max(1, min(args.rounds, 20))
    seconds = max(0.05, min(args.seconds, 2.0))

    from pkcs11 import KeyType, Mechanism, ObjectClass

    from dpop_signer import PemSigner
    from dpop_signer.signers.pkcs11 import Pkcs11Signer, open_pkcs11_signer
    from dpop_signer.signers.pkcs11_uri import parse_pkcs11_uri

    workdir = None
    key_ref = os.environ.get("DPOP_KEY", "")
    if os.environ.get("SOFTHSM2_CONF") and key_ref.startswith("pkcs11:"):
        uri, pin, source = key_ref, os.environ.get("DPOP_PIN"), "development token (dev.env)"
    else:
        workdir, uri, pin = temp_token()
        source = "temporary SoftHSM2 token"

    try:
        # The PEM signer and the raw cryptography path share one key.
        ec_key = ec.generate_private_key(ec.SECP256R1())
        pem = PemSigner(ec_key, source="bench key")
        hsm: Pkcs11Signer = open_pkcs11_signer(uri, pin=pin)
        module = hsm.module
        opened = parse_pkcs11_uri(hsm.uri)

        # The raw python-pkcs11 path: the same token key, through its own session (opened
        # without a PIN: our open signer holds the token's login for the application).
        def raw_session() -> tuple[Any, Any]:
            token = module.lib.get_token(token_label=opened.token)
            session = token.open()
            key = session.get_key(
                ObjectClass.PRIVATE_KEY, KeyType.EC, label=opened.object, id=opened.id
            )
            return session, key

        session, raw_key = module.call(raw_session)
        raw_lock = threading.Lock()

        def raw_pkcs11() -> bytes:
            digest = hashlib.sha256(MESSAGE).digest()
            # Called only when our worker is idle (variants never overlap); the lock keeps
            # the 4 raw threads from entering SoftHSM2 together.
            with raw_lock:
                return bytes(raw_key.sign(digest, mechanism=Mechanism.ECDSA))

        def ours_pem() -> bytes:
            return pem.sign(MESSAGE)

        def ours_hsm() -> bytes:
            return hsm.sign(MESSAGE)

        raw_pem = raw_cryptography(ec_key)
        variants = []
        for threads in THREADS:
            variants += [
                Variant("PemSigner.sign", threads, ours_pem),
                Variant("cryptography raw sign + DER->r||s", threads, raw_pem),
                Variant("Pkcs11Signer.sign", threads, ours_hsm),
                Variant("python-pkcs11 raw key.sign (lock)", threads, raw_pkcs11),
            ]
        async_rates: list[float] = []

        for v in variants:  # warm-up, and a check that every path signs 64 bytes
            assert len(v.sign()) == 64  # type: ignore[arg-type]
        budget_start = time.perf_counter()
        for _ in range(rounds):
            for v in variants:
                v.rates.append(measure(v.sign, v.threads, seconds))
            async_rates.append(measure_async(hsm, 64, seconds))
            if time.perf_counter() - budget_start > 50:
                break  # stay well inside a minute whatever the options say

        module.call(session.close)
        hsm.close()
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\nES256 signatures/s: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {len(variants[0].rates)} interleaved rounds x {seconds:g} s, "
        f"PKCS#11 on the {source}\n"
    )
    print("| path | threads | median sig/s | ours / raw (median of per-round ratios) | per round |")
    print("|---|---|---|---|---|")
    for i in range(0, len(variants), 2):
        ours, raw = variants[i], variants[i + 1]
        ratios = [a / b for a, b in zip(ours.rates, raw.rates, strict=True)]
        print(
            f"| {ours.name} | {ours.threads} | {statistics.median(ours.rates):,.0f} | "
            f"{statistics.median(ratios):.2f} | {' '.join(f'{r:.2f}' for r in ratios)} |"
        )
        print(f"| {raw.name} | {raw.threads} | {statistics.median(raw.rates):,.0f} | | |")
    print(
        f"| Pkcs11Signer.sign_async, 64 asyncio tasks | 1 loop | "
        f"{statistics.median(async_rates):,.0f} | | |"
    )
    return 0
