"""dpop-signer on a TPM: a tpm2-pkcs11 token over swtpm (tests/tpm2_fixtures.py).

tpm2-pkcs11 refuses the key template that suits SoftHSM2 and HSMs (it answers
CKR_GENERAL_ERROR when the public key's template sets CKA_VERIFY or CKA_ENCRYPT, which it
derives from the TPM key itself); ``dpop keygen`` must still make a key there, and the key must
still be private, sensitive, never extractable and allowed to sign. Each key is read back by
python-pkcs11 alone in a separate process, and each proof is checked by ``tests.oracle`` against
that independently read public key.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from dpop_signer import load_signer
from dpop_signer.proof import DPoPProofBuilder
from dpop_signer.signers import close_signer
from dpop_signer.signers.pkcs11 import generate_pkcs11_key
from tests import oracle
from tests.cli_support import Result, assert_absent, assert_ok, assert_one_line_error, dpop
from tests.test_cli_servers import doctor_lines
from tests.tpm2_fixtures import Tpm2Token

THREADS = 4
PROOFS_PER_THREAD = 8
THREAD_TIMEOUT = 120.0

# python-pkcs11 only: what the token itself says about a key, in a process of its own.
_INSPECT = """
import json, sys
import pkcs11
from pkcs11 import Attribute, ObjectClass

module, token_label, key_label = sys.argv[1:4]
pin = sys.stdin.readline().rstrip("\\n")
token = pkcs11.lib(module).get_token(token_label=token_label)
with token.open(user_pin=pin) as session:
    (private,) = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                      Attribute.LABEL: key_label})
    (public,) = session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                     Attribute.LABEL: key_label})
    names = ("TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "SIGN", "ALWAYS_SENSITIVE",
             "NEVER_EXTRACTABLE")
    out = {name: bool(private[getattr(Attribute, name)]) for name in names}
    out["EC_POINT"] = bytes(public[Attribute.EC_POINT]).hex()
