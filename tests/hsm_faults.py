"""Real faults of a real token, made from outside the process under test, as an operator would.

Used by tests/test_signer_lifecycle.py:

- `FreshToken`: a SoftHSM2 token of its own (unique label) in the session's token directory,
  with a key made by ``dpop keygen``; `reinit` re-initializes it (new PIN, or the same PIN and a
  new key under the same label) with ``softhsm2-util`` from another process, `delete_key`
  removes the key with ``pkcs11-tool``.
- `P11KitServer`: the token served by ``p11-kit server`` to ``p11-kit-client.so``, standing in
  for a network HSM; its per-connection child can be stopped (a stalled HSM), continued or
  killed (a dropped connection). Optionally the server loads the token through
  ``pkcs11-spy.so``, whose log counts the calls that reach the "HSM".
- `spy_calls`: how many times a function was called (and returned a given CKR) in a spy log.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT, SoftHsmToken, require

SPY_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/pkcs11-spy.so",
    "/usr/lib/pkcs11/pkcs11-spy.so",
)
CLIENT_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
)
WAIT = 20.0
"""Longest wait for any outside step (a command, a socket, a child process)."""


def _first(paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if os.path.exists(p)), None)


def spy_module() -> str:
    path = _first(SPY_CANDIDATES)
    require(path is not None, "pkcs11-spy.so is missing (Debian: apt-get install opensc)")
    assert path is not None
    return path


def client_module() -> str:
    path = _first(CLIENT_CANDIDATES)
    require(path is not None, "p11-kit-client.so is missing (Debian: p11-kit-modules)")
    require(shutil.which("p11-kit") is not None, "p11-kit is missing (Debian: p11-kit)")
    assert path is not None
    return path


def run(args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=WAIT, env=env or dict(os.environ)
    )
    assert done.returncode == 0, f"{args[0]} failed: {done.stdout} {done.stderr}"
    return done.stdout


def spy_calls(log: Path, function: str, returned: str | None = None) -> int:
    """Calls of ``function`` in a pkcs11-spy log (only those that returned ``returned``)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    count = 0
    # Each call is logged as "N: C_Name" ... "Returned:  RV CKR_NAME".
    for match in re.finditer(rf"\d+: {function}\n.*?Returned:\s+\d+ (\w+)", text, re.S):
        if returned is None or match.group(1) == returned:
            count += 1
    return count


@dataclass
class FreshToken:
    base: SoftHsmToken
    label: str
    pin: str
    key_label: str = "lifecycle"

    @classmethod
    def create(cls, base: SoftHsmToken, tmp_path: Path) -> FreshToken:
        token = cls(base, f"lc-{secrets.token_hex(4)}", secrets.token_hex(8))
        run(["softhsm2-util", "--init-token", "--free", "--label", token.label,
             "--pin", token.pin, "--so-pin", base.so_pin])  # fmt: skip
        token.keygen(tmp_path)
        return token

    def uri(self, module: str | None = None) -> str:
        return (
            f"pkcs11:token={self.label};object={self.key_label}"
            f"?module-path={module or self.base.module}"
        )

    def keygen(self, tmp_path: Path) -> None:
        """``dpop keygen`` in its own process."""
        env = {**os.environ, "DPOP_PIN": self.pin}
        run([sys.executable, "-m", "dpop_signer", "keygen", "--key", self.uri()], env)
        del tmp_path

    def reinit(self, tmp_path: Path, *, pin: str | None = None, new_key: bool = False) -> None:
        """Re-initialize the token in place (same label): every object is gone."""
        self.pin = pin or self.pin
        run(["softhsm2-util", "--init-token", "--token", self.label, "--label", self.label,
             "--pin", self.pin, "--so-pin", self.base.so_pin])  # fmt: skip
        if new_key:
            self.keygen(tmp_path)

    def change_pin(self, new: str) -> None:
        """``C_SetPIN`` with ``pkcs11-tool`` (OpenSC): the keys stay, the old PIN stops working."""
        require(shutil.which("pkcs11-tool") is not None, "pkcs11-tool is missing (opensc)")
        run(["pkcs11-tool", "--module", self.base.module, "--token-label", self.label,
             "--login", "--pin", self.pin, "--change-pin", "--new-pin", new])  # fmt: skip
        self.pin = new

    def delete_key(self) -> None:
        """Delete the key pair with ``pkcs11-tool`` (OpenSC), as an operator would."""
        require(shutil.which("pkcs11-tool") is not None, "pkcs11-tool is missing (opensc)")
        for kind in ("privkey", "pubkey"):
            run(["pkcs11-tool", "--module", self.base.module, "--token-label", self.label,
                 "--login", "--pin", self.pin, "--delete-object", "--type", kind,
                 "--label", self.key_label])  # fmt: skip


class P11KitServer:
    """``p11-kit server`` in the foreground for one token; stopped by PID at the end."""

    def __init__(self, token: FreshToken, workdir: Path, *, spy_log: Path | None = None) -> None:
        self.socket = workdir / "p11-kit.sock"
        env = dict(os.environ)
        provider = token.base.module
        if spy_log is not None:
            env["PKCS11SPY"] = provider
            env["PKCS11SPY_OUTPUT"] = str(spy_log)
            provider = spy_module()
        self._out = open(workdir / "p11-kit-server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(self.socket), "--provider", provider,
             f"pkcs11:token={token.label}"],
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + WAIT
        while not self.socket.exists():
            assert self.process.poll() is None, (workdir / "p11-kit-server.log").read_text()
            assert time.monotonic() < deadline, "p11-kit server did not create its socket"
            time.sleep(0.02)
        self.address = f"unix:path={self.socket}"
        self.env = {"P11_KIT_SERVER_ADDRESS": self.address}

    def children(self) -> list[int]:
        """PIDs of the per-connection children (one per client process)."""
        done = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, timeout=WAIT
        )
        return [int(pid) for pid in done.stdout.split()]

    def child(self) -> int:
        deadline = time.monotonic() + WAIT
        while not (pids := self.children()):
            assert time.monotonic() < deadline, "no client has connected to p11-kit server"
            time.sleep(0.02)
        assert len(pids) == 1, pids
        return pids[0]

    def signal_child(self, sig: int) -> int:
        pid = self.child()
        os.kill(pid, sig)
        return pid

    @contextmanager
    def stalled(self) -> Iterator[int]:
        """The child stopped (SIGSTOP) for the block: every call into the module hangs."""
        pid = self.signal_child(signal.SIGSTOP)
        try:
            yield pid
        finally:
            os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        for pid in self.children():
            os.kill(pid, signal.SIGCONT)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        self._out.close()


def python_child(code: str, env: dict[str, str], timeout: float = WAIT) -> str:
    """Run ``code`` in a fresh interpreter (own module state, own spy log); return stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
