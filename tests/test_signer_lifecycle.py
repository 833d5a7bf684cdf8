"""The signer's promises while the token changes under a running process (real SoftHSM2).

Each fault is made from outside, as an operator would: ``softhsm2-util`` re-initializes the
token (new PIN, or a new key under the same label), ``pkcs11-tool`` deletes the key, ``p11-kit
server`` stands in for a network HSM whose connection drops or stalls, and ``fork()`` starts
workers. ``pkcs11-spy.so`` counts the calls that reach the module; every signature is checked
by the independent verifier in tests/sigcheck.py.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpop_signer import load_signer
from dpop_signer.errors import (
    KeyChangedError,
    KeyNotFoundError,
    PinError,
    SignerTimeoutError,
    SignerUnavailableError,
)
from dpop_signer.signers.pkcs11 import Pkcs11Signer, open_pkcs11_signer
from tests.conftest import SoftHsmToken
from tests.hsm_faults import (
    FreshToken,
    P11KitServer,
    client_module,
    python_child,
    spy_calls,
    spy_module,
)
from tests.sigcheck import verify_all


@pytest.fixture
def token(softhsm: SoftHsmToken, tmp_path: Path) -> FreshToken:
    return FreshToken.create(softhsm, tmp_path)


@pytest.fixture
def p11kit(token: FreshToken, tmp_path: Path) -> Iterator[P11KitServer]:
    client_module()
    server = P11KitServer(token, tmp_path, spy_log=tmp_path / "server-spy.log")
    os.environ.update(server.env)  # p11-kit-client.so reads it when the module starts
    try:
        yield server
    finally:
        for name in server.env:
            os.environ.pop(name, None)
        server.stop()


def _checked(signer: Pkcs11Signer, message: bytes) -> None:
    verify_all(dict(signer.public_jwk), [(message, signer.sign(message))])


# -- 1. a refused PIN is sent once, never again --------------------------------------------

_REFUSED_PIN_CHILD = """
import json, os, subprocess, sys, time
from dpop_signer.errors import KeyNotFoundError, PinError
from dpop_signer.signers.pkcs11 import open_pkcs11_signer
uri, old, new, so, label = json.loads(os.environ["ARGS"])
signer = open_pkcs11_signer(uri, pin=old)
first = signer.sign(b"before").hex()
subprocess.run(["softhsm2-util", "--init-token", "--token", label, "--label", label,
                "--pin", new, "--so-pin", so], check=True, capture_output=True, timeout=20)
# The process loses its module state (as when a network HSM client reconnects): the next sign
# must start the module, which reads the token afresh, and log in again.
signer.module.call(signer.module.lib.finalize)
outcomes, slowest = [], 0.0
for _ in range(40):
    started = time.monotonic()
    try:
        signer.sign(b"x")
        outcomes.append("signed")
    except PinError as exc:
        outcomes.append("PinError")
        message = exc.message
    slowest = max(slowest, time.monotonic() - started)
    time.sleep(0.05)
reopened = []
try:
    open_pkcs11_signer(uri, pin=old)  # a new signer with the refused PIN: not tried either
except PinError as exc:
    reopened.append(exc.message)
jwk = signer.public_jwk
signer.close()
try:  # the configuration changed: the new PIN is tried (the re-initialized token has no key)
    open_pkcs11_signer(uri, pin=new)
except KeyNotFoundError as exc:
    reopened.append(exc.message)
print(json.dumps({"first": first, "outcomes": outcomes, "slowest": slowest,
                  "message": message, "reopened": reopened, "jwk": jwk}))