print(json.dumps(out))
"""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def inspect_key(tpm: Tpm2Token, label: str) -> tuple[dict[str, bool], dict[str, str]]:
    """The private key's attributes and the public JWK, as python-pkcs11 reads them."""
    proc = subprocess.run(
        [sys.executable, "-c", _INSPECT, tpm.module, tpm.label, label],
        input=tpm.pin + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    found: dict[str, Any] = json.loads(proc.stdout)
    der = bytes.fromhex(found.pop("EC_POINT"))
    # CKA_EC_POINT is a DER OCTET STRING around the uncompressed point 04 || x || y.
    assert der[:3] == b"\x04\x41\x04", der.hex()
    assert len(der) == 67, der.hex()
    jwk = {"kty": "EC", "crv": "P-256", "x": _b64url(der[3:35]), "y": _b64url(der[35:])}
    return found, jwk


def without_module_log(result: Result) -> Result:
    """``result`` without the lines tpm2-pkcs11 itself writes to stderr on any failure.

    Its ``ERROR: ...`` lines (a wrong PIN, a refused template) cannot be switched off:
    TPM2_PKCS11_LOG_LEVEL=0 still shows errors. The CLI's own lines start with ``error:``.
    """
    err = "".join(
        line for line in result.err.splitlines(keepends=True) if not line.startswith("ERROR: ")
    )
    return Result(result.code, result.out, err)


SAFE = {
    "TOKEN": True,
    "PRIVATE": True,
    "SENSITIVE": True,
    "EXTRACTABLE": False,
    "SIGN": True,
    "ALWAYS_SENSITIVE": True,
    "NEVER_EXTRACTABLE": True,
}


def test_dpop_keygen_makes_a_safe_key_in_the_tpm(tpm2_token: Tpm2Token) -> None:
    uri = tpm2_token.uri("cli-keygen")
    made = assert_ok(dpop("keygen", "--key", uri, env={"DPOP_PIN": tpm2_token.pin}))
    attributes, jwk = inspect_key(tpm2_token, "cli-keygen")
    assert attributes == SAFE
    assert made.out.strip() == oracle.thumbprint(jwk)
    shown = assert_ok(dpop("jwk", "--key", uri, env={"DPOP_PIN": tpm2_token.pin}))
    assert json.loads(shown.out) == jwk
    assert_absent(made.both + shown.both, [tpm2_token.pin])

    again = dpop("keygen", "--key", uri, env={"DPOP_PIN": tpm2_token.pin})
    assert_one_line_error(
        without_module_log(again), says="already has an object labelled 'cli-keygen'"
    )
    assert inspect_key(tpm2_token, "cli-keygen")[1] == jwk  # not overwritten


def test_keygen_names_what_the_module_refused(
    tpm2_token: Tpm2Token, caplog: pytest.LogCaptureFixture
) -> None:
    uri = tpm2_token.uri("lib-keygen", **{"pin-value": tpm2_token.pin})
    with caplog.at_level(logging.INFO, logger="dpop_signer.pkcs11"):
        signer = generate_pkcs11_key(uri)
    try:
        attributes, jwk = inspect_key(tpm2_token, "lib-keygen")
        assert attributes == SAFE
        assert dict(signer.public_jwk) == jwk
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        # tpm2-pkcs11 1.9 refuses the full template; a later one may not. When it refuses, the
        # log says with which answer, and which attributes the accepted template left out.
        for message in refusals:
            assert "GeneralError" in message or "CKR_" in message or "Attribute" in message
            assert "without" in message, message
            assert "CKA_" in message, message
        assert tpm2_token.pin not in caplog.text
    finally:
        signer.close()


def test_doctor_on_the_tpm(tpm2_token: Tpm2Token) -> None:
    uri = tpm2_token.uri("doctor-key")
    assert_ok(dpop("keygen", "--key", uri, env={"DPOP_PIN": tpm2_token.pin}))
    jwk = inspect_key(tpm2_token, "doctor-key")[1]
    result = assert_ok(dpop("doctor", "--key", uri, env={"DPOP_PIN": tpm2_token.pin}))
    steps = doctor_lines(result)
    for step in (
        "module loads",
        "token present",
        "login",
        "key found",
        "EC P-256",
        "CKM_ECDSA offered",
        "sign and verify",
    ):
        assert steps[step].startswith("✓"), (step, result.out)
    assert oracle.thumbprint(jwk) in steps["sign and verify"]
    assert_absent(result.both, [tpm2_token.pin])


def test_four_threads_sign_proofs_that_verify(tpm2_token: Tpm2Token) -> None:
    uri = tpm2_token.uri("threads-key")
    # Made in this process: tpm2-pkcs11 reads its store once per process, so a process that
    # has loaded the module does not see keys that `dpop keygen` makes afterwards.
    close_signer(generate_pkcs11_key(uri, pin=tpm2_token.pin))
    jwk = inspect_key(tpm2_token, "threads-key")[1]
    signer = load_signer(uri, pin=tpm2_token.pin)
    builder = DPoPProofBuilder(signer)
    url = "https://rs.example/v1/things"
    proofs: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def work() -> None:
        try:
            start.wait(timeout=THREAD_TIMEOUT)
            for _ in range(PROOFS_PER_THREAD):
                proof = builder.build("POST", url)
                with lock:
                    proofs.append(proof)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    began = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, THREAD_TIMEOUT - (time.monotonic() - began)))
        assert not any(t.is_alive() for t in threads), f"not done within {THREAD_TIMEOUT} s"
    finally:
        close_signer(signer)
    assert errors == []
    assert len(proofs) == THREADS * PROOFS_PER_THREAD
    jtis = set()
    for proof in proofs:
        checked = oracle.check_proof(proof, htm="POST", url=url, expected_jwk=jwk)
        jtis.add(checked.claims["jti"])
    assert len(jtis) == len(proofs)


def test_dictionary_attack_lockout_reads_as_a_locked_pin(tpm2_token: Tpm2Token) -> None:
    uri = tpm2_token.uri("lockout-key")
    assert_ok(dpop("keygen", "--key", uri, env={"DPOP_PIN": tpm2_token.pin}))
    jkt = oracle.thumbprint(inspect_key(tpm2_token, "lockout-key")[1])
    # One wrong authorization puts this TPM into lockout (the default is 3 in swtpm).
    tpm2_token.tool("tpm2_dictionarylockout", "--setup-parameters", "--max-tries=1")
    try:
        wrong = dpop("thumbprint", "--key", uri, env={"DPOP_PIN": "0000"})
        assert_one_line_error(without_module_log(wrong), says="wrong PIN")
        right = dpop("thumbprint", "--key", uri, env={"DPOP_PIN": tpm2_token.pin})
        # The right PIN, refused while the TPM is locked out.
        assert_one_line_error(without_module_log(right), says="locked")
        tpm2_token.tool("tpm2_dictionarylockout", "--clear-lockout")
        again = assert_ok(dpop("thumbprint", "--key", uri, env={"DPOP_PIN": tpm2_token.pin}))
        assert again.out.strip() == jkt
        assert_absent(wrong.both + right.both + again.both, [tpm2_token.pin, "0000"])
    finally:
        tpm2_token.tool("tpm2_dictionarylockout", "--clear-lockout")
        tpm2_token.tool("tpm2_dictionarylockout", "--setup-parameters", "--max-tries=32")
