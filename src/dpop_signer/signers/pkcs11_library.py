"""`Pkcs11Module`: one loaded PKCS#11 module per process, its lock, its deadline and its fork.

* **One lock per loaded module.** python-pkcs11 initializes modules with NULL init args (no
  locking) and releases the GIL in every call, so two threads in one module corrupt memory.
  Every python-pkcs11 call for a module holds its lock. A lock rather than a worker thread:
  handing each signature to another thread cost 0.56x of raw ``C_Sign`` on one caller thread
  here, the lock costs nothing measurable. Async callers reach the lock from the module's
  `SigningWorker` thread.
* **A deadline.** The lock records when the call inside the module started; a caller that cannot
  have the lock within ``sign_timeout`` gets `SignerTimeoutError` (at once when the call inside is
  already older than that), so a stuck HSM never queues callers without bound.
* **Refused PINs.** A PIN a token refused is remembered (as a keyed fingerprint) and never sent
  to that token again in this process, by any signer.
* **fork().** A child process starts its own copy of the module (PKCS#11 v2.40 §5.4); signers
  inherited from the parent keep refusing to sign.
* **Discovery.** Processes that open one token at the same moment may see no token for an
  instant (SoftHSM2's file store does this about once in ten starts); discovery is repeated a
  few times within half a second, a login never.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

import pkcs11
from pkcs11 import TokenFlag
from pkcs11 import exceptions as p11x

from dpop_signer.errors import (
    ConfigError,
    PinError,
    SignerTimeoutError,
    SignerUnavailableError,
)
from dpop_signer.signers.cryptoki import Cryptoki
from dpop_signer.signers.pkcs11_errors import ckr, yubihsm_hint
from dpop_signer.signers.pkcs11_uri import (
    MODULE_ENV,
    Pkcs11Uri,
)
from dpop_signer.signers.worker import SigningWorker

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib

    from dpop_signer.signers.pkcs11_login import LoginSession

__all__ = ["Pkcs11Module", "loaded_module_names", "pkcs11_module"]

logger = logging.getLogger("dpop_signer.pkcs11")

_T = TypeVar("_T")


class Pkcs11Module:
    """One loaded PKCS#11 module, the lock that serializes calls into it, and its logins.

    There is exactly one per module file per process (`pkcs11_module`). Every python-pkcs11
    call for the module goes through `call`; async callers run `call` on `worker`.
    """

    def __init__(self, path: str, display: str) -> None:
        """Create the lock and worker; `pkcs11_module` then loads the library."""
        self.path = path
        self.display = display
        self.pid = os.getpid()
        name = os.path.basename(path).removesuffix(".so")
        self.worker = SigningWorker(f"pkcs11-{name}")
        # Reentrant: recovery and key lookup call back into `call` while holding it.
        self._lock = threading.RLock()
        self._lib: Pkcs11Lib | None = None
        self._cryptoki: Cryptoki | None = None
        self.anchors: dict[tuple[str, bytes], LoginSession] = {}
        self.busy_since = 0.0
        """`time.monotonic` when the call now inside the module started; 0.0 when idle.

        Written only by the thread holding the lock, read by anyone: a call older than the
        signing deadline means the module is stuck, and new callers fail at once.
        """
        # Per token (label, serial): fingerprints of PINs the token refused. A refused PIN is
        # never sent again in this process (tokens lock after a few wrong PINs), even after a
        # lost session or by a new signer; only a different PIN (a reload) is tried.
        self._refused: dict[tuple[str, bytes], dict[bytes, PinError]] = {}
        self._pin_key = secrets.token_bytes(32)

    @property
    def lib(self) -> Pkcs11Lib:
        """The python-pkcs11 library object; use it only inside `call`."""
        assert self._lib is not None
        return self._lib

    @property
    def cryptoki(self) -> Cryptoki | None:
        """``C_Login`` and friends through ctypes (None if the module cannot share them)."""
        return self._cryptoki

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` holding the module's lock and return its result."""
        with self._lock:
            return fn(*args)

    def call_within(
        self, deadline: float | None, what: str, fn: Callable[..., _T], *args: Any
    ) -> _T:
        """`call`, but give up with `SignerTimeoutError` if the lock is not free in time.

        A module stuck in a call (a network HSM that stopped answering) holds the lock; callers
        behind it fail at the deadline instead of queueing without bound, and at once when the
        stuck call is already older than the deadline. ``deadline`` None waits for ever.
        """
        if deadline is not None:
            stuck = self.stalled_for(deadline)
            if stuck:
                raise self.timeout_error(what, deadline, stuck)
            if not self._lock.acquire(True, deadline):
                raise self.timeout_error(what, deadline, self.stalled_for(0.0))
        else:
            self._lock.acquire()
        outer = self.busy_since == 0.0
        if outer:
            self.busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            if outer:
                self.busy_since = 0.0
            self._lock.release()

    def stalled_for(self, longer_than: float) -> float:
        """Seconds the call inside the module has run, if more than ``longer_than``; else 0."""
        since = self.busy_since
        if not since:
            return 0.0
        busy = time.monotonic() - since
        return busy if busy > longer_than else 0.0

    def timeout_error(self, what: str, deadline: float, stuck: float) -> SignerTimeoutError:
        """The error for a caller that gave up waiting for this module."""
        detail = f"; a call has been inside the module for {stuck:.1f} s" if stuck else ""
        return SignerTimeoutError(
            f"{what} did not answer within the signing deadline of {deadline:g} s{detail}; "
            "check that the HSM (or its network connection) is up, or raise sign_timeout"
        )

    def refused_pin(self, label: str, serial: bytes, pin: str) -> PinError | None:
        """The error a token gave for this PIN earlier in this process, if it refused it."""
        refused = self._refused.get((label, serial))
        if not refused:
            return None
        return refused.get(self._pin_fingerprint(pin))

    def remember_refused_pin(self, label: str, serial: bytes, pin: str, error: PinError) -> None:
        """Never send ``pin`` to this token again in this process."""
        self._refused.setdefault((label, serial), {})[self._pin_fingerprint(pin)] = error

    def _pin_fingerprint(self, pin: str) -> bytes:
        # Keyed with a per-process secret: the fingerprint says nothing about the PIN outside.
        return hmac.digest(self._pin_key, pin.encode("utf-8"), "sha256")

    def _load(self) -> None:
        hint = yubihsm_hint(self.path)
        try:
            self._lib = pkcs11.lib(self.path)
        except p11x.ArgumentsBad as exc:
            raise SignerUnavailableError(
                f"PKCS#11 module {self.display} refused to initialize (ArgumentsBad); "
                f"check its configuration{hint}"
            ) from exc
        except (p11x.PKCS11Error, OSError, AttributeError) as exc:
            detail = str(exc)
            if "C_GetFunctionList" in detail:
                what = "is not a PKCS#11 module (no C_GetFunctionList)"
            elif "while loading" in detail or isinstance(exc, OSError):
                what = f"cannot be loaded ({detail.rsplit(': ', 1)[-1]})"
            else:
                what = f"failed to initialize ({ckr(exc)})"
            raise SignerUnavailableError(
                f"PKCS#11 module {self.display} {what}; point module-path= or {MODULE_ENV} at "
                f"the vendor's PKCS#11 library{hint}"
            ) from exc
        try:
            cryptoki = Cryptoki(self.path)
        except (OSError, AttributeError, p11x.PKCS11Error):
            return  # python-pkcs11 loaded it; its own login path will do
        if cryptoki.shares_state():
            self._cryptoki = cryptoki

    def _load_in_child(self, inherited: Pkcs11Module) -> None:
        """Start the module afresh in a forked child (PKCS#11 v2.40 §5.4).

        python-pkcs11 keeps one library object per path, marked initialized by the parent; the
        module's own state is the parent's copy. Initialize it again, finalizing first where the
        module insists it is initialized already, and never touch the parent's sessions.
        """
        lib = inherited.lib
        cryptoki = inherited.cryptoki or Cryptoki(self.path)
        try:
            if not cryptoki.initialize_in_child():
                with suppress(p11x.PKCS11Error):
                    lib.finalize()
                lib.initialize()
        except p11x.PKCS11Error as exc:
            raise SignerUnavailableError(
                f"PKCS#11 module {self.display} could not be initialized again in this child "
                f"process: {ckr(exc)}; open signers only after fork()"
            ) from exc
        self._lib = lib
        self._cryptoki = cryptoki if cryptoki.shares_state() else None

    def find_token_patiently(self, uri: Pkcs11Uri) -> pkcs11.Token:
        """`find_token`, looking again a few times within half a second before giving up.

        With SoftHSM2's file store, processes that open one token at the same moment sometimes
        see no token for an instant (about 1 start in 10, raw python-pkcs11 too). Only the
        discovery is repeated, never a login.
        """
        for pause in _DISCOVERY_PAUSES:
            try:
                return self.find_token(uri)
            except SignerUnavailableError:
                time.sleep(pause)
                if not self.anchors:
                    # Nothing in this process holds a session here, so starting the module
                    # again costs nothing and lets a module whose device or server went away
                    # (p11-kit-client, a network HSM) find its tokens again.
                    with suppress(p11x.PKCS11Error):
                        self.reinitialize()
        return self.find_token(uri)

    def find_token(self, uri: Pkcs11Uri) -> pkcs11.Token:
        """The one initialized token the URI selects (module lock held)."""
        try:
            tokens = [t for t in self.lib.get_tokens() if t.flags & TokenFlag.TOKEN_INITIALIZED]
        except p11x.PKCS11Error as exc:
            raise SignerUnavailableError(
                f"cannot list the tokens of PKCS#11 module {self.display}: {ckr(exc)}"
            ) from exc
        matches = [
            t
            for t in tokens
            if (uri.token is None or t.label == uri.token)
            and (uri.serial is None or t.serial.decode("ascii", "replace") == uri.serial)
            and (uri.manufacturer is None or t.manufacturer_id == uri.manufacturer)
            and (uri.model is None or t.model == uri.model)
        ]
        if len(matches) == 1:
            return matches[0]
        wanted = _token_selector(uri)
        labels = ", ".join(repr(t.label) for t in tokens) or "none"
        if not matches:
            raise SignerUnavailableError(
                f"no token matching {wanted} in PKCS#11 module {self.display}; "
                f"tokens present: {labels}{yubihsm_hint(self.path)}"
            )
        raise ConfigError(
            f"{len(matches)} tokens match {wanted} in PKCS#11 module {self.display} "
            f"({labels}); add token= or serial= to the URI"
        )

    def forget(self, anchor: LoginSession) -> None:
        """Drop a closed anchor from the registry (module lock held)."""
        key = (anchor.label, anchor.serial)
        if self.anchors.get(key) is anchor:
            del self.anchors[key]

    def reinitialize(self) -> None:
        """``C_Finalize`` (if needed) and ``C_Initialize`` again (module lock held)."""
        lib = self.lib
        if lib.initialized:
            # Someone may have finalized behind python-pkcs11's back; initialize anyway.
            with suppress(p11x.PKCS11Error):
                lib.finalize()
        lib.initialize()


