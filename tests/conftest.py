"""Shared fixtures: a fresh SoftHSM2 token per test session, keys, and the CI rule.

Tests that need a real part (SoftHSM2, node) skip with a reason on a developer machine that
lacks it, and fail when ``CI`` is set: CI must never pass by skipping what it was meant to test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpop_signer.signers.base import Signer

# oidc_provider / jose_rs: the node interop servers of tests/interop/ (see that module).
# local_servers / oracle_check: in-package local servers, every proof re-checked by the oracle.
pytest_plugins = [
    "tests.interop_fixtures",
    "tests.servers_fixtures",
    "tests.tpm2_fixtures",
    "tests.redis_fixtures",
    "tests.interop2_fixtures",
]

IN_CI = bool(os.environ.get("CI"))
ROOT = Path(__file__).resolve().parent.parent

SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

TOKEN_LABEL = "dpop-test"
USER_PIN = "1234"
SO_PIN = "12345678"


def require(condition: bool, what: str) -> None:
    """Skip when a real part is missing, or fail under CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} (CI is set: this test must run, not skip)")
    pytest.skip(what)


def find_softhsm_module() -> str | None:
    for path in SOFTHSM_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


@dataclass(frozen=True)
class SoftHsmToken:
    module: str
    label: str
    pin: str
    so_pin: str
    conf: str

    def uri(self, obj: str, **query: str) -> str:
        q = "&".join([f"module-path={self.module}", *(f"{k}={v}" for k, v in query.items())])
        return f"pkcs11:token={self.label};object={obj}?{q}"


_SESSION: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    # SOFTHSM2_CONF must be in the environment before any test loads the module (it is read
    # at C_Initialize, once per process), and subprocesses (the CLI, the service) inherit it.
    module = find_softhsm_module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        return
    workdir = tempfile.mkdtemp(prefix="dpop-softhsm-")
    tokens = Path(workdir, "tokens")
    tokens.mkdir()
    conf = Path(workdir, "softhsm2.conf")
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["DPOP_PKCS11_MODULE"] = module
    subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            TOKEN_LABEL,
            "--pin",
            USER_PIN,
            "--so-pin",
            SO_PIN,
        ],
        check=True,
        capture_output=True,
    )
    _SESSION["token"] = SoftHsmToken(module, TOKEN_LABEL, USER_PIN, SO_PIN, str(conf))
    _SESSION["workdir"] = workdir


def pytest_unconfigure(config: pytest.Config) -> None:
    workdir = _SESSION.get("workdir")
    if isinstance(workdir, str):
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def softhsm() -> SoftHsmToken:
    """The session's fresh SoftHSM2 token (label ``dpop-test``, PIN ``1234``)."""
    token = _SESSION.get("token")
    require(
        isinstance(token, SoftHsmToken),
        "SoftHSM2 is not installed (Debian: apt-get install softhsm2)",
    )
    assert isinstance(token, SoftHsmToken)
    return token


@pytest.fixture(scope="session")
def pkcs11_key_uri(softhsm: SoftHsmToken) -> str:
    """URI of a P-256 key made once per session in the token by our own `generate_key`."""
    from dpop_signer import generate_key

    uri = softhsm.uri("session-es256", **{"pin-value": softhsm.pin})
    signer = generate_key(uri)
    close = getattr(signer, "close", None)
    if close is not None:
        close()
    return uri


@pytest.fixture(scope="session")
def pem_key_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of an unencrypted P-256 PEM key made once per session."""
    from dpop_signer import generate_key

    path = tmp_path_factory.mktemp("pem") / "key.pem"
    generate_key(str(path))
    return str(path)


@pytest.fixture
def pem_signer(pem_key_path: str) -> Signer:
    from dpop_signer import load_signer

    return load_signer(pem_key_path)
