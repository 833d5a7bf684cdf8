"""How long ``dpop serve`` takes to say at ``/healthz`` that its key is in trouble.

Each fault is made from outside, on a throw-away SoftHSM2 token, while the service has no
traffic at all (only its own health probes, ``--probe-interval``, can notice):

- the key is deleted (``pkcs11-tool --delete-object``) -> ``key_missing``;
- the HSM stalls (``p11-kit server``'s child stopped with SIGSTOP, ``--sign-timeout 1``) ->
  ``stalled``;
- the PIN is changed and the HSM connection drops (``pkcs11-tool --change-pin``, the p11-kit
  child killed) -> ``pin_refused``.

The time is from the fault to the first ``/healthz`` answer naming it, polled every 10 ms; the
expected bound is the probe interval plus the signing deadline for a stall. Each fault runs
``--repeat`` times (default 3) with a fresh service; the median is shown.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from bench.report import Row

SECTION = "Faults (dpop serve, no traffic)"
PROBE = 0.5
SIGN_TIMEOUT = 1.0
WAIT = 20.0
SO_PIN = "12345678"
CLIENT_MODULES = ("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
                  "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so")  # fmt: skip


def _run(args: list[str], env: dict[str, str]) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=WAIT, env=env)


class _Token:
    def __init__(self, workdir: Path, module: str) -> None:
        self.workdir = workdir
        self.module = module
        self.label = f"fault-{secrets.token_hex(3)}"
        self.pin = secrets.token_hex(6)
        (workdir / "tokens").mkdir(exist_ok=True)
        conf = workdir / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {workdir}/tokens\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        self.env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        _run(["softhsm2-util", "--init-token", "--free", "--label", self.label,
              "--pin", self.pin, "--so-pin", SO_PIN], self.env)  # fmt: skip
        _run([sys.executable, "-m", "dpop_signer", "keygen", "--key", self.uri(),
              "--pin", self.pin], self.env)  # fmt: skip

    def uri(self, module: str | None = None) -> str:
        return f"pkcs11:token={self.label};object=fault?module-path={module or self.module}"

    def tool(self, *args: str) -> None:
        _run(["pkcs11-tool", "--module", self.module, "--token-label", self.label, "--login",
              "--pin", self.pin, *args], self.env)  # fmt: skip


@contextlib.contextmanager
def _p11kit(token: _Token) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    sock = token.workdir / "p11.sock"
    server = subprocess.Popen(
        ["p11-kit", "server", "-f", "-n", str(sock), "--provider", token.module,
         f"pkcs11:token={token.label}"],
        env=token.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        while not sock.exists():
            if time.monotonic() > deadline:
                raise SystemExit("p11-kit server did not start")
            time.sleep(0.02)
        yield server, {"P11_KIT_SERVER_ADDRESS": f"unix:path={sock}"}
    finally:
        for child in _children(server.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
        server.terminate()
        server.wait(WAIT)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=WAIT)
    return [int(p) for p in out.stdout.split()]


@contextlib.contextmanager
def _serve(token: _Token, uri: str, env: dict[str, str]) -> Iterator[str]:
    sock = token.workdir / f"svc-{secrets.token_hex(3)}.sock"
    pin_file = token.workdir / "pin"
    pin_file.write_text(token.pin)
    log = open(token.workdir / "serve.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "dpop_signer", "serve", "--listen", f"unix:{sock}", "--key", uri,
         "--pin-file", str(pin_file), "--probe-interval", str(PROBE),
         "--sign-timeout", str(SIGN_TIMEOUT)],
        env={**token.env, **env}, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        while not sock.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((token.workdir / "serve.log").read_text()[-2000:])
            time.sleep(0.02)
        yield str(sock)
    finally:
        process.terminate()
        process.wait(WAIT)
        log.close()


def _time_to(sock: str, state: str, fault: Callable[[], None]) -> float:
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://dpop") as client:
        deadline = time.monotonic() + WAIT
        while client.get("/healthz").json()["signer"] != "available":
            if time.monotonic() > deadline:
                raise SystemExit("the service never became available")
            time.sleep(0.01)
        started = time.monotonic()
        fault()
        while client.get("/healthz").json()["signer"] != state:
            if time.monotonic() - started > WAIT:
                raise SystemExit(f"/healthz never said {state}")
            time.sleep(0.01)
        return time.monotonic() - started


def _deleted(workdir: Path, module: str) -> float:
    token = _Token(workdir, module)

    def delete() -> None:
        for kind in ("privkey", "pubkey"):
            token.tool("--delete-object", "--type", kind, "--label", "fault")

    with _serve(token, token.uri(), {}) as sock:
        return _time_to(sock, "key_missing", delete)


def _stalled(workdir: Path, module: str, client: str) -> float:
    token = _Token(workdir, module)
    with _p11kit(token) as (server, env), _serve(token, token.uri(client), env) as sock:

        def stop() -> None:
            for child in _children(server.pid):
                os.kill(child, signal.SIGSTOP)

        return _time_to(sock, "stalled", stop)


def _pin_refused(workdir: Path, module: str, client: str) -> float:
    token = _Token(workdir, module)
    with _p11kit(token) as (server, env), _serve(token, token.uri(client), env) as sock:

        def change() -> None:
            token.tool("--change-pin", "--new-pin", "87654321")
            for child in _children(server.pid):
                os.kill(child, signal.SIGKILL)

        return _time_to(sock, "pin_refused", change)


def main(argv: list[str]) -> list[Row]:
    """Run each fault ``--repeat`` times; one row per fault."""
    from dpop_signer.signers.pkcs11_uri import find_softhsm2_module

    repeat = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--repeat=")), 3)
    module = find_softhsm2_module()
    client = next((p for p in CLIENT_MODULES if os.path.exists(p)), None)
    if module is None or client is None or not shutil.which("pkcs11-tool"):
        raise SystemExit(
            "SoftHSM2, p11-kit-client.so and pkcs11-tool are needed (make system-deps)"
        )
    rows = []
    faults: list[tuple[str, str, Callable[[Path], float], float]] = [
        ("key deleted", "key_missing", lambda w: _deleted(w, module), PROBE),
        ("HSM stalled (p11-kit child stopped)", "stalled",
         lambda w: _stalled(w, module, client), PROBE + SIGN_TIMEOUT),
        ("PIN changed, HSM connection dropped", "pin_refused",
         lambda w: _pin_refused(w, module, client), PROBE),
    ]  # fmt: skip
    for name, state, measure, bound in faults:
        seconds = []
        for _ in range(repeat):
            workdir = Path(tempfile.mkdtemp(prefix="dpop-fault-"))
            try:
                seconds.append(measure(workdir))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        median = statistics.median(seconds)
        rows.append(
            Row(
                SECTION,
                f"{name} -> /healthz {state}",
                f"{median * 1000:,.0f} ms",
                target=f"≤ {bound * 1000 + 500:,.0f} ms",
                met=median <= bound + 0.5,
                note=f"runs: {', '.join(f'{s * 1000:.0f}' for s in seconds)} ms; probe every "
                f"{PROBE:g} s, sign timeout {SIGN_TIMEOUT:g} s",
            )
        )
    return rows
