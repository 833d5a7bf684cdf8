"""`SessionPool`: several sessions that sign at once, for modules safe for concurrent calls.

Every call into a module that python-pkcs11 initialized without locking must be serialized
(SoftHSM2 and the YubiHSM module corrupt memory otherwise), so by default a signer signs on one
session under its module's lock. ``p11-kit-proxy.so`` initializes the modules it loads with
locking (``CKF_OS_LOCKING_OK``), and p11-kit's own RPC is thread-safe: through it, a network HSM
whose signature takes milliseconds can serve several signatures at the same time. A key URI
with ``sessions=N`` asks for that; it is refused for any other module.

The pool's sessions are opened without a PIN: login belongs to the application (the signer's
login session holds it), so they are logged in already. Each finds the key again and proves it
is the signer's key (`prove_same_key`) before signing anything. Building, rebuilding and closing
the pool happen under the module lock, and only once no slot is in use.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pkcs11
from pkcs11.types import SignMixin

from dpop_signer.errors import ConfigError
from dpop_signer.jwk import PublicJwk
from dpop_signer.signers.pkcs11_keys import SignScheme, find_private_key, prove_same_key
from dpop_signer.signers.pkcs11_login import LoginSession, close_quietly
from dpop_signer.signers.pkcs11_uri import Pkcs11Uri

__all__ = ["SessionPool", "check_concurrent_module"]

_CONCURRENT_MODULES = ("p11-kit-proxy.so",)
"""Module files known to be safe for calls on several sessions at once."""


def check_concurrent_module(path: str, sessions: int, loaded: Iterable[str] = ()) -> None:
    """Refuse ``sessions`` > 1 for a module that is not safe for concurrent calls.

    ``loaded`` are the module files (as named) this process has loaded: a module that p11-kit
    also loads for us is the same library in memory, initialized without locking by the direct
    load, so concurrent calls through p11-kit would not be safe either.
    """
    if sessions <= 1:
        return
    names = {os.path.basename(path), os.path.basename(os.path.realpath(path))}
    direct = sorted(
        p
        for p in loaded
        if os.path.basename(p) not in _CONCURRENT_MODULES
        and os.path.realpath(p) != os.path.realpath(path)
    )
    if names & set(_CONCURRENT_MODULES) and direct:
        raise ConfigError(
            f"sessions={sessions} is not safe in this process: it also loads "
            f"{', '.join(direct)} directly (without locking), and p11-kit may load the same "
            "library; open every key of the process through p11-kit-proxy.so, or leave "
            "sessions= out"
        )
    if not names & set(_CONCURRENT_MODULES):
        raise ConfigError(
            f"sessions={sessions} needs a module that is safe for concurrent calls, and "
            f"{os.path.basename(path)} is initialized without locking (two sessions at once "
            "can crash it); load it through p11-kit-proxy.so (module-path=.../p11-kit-proxy.so "
            "with the module registered in /etc/pkcs11/modules/), or leave sessions= out"
        )


@dataclass
class _Slot:
    session: pkcs11.Session
    key: SignMixin
    since: float = 0.0  # time.monotonic() when its signature started; 0.0 when free


class SessionPool:
    """``size`` signing sessions; a thread takes a free one, signs, and gives it back."""

    def __init__(self, size: int) -> None:
        """Empty; `build` opens the sessions."""
        self.size = size
        self.generation = -1  # the login session's generation the slots were built for
        self.broken = False
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._changed = threading.Condition()

    def build(
        self,
        login: LoginSession,
        selector: Pkcs11Uri,
        jwk: PublicJwk,
        scheme: SignScheme,
        what: str,
    ) -> None:
        """Open the sessions and find (and prove) the key in each (module lock held)."""
        self.close()
        assert login.session is not None
        slots = []
        try:
            for _ in range(self.size):
                session = login.token.open()
                slots.append(_Slot(session, _proved(session, selector, jwk, scheme, what)))
        except BaseException:
            for slot in slots:
                close_quietly(slot.session)
            raise
        with self._changed:
            self._slots = slots
            self._free = list(slots)
            self.generation = login.generation
            self.broken = False
            self._changed.notify_all()

    def take(self, timeout: float | None) -> _Slot | None:
        """A free slot, waiting at most ``timeout`` seconds (None: for ever); None if none."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._free:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._changed.wait(remaining)
            slot = self._free.pop()
            slot.since = time.monotonic()
            return slot

    def give(self, slot: _Slot) -> None:
        """Return a slot taken with `take`."""
        with self._changed:
            slot.since = 0.0
            if slot in self._slots:
                self._free.append(slot)
            self._changed.notify_all()

    def stalled_for(self, longer_than: float) -> float:
        """Seconds the oldest signature in progress has run, if more than ``longer_than``."""
        now = time.monotonic()
        oldest = max((now - s.since for s in self._slots if s.since), default=0.0)
        return oldest if oldest > longer_than else 0.0

    def close(self, wait: float | None = None) -> bool:
        """Close every session once no slot is in use (module lock held).

        Waits at most ``wait`` seconds for slots in use; returns False (and closes nothing)
        if some are still in use then: a stuck signature keeps its session.
        """
        deadline = None if wait is None else time.monotonic() + wait
        with self._changed:
            while len(self._free) < len(self._slots):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            slots, self._slots, self._free = self._slots, [], []
            self.generation = -1
        for slot in slots:
            close_quietly(slot.session)
        return True


def _proved(
    session: pkcs11.Session, selector: Pkcs11Uri, jwk: PublicJwk, scheme: SignScheme, what: str
) -> SignMixin:
    key = find_private_key(session, selector, what)
    prove_same_key(session, key, jwk, scheme, what)
    return key
