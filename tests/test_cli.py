"""``dpop`` key commands as real subprocesses: keygen, jwk, thumbprint, proof, help, errors.

Expected JWKs and thumbprints come from the key file read with ``cryptography`` and from the
independent ``tests/oracle.py``, never from dpop_signer itself.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests import oracle
from tests.cli_support import assert_absent, assert_ok, assert_one_line_error, dpop

COMMANDS = ["keygen", "jwk", "thumbprint", "proof", "token", "request", "doctor", "demo"]


def jwk_of_pem(path: str | Path, password: bytes | None = None) -> dict[str, str]:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": oracle._b64e(numbers.x.to_bytes(32, "big")),
        "y": oracle._b64e(numbers.y.to_bytes(32, "big")),
    }


# --- help ----------------------------------------------------------------------------------


def test_top_level_help_lists_every_command_with_examples():
    result = assert_ok(dpop("--help"))
    for name in COMMANDS:
        assert f"  {name} " in result.out
    assert "Examples:" in result.out
    assert "dpop request" in result.out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_says_what_it_does_with_an_example(command):
    result = assert_ok(dpop(command, "--help"))
    assert "Example" in result.out
    assert f"dpop {command}" in result.out or (command == "demo" and "make demo" in result.out)
    # The environment variables appear next to the options they feed.
    if command not in ("demo",):
        assert "[env: DPOP_KEY]" in " ".join(result.out.split())


def test_console_script_and_version():
    script = Path(sys.executable).with_name("dpop")
    if not script.exists():
        found = shutil.which("dpop")
        assert found, "the dpop console script is not installed"
        script = Path(found)
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("dpop, version ")


# --- keygen / jwk / thumbprint -------------------------------------------------------------


def test_keygen_jwk_thumbprint_with_a_pem_key(tmp_path):
    key = tmp_path / "k.pem"
    created = assert_ok(dpop("keygen", "--key", str(key)))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    expected_jwk = jwk_of_pem(key)
    expected_jkt = oracle.thumbprint(expected_jwk)
    assert created.out.strip() == expected_jkt

    assert json.loads(assert_ok(dpop("jwk", "--key", str(key))).out) == expected_jwk
    assert assert_ok(dpop("thumbprint", "--key", str(key))).out.strip() == expected_jkt
    # The same key through DPOP_KEY and through a config file.
    assert assert_ok(dpop("thumbprint", env={"DPOP_KEY": str(key)})).out.strip() == expected_jkt
    cfg = tmp_path / "dpop.toml"
    cfg.write_text(f'key = "{key}"\n')
    assert assert_ok(dpop("thumbprint", "--config", str(cfg))).out.strip() == expected_jkt
    assert assert_ok(dpop("thumbprint", env={"DPOP_CONFIG": str(cfg)})).out.strip() == expected_jkt


def test_keygen_refuses_to_overwrite(tmp_path):
    key = tmp_path / "k.pem"
    assert_ok(dpop("keygen", "--key", str(key)))
    before = key.read_bytes()
    assert_one_line_error(dpop("keygen", "--key", str(key)), says="exists already")
    assert key.read_bytes() == before


def test_encrypted_pem_key_with_pin_file_env_and_option(tmp_path):
    key = tmp_path / "k.pem"
    pin_file = tmp_path / "pin"
    pin_file.write_text("pem-passphrase-1\n")
    assert_ok(dpop("keygen", "--key", str(key), "--pin-file", str(pin_file)))
    assert b"ENCRYPTED" in key.read_bytes()
    expected = oracle.thumbprint(jwk_of_pem(key, b"pem-passphrase-1"))

    via_env = assert_ok(dpop("thumbprint", "--key", str(key), env={"DPOP_PIN": "pem-passphrase-1"}))
    assert via_env.out.strip() == expected
    via_env_file = dpop("thumbprint", "--key", str(key), env={"DPOP_PIN_FILE": str(pin_file)})
    assert assert_ok(via_env_file).out.strip() == expected

    via_option = assert_ok(dpop("thumbprint", "--key", str(key), "--pin", "pem-passphrase-1"))
    assert via_option.out.strip() == expected
    assert "warning: --pin on the command line" in via_option.err
    assert "pem-passphrase-1" not in via_option.err

    wrong = dpop("thumbprint", "--key", str(key), env={"DPOP_PIN": "not-the-passphrase"})
    line = assert_one_line_error(wrong, code=3, says="wrong passphrase")
    assert_absent(wrong.both, ["not-the-passphrase", "pem-passphrase-1"])
    assert str(key) in line

    missing = dpop("thumbprint", "--key", str(key))
    line = assert_one_line_error(missing, code=3, says="encrypted")
    # In the command's words: the options and variables that exist, never Python's pin=.
    for hint in ("--pin-file", "DPOP_PIN_FILE", "DPOP_PIN", "--config"):
        assert hint in line
    assert "pin=" not in line


# --- proof ---------------------------------------------------------------------------------


def test_proof_passes_the_oracle(pem_key_path):
    url = "https://API.Example.com:443/v1/things?page=2#frag"
    result = assert_ok(dpop("proof", "--key", pem_key_path, "get", url))
    proof = result.out.strip()
    checked = oracle.check_proof(proof, htm="GET", url=url, expected_jwk=jwk_of_pem(pem_key_path))
    assert checked.claims["htu"] == "https://api.example.com/v1/things"
    assert "ath" not in checked.claims


def test_proof_with_access_token_and_nonce(pem_key_path, tmp_path):
    token = "eyJhbGciOiJFUzI1NiJ9.e30.c2lnbmF0dXJl-access-token"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    for args, env in [
        (["--access-token", token], {}),
        (["--access-token", f"@{token_file}"], {}),
        ([], {"DPOP_ACCESS_TOKEN": token}),
    ]:
        result = assert_ok(
            dpop(
                "proof",
                "--key",
                pem_key_path,
                *args,
                "--nonce",
                "server-nonce-123",
                "POST",
                "http://127.0.0.1:8080/token",
                env=env,
            )
        )
        oracle.check_proof(
            result.out.strip(),
            htm="POST",
            url="http://127.0.0.1:8080/token",
            access_token=token,
            nonce="server-nonce-123",
            expected_jwk=jwk_of_pem(pem_key_path),
        )


def test_each_proof_is_fresh(pem_key_path):
    a = assert_ok(dpop("proof", "--key", pem_key_path, "GET", "https://a.example/")).out
    b = assert_ok(dpop("proof", "--key", pem_key_path, "GET", "https://a.example/")).out
    ca = oracle.check_proof(a.strip(), htm="GET", url="https://a.example/")
    cb = oracle.check_proof(b.strip(), htm="GET", url="https://a.example/")
    assert ca.claims["jti"] != cb.claims["jti"]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["proof", "--key", "{pem}"], 2, "missing argument 'method'"),
        (["proof", "--key", "{pem}", "GET"], 2, "missing argument 'url'"),
        (["proof", "GET", "https://a.example/"], 2, "DPOP_KEY"),
        (["proof", "--key", "{pem}", "GET", "ftp://a.example/x"], 2, ""),
        (["proof", "--key", "{pem}", "GET", "/relative"], 2, "absolute"),
        (["jwk", "--key", "{tmp}/missing.pem"], 3, "does not exist"),
        (["jwk", "--key", "{tmp}"], 3, "cannot be read"),
        (["jwk", "--key", "{tmp}/garbage.pem"], 3, "not PEM"),
        (["jwk", "--config", "{tmp}/missing.toml"], 2, "does not exist"),
        (["jwk", "--config", "{tmp}/bad.toml"], 2, "unknown key 'colour'"),
        (["jwk", "--nope"], 2, "no such option"),
        (["frobnicate"], 2, "no such command"),
        (["jwk", "--key", "pkcs11:slot-id=0;object=x"], 2, "token= or serial="),
    ],
)
def test_bad_input_gives_one_line_error(pem_key_path, tmp_path, args, code, says):
    (tmp_path / "garbage.pem").write_text("hello")
    (tmp_path / "bad.toml").write_text("colour = 'blue'\n")
    argv = [a.format(pem=pem_key_path, tmp=tmp_path) for a in args]
    assert_one_line_error(dpop(*argv), code=code, says=says)


def test_error_names_the_layer_of_a_bad_value(tmp_path):
    result = dpop("jwk", env={"DPOP_KEY": "k.pem", "DPOP_TIMEOUT": "-3"})
    assert_one_line_error(result, code=2, says="timeout from DPOP_TIMEOUT")


# --- PKCS#11 (SoftHSM2) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_token_key(softhsm):
    """A key made in the session token by ``dpop keygen`` itself (PIN from DPOP_PIN)."""
    uri = f"pkcs11:token={softhsm.label};object=cli-es256"
    result = dpop("keygen", "--key", uri, env={"DPOP_PIN": softhsm.pin})
    assert_ok(result)
    return uri, result.out.strip()


@pytest.mark.softhsm
def test_pkcs11_keygen_jwk_thumbprint_proof(softhsm, cli_token_key, tmp_path):
    uri, jkt = cli_token_key
    env = {"DPOP_PIN": softhsm.pin}
    jwk = json.loads(assert_ok(dpop("jwk", "--key", uri, env=env)).out)
    assert set(jwk) == {"kty", "crv", "x", "y"}
    assert oracle.thumbprint(jwk) == jkt
    assert assert_ok(dpop("thumbprint", "--key", uri, env=env)).out.strip() == jkt
    proof = assert_ok(dpop("proof", "--key", uri, "PUT", "https://rs.example/x", env=env)).out
    oracle.check_proof(proof.strip(), htm="PUT", url="https://rs.example/x", expected_jwk=jwk)
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    by_file = dpop("thumbprint", "--key", uri, "--pin-file", str(pin_file))
    assert assert_ok(by_file).out.strip() == jkt


@pytest.mark.softhsm
def test_pkcs11_wrong_and_missing_pin(softhsm, cli_token_key):
    uri, _ = cli_token_key
    wrong = dpop("thumbprint", "--key", uri, env={"DPOP_PIN": "99999999"})
    assert_one_line_error(wrong, code=3, says="pin")
    assert_absent(wrong.both, ["99999999"])
    # The token is not locked by that single try: the right PIN still works.
    assert_ok(dpop("thumbprint", "--key", uri, env={"DPOP_PIN": softhsm.pin}))
    line = assert_one_line_error(dpop("thumbprint", "--key", uri), code=3, says="pin")
    assert "pass pin=" not in line
    assert "--pin-file" in line
    assert "DPOP_PIN_FILE" in line


@pytest.mark.softhsm
def test_pkcs11_missing_key_and_token(softhsm):
    env = {"DPOP_PIN": softhsm.pin}
    no_key = dpop("jwk", "--key", f"pkcs11:token={softhsm.label};object=absent", env=env)
    assert_one_line_error(no_key, code=3, says="absent")
    no_token = dpop("jwk", "--key", "pkcs11:token=no-such-token;object=x", env=env)
    assert_one_line_error(no_token, code=3, says="no-such-token")


def test_no_heavy_imports_for_help():
    # `dpop --help` lists every command, the lazy service ones included: none of that may load
    # pydantic (most of the start-up time when it did), cryptography, httpx, PKCS#11 or the
    # ASGI stack.
    code = (
        "import contextlib, io, sys; from dpop_signer.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert 'serve' in out.getvalue() and 'proxy' in out.getvalue(), out.getvalue()\n"
        "names = ('httpx', 'pkcs11', 'starlette', 'uvicorn', 'pydantic', 'cryptography')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert proc.stdout.strip() == ""


def run_on_terminal(args: list[str], answer: str, *, prompt: bytes) -> tuple[str, int]:
    """Run dpop on a pseudo-terminal, type ``answer`` at ``prompt``; return output and status."""
    import pty
    import select
    import time

    from tests.cli_support import clean_env

    env = clean_env()
    del env["DPOP_NO_PROMPT"]
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(sys.executable, [sys.executable, "-m", "dpop_signer", *args], env)  # noqa: S606
    output = b""
    answered = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if prompt in output and not answered:
                os.write(fd, answer.encode() + b"\n")
                answered = True
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return output.decode("utf-8", "replace"), os.waitstatus_to_exitcode(status)


def test_passphrase_prompt_on_a_terminal_is_hidden(tmp_path):
    key = tmp_path / "k.pem"
    assert_ok(dpop("keygen", "--key", str(key), env={"DPOP_PIN": "typed-secret-42"}))
    output, status = run_on_terminal(
        ["thumbprint", "--key", str(key)], "typed-secret-42", prompt=b"passphrase for"
    )
    assert status == 0, output
    assert oracle.thumbprint(jwk_of_pem(key, b"typed-secret-42")) in output
    assert "typed-secret-42" not in output  # not echoed


@pytest.mark.softhsm
def test_pin_prompt_on_a_terminal(softhsm, cli_token_key):
    uri, jkt = cli_token_key
    output, status = run_on_terminal(
        ["thumbprint", "--key", uri], softhsm.pin, prompt=b"PIN for token"
    )
    assert status == 0, output
    assert jkt in output