def _token_selector(uri: Pkcs11Uri) -> str:
    parts = [
        f"{name}={value!r}"
        for name, value in (
            ("token", uri.token),
            ("serial", uri.serial),
            ("manufacturer", uri.manufacturer),
            ("model", uri.model),
        )
        if value is not None
    ]
    return " ".join(parts) if parts else "(any)"


_DISCOVERY_PAUSES = (0.02, 0.05, 0.1, 0.2)
"""Pauses between looks for a token that is not there (0.37 s in all)."""

_MODULES: dict[str, Pkcs11Module] = {}
_MODULES_LOCK = threading.Lock()

pid = os.getpid()
"""This process's id, kept current by a fork hook: `Pkcs11Signer.sign` compares it per call
without the ``getpid`` system call."""


def _after_fork_in_child() -> None:
    global pid, _MODULES_LOCK  # written only in a freshly forked child
    pid = os.getpid()
    # Another thread of the parent may have held it at fork(); it would stay held for ever.
    _MODULES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def loaded_module_names() -> dict[str, str]:
    """The modules this process has loaded: real path -> the path they were named by."""
    with _MODULES_LOCK:
        return {
            path: module.display for path, module in _MODULES.items() if module.pid == os.getpid()
        }


def pkcs11_module(path: str) -> Pkcs11Module:
    """The process's one `Pkcs11Module` for the module file ``path``, loaded on first use.

    Raises:
        SignerUnavailableError: the file is missing or is not a loadable PKCS#11 module, or the
            module was loaded before ``fork()`` (open signers in the child process).
    """
    real = os.path.realpath(path)
    with _MODULES_LOCK:
        module = _MODULES.get(real)
        if module is not None:
            if module.pid == os.getpid():
                return module
            # Loaded before fork(): this child starts its own copy. Signers inherited from the
            # parent keep pointing at the parent's copy and keep refusing to sign.
            child = Pkcs11Module(real, path)
            child.call(child._load_in_child, module)
            _MODULES[real] = child
            return child
        if not os.path.isfile(real):
            raise SignerUnavailableError(
                f"PKCS#11 module {path} does not exist; set module-path= in the URI or "
                f"{MODULE_ENV} to the vendor's PKCS#11 library, or install SoftHSM2 "
                f"(apt-get install softhsm2){yubihsm_hint(path)}"
            )
        module = Pkcs11Module(real, path)
        module.call(module._load)
        _MODULES[real] = module
        return module
