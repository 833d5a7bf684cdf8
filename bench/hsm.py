"""The SoftHSM2 key the benchmarks sign with: the development token, or a throw-away one.

``make bench`` sources ``.softhsm/dev.env``, so ``SOFTHSM2_CONF``, ``DPOP_KEY`` and ``DPOP_PIN``
name the development key; run by hand without them, a temporary token is made with our own
`generate_key` and removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchKey:
    """A PKCS#11 key for benchmarks: ``uri``, ``pin``, where it came from, and its cleanup."""

    uri: str
    pin: str
    source: str
    cleanup: Callable[[], None]


def temp_token() -> tuple[str, str, str]:
    """A throw-away SoftHSM2 token with a key made by our generate_key: (dir, uri, pin)."""
    from dpop_signer import generate_key
    from dpop_signer.signers.pkcs11_uri import find_softhsm2_module

    module = find_softhsm2_module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        raise SystemExit("SoftHSM2 is not installed (make system-deps)")
    workdir = tempfile.mkdtemp(prefix="dpop-bench-")
    Path(workdir, "tokens").mkdir()
    conf = Path(workdir, "softhsm2.conf")
    conf.write_text(
        f"directories.tokendir = {workdir}/tokens\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [util, "--init-token", "--free", "--label", "dpop-bench",
         "--pin", "1234", "--so-pin", "12345678"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    uri = f"pkcs11:token=dpop-bench;object=bench-es256?module-path={module}"
    generate_key(uri, pin="1234").close()  # type: ignore[attr-defined]
    return workdir, uri, "1234"


def bench_key() -> BenchKey:
    """The development key when ``dev.env`` is loaded, else a temporary token's key."""
    key_ref = os.environ.get("DPOP_KEY", "")
    if os.environ.get("SOFTHSM2_CONF") and key_ref.startswith("pkcs11:"):
        return BenchKey(key_ref, os.environ.get("DPOP_PIN", ""), "development token", lambda: None)
    workdir, uri, pin = temp_token()
    return BenchKey(uri, pin, "temporary token", lambda: shutil.rmtree(workdir, ignore_errors=True))
