"""A tpm2-pkcs11 token over a software TPM (``swtpm``) for the tests, started once per session.

``tpm2_token`` starts three processes, each stopped by its PID at the end of the session:

* ``swtpm``, a TPM 2.0 emulator, on two free loopback ports (its TCTI uses port N for
  commands and N+1 for control);
* a private ``dbus-daemon`` on a socket in a temporary directory;
* ``tpm2-abrmd``, the TPM access broker, on that bus. It is needed: without a resource
  manager every tpm2-tools run leaves its transient objects in the TPM (which holds three),
  so ``tpm2_ptool addtoken`` fails with "out of memory for object contexts", and ``swtpm``
  serves one connection at a time while the tests load the module in this process and in
  ``dpop`` subprocesses at once.

``tpm2_ptool`` then makes a store in the temporary directory and a token in it. The TCTI, store
and bus variables go into ``os.environ`` for the session (the module reads them at
``C_Initialize``, and ``dpop`` subprocesses inherit them) and are restored afterwards.

Without the Debian packages (``swtpm``, ``swtpm-tools``, ``libtpm2-pkcs11-1``,
``libtpm2-pkcs11-tools``, ``tpm2-tools``, ``tpm2-abrmd``; ``make system-deps`` installs them)
the tests skip on a developer machine and fail under CI (``conftest.require``).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require
from tests.interop_fixtures import NodeProcess

__all__ = ["TPM2_MODULE_CANDIDATES", "Tpm2Token", "tpm2_token"]

TPM2_MODULE_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib64/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/pkcs11/libtpm2_pkcs11.so",
    "/usr/local/lib/libtpm2_pkcs11.so",
)
TOOLS = ("swtpm", "dbus-daemon", "tpm2-abrmd", "tpm2_ptool", "tpm2_getrandom")
PACKAGES = (
    "swtpm swtpm-tools libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools tpm2-abrmd "
    "libtss2-tcti-tabrmd0 dbus-daemon"
)
TABRMD_TCTI_GLOBS = (
    "/usr/lib/*-linux-gnu/libtss2-tcti-tabrmd.so.0",
    "/usr/lib64/libtss2-tcti-tabrmd.so.0",
)
READY_TIMEOUT = 20.0
TOOL_TIMEOUT = 60.0
PORT_TRIES = 5

TOKEN_LABEL = "dpop-tpm"
USER_PIN = "4321"
SO_PIN = "87654321"


@dataclass(frozen=True)
class Tpm2Token:
    """The session's tpm2-pkcs11 token and how to reach it."""

    module: str
    label: str
    pin: str
    so_pin: str
    env: dict[str, str]  # the variables a process needs to reach this TPM

    def uri(self, obj: str, **query: str) -> str:
        q = "&".join([f"module-path={self.module}", *(f"{k}={v}" for k, v in query.items())])
        return f"pkcs11:token={self.label};object={obj}?{q}"

    def tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a tpm2-tools command against this TPM; fail the test when it fails."""
        proc = subprocess.run(
            list(args),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            check=False,
        )
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}"
        return proc


def _find_module() -> str | None:
    return next((p for p in TPM2_MODULE_CANDIDATES if os.path.exists(p)), None)


def _which(tool: str) -> str | None:
    """The tool's path; tpm2-abrmd lives in /usr/sbin, which a user's PATH may lack."""
    found = shutil.which(tool)
    if found is None and os.access(f"/usr/sbin/{tool}", os.X_OK):
        found = f"/usr/sbin/{tool}"
    return found


def _wait_for(ready: Callable[[], bool], what: str, process: NodeProcess) -> float:
    """Poll ``ready`` until it holds; fail after READY_TIMEOUT or when ``process`` exits."""
    started = time.monotonic()
    deadline = started + READY_TIMEOUT
    while not ready():
        if process.process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {process.process.returncode}: {process.stderr()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {READY_TIMEOUT} s: {process.stderr()}")
        time.sleep(0.05)
    return time.monotonic() - started


def _connects(path_or_port: str | int) -> bool:
    family = socket.AF_UNIX if isinstance(path_or_port, str) else socket.AF_INET
    address = path_or_port if isinstance(path_or_port, str) else ("127.0.0.1", path_or_port)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


def _free_port_pair() -> int:
    """A free loopback port N from the OS whose neighbour N+1 is free too (swtpm needs both)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two adjacent free loopback ports in 50 tries")


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> NodeProcess:
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    return NodeProcess(process, {}, log)


