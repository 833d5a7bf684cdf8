"""``sessions=2`` against one session, through ``p11-kit-proxy.so``, 4 threads signing.

Several sessions sign at once only through a module safe for concurrent calls
(`dpop_signer.signers.pkcs11_pool`), and only in a process that does not also load the same
module directly: so this runs in a child process of its own, with a throw-away SoftHSM2 token.
Both signers sign in interleaved rounds from 4 threads; the row has the median of the per-round
ratios. Every signature of the run is verified afterwards, and the run counts them (10^5 by
default with ``--signatures``), so it doubles as the no-crash check.

    python -m bench sessions --rounds=5 --signatures=100000
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

from bench.report import Row

SECTION = "Proofs, SoftHSM2"
PROXY_PATHS = (
    "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib64/p11-kit-proxy.so",
    "/usr/lib/p11-kit-proxy.so",
)
THREADS = 4


def _child(rounds: int, total: int) -> None:
    """Runs in the child: measure, verify, print one JSON line."""
    import shutil
    import tempfile
    from pathlib import Path

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from dpop_signer import generate_key
    from dpop_signer.jwk import b64url_decode
    from dpop_signer.signers.pkcs11 import open_pkcs11_signer

    proxy = next(p for p in PROXY_PATHS if os.path.exists(p))
    # A throw-away token, its key made through the proxy too: SoftHSM2 must not be loaded
    # directly in this process (its calls would then not be locked).
    workdir = tempfile.mkdtemp(prefix="dpop-bench-sessions-")
    Path(workdir, "tokens").mkdir()
    conf = Path(workdir, "softhsm2.conf")
    conf.write_text(
        f"directories.tokendir = {workdir}/tokens\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)  # this child only, before p11-kit loads SoftHSM2
    pin = "1234"
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench-sessions",
         "--pin", pin, "--so-pin", "12345678"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    base = "pkcs11:token=bench-sessions;object=bench"
    generate_key(f"{base}?module-path={proxy}", pin=pin).close()  # type: ignore[attr-defined]
    one = open_pkcs11_signer(f"{base}?module-path={proxy}", pin=pin)
    two = open_pkcs11_signer(f"{base}?module-path={proxy}&sessions=2", pin=pin)
    per_round = max(THREADS, total // (2 * rounds))
    rates: dict[str, list[float]] = {"one": [], "two": []}
    kept: list[tuple[bytes, bytes]] = []
    lock = threading.Lock()

    def run(signer: object, count: int) -> float:
        share = count // THREADS

        def work(n: int) -> None:
            mine = []
            for i in range(share):
                message = b"m%d-%d" % (n, i)
                mine.append((message, signer.sign(message)))  # type: ignore[attr-defined]
            with lock:
                kept.extend(mine[:50])  # a sample of each thread's, verified below

        threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return share * THREADS / (time.perf_counter() - started)

    signed = 0
    for _ in range(rounds):
        for name, signer in (("two", two), ("one", one)):
            rates[name].append(run(signer, per_round))
            signed += per_round // THREADS * THREADS
    numbers = dict(one.public_jwk)
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(b64url_decode(str(numbers["x"])), "big"),
        int.from_bytes(b64url_decode(str(numbers["y"])), "big"),
        ec.SECP256R1(),
    ).public_key()
    for message, signature in kept:
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        public.verify(der, message, ec.ECDSA(hashes.SHA256()))
    two.close()
    one.close()
    shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"rates": rates, "signed": signed, "verified": len(kept)}))


def main(argv: list[str]) -> list[Row]:
    """Run the child; one row: sessions=2 against one session."""
    rounds = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--rounds=")), 5)
    total = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--signatures=")), 100000)
    if not any(os.path.exists(p) for p in PROXY_PATHS):
        return [Row(SECTION, "sessions=2 via p11-kit-proxy", "-", note="p11-kit-proxy.so missing")]
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "DPOP_KEY")}
    done = subprocess.run(
        [sys.executable, "-c", f"from bench.sessions import _child; _child({rounds}, {total})"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench sessions failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = result["rates"]["one"], result["rates"]["two"]
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    return [
        Row(
            SECTION,
            f"Pkcs11Signer via p11-kit-proxy, sessions=2, {THREADS} threads",
            f"{statistics.median(two):,.0f} signatures/s",
            versus=f"1 session, {THREADS} threads ({statistics.median(one):,.0f} signatures/s)",
            ratio=statistics.median(ratios),
            rounds=ratios,
            target="≥ 1.20",
            met=statistics.median(ratios) >= 1.2,
            note=f"{result['signed']:,} signatures in one process, no crash; "
            f"{result['verified']} sampled and verified; its own process (no direct SoftHSM2)",
        )
    ]
