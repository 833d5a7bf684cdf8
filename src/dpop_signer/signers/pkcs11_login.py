"""`LoginSession`: the one long-lived, logged-in session per (module, token) of a process.

PKCS#11 login belongs to the application, not the session: closing a PIN session logs every
session out, a second login fails, and python-pkcs11 leaks the session of a failed login. So the
login session is opened without a PIN and logged in with ``C_Login`` through ctypes
(`Cryptoki`), which lets a wrong PIN close its session cleanly and
``CKR_USER_ALREADY_LOGGED_IN`` count as success. Signers on the same token share it, reference
counted; the last one to close logs out. A PIN the token refused is never sent again.
"""

from __future__ import annotations

import dataclasses
import hmac
from contextlib import suppress
from typing import Any, cast

import pkcs11
from pkcs11 import Mechanism, TokenFlag
from pkcs11 import exceptions as p11x

from dpop_signer.errors import (
    PinError,
    SignerUnavailableError,
)
from dpop_signer.signers.cryptoki import CKS_USER_FUNCTIONS
from dpop_signer.signers.pkcs11_errors import (
    ckr,
    login_error,
    missing_pin,
    refused_again,
)
from dpop_signer.signers.pkcs11_library import Pkcs11Module
from dpop_signer.signers.pkcs11_uri import (
    Pkcs11Uri,
)

__all__ = ["LoginSession", "acquire_login", "close_quietly", "session_handle"]


def acquire_login(module: Pkcs11Module, uri: Pkcs11Uri, pin: str | None) -> LoginSession:
    """The logged-in anchor of the URI's token, with one more reference (module lock held)."""
    token = module.find_token_patiently(uri)
    key = (token.label, token.serial)
    anchor = module.anchors.get(key)
    if anchor is None:
        anchor = LoginSession(module, token, uri, pin)
        anchor.open()
        module.anchors[key] = anchor
    else:
        anchor.check_pin(pin)
    anchor.refs += 1
    return anchor


class LoginSession:
    """The long-lived session that holds the application's login to one token.

    Used only under the module lock: every method must be called through `call`. ``generation``
    changes on every reopen, so signers know their cached key handles went stale.
    """

    def __init__(self, module: Pkcs11Module, token: pkcs11.Token, uri: Pkcs11Uri, pin: str | None):
        self.module = module
        self.token = token
        self.label = token.label
        self.serial = token.serial
        self.selector = dataclasses.replace(
            uri, token=token.label, serial=token.serial.decode("ascii", "replace")
        )
        self.login_required = bool(token.flags & TokenFlag.LOGIN_REQUIRED)
        self._pin = pin
        self.session: pkcs11.Session | None = None
        self.generation = 0
        self.refs = 0
        self.mechanisms: frozenset[Mechanism] = frozenset()

    @property
    def where(self) -> str:
        """The token and module, for messages."""
        return f"token {self.label!r} (module {self.module.display})"

    def check_pin(self, pin: str | None) -> None:
        """Refuse a second signer whose PIN differs from the one this login was made with.

        While nothing is logged in (the token refused the PIN the session was opened with),
        a different PIN is taken for the next login instead: that is how a reload with the
        corrected PIN recovers while the old signer is still open.
        """
        if not self.login_required:
            return
        if pin is None:
            raise missing_pin(self.label)
        refused = self.module.refused_pin(self.label, self.serial, pin)
        if refused is not None:
            raise refused_again(refused)
        if self.session is None:
            self._pin = pin
            return
        if self._pin is not None and not hmac.compare_digest(
            pin.encode("utf-8"), self._pin.encode("utf-8")
        ):
            raise PinError(
                f"{self.where} is already logged in in this process with a different PIN; "
                "the PIN was not tried (tokens lock after a few wrong PINs)"
            )

    def open(self) -> None:
        """Open the session and log in, unless this PIN was refused before."""
        if self.login_required and self._pin is None:
            raise missing_pin(self.label)
        if self.login_required and self._pin is not None:
            refused = self.module.refused_pin(self.label, self.serial, self._pin)
            if refused is not None:
                # Checked before any session is opened: a refused PIN costs the token nothing.
                raise refused_again(refused)
        try:
            self.mechanisms = frozenset(self.token.slot.get_mechanisms())
            session = self.token.open()
        except p11x.PKCS11Error as exc:
            raise SignerUnavailableError(
                f"cannot open a session on {self.where}: {ckr(exc)}"
            ) from exc
        try:
            if self.login_required and self._pin is not None:
                session = self._login(session, self._pin)
        except BaseException as exc:
            close_quietly(session)
            if isinstance(exc, p11x.PKCS11Error):
                error = login_error(exc, self.where)
                if isinstance(error, PinError) and self._pin is not None:
                    self.module.remember_refused_pin(self.label, self.serial, self._pin, error)
                raise error from exc
            raise
        self.session = session
        self.generation += 1

    def _login(self, session: pkcs11.Session, pin: str) -> pkcs11.Session:
        """Log the application in; return the session that now holds the login."""
        cryptoki = self.module.cryptoki
        if cryptoki is not None:
            # Login is per application: an earlier login that still holds is success.
            with suppress(p11x.UserAlreadyLoggedIn):
                cryptoki.login(session_handle(session), pin)
            return session
        # No ctypes path for this module: python-pkcs11's own login, which needs a fresh
        # session and leaks it if the PIN is wrong (still never retried).
        close_quietly(session)
        try:
            return self.token.open(user_pin=pin)
        except p11x.UserAlreadyLoggedIn:
            return self.token.open()

    def healthy(self) -> bool:
        """Whether the session still exists and, if the token needs it, is still logged in.

        Checked before a search: a search started on a dead session makes python-pkcs11 raise
        again from a destructor, which only prints "Exception ignored" on stderr.
        """
        if self.session is None:
            return False
        cryptoki = self.module.cryptoki
        if cryptoki is None:
            return True  # cannot ask; a failure on use still triggers the recovery
        try:
            state = cryptoki.session_state(session_handle(self.session))
        except p11x.PKCS11Error:
            return False
        return state in CKS_USER_FUNCTIONS or not self.login_required

    def reopen(self) -> None:
        """Throw the session away, find the token again, open and log in again."""
        old, self.session = self.session, None
        if old is not None:
            # No C_Logout: the login may still hold, and then the next C_Login just says so.
            close_quietly(old)
        module = self.module
        if not module.lib.initialized:
            module.lib.initialize()
        try:
            self.token = module.find_token(self.selector)
        except SignerUnavailableError:
            # The module lost its state (CKR_CRYPTOKI_NOT_INITIALIZED from C_Finalize, or a
            # token reset): start it again once, then look once more.
            module.reinitialize()
            self.token = module.find_token(self.selector)
        self.open()

    def release(self) -> None:
        """One signer fewer; the last one logs out and closes the session."""
        self.refs -= 1
        if self.refs > 0:
            return
        self.module.forget(self)
        session, self.session = self.session, None
        if session is None:
            return
        cryptoki = self.module.cryptoki
        if self.login_required and cryptoki is not None:
            # Already logged out or gone: nothing left to release.
            with suppress(p11x.PKCS11Error):
                cryptoki.logout(session_handle(session))
        close_quietly(session)  # a python-pkcs11 login session logs out as it closes


def close_quietly(session: pkcs11.Session) -> None:
    """Close ``session``; it may be gone already, so this is best effort."""
    with suppress(p11x.PKCS11Error):
        session.close()


def session_handle(session: pkcs11.Session) -> int:
    """The CK_SESSION_HANDLE (python-pkcs11's type stubs do not declare it)."""
    return int(cast(Any, session).handle)