"""


def test_a_refused_pin_is_sent_once_and_never_again(token: FreshToken, tmp_path: Path) -> None:
    spy_log = tmp_path / "spy.log"
    uri = token.uri(spy_module())
    args = [uri, token.pin, "99999999", token.base.so_pin, token.label]
    out = python_child(
        _REFUSED_PIN_CHILD,
        {
            "ARGS": json.dumps(args),
            "PKCS11SPY": token.base.module,
            "PKCS11SPY_OUTPUT": str(spy_log),
        },
        timeout=60,
    )
    result = json.loads(out)
    verify_all(result["jwk"], [(b"before", bytes.fromhex(result["first"]))])
    assert result["outcomes"] == ["PinError"] * 40
    assert result["slowest"] < 1.0  # at once: no session, no login, no search
    assert "never sent to the token again" in result["message"]
    assert token.pin not in result["message"]
    assert "never sent to the token again" in result["reopened"][0]
    assert "does not exist" in result["reopened"][1]  # past the login: the new PIN worked
    # What reached the token: the first login, one refused one and none after it, then the new
    # PIN once the configuration changed.
    assert spy_calls(spy_log, "C_Login", "CKR_PIN_INCORRECT") == 1
    assert spy_calls(spy_log, "C_Login", "CKR_OK") == 2
    assert spy_calls(spy_log, "C_Login") == 3


# -- 2. a different key under the same name is never used ----------------------------------


def test_a_key_replaced_under_the_same_label_is_never_used(
    token: FreshToken, tmp_path: Path
) -> None:
    signer = open_pkcs11_signer(token.uri(), pin=token.pin)
    try:
        _checked(signer, b"before")
        old_jwk = signer.public_jwk
        token.reinit(tmp_path, new_key=True)  # same label, same PIN, a new key
        for _ in range(5):
            with pytest.raises(KeyChangedError, match="no longer the key this signer was opened"):
                signer.sign(b"after")
        assert signer.public_jwk == old_jwk
    finally:
        signer.close()
    with open_pkcs11_signer(token.uri(), pin=token.pin) as rotated:  # the explicit way
        assert rotated.public_jwk != old_jwk
        _checked(rotated, b"rotated")


# -- 3. a missing key is looked for with back-off, not per signature -----------------------

_MISSING_KEY_CHILD = """
import json, os, subprocess, sys, time
from dpop_signer.errors import KeyNotFoundError
from dpop_signer.signers.pkcs11 import open_pkcs11_signer
uri, pin, module, label, key = json.loads(os.environ["ARGS"])
log = os.environ["PKCS11SPY_OUTPUT"]
signer = open_pkcs11_signer(uri, pin=pin)
signer.sign(b"before")
for kind in ("privkey", "pubkey"):
    subprocess.run(["pkcs11-tool", "--module", module, "--token-label", label, "--login",
                    "--pin", pin, "--delete-object", "--type", kind, "--label", key],
                   check=True, capture_output=True, timeout=20)
def searches():
    return open(log, errors="replace").read().count(": C_FindObjectsInit\\n")
errors = []
try:
    signer.sign(b"first")
except KeyNotFoundError as exc:
    errors.append(exc.message)
after_first = searches()
started = time.monotonic()
for _ in range(30):  # inside the first 1 s back-off: stop at 0.8 s on a slow machine
    if time.monotonic() - started > 0.8:
        break
    try:
        signer.sign(b"x")
    except KeyNotFoundError:
        errors.append("again")
    time.sleep(0.01)
print(json.dumps({"errors": errors, "extra_searches": searches() - after_first,
                  "seconds": time.monotonic() - started}))