def _start_swtpm(workdir: Path) -> tuple[NodeProcess, int]:
    state = workdir / "tpm-state"
    state.mkdir()
    # Another process may take a port between our check and swtpm's bind: then swtpm exits,
    # and a new pair is tried (a bounded number of times).
    for attempt in range(PORT_TRIES):
        port = _free_port_pair()
        swtpm = _start(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={state}",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ],
            workdir / f"swtpm-{attempt}.log",
        )

        def listening(port: int = port) -> bool:
            return _connects(port + 1) and _connects(port)

        try:
            _wait_for(listening, "swtpm", swtpm)
        except RuntimeError:
            swtpm.stop()
            if attempt == PORT_TRIES - 1:
                raise
            continue
        return swtpm, port
    raise AssertionError("unreachable")


def _start_tpm(workdir: Path, env: dict[str, str], started: list[NodeProcess]) -> None:
    """Start swtpm, the bus and the broker; fill ``env`` with what clients need."""
    swtpm, port = _start_swtpm(workdir)
    started.append(swtpm)
    bus_path = workdir / "bus"
    bus = _start(
        [
            "dbus-daemon",
            "--session",
            "--nofork",
            "--nopidfile",
            f"--address=unix:path={bus_path}",
        ],
        workdir / "dbus.log",
    )
    started.append(bus)
    _wait_for(lambda: _connects(str(bus_path)), "dbus-daemon", bus)
    name = f"com.intel.tss2.Tabrmd.dpop{os.getpid()}"
    tcti = f"tabrmd:bus_type=session,bus_name={name}"
    env.update(
        DBUS_SESSION_BUS_ADDRESS=f"unix:path={bus_path}",
        TPM2TOOLS_TCTI=tcti,
        TPM2_PKCS11_TCTI=tcti,
        TPM2_PKCS11_STORE=str(workdir / "store"),
        # Both log to stderr, which the CLI tests read line by line: nothing from the TSS,
        # errors only from tpm2-pkcs11 (its lowest level; test_tpm2 drops those lines).
        TPM2_PKCS11_LOG_LEVEL="0",
        TSS2_LOG="all+NONE",
    )
    abrmd = _start(
        [
            str(_which("tpm2-abrmd")),
            "--session",
            f"--dbus-name={name}",
            "--flush-all",
            f"--tcti=swtpm:host=127.0.0.1,port={port}",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        workdir / "abrmd.log",
        env={**os.environ, **env},
    )
    started.append(abrmd)

    def answers() -> bool:
        probe = subprocess.run(
            ["tpm2_getrandom", "4"],
            env={**os.environ, **env},
            capture_output=True,
            timeout=5.0,
            check=False,
        )
        return probe.returncode == 0

    _wait_for(answers, "tpm2-abrmd", abrmd)


@pytest.fixture(scope="session")
def tpm2_token() -> Iterator[Tpm2Token]:
    """A tpm2-pkcs11 token ``dpop-tpm`` (user PIN ``4321``) on a fresh swtpm for the session."""
    module = _find_module()
    missing = [tool for tool in TOOLS if _which(tool) is None]
    if not any(glob.glob(pattern) for pattern in TABRMD_TCTI_GLOBS):
        missing.append("the tabrmd TCTI")
    require(
        module is not None and not missing,
        f"tpm2-pkcs11 over swtpm is not installed (missing: {', '.join(missing) or 'the module'};"
        f" Debian: apt-get install {PACKAGES}, or make system-deps)",
    )
    assert module is not None
    workdir = Path(tempfile.mkdtemp(prefix="dpop-tpm-"))  # short: a socket path lives here
    env: dict[str, str] = {}
    started: list[NodeProcess] = []
    saved = {name: os.environ.get(name) for name in ("DBUS_SESSION_BUS_ADDRESS",)}
    try:
        _start_tpm(workdir, env, started)
        saved.update({name: os.environ.get(name) for name in env})
        os.environ.update(env)
        token = Tpm2Token(module, TOKEN_LABEL, USER_PIN, SO_PIN, env)
        store = env["TPM2_PKCS11_STORE"]
        os.mkdir(store)
        token.tool("tpm2_ptool", "init", f"--path={store}")
        token.tool(
            "tpm2_ptool",
            "addtoken",
            "--pid=1",
            f"--label={TOKEN_LABEL}",
            f"--userpin={USER_PIN}",
            f"--sopin={SO_PIN}",
            f"--path={store}",
        )
        yield token
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for process in reversed(started):
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
