"""Running ``dpop`` as a real subprocess in the CLI tests, and checking what it printed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Variables a developer's shell may carry that would change what the CLI under test does.
_STRIPPED_PREFIXES = ("DPOP_",)
_KEPT = {"DPOP_PKCS11_MODULE"}


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def both(self) -> str:
        return self.out + self.err


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED_PREFIXES) or k in _KEPT
    }
    env["DPOP_NO_PROMPT"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def dpop(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stdin: str | None = None,
    timeout: float = 60.0,
) -> Result:
    """Run ``python -m dpop_signer ARGS`` with a clean environment plus ``env``."""
    proc = subprocess.run(
        [sys.executable, "-m", "dpop_signer", *args],
        env=clean_env(env),
        cwd=cwd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_ok(result: Result) -> Result:
    assert result.code == 0, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err}"
    assert "Traceback" not in result.both
    return result


def assert_one_line_error(result: Result, *, code: int | None = None, says: str = "") -> str:
    """Non-zero exit, no traceback, and exactly one ``error:`` line on stderr (warnings aside)."""
    assert result.code != 0, f"expected failure, got 0\nstdout: {result.out}"
    if code is not None:
        assert result.code == code, f"exit {result.code}, want {code}; stderr: {result.err}"
    assert "Traceback" not in result.both, result.both
    lines = [line for line in result.err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, f"want one error line, got: {result.err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert says.lower() in lines[0].lower(), f"{says!r} not in {lines[0]!r}"
    return lines[0]


def assert_absent(text: str, secrets: Iterable[str | None]) -> None:
    """None of ``secrets`` (the real values) occurs in ``text``."""
    for secret in secrets:
        if secret:
            assert secret not in text, f"a secret value of {len(secret)} chars leaked"
