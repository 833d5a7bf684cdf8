"""DPoP proofs per second: our builder against the raw signature and the JOSE libraries.

**Proofs, PEM key** - one thread, one P-256 key shared by every in-memory path, all five in ONE
`interleave` rotation, so every ratio is taken against the same rounds:

* ``DPoPProofBuilder.build`` with a `PemSigner`: an API-request proof (``ath`` from the access
  token, no nonce), the URL passed with its query so that ``htu`` normalization runs;
* raw ``cryptography`` ``key.sign(ECDSA(SHA256))`` + DER -> r||s of a signing input of the same
  length: the in-process limit (target ≥ 0.80);
* PyJWT ``jwt.encode`` of the same proof (target ≥ 1.50), joserfc ``jwt.encode`` of the same
  proof (no target), both given ``htu`` already normalized and ``ath`` precomputed, which
  favours them; ``jti`` is ``secrets.token_urlsafe(16)``, ``iat`` ``int(time.time())``;
* requests-oauth2client's ``DPoPKey(<the same key>).proof(htm, htu, ath)`` (jwskate underneath),
  ``str()`` of the proof it returns; it gets the URL with its query and strips it itself (as it
  does in ``add_dpop_proof``), ``ath`` precomputed; its ``jti`` is a UUID4 (no target).

Every peer's output is checked once, before measuring, to be the same proof: the same header
(``typ``, ``alg``, ``jwk`` with the same members), the same claim names, the same ``htm``/``htu``/
``ath`` values and a signature that verifies with the key. A last row runs ``openssl speed
-seconds 2 ecdsap256`` once, in its own process and outside the interleave: OpenSSL's C loop
with no Python at all, the physical limit; its ours/openssl figure is a note, not a paired ratio
(and the ``openssl`` binary may be a different OpenSSL than the one inside ``cryptography``).

**Proofs, SoftHSM2** - the key of `bench.hsm.bench_key`. ``DPoPProofBuilder.build`` with the
`Pkcs11Signer` against raw python-pkcs11 ``key.sign(sha256(input), mechanism=ECDSA)`` on the same
token key in its own session, with 1, 2 and 4 caller threads; the raw threads take a lock
around the ``C_Sign`` (two threads in SoftHSM2 at once corrupt memory, docs/architecture.md),
which is the fastest safe raw baseline, and ours serializes on the module's lock the same way.
Each thread count is its own rotation of ours and raw with the same number of threads; the
rotations take turns round by round. "SoftHSM2 proofs ≥ 0.85x raw C_Sign" is the target of
every thread count and of the p11-kit-proxy row. One more rotation pairs
``await builder.build_async`` from ``--tasks`` asyncio tasks on one event loop with raw
1-thread ``C_Sign`` measured in the same rounds (no target: it is what async callers get, the
executor hand-off included).
When ``p11-kit-proxy.so`` is installed and SoftHSM2 is registered with p11-kit, the same token
key is opened a second time through the proxy (a second module in the process, as
`open_pkcs11_signer` allows) and builder vs raw ``C_Sign`` run through it, 1 thread.

**Proofs per algorithm** - ``DPoPProofBuilder.build`` (an API-request proof, as above) with a
key of every kind: ES256, ES384, ES512, EdDSA, PS256 and RS256 (RSA-2048), once as a `PemSigner`
(keys in memory) and once as a `Pkcs11Signer` (keys made by `generate_key(alg=...)` in a
temporary SoftHSM2 token), each backend in ONE `interleave` rotation, so the rows of a backend
are taken over the same rounds. No targets: what each algorithm costs next to ES256. ``--algs``
runs only this section (with ``--no-hsm``: only its PEM half).

Budget: each phase stops starting rounds that would end past its share, so the whole module
stays under ~110 s whatever the options; the defaults take about 60 s.

    python -m bench proofs --rounds=9 --seconds=0.4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from bench.hsm import BenchKey, bench_key
from bench.report import Row, Variant, compare, interleave, rate, single

PEM = "Proofs, PEM key"
ALGS = "Proofs per algorithm"
ALGORITHMS = ("ES256", "ES384", "ES512", "EdDSA", "PS256", "RS256")
ALGS_BUDGET = 30.0
HSM = "Proofs, SoftHSM2"
URL = "https://api.example.com/v1/things?page=2"
HTU = "https://api.example.com/v1/things"
TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"  # RFC 9449 §7.1 example token
THREADS = (1, 2, 4)
HSM_SLICE = 0.05
"""Seconds per slice in `rotate`: long enough that waking the caller threads is noise."""
PEM_BUDGET = 30.0
OPENSSL_TIMEOUT = 20.0
HSM_BUDGET = 55.0
PROXY_PATHS = (
    "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib64/p11-kit-proxy.so",
    "/usr/lib/p11-kit-proxy.so",
    "/usr/local/lib/p11-kit-proxy.so",
)


def _log(text: str) -> None:
    print(f"[proofs] {text}", file=sys.stderr, flush=True)


def _require(condition: bool, message: str) -> None:
    # Not `assert`: the checks must hold under ``python -O`` too.
    if not condition:
        raise AssertionError(message)


# -- the same proof ----------------------------------------------------------------------------


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def check_same_proof(
    name: str, proof: str, reference: str, public_key: ec.EllipticCurvePublicKey
) -> None:
    """Raise unless ``proof`` is the proof ``reference`` is, up to ``jti``/``iat``/signature."""
    head, body, signature = proof.split(".")
    ref_head, ref_body, _ = reference.split(".")
    header, claims = json.loads(_b64decode(head)), json.loads(_b64decode(body))
    ref_header, ref_claims = json.loads(_b64decode(ref_head)), json.loads(_b64decode(ref_body))
    _require(header == ref_header, f"{name}: header {header} is not {ref_header}")
    _require(
        set(claims) == set(ref_claims), f"{name}: claims {sorted(claims)} not {sorted(ref_claims)}"
    )
    for claim in ("htm", "htu", "ath"):
        _require(claims[claim] == ref_claims[claim], f"{name}: {claim} is {claims[claim]!r}")
    raw = _b64decode(signature)
    _require(len(raw) == 64, f"{name}: a {len(raw)}-byte signature")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, f"{head}.{body}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise AssertionError(f"{name}: the signature does not verify") from exc


# -- Proofs, PEM key ---------------------------------------------------------------------------


def pem_variants(ec_key: ec.EllipticCurvePrivateKey) -> tuple[list[Variant], str, int]:
    """ours, raw, PyJWT, joserfc, requests-oauth2client; a sample proof; the signing input size."""
    import jwt
    from joserfc import jwt as joserfc_jwt
    from joserfc.jwk import ECKey
    from requests_oauth2client import DPoPKey

    from dpop_signer import PemSigner
    from dpop_signer.proof import DPoPProofBuilder, access_token_hash

    builder = DPoPProofBuilder(PemSigner(ec_key, source="bench key"))
    sample = builder.build("GET", URL, access_token=TOKEN)
    message = sample.rsplit(".", 1)[0].encode("ascii")
    algorithm = ec.ECDSA(hashes.SHA256())

    def ours() -> str:
        return builder.build("GET", URL, access_token=TOKEN)

    def raw() -> bytes:
        r, s = decode_dss_signature(ec_key.sign(message, algorithm))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    jwk = dict(builder.signer.public_jwk)
    ath = access_token_hash(TOKEN)
    pyjwt_headers = {"typ": "dpop+jwt", "jwk": jwk}

    def claims() -> dict[str, object]:
        # What a peer must compute per proof; htu and ath are handed to it precomputed.
        return {
            "jti": secrets.token_urlsafe(16),
            "htm": "GET",
            "htu": HTU,
            "iat": int(time.time()),
            "ath": ath,
        }

    def pyjwt() -> str:
        return jwt.encode(claims(), ec_key, algorithm="ES256", headers=pyjwt_headers)

    joserfc_key = ECKey.import_key(ec_key)
    joserfc_header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}

    def joserfc() -> str:
        return joserfc_jwt.encode(joserfc_header, claims(), joserfc_key)

    dpop_key = DPoPKey(ec_key, alg="ES256")  # jwskate imports the same cryptography key

    def roc() -> str:
        return str(dpop_key.proof(htm="GET", htu=URL, ath=ath))

    public = ec_key.public_key()
    check_same_proof("ours", sample, sample, public)
    for name, peer in (("PyJWT", pyjwt), ("joserfc", joserfc), ("requests-oauth2client", roc)):
        check_same_proof(name, peer(), sample, public)
    _require(len(raw()) == 64, "raw: not a 64-byte signature")
    variants = [
        Variant("DPoPProofBuilder.build (PemSigner)", ours),
        Variant("cryptography raw sign + DER->r||s", raw),
        Variant("PyJWT jwt.encode", pyjwt),
        Variant("joserfc jwt.encode", joserfc),
        Variant("requests-oauth2client DPoPKey.proof", roc),
    ]
    return variants, sample, len(message)


_SPEED_LINE = re.compile(r"^\s*256 bits ecdsa \(nistp256\)\s+(.*)$")


def openssl_speed(seconds: int = 2) -> tuple[float, float] | str:
    """(sign/s, verify/s) of ``openssl speed -seconds N ecdsap256``, or why there are none."""
    binary = shutil.which("openssl")
    if binary is None:
        return "not found"
    try:
        done = subprocess.run(
            [binary, "speed", "-seconds", str(seconds), "ecdsap256"],
            capture_output=True,
            text=True,
            timeout=OPENSSL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {type(exc).__name__}"
    for line in done.stdout.splitlines():
        match = _SPEED_LINE.match(line)
        if match is None:
            continue
        # "0.0000s 0.0001s 45167.3 16618.0": times per operation, then sign/s and verify/s.
        numbers = [t for t in match.group(1).split() if not t.endswith("s")]
        try:
            return float(numbers[0]), float(numbers[1])
        except (IndexError, ValueError):
            break
    return f"unparsed output (exit {done.returncode})"


def pem_rows(rounds: int, seconds: float) -> list[Row]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    variants, sample, signed = pem_variants(ec_key)
    _log(f"PEM: 5 variants, up to {rounds} rounds x {seconds:g} s")
    # interleave checks its budget after a round: stop one round's length early.
    interleave(variants, rounds, seconds, budget=max(0.0, PEM_BUDGET - 5 * seconds))
    ours, raw, pyjwt, joserfc, roc = variants
    measured = f"{len(ours.rates)} rounds"
    rows = [
        compare(
            PEM,
            ours,
            raw,
            "proofs/s",
            target=0.80,
            note=f"proof {len(sample)} B, signing input {signed} B; {measured}",
        ),
        compare(PEM, ours, pyjwt, "proofs/s", target=1.50, note="htu, ath precomputed for it"),
        compare(PEM, ours, joserfc, "proofs/s", note="htu, ath precomputed for it"),
        compare(
            PEM,
            ours,
            roc,
            "proofs/s",
            note="same key via jwskate; strips the query itself (furl), ath precomputed",
        ),
    ]
    rows[0].versus = f"{raw.name} ({rate(raw.median, 'signatures/s')})"
    _log("PEM: openssl speed -seconds 2 ecdsap256")
    speed = openssl_speed(2)
    name = "openssl speed -seconds 2 ecdsap256, sign"
    if isinstance(speed, str):
        rows.append(Row(PEM, name, speed, note="the physical limit: OpenSSL's C loop, no Python"))
    else:
        version = (
            subprocess.run(
                ["openssl", "version"], capture_output=True, text=True, timeout=10, check=False
            )
            .stdout.split(" (")[0]
            .strip()
        )
        rows.append(
            Row(
                PEM,
                name,
                rate(speed[0], "signatures/s"),
                note=(
                    "the physical limit: OpenSSL's C loop, no Python; one run in its own "
                    f"process, outside the interleave; {version}; ours/openssl = "
                    f"{ours.median / speed[0]:.2f} (not a paired ratio)"
                ),
            )
        )
    return rows


# -- Proofs, SoftHSM2 --------------------------------------------------------------------------

Drive = Callable[[float], tuple[int, float]]
"""Run for about the given seconds; return (calls made, seconds it took)."""


def inline(call: Callable[[], object]) -> Drive:
    """``call`` in a loop on this thread: one caller."""

    def drive(seconds: float) -> tuple[int, float]:
        clock = time.perf_counter
        start = clock()
        end = start + seconds
        calls = 0
        while True:
            call()
            calls += 1
            now = clock()
            if now >= end:
                return calls, now - start

    return drive


class Callers:
    """``threads`` threads calling ``call`` in a loop for each slice; alive between slices.

    Started once and parked on a barrier, so a slice pays for waking them, not for making them.
    """

    def __init__(self, call: Callable[[], object], threads: int) -> None:
        self._call = call
        self._gate = threading.Barrier(threads + 1)
        self._counts = [0] * threads
        self._end = 0.0
        self._stop = False
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _loop(self, slot: int) -> None:
        call, clock = self._call, time.perf_counter
        try:
            while True:
                self._gate.wait()
                if self._stop:
                    return
                end, calls = self._end, 0
                while True:
                    call()
                    calls += 1
                    if clock() >= end:
                        break
                self._counts[slot] = calls
                self._gate.wait()
        except threading.BrokenBarrierError:
            return
        except BaseException as exc:  # reported by the main thread, not lost in a thread
            self._error = exc
            self._gate.abort()

    def __call__(self, seconds: float) -> tuple[int, float]:
        start = time.perf_counter()
        self._end = start + seconds
        try:
            self._gate.wait(timeout=seconds + 30)
            self._gate.wait(timeout=seconds + 30)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"a caller thread failed: {self._error!r}") from self._error
        return sum(self._counts), time.perf_counter() - start

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(threading.BrokenBarrierError):
            self._gate.wait(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


class AsyncCallers:
    """``tasks`` asyncio tasks on one event loop awaiting ``make()`` in a loop for each slice."""

    def __init__(self, make: Callable[[], Coroutine[Any, Any, object]], tasks: int) -> None:
        self._make = make
        self._tasks = tasks
        self._loop = asyncio.new_event_loop()

    async def _slice(self, end: float) -> int:
        clock, make, calls = time.perf_counter, self._make, 0

        async def task() -> None:
            nonlocal calls
            while clock() < end:
                await make()
                calls += 1

        await asyncio.gather(*(task() for _ in range(self._tasks)))
        return calls

    def __call__(self, seconds: float) -> tuple[int, float]:
        start = time.perf_counter()
        calls = self._loop.run_until_complete(self._slice(start + seconds))
        # Tasks still waiting at the deadline finish first: counted, and their time too.
        return calls, time.perf_counter() - start

    def close(self) -> None:
        self._loop.close()


@dataclass
class Driven:
    """A `Variant` whose rates come from a `Drive` (threads, tasks) rather than `interleave`."""

    variant: Variant
    drive: Drive


def rotate(rotations: list[list[Driven]], rounds: int, seconds: float, budget: float) -> None:
    """`interleave` for drivers: per round, each rotation in turn, its variants in slices.

    Within a rotation every variant runs ``seconds`` in total, in shuffled slices of HSM_SLICE,
    so load from elsewhere hits ours and raw of one thread count alike. No round is started
    that would end after ``budget`` seconds (judged by the last round's length).
    """
    clock = time.perf_counter
    began = clock()
    for rotation in rotations:
        for driven in rotation:
            driven.drive(0.01)  # warm-up: threads running, handles fresh
    shuffle = random.Random(9449).shuffle
    for _ in range(rounds):
        start = clock()
        for rotation in rotations:
            spent = [0.0] * len(rotation)
            calls = [0] * len(rotation)
            order = list(range(len(rotation)))
            while min(spent) < seconds:
                shuffle(order)
                for i in order:
                    done, took = rotation[i].drive(min(HSM_SLICE, seconds))
                    calls[i] += done
                    spent[i] += took
            for i, driven in enumerate(rotation):
                driven.variant.rates.append(calls[i] / spent[i])
        now = clock()
        if now - began + (now - start) > budget:
            break


def raw_signer(module: Any, uri: str, message: bytes) -> tuple[Callable[[], bytes], Any]:
    """python-pkcs11's ``key.sign`` on the key of ``uri`` in a session of its own; the session.

    Opened without a PIN: our open signer holds the token's login for the application. The
    lock keeps raw threads out of SoftHSM2 together, as our module lock does.
    """
    from pkcs11 import KeyType, Mechanism, ObjectClass

    from dpop_signer.signers.pkcs11_uri import parse_pkcs11_uri

    opened = parse_pkcs11_uri(uri)

    def open_session() -> tuple[Any, Any]:
        session = module.lib.get_token(token_label=opened.token).open()
        key = session.get_key(
            ObjectClass.PRIVATE_KEY, KeyType.EC, label=opened.object, id=opened.id
        )
        return session, key

    session, key = module.call(open_session)
    lock = threading.Lock()
    mechanism = Mechanism.ECDSA

    def sign() -> bytes:
        digest = hashlib.sha256(message).digest()
        with lock:
            return bytes(key.sign(digest, mechanism=mechanism))

    return sign, session


def find_proxy() -> str | None:
    """The p11-kit proxy module, if installed."""
    return next((p for p in PROXY_PATHS if os.path.isfile(p)), None)


def hsm_rows(rounds: int, seconds: float, tasks: int, bench: BenchKey | None = None) -> list[Row]:
    from dpop_signer.proof import DPoPProofBuilder
    from dpop_signer.signers.pkcs11 import Pkcs11Signer, open_pkcs11_signer

    owned = bench is None
    if bench is None:
        bench = bench_key()
    closers: list[Callable[[], None]] = []
    rotations: list[list[Driven]] = []
    pairs: list[tuple[Driven, Driven, float | None]] = []  # ours, raw, target
    proxy_note = ""
    try:
        hsm: Pkcs11Signer = open_pkcs11_signer(bench.uri, pin=bench.pin or None)
        closers.append(hsm.close)
        builder = DPoPProofBuilder(hsm)
        sample = builder.build("GET", URL, access_token=TOKEN)
        message = sample.rsplit(".", 1)[0].encode("ascii")
        raw, session = raw_signer(hsm.module, hsm.uri, message)
        closers.append(lambda: hsm.module.call(session.close))
        _require(len(raw()) == 64, "raw C_Sign: not a 64-byte signature")

        def ours() -> str:
            return builder.build("GET", URL, access_token=TOKEN)

        async def ours_async() -> str:
            return await builder.build_async("GET", URL, access_token=TOKEN)

        for threads in THREADS:
            caller = "1 thread" if threads == 1 else f"{threads} threads"
            if threads == 1:
                ours_drive, raw_drive = inline(ours), inline(raw)
            else:
                ours_callers, raw_callers = Callers(ours, threads), Callers(raw, threads)
                closers += [ours_callers.close, raw_callers.close]
                ours_drive, raw_drive = ours_callers, raw_callers
            mine = Driven(
                Variant(f"DPoPProofBuilder.build (Pkcs11Signer), {caller}", ours), ours_drive
            )
            theirs = Driven(Variant(f"python-pkcs11 raw C_Sign + lock, {caller}", raw), raw_drive)
            rotation = [mine, theirs]
            pairs.append((mine, theirs, 0.85))
            if threads == 1:
                callers = AsyncCallers(ours_async, tasks)
                closers.append(callers.close)
                asynchronous = Driven(
                    Variant(f"await build_async (Pkcs11Signer), {tasks} tasks, 1 loop", ours),
                    callers,
                )
                # Its own rotation with its own raw 1-thread baseline: the executor hand-offs
                # must not leave their traces between the slices of the targeted pair.
                baseline = Driven(Variant(theirs.variant.name, raw), inline(raw))
                rotations.append([asynchronous, baseline])
                pairs.append((asynchronous, baseline, None))
            rotations.append(rotation)

        proxy = find_proxy()
        if proxy is None:
            proxy_note = "skipped: p11-kit-proxy.so not installed"
        else:
            try:
                via = open_pkcs11_signer(
                    f"{hsm.uri.split('?', 1)[0]}?module-path={proxy}", pin=bench.pin or None
                )
            except Exception as exc:  # a p11-kit without SoftHSM2 registered, say
                proxy_note = f"skipped: opening the key through {proxy} failed: {exc}"
            else:
                # Closed before the direct signer (closers run in reverse): the direct one's
                # logout also logs out the proxy's sessions, which share SoftHSM2 underneath.
                closers.append(via.close)
                _require(via.public_jwk == hsm.public_jwk, "the proxy opened a different key")
                proxy_builder = DPoPProofBuilder(via)
                raw_proxy, proxy_session = raw_signer(via.module, via.uri, message)
                closers.append(lambda: via.module.call(proxy_session.close))
                _require(len(raw_proxy()) == 64, "raw C_Sign via proxy: not 64 bytes")

                def ours_proxy() -> str:
                    return proxy_builder.build("GET", URL, access_token=TOKEN)

                mine = Driven(
                    Variant(
                        "DPoPProofBuilder.build (Pkcs11Signer via p11-kit-proxy), 1 thread",
                        ours_proxy,
                    ),
                    inline(ours_proxy),
                )
                theirs = Driven(
                    Variant("python-pkcs11 raw C_Sign via p11-kit-proxy, 1 thread", raw_proxy),
                    inline(raw_proxy),
                )
                rotations.append([mine, theirs])
                pairs.append((mine, theirs, 0.85))

        count = sum(len(r) for r in rotations)
        _log(f"SoftHSM2 ({bench.source}): {count} variants, up to {rounds} rounds x {seconds:g} s")
        rotate(rotations, rounds, seconds, budget=HSM_BUDGET)
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception as exc:  # cleanup is best effort; the numbers are taken
                _log(f"cleanup: {exc!r}")
        if owned:
            bench.cleanup()

    rows = []
    for mine, theirs, target in pairs:
        row = compare(
            HSM,
            mine.variant,
            theirs.variant,
            "proofs/s",
            target=target,
            note=f"{bench.source}; {len(mine.variant.rates)} rounds",
        )
        row.versus = f"{theirs.variant.name} ({rate(theirs.variant.median, 'signatures/s')})"
        rows.append(row)
    if proxy_note:
        rows.append(Row(HSM, "DPoPProofBuilder.build via p11-kit-proxy", "-", note=proxy_note))
    return rows


def algorithm_rows(rounds: int, seconds: float, bench: BenchKey | None) -> list[Row]:
    """Proofs/s of `DPoPProofBuilder.build` for every algorithm, PEM and SoftHSM2.

    The SoftHSM2 keys are made in ``bench``'s token when it is a temporary one (a process
    initializes SoftHSM2 once, with one configuration, so the token is shared with `hsm_rows`);
    never in the development token.
    """
    from dpop_signer.proof import DPoPProofBuilder
    from dpop_signer.signers import close_signer, generate_key
    from dpop_signer.signers.pem import PemSigner, new_private_key

    rows: list[Row] = []
    pem = [PemSigner(new_private_key(alg), alg=alg) for alg in ALGORITHMS]
    backends: list[tuple[str, list[Any]]] = [("PemSigner", pem)]
    if bench is not None and bench.source == "temporary token":
        base = bench.uri.replace("object=bench-es256", "object=bench-alg-{}")
        made = [generate_key(base.format(a), pin=bench.pin, alg=a) for a in ALGORITHMS]
        backends.append(("Pkcs11Signer", made))
    elif bench is not None:
        rows.append(
            Row(ALGS, "Pkcs11Signer, every algorithm", "-", note="skipped: not on the dev token")
        )
    try:
        for kind, signers in backends:
            variants = []
            for signer in signers:
                builder = DPoPProofBuilder(signer)

                def ours(builder: DPoPProofBuilder = builder) -> str:
                    return builder.build("GET", URL, access_token=TOKEN)

                name = f"{signer.algorithm}, DPoPProofBuilder.build ({kind})"
                variants.append(Variant(name, ours))
            _log(f"{ALGS}: {kind}, {len(variants)} variants, up to {rounds} rounds x {seconds:g} s")
            interleave(variants, rounds, seconds, budget=ALGS_BUDGET / len(backends))
            for v in variants:
                rows.append(single(ALGS, v, "proofs/s", note=f"{len(v.rates)} rounds"))
    finally:
        for _, signers in backends:
            for signer in signers:
                close_signer(signer)
    return rows


def main(argv: list[str]) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench proofs")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.4, help="per variant per round")
    parser.add_argument("--tasks", type=int, default=64, help="asyncio tasks for build_async")
    parser.add_argument("--no-hsm", action="store_true", help="skip the SoftHSM2 section")
    parser.add_argument("--algs", action="store_true", help="only the per-algorithm section")
    args, _ = parser.parse_known_args(argv)
    rounds = max(1, min(args.rounds, 25))
    seconds = max(0.05, min(args.seconds, 2.0))
    tasks = max(1, min(args.tasks, 256))

    bench = None if args.no_hsm else bench_key()
    try:
        if args.algs:
            return algorithm_rows(rounds, seconds, bench)
        rows = pem_rows(rounds, seconds)
        rows += algorithm_rows(rounds, seconds, bench)
        if bench is not None:
            rows += hsm_rows(rounds, seconds, tasks, bench)
        return rows
    finally:
        if bench is not None:
            bench.cleanup()


if __name__ == "__main__":
    from bench.report import machine, render

    print(machine())
    print(render(main(sys.argv[1:])))
