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
from tests.cli_support import DPOP, assert_absent, assert_ok, assert_one_line_error, dpop

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


def run_on_terminal(
    args: list[str], answer: str, *, prompt: bytes, extra_env: dict[str, str] | None = None
) -> tuple[str, int]:
    """Run dpop on a pseudo-terminal, type ``answer`` at ``prompt``; return output and status."""
    import pty
    import select
    import time

    from tests.cli_support import clean_env

    env = clean_env(extra_env)
    del env["DPOP_NO_PROMPT"]
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(str(DPOP), [str(DPOP), *args], env)  # noqa: S606
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


# --- first run: help, hints, settings, SoftHSM2, packaging ---------------------------------


def test_dpop_alone_prints_the_help_as_help_does():
    result = dpop()
    assert result.code == 2
    assert result.err == assert_ok(dpop("--help")).out  # the same text, not one squashed line
    assert "error:" not in result.err
    assert result.err.startswith("Usage: dpop")
    assert "Exit status:" in result.err


def test_demo_pin_hint_names_only_what_demo_has(tmp_path):
    key = tmp_path / "k.pem"
    assert_ok(dpop("keygen", "--key", str(key), env={"DPOP_PIN": "demo-passphrase-7"}))
    line = assert_one_line_error(dpop("demo", "--key", str(key)), code=3, says="encrypted")
    assert "DPOP_PIN_FILE" in line
    assert "--pin" not in line  # `dpop demo` has no --pin, --pin-file or --config
    assert "--config" not in line


def test_default_config_file_and_dpop_config(pem_key_path, tmp_path):
    config_dir = tmp_path / "xdg" / "dpop"
    config_dir.mkdir(parents=True)
    (tmp_path / "secret").write_text("config-secret-55\n")
    (config_dir / "config.toml").write_text(
        f'key = "{pem_key_path}"\nclient_secret_file = "{tmp_path / "secret"}"\n'
    )
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "DPOP_TOKEN_URL": "https://as.example/t"}
    expected = oracle.thumbprint(jwk_of_pem(pem_key_path))
    assert assert_ok(dpop("thumbprint", env=env)).out.strip() == expected
    shown = assert_ok(dpop("config", "--scope", "read", env=env)).out
    lines = {line.split(" = ")[0]: line for line in shown.splitlines() if " = " in line}
    assert str(config_dir / "config.toml") in shown.splitlines()[0]
    assert lines["key"].endswith(f"# from {config_dir / 'config.toml'} (key)")
    assert lines["token_url"] == 'token_url = "https://as.example/t"  # from DPOP_TOKEN_URL'
    assert lines["scope"] == 'scope = "read"  # from --scope'
    assert "(client_secret_file)" in lines["client_secret"]
    assert_absent(shown, ["config-secret-55"])
    assert "# client_id is not set" in shown
    # DPOP_CONFIG beats the default location.
    other = tmp_path / "other.toml"
    other.write_text('scope = "other"\n')
    named = assert_ok(dpop("config", env={**env, "DPOP_CONFIG": str(other)})).out
    assert 'scope = "other"' in named
    assert "named by DPOP_CONFIG" in named


def test_shell_completion_is_clicks_own():
    result = dpop(env={"_DPOP_COMPLETE": "bash_source"})
    assert result.code == 0, result.err
    assert "complete " in result.out
    assert "_DPOP_COMPLETE=bash_complete" in result.out


@pytest.mark.softhsm
def test_softhsm2_configuration_is_named_as_the_cause(softhsm, tmp_path):
    ref = "pkcs11:token=no-such-token;object=x"
    unset = dpop("jwk", "--key", ref, env={"SOFTHSM2_CONF": None, "DPOP_PIN": "1"})
    line = assert_one_line_error(unset, code=3)
    assert "SOFTHSM2_CONF is not set" in line
    gone = tmp_path / "gone.conf"
    missing = dpop("jwk", "--key", ref, env={"SOFTHSM2_CONF": str(gone), "DPOP_PIN": "1"})
    line = assert_one_line_error(missing, code=3)
    assert f"SOFTHSM2_CONF={gone} does not exist" in line
    assert "module-path=" not in line  # the module is fine; its configuration is not
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    no_dir = dpop("jwk", "--key", ref, env={"SOFTHSM2_CONF": str(conf), "DPOP_PIN": "1"})
    assert f"token directory {tmp_path / 'tokens'}" in assert_one_line_error(no_dir, code=3)


@pytest.mark.softhsm
def test_dev_token_script_recreates_a_token_that_is_gone(softhsm, tmp_path):
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "softhsm").mkdir()
    for name in ("dev-token.sh", "softhsm2.conf.in"):
        shutil.copy(root / "softhsm" / name, tmp_path / "softhsm" / name)
    env = {**os.environ, "BIN": str(Path(sys.executable).parent)}

    def run() -> str:
        proc = subprocess.run(
            ["bash", str(tmp_path / "softhsm" / "dev-token.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    made = run()
    assert "created SoftHSM2 token" in made
    assert "already set up" in run()
    shutil.rmtree(tmp_path / ".softhsm" / "tokens")
    again = run()
    assert "setting it up again" in again
    assert "created SoftHSM2 token" in again
    dev_env = dict(
        line.split("=", 1)
        for line in (tmp_path / ".softhsm" / "dev.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    values = {k: v.strip("'") for k, v in dev_env.items()}
    # One key, one URI: the script printed the URI that dev.env holds.
    assert f"P-256 key {values['DPOP_KEY']} " in again
    jkt = assert_ok(dpop("thumbprint", env=values)).out.strip()
    assert f"(jkt {jkt})" in again


def test_license_and_package_metadata():
    import tomllib

    root = Path(__file__).resolve().parent.parent
    license_text = (root / "LICENSE").read_text()
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert "Programming Language :: Python :: 3.13" in project["classifiers"]
    assert project["urls"]
    assert any(dep.startswith("truststore") for dep in project["dependencies"])