"""


def test_a_deleted_key_is_reported_and_not_searched_for_on_every_signature(
    token: FreshToken, tmp_path: Path
) -> None:
    spy_log = tmp_path / "spy.log"
    args = [token.uri(spy_module()), token.pin, token.base.module, token.label, token.key_label]
    out = python_child(
        _MISSING_KEY_CHILD,
        {
            "ARGS": json.dumps(args),
            "PKCS11SPY": token.base.module,
            "PKCS11SPY_OUTPUT": str(spy_log),
        },
        timeout=60,
    )
    result = json.loads(out)
    assert "does not exist" in result["errors"][0]
    again = result["errors"][1:]
    assert len(again) >= 5
    assert again == ["again"] * len(again)
    assert result["extra_searches"] == 0
    assert result["seconds"] < 5.0


# -- 4. a stalled HSM: callers fail at the deadline, the stuck call finishes by itself ------


def test_a_stalled_module_fails_callers_at_the_deadline_and_resumes(
    token: FreshToken, p11kit: P11KitServer
) -> None:
    deadline = 1.0
    uri = token.uri(client_module())
    signer = open_pkcs11_signer(uri, pin=token.pin, sign_timeout=deadline)
    try:
        _checked(signer, b"before")
        stuck_thread: dict[str, Any] = {}

        def inside_the_stall() -> None:
            started = time.monotonic()
            try:
                stuck_thread["signature"] = signer.sign(b"stuck")
            except Exception as exc:
                stuck_thread["error"] = exc
            stuck_thread["seconds"] = time.monotonic() - started

        async def callers() -> list[tuple[BaseException | bytes, float]]:
            async def one() -> tuple[BaseException | bytes, float]:
                started = time.monotonic()
                try:
                    outcome: BaseException | bytes = await signer.sign_async(b"async")
                except SignerTimeoutError as exc:
                    outcome = exc
                return outcome, time.monotonic() - started

            return await asyncio.gather(*(one() for _ in range(5)))

        with p11kit.stalled():
            thread = threading.Thread(target=inside_the_stall)
            thread.start()
            entered = time.monotonic()
            while not signer.module.busy_since:  # the thread is inside C_Sign now
                assert time.monotonic() - entered < 5.0
                time.sleep(0.005)
            results = asyncio.run(callers())
            while not signer.stalled:  # older than the deadline: callers now fail at once
                assert time.monotonic() - entered < deadline + 5.0
                time.sleep(0.01)
            started = time.monotonic()
            with pytest.raises(SignerTimeoutError, match="did not answer within the signing"):
                signer.sign(b"sync caller")
            sync_seconds = time.monotonic() - started
        thread.join(10)
        assert not thread.is_alive()
        for outcome, seconds in results:
            assert isinstance(outcome, SignerTimeoutError)
            assert seconds < deadline + 0.5
        assert sync_seconds < deadline + 0.5
        # The call that was inside the module when it stalled finished once it answered again.
        if "signature" in stuck_thread:
            verify_all(dict(signer.public_jwk), [(b"stuck", stuck_thread["signature"])])
        assert not signer.stalled
        _checked(signer, b"after")
    finally:
        signer.close()


# -- 5. forked workers open their own signer -----------------------------------------------


def _forked_worker(uri: str, pin: str, inherited: Pkcs11Signer, queue: Any) -> None:
    try:
        try:
            inherited.sign(b"inherited")
            inherited_error = "signed"
        except SignerUnavailableError as exc:
            inherited_error = exc.message
        own = load_signer(uri, pin=pin)
        signature = own.sign(b"child %d" % os.getpid())
        queue.put((inherited_error, os.getpid(), signature.hex(), dict(own.public_jwk)))
    except BaseException as exc:
        queue.put(("crash", 0, repr(exc), {}))


def test_forked_children_open_their_own_signer_and_sign(pkcs11_key_uri: str) -> None:
    parent = open_pkcs11_signer(pkcs11_key_uri)
    try:
        _checked(parent, b"parent before")
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        # Four workers opening at the same moment, as gunicorn starts them.
        workers = [
            context.Process(target=_forked_worker, args=(pkcs11_key_uri, None, parent, queue))
            for _ in range(4)
        ]
        for worker in workers:
            worker.start()
        answers = [queue.get(timeout=30) for _ in workers]
        for worker in workers:
            worker.join(30)
            assert worker.exitcode == 0
        for inherited_error, pid, signature, jwk in answers:
            assert inherited_error != "crash", signature
            assert "opened before fork()" in inherited_error
            assert jwk == parent.public_jwk
            verify_all(jwk, [(b"child %d" % pid, bytes.fromhex(signature))])
        _checked(parent, b"parent after")
    finally:
        parent.close()


# -- 6. close() racing sign() --------------------------------------------------------------

_CLOSE_RACE_CHILD = """
import json, os, threading
from dpop_signer.errors import SignerUnavailableError
from dpop_signer.signers.pkcs11 import open_pkcs11_signer
uri, pin = json.loads(os.environ["ARGS"])
after_close = 0
for _ in range(20):
    signer = open_pkcs11_signer(uri, pin=pin)
    closed = threading.Event()
    stop = threading.Event()
    def hammer():
        global after_close
        while not stop.is_set():
            was_closed = closed.is_set()
            try:
                signer.sign(b"x")
                if was_closed:
                    after_close += 1
            except SignerUnavailableError:
                pass
    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    signer.close()
    closed.set()
    for _ in range(200):
        try:
            signer.sign(b"y")
            after_close += 1
        except SignerUnavailableError:
            pass
    stop.set()
    for t in threads:
        t.join(10)
print(json.dumps({"after_close": after_close}))
"""


def test_no_signature_and_no_session_survive_close(token: FreshToken, tmp_path: Path) -> None:
    spy_log = tmp_path / "spy.log"
    out = python_child(
        _CLOSE_RACE_CHILD,
        {
            "ARGS": json.dumps([token.uri(spy_module()), token.pin]),
            "PKCS11SPY": token.base.module,
            "PKCS11SPY_OUTPUT": str(spy_log),
        },
        timeout=120,
    )
    assert json.loads(out)["after_close"] == 0
    # Every login was undone by close(): none was made again behind a closed signer's back.
    assert spy_calls(spy_log, "C_Login", "CKR_OK") == 20
    assert spy_calls(spy_log, "C_Logout", "CKR_OK") == 20
    assert spy_calls(spy_log, "C_OpenSession") == spy_calls(spy_log, "C_CloseSession")


def test_missing_key_error_names_the_key(token: FreshToken) -> None:
    token.delete_key()
    with pytest.raises(KeyNotFoundError, match=token.key_label):
        open_pkcs11_signer(token.uri(), pin=token.pin)


def test_a_refused_pin_at_open_is_not_sent_again_by_a_second_open(token: FreshToken) -> None:
    with pytest.raises(PinError, match="wrong PIN"):
        open_pkcs11_signer(token.uri(), pin="00000000")
    with pytest.raises(PinError, match="never sent to the token again"):
        open_pkcs11_signer(token.uri(), pin="00000000")
    with open_pkcs11_signer(token.uri(), pin=token.pin) as signer:
        _checked(signer, b"right pin")
