"""`Pkcs11Signer`: ES256 with a P-256 key that stays inside a PKCS#11 token.

Works with any PKCS#11 module (network HSMs, YubiHSM 2, SoftHSM2 in CI); nothing here assumes
SoftHSM, and no slot number is ever used. The shape of this module follows what python-pkcs11
and SoftHSM2 were measured to do (see DESIGN.md, "Facts that shape the PKCS#11 backend"):

* **One lock per loaded module.** python-pkcs11 initializes modules with NULL init args (no
  locking) and releases the GIL in every call, so two threads in one module corrupt memory.
  `Pkcs11Module` owns the module and a lock that every python-pkcs11 call for that module holds.
  A lock rather than a worker thread: handing each signature to another thread cost 0.56x of raw
  ``C_Sign`` on one caller thread here, the lock costs nothing measurable. `sign_async` reaches
  the lock from the module's `SigningWorker` thread, so the event loop never blocks on a slow
  HSM, and answers come back to the loop in batches.
* **One logged-in anchor session per (module, token).** PKCS#11 login belongs to the
  application, not the session: closing a PIN session logs every session out, a second login
  fails, and python-pkcs11 leaks the session of a failed login. So the anchor opens a session
  without a PIN and logs in with ``C_Login`` through ctypes (`_Cryptoki`), which lets a wrong
  PIN close its session cleanly and ``CKR_USER_ALREADY_LOGGED_IN`` count as success. Signers on
  the same token share the anchor, reference counted.
* **Hash on the host, sign with CKM_ECDSA.** SoftHSM 2.6 has no CKM_ECDSA_SHA256 and the big
  HSMs hash on the host anyway; the token returns r||s already (RFC 7518 §3.4), checked to be
  exactly 64 bytes.
* **Recover once.** A lost session, stale handle or device error reopens the anchor, logs in
  again, finds the key again and retries once. A wrong PIN is never retried: real tokens lock.

python-pkcs11 exceptions carry no message; each one is wrapped here in a `dpop_signer.errors`
class that names the module, token and key, and never the PIN.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pkcs11
from asn1crypto.core import OctetString
from asn1crypto.keys import ECDomainParameters
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11x
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from dpop_signer.errors import (
    ConfigError,
    DPoPSignerError,
    KeyNotFoundError,
    PinError,
    SignerError,
    SignerUnavailableError,
    SigningFailedError,
    UnsupportedKeyError,
)
from dpop_signer.jwk import SIGNATURE_SIZE, EcPublicJwk, ec_public_jwk, raw_to_der_signature
from dpop_signer.signers.base import ALGORITHM, check_signature
from dpop_signer.signers.pkcs11_uri import (
    MODULE_ENV,
    Pkcs11Uri,
    parse_pkcs11_uri,
    resolve_module,
    resolve_pin,
)
from dpop_signer.signers.worker import SigningWorker

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib

__all__ = [
    "Pkcs11Module",
    "Pkcs11Signer",
    "generate_pkcs11_key",
    "open_pkcs11_signer",
    "pkcs11_module",
]

logger = logging.getLogger("dpop_signer.pkcs11")

_T = TypeVar("_T")

_DIGEST_SIZE = 32
_CKM_ECDSA = Mechanism.ECDSA  # a module constant: no enum attribute lookup per signature
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_SELF_TEST_MESSAGE = b"dpop-signer: does the private key match the public key?"

# Errors after which the session, the handles or the whole module state may be gone, but a
# fresh session and login can work again (privacyidea#787, autograph#244 made the same list).
_RECOVERABLE: tuple[type[p11x.PKCS11Error], ...] = (
    p11x.SessionHandleInvalid,
    p11x.SessionClosed,
    p11x.ObjectHandleInvalid,
    p11x.KeyHandleInvalid,
    p11x.UserNotLoggedIn,
    p11x.DeviceRemoved,
    p11x.TokenNotPresent,
    p11x.DeviceError,
)


def _recoverable(exc: p11x.PKCS11Error) -> bool:
    # CKR_CRYPTOKI_NOT_INITIALIZED has no class of its own in python-pkcs11.
    return isinstance(exc, _RECOVERABLE) or "not initialized" in str(exc)


def _ckr(exc: BaseException) -> str:
    """Name a python-pkcs11 exception: its class, plus its text when it has one."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    return f"{name} ({text})" if text and type(exc) is p11x.PKCS11Error else name


def _yubihsm_hint(path: str) -> str:
    if "yubihsm" in os.path.basename(path).lower() and not os.environ.get("YUBIHSM_PKCS11_CONF"):
        return (
            "; the YubiHSM 2 module needs YUBIHSM_PKCS11_CONF set to a yubihsm_pkcs11.conf "
            "containing connector=http://127.0.0.1:12345 (or yhusb://)"
        )
    return ""


# --- C_Login / C_Logout through ctypes ----------------------------------------------------


class _CkVersion(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


# CK_FUNCTION_LIST up to C_Logout, in the order of PKCS#11 v2.40 §5.
_FUNCTION_NAMES = (
    *("Initialize", "Finalize", "GetInfo", "GetFunctionList", "GetSlotList", "GetSlotInfo"),
    *("GetTokenInfo", "GetMechanismList", "GetMechanismInfo", "InitToken", "InitPIN", "SetPIN"),
    *("OpenSession", "CloseSession", "CloseAllSessions", "GetSessionInfo"),
    *("GetOperationState", "SetOperationState", "Login", "Logout"),
)


class _CkFunctionList(ctypes.Structure):
    if sys.platform == "win32":  # pragma: no cover - PKCS#11 packs its structs to 1 on Windows
        _pack_ = 1
    _fields_ = (("version", _CkVersion), *((f"C_{n}", ctypes.c_void_p) for n in _FUNCTION_NAMES))


_CK_RV = ctypes.c_ulong
_CKU_USER = 1
_LOGIN = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong)
_ONE_ARG = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong)


class _CkSessionInfo(ctypes.Structure):
    if sys.platform == "win32":  # pragma: no cover
        _pack_ = 1
    _fields_ = (
        ("slotID", ctypes.c_ulong),
        ("state", ctypes.c_ulong),
        ("flags", ctypes.c_ulong),
        ("ulDeviceError", ctypes.c_ulong),
    )


_GET_SLOT_LIST = ctypes.CFUNCTYPE(
    _CK_RV, ctypes.c_ubyte, ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_ulong)
)
_GET_SESSION_INFO = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong, ctypes.POINTER(_CkSessionInfo))
_CKS_USER_FUNCTIONS = frozenset({1, 3})  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS

_CKR_ERRORS: dict[int, type[p11x.PKCS11Error]] = {
    0x030: p11x.DeviceError,
    0x031: p11x.DeviceMemory,
    0x032: p11x.DeviceRemoved,
    0x0A0: p11x.PinIncorrect,
    0x0A1: p11x.PinInvalid,
    0x0A2: p11x.PinLenRange,
    0x0A3: p11x.PinExpired,
    0x0A4: p11x.PinLocked,
    0x0B0: p11x.SessionClosed,
    0x0B3: p11x.SessionHandleInvalid,
    0x0E0: p11x.TokenNotPresent,
    0x100: p11x.UserAlreadyLoggedIn,
    0x101: p11x.UserNotLoggedIn,
    0x102: p11x.UserPinNotInitialized,
    0x104: p11x.AnotherUserAlreadyLoggedIn,
}


def _check_rv(rv: int) -> None:
    if rv == 0:
        return
    if rv == 0x190:
        raise p11x.PKCS11Error("Initialisation error (not initialized)")
    raise _CKR_ERRORS.get(rv, p11x.GeneralError)(f"CKR 0x{rv:x}" if rv not in _CKR_ERRORS else "")


class _Cryptoki:
    """The PKCS#11 calls python-pkcs11 does not expose on their own.

    python-pkcs11 logs in only inside ``Token.open(user_pin=...)``, which leaks the session
    when the PIN is wrong and fails when the application is logged in already. Calling
    ``C_Login`` on a session python-pkcs11 opened without a PIN avoids both. ``dlopen`` of the
    same file returns the same loaded module, so these calls share python-pkcs11's state; a
    module that hands out a new instance per ``C_GetFunctionList`` (p11-kit-client.so does)
    fails `shares_state`, and is then logged in through python-pkcs11 instead.
    """

    def __init__(self, path: str) -> None:
        dll = ctypes.CDLL(path)
        get_function_list = dll.C_GetFunctionList
        get_function_list.restype = _CK_RV
        get_function_list.argtypes = (ctypes.POINTER(ctypes.POINTER(_CkFunctionList)),)
        table = ctypes.POINTER(_CkFunctionList)()
        _check_rv(get_function_list(ctypes.byref(table)))
        functions = table.contents
        self._dll = dll  # keeps the module mapped as long as we hold its function pointers
        self._login = _LOGIN(functions.C_Login)
        self._logout = _ONE_ARG(functions.C_Logout)
        self._close_all = _ONE_ARG(functions.C_CloseAllSessions)
        self._session_info = _GET_SESSION_INFO(functions.C_GetSessionInfo)
        self._slot_list = _GET_SLOT_LIST(functions.C_GetSlotList)

    def shares_state(self) -> bool:
        """Whether these calls reach the instance python-pkcs11 initialized."""
        count = ctypes.c_ulong(0)
        # CKR_CRYPTOKI_NOT_INITIALIZED here means a separate, uninitialized instance.
        return int(self._slot_list(0, None, ctypes.byref(count))) == 0

    def login(self, session_handle: int, pin: str) -> None:
        """``C_Login(CKU_USER)``; raises the python-pkcs11 exception for the CKR code."""
        data = pin.encode("utf-8")
        _check_rv(self._login(session_handle, _CKU_USER, data, len(data)))

    def logout(self, session_handle: int) -> None:
        """``C_Logout``; logs the whole application out of the token."""
        _check_rv(self._logout(session_handle))

    def session_state(self, session_handle: int) -> int:
        """``C_GetSessionInfo``'s state (CKS_*); raises if the session is gone."""
        info = _CkSessionInfo()
        _check_rv(self._session_info(session_handle, ctypes.byref(info)))
        return int(info.state)

    def close_all_sessions(self, slot_id: int) -> None:
        """``C_CloseAllSessions``: every session of this application on the slot."""
        _check_rv(self._close_all(slot_id))


# --- the module, its lock, and the anchor sessions ----------------------------------------


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
        self._cryptoki: _Cryptoki | None = None
        self._anchors: dict[tuple[str, bytes], _Anchor] = {}

    @property
    def lib(self) -> Pkcs11Lib:
        """The python-pkcs11 library object; use it only inside `call`."""
        assert self._lib is not None
        return self._lib

    @property
    def cryptoki(self) -> _Cryptoki | None:
        """``C_Login`` and friends through ctypes (None if the module cannot share them)."""
        return self._cryptoki

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` holding the module's lock and return its result."""
        with self._lock:
            return fn(*args)

    def _load(self) -> None:
        hint = _yubihsm_hint(self.path)
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
                what = f"failed to initialize ({_ckr(exc)})"
            raise SignerUnavailableError(
                f"PKCS#11 module {self.display} {what}; point module-path= or {MODULE_ENV} at "
                f"the vendor's PKCS#11 library{hint}"
            ) from exc
        try:
            cryptoki = _Cryptoki(self.path)
        except (OSError, AttributeError, p11x.PKCS11Error):
            return  # python-pkcs11 loaded it; its own login path will do
        if cryptoki.shares_state():
            self._cryptoki = cryptoki

    def find_token(self, uri: Pkcs11Uri) -> pkcs11.Token:
        """The one initialized token the URI selects (module lock held)."""
        try:
            tokens = [t for t in self.lib.get_tokens() if t.flags & TokenFlag.TOKEN_INITIALIZED]
        except p11x.PKCS11Error as exc:
            raise SignerUnavailableError(
                f"cannot list the tokens of PKCS#11 module {self.display}: {_ckr(exc)}"
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
                f"tokens present: {labels}{_yubihsm_hint(self.path)}"
            )
        raise ConfigError(
            f"{len(matches)} tokens match {wanted} in PKCS#11 module {self.display} "
            f"({labels}); add token= or serial= to the URI"
        )

    def acquire_anchor(self, uri: Pkcs11Uri, pin: str | None) -> _Anchor:
        """The logged-in anchor of the URI's token, with one more reference (module lock held)."""
        try:
            token = self.find_token(uri)
        except SignerUnavailableError:
            if self._anchors:
                raise
            # Nothing in this process holds a session here, so starting the module again costs
            # nothing: it lets a module whose device or server went away (p11-kit-client, a
            # network HSM) find its tokens again. Sessions of other signers would not survive it.
            self.reinitialize()
            token = self.find_token(uri)
        key = (token.label, token.serial)
        anchor = self._anchors.get(key)
        if anchor is None:
            anchor = _Anchor(self, token, uri, pin)
            anchor.open()
            self._anchors[key] = anchor
        else:
            anchor.check_pin(pin)
        anchor.refs += 1
        return anchor

    def forget(self, anchor: _Anchor) -> None:
        """Drop a closed anchor from the registry (module lock held)."""
        key = (anchor.label, anchor.serial)
        if self._anchors.get(key) is anchor:
            del self._anchors[key]

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


_MODULES: dict[str, Pkcs11Module] = {}
_MODULES_LOCK = threading.Lock()

_pid = os.getpid()
"""This process's id, kept current by a fork hook: `Pkcs11Signer.sign` compares it per call
without the ``getpid`` system call."""


def _after_fork_in_child() -> None:
    global _pid  # one int, written only in a freshly forked child
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
            if module.pid != os.getpid():
                raise _forked_error(path)
            return module
        if not os.path.isfile(real):
            raise SignerUnavailableError(
                f"PKCS#11 module {path} does not exist; set module-path= in the URI or "
                f"{MODULE_ENV} to the vendor's PKCS#11 library, or install SoftHSM2 "
                f"(apt-get install softhsm2){_yubihsm_hint(path)}"
            )
        module = Pkcs11Module(real, path)
        module.call(module._load)
        _MODULES[real] = module
        return module


def _forked_error(path: str) -> SignerUnavailableError:
    return SignerUnavailableError(
        f"PKCS#11 module {path} was loaded before fork(); a child process must open its own "
        "signer (with gunicorn, do not use --preload)"
    )


class _Anchor:
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
        return f"token {self.label!r} (module {self.module.display})"

    def check_pin(self, pin: str | None) -> None:
        """Refuse a second signer whose PIN differs from the one this login was made with."""
        if not self.login_required:
            return
        if pin is None:
            raise _missing_pin(self.label)
        if self._pin is not None and not hmac.compare_digest(
            pin.encode("utf-8"), self._pin.encode("utf-8")
        ):
            raise PinError(
                f"{self.where} is already logged in in this process with a different PIN; "
                "the PIN was not tried (tokens lock after a few wrong PINs)"
            )

    def open(self) -> None:
        if self.login_required and self._pin is None:
            raise _missing_pin(self.label)
        try:
            self.mechanisms = frozenset(self.token.slot.get_mechanisms())
            session = self.token.open()
        except p11x.PKCS11Error as exc:
            raise SignerUnavailableError(
                f"cannot open a session on {self.where}: {_ckr(exc)}"
            ) from exc
        try:
            if self.login_required and self._pin is not None:
                session = self._login(session, self._pin)
        except BaseException as exc:
            _close_quietly(session)
            if isinstance(exc, p11x.PKCS11Error):
                raise _login_error(exc, self.where) from exc
            raise
        self.session = session
        self.generation += 1

    def _login(self, session: pkcs11.Session, pin: str) -> pkcs11.Session:
        """Log the application in; return the session that now holds the login."""
        cryptoki = self.module.cryptoki
        if cryptoki is not None:
            # Login is per application: an earlier login that still holds is success.
            with suppress(p11x.UserAlreadyLoggedIn):
                cryptoki.login(_handle(session), pin)
            return session
        # No ctypes path for this module: python-pkcs11's own login, which needs a fresh
        # session and leaks it if the PIN is wrong (still never retried).
        _close_quietly(session)
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
            state = cryptoki.session_state(_handle(self.session))
        except p11x.PKCS11Error:
            return False
        return state in _CKS_USER_FUNCTIONS or not self.login_required

    def reopen(self) -> None:
        """Throw the session away, find the token again, open and log in again."""
        old, self.session = self.session, None
        if old is not None:
            # No C_Logout: the login may still hold, and then the next C_Login just says so.
            _close_quietly(old)
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
                cryptoki.logout(_handle(session))
        _close_quietly(session)  # a python-pkcs11 login session logs out as it closes


def _close_quietly(session: pkcs11.Session) -> None:
    # The session may be gone already; closing it is best effort.
    with suppress(p11x.PKCS11Error):
        session.close()


def _handle(session: pkcs11.Session) -> int:
    # The CK_SESSION_HANDLE; python-pkcs11's type stubs do not declare it.
    return int(cast(Any, session).handle)


def _missing_pin(label: str) -> PinError:
    return PinError(
        f"token {label!r} needs a PIN: pass pin=, use --pin or DPOP_PIN, or add "
        "pin-source=file:/path/to/pin to the URI"
    )


def _login_error(exc: p11x.PKCS11Error, where: str) -> DPoPSignerError:
    never = "it was not retried (tokens lock after a few wrong PINs)"
    if isinstance(exc, p11x.PinIncorrect):
        return PinError(f"wrong PIN for {where}; {never}")
    if isinstance(exc, p11x.PinLocked):
        return PinError(f"the user PIN of {where} is locked; unlock it with the SO PIN")
    if isinstance(exc, p11x.PinLenRange | p11x.PinInvalid):
        return PinError(f"the PIN for {where} has the wrong length or characters; {never}")
    if isinstance(exc, p11x.PinExpired):
        return PinError(f"the user PIN of {where} has expired; change it with the token's tools")
    if isinstance(exc, p11x.UserPinNotInitialized):
        return PinError(f"{where} has no user PIN yet; initialize it with the SO PIN")
    return SignerUnavailableError(f"login to {where} failed: {_ckr(exc)}")


# --- key lookup and checks (module lock held) ----------------------------------------


def _find_private_key(session: pkcs11.Session, uri: Pkcs11Uri, what: str) -> SignMixin:
    """The one EC private key the URI's ``object``/``id`` select, or a clear error."""
    selector: dict[Attribute, Any] = {}
    if uri.object is not None:
        selector[Attribute.LABEL] = uri.object
    if uri.id is not None:
        selector[Attribute.ID] = uri.id
    private = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, **selector}
    # list(): a search left half-read keeps the session busy (OperationActive) or blocks it.
    ec_keys = list(session.get_objects({**private, Attribute.KEY_TYPE: KeyType.EC}))
    if len(ec_keys) == 1:
        return cast(SignMixin, ec_keys[0])
    if ec_keys:
        raise KeyNotFoundError(
            f"{len(ec_keys)} EC private keys match {what}; give each key a unique label, or "
            "add id= to the URI"
        )
    others = list(session.get_objects(private))
    if others:
        kinds = sorted({_key_type_name(o) for o in others})
        raise UnsupportedKeyError(
            f"{what} is {'/'.join(kinds)}, not EC; ES256 needs an EC P-256 key "
            "(make one with 'dpop keygen')"
        )
    named = list(session.get_objects(selector))
    if named:
        classes = sorted({_object_class_name(o) for o in named})
        raise UnsupportedKeyError(
            f"{what} is only a {'/'.join(classes)} object; signing needs its private key"
        )
    present = sorted(
        {
            str(o[Attribute.LABEL])
            for o in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        }
    )
    shown = ", ".join(repr(label) for label in present[:10]) or "none"
    raise KeyNotFoundError(
        f"{what} does not exist; private keys in the token: {shown}"
        + (" ..." if len(present) > 10 else "")
    )


def _key_type_name(obj: pkcs11.Object) -> str:
    try:
        return f"an {KeyType(obj[Attribute.KEY_TYPE]).name} key"
    except (p11x.PKCS11Error, ValueError):
        return "a non-EC key"


def _object_class_name(obj: pkcs11.Object) -> str:
    try:
        return ObjectClass(obj[Attribute.CLASS]).name.lower().replace("_", " ")
    except (p11x.PKCS11Error, ValueError):
        return "non-key"


def _curve_of(ec_params: bytes) -> str:
    """``P-256``-style name of DER ECParameters (a namedCurve OID in practice)."""
    try:
        params = ECDomainParameters.load(ec_params)
        if params.name != "named":
            return "explicit-parameters"
        name = str(params.chosen.native)
    except (ValueError, TypeError):
        return "unknown"
    return _CURVE_NAMES.get(name, name)


def _decode_ec_point(raw: bytes, what: str) -> bytes:
    """The uncompressed point from CKA_EC_POINT: DER OCTET STRING (the standard) or bare."""
    if len(raw) == 65 and raw[0] == 4:
        point = raw  # a bare point (some older modules); a wrapped one is 67 bytes
    else:
        try:
            point = bytes(OctetString.load(raw, strict=True).native)
        except (ValueError, TypeError) as exc:
            raise UnsupportedKeyError(
                f"the CKA_EC_POINT of {what} is neither a DER OCTET STRING nor a bare point"
            ) from exc
    if point[:1] in (b"\x02", b"\x03"):
        raise UnsupportedKeyError(
            f"{what} has a compressed public point; store the public key uncompressed"
        )
    return point


def _attribute(obj: pkcs11.Object, attr: Attribute) -> Any:
    """An attribute's value, or None when the token will not say."""
    try:
        return obj[attr]
    except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, p11x.FunctionFailed):
        return None


def _public_point(session: pkcs11.Session, key: SignMixin, what: str) -> bytes:
    """The public point of ``key``: from its public key object, else from the key itself."""
    key_id = _attribute(key, Attribute.ID)
    label = _attribute(key, Attribute.LABEL)
    search: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: KeyType.EC,
    }
    if key_id:
        search[Attribute.ID] = key_id
    elif label:
        search[Attribute.LABEL] = label
    publics = list(session.get_objects(search)) if len(search) > 2 else []
    if len(publics) > 1 and key_id and label:
        publics = [p for p in publics if _attribute(p, Attribute.LABEL) == label]
    if len(publics) == 1:
        return _decode_ec_point(bytes(publics[0][Attribute.EC_POINT]), what)
    # Some tokens keep no public key object, but expose CKA_EC_POINT on the private key.
    raw = _attribute(key, Attribute.EC_POINT)
    if raw:
        return _decode_ec_point(bytes(raw), what)
    found = "several" if publics else "no"
    raise KeyNotFoundError(
        f"{found} EC public key objects share the id/label of {what}, and the private key does "
        "not expose CKA_EC_POINT; store its public key in the token with the same CKA_ID"
    )


# --- the signer ---------------------------------------------------------------------------


class Pkcs11Signer:
    """Signs ES256 with an EC P-256 private key inside a PKCS#11 token.

    Open it with `open_pkcs11_signer` (or `dpop_signer.load_signer`) and close it when done;
    it is a context manager. Any number of threads may call `sign` at once, and event loops
    call `sign_async`; every call reaches the token holding the module's one lock.

    >>> with open_pkcs11_signer("pkcs11:token=dpop-dev;object=dpop-es256") as s:  # doctest: +SKIP
    ...     len(s.sign(b"header.claims"))
    64
    """

    def __init__(
        self,
        *,
        module: Pkcs11Module,
        anchor: _Anchor,
        selector: Pkcs11Uri,
        key: SignMixin,
        jwk: EcPublicJwk,
        label: str,
        key_id: bytes,
    ) -> None:
        """Wrap an opened, checked key; use `open_pkcs11_signer` instead."""
        self._module = module
        self._module_lock = module._lock
        self._anchor = anchor
        self._selector = selector
        self._key = key
        self._generation = anchor.generation
        self._jwk = jwk
        self._label = label
        self._id = key_id
        self._closed = False
        self._what = f"key {selector.key_description} in {anchor.where}"
        self._source = f"PKCS#11 {self._what}"

    @classmethod
    def open(cls, uri: str, *, pin: str | None = None) -> Pkcs11Signer:
        """Open the key an RFC 7512 URI names; see `open_pkcs11_signer`."""
        parsed = parse_pkcs11_uri(uri)
        _require_key_name(parsed)
        secret = resolve_pin(parsed, pin)
        module = pkcs11_module(resolve_module(parsed))
        return module.call(_open_locked, module, parsed, secret)

    @property
    def algorithm(self) -> str:
        """Always ``"ES256"``."""
        return ALGORITHM

    @property
    def public_jwk(self) -> EcPublicJwk:
        """The public JWK (``kty, crv, x, y``), read once at open; a fresh copy."""
        return dict(self._jwk)  # type: ignore[return-value]

    @property
    def uri(self) -> str:
        """The key's URI without any PIN: token label, key label, id, module, pin-source."""
        return dataclasses.replace(
            self._selector,
            token=self._anchor.label,
            object=self._label or None,
            id=self._id or None,
            module_path=self._module.display,
            pin_value=None,
        ).redacted()

    @property
    def module(self) -> Pkcs11Module:
        """The loaded module and its lock (for diagnostics and tests)."""
        return self._module

    def sign(self, message: bytes) -> bytes:
        """ES256-sign ``message``: SHA-256 here, CKM_ECDSA in the token; 64 bytes r||s.

        Raises:
            SignerUnavailableError: the session or device was lost and one reopen did not help.
            PinError: logging in again after a lost session failed on the PIN (never retried).
            SigningFailedError: the token refused to sign or returned a malformed signature.
        """
        if self._closed or self._module.pid != _pid:
            self._check_open()
        digest = hashlib.sha256(message).digest()
        # Pkcs11Module.call inlined: one Python frame less per signature on the hot path.
        with self._module_lock:
            return self._sign_digest(digest)

    async def sign_async(self, message: bytes) -> bytes:
        """Like `sign`, from the module's worker thread, so the event loop never blocks."""
        self._check_open()
        digest = hashlib.sha256(message).digest()
        return await self._module.worker.run(self._module.call, self._sign_digest, digest)

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest computed by the caller; 64 bytes r||s.

        Raises:
            SigningFailedError: ``digest`` is not 32 bytes, or as `sign`.
        """
        self._check_open()
        return self._module.call(self._sign_digest, digest)

    def close(self) -> None:
        """Release the token; the last signer on a token logs out and closes its session."""
        if self._closed:
            return
        self._closed = True
        if self._module.pid != os.getpid():
            return  # the parent owns the session; the child must not touch it
        # A close during interpreter shutdown may fail with RuntimeError; the process ends anyway.
        with suppress(RuntimeError):
            self._module.call(self._anchor.release)

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"Pkcs11Signer({self.uri!r}{state})"

    def _check_open(self) -> None:
        if self._closed:
            raise SignerUnavailableError(f"{self._source} was closed; open it again")
        if self._module.pid != os.getpid():
            raise _forked_error(self._module.display)

    # Everything below runs holding the module lock.

    def _current_key(self) -> SignMixin:
        anchor = self._anchor
        if anchor.session is None:
            anchor.reopen()
        if self._generation != anchor.generation:
            assert anchor.session is not None
            self._key = _find_private_key(anchor.session, self._selector, self._what)
            self._generation = anchor.generation
        return self._key

    def _sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != _DIGEST_SIZE:
            # SoftHSM signs a digest of any length; a truncated one would verify nowhere.
            raise SigningFailedError(
                f"{self._source} was given a {len(digest)}-byte digest; ES256 signs a 32-byte "
                "SHA-256 digest"
            )
        anchor = self._anchor
        try:
            # `_current_key` only when needed (it reopens or looks the key up again): the
            # usual case is an open session and a current handle, checked inline.
            if anchor.session is None or self._generation != anchor.generation:
                self._current_key()
            signature = self._key.sign(digest, mechanism=_CKM_ECDSA)
        except p11x.PKCS11Error as exc:
            if not _recoverable(exc):
                raise SigningFailedError(f"{self._source} failed to sign: {_ckr(exc)}") from exc
            first = _ckr(exc)
        else:
            if len(signature) == SIGNATURE_SIZE:
                return signature
            return check_signature(signature, source=self._source)
        logger.warning("%s: %s while signing; reopening the session once", self._source, first)
        try:
            self._anchor.reopen()
            signature = self._current_key().sign(digest, mechanism=Mechanism.ECDSA)
        except p11x.PKCS11Error as exc:
            raise SignerUnavailableError(
                f"{self._source} is unavailable: {first}, then {_ckr(exc)} after reopening the "
                "session; check that the token or HSM is connected"
            ) from exc
        logger.info("%s: session reopened, signing again", self._source)
        return check_signature(signature, source=self._source)


def _require_key_name(uri: Pkcs11Uri) -> None:
    if uri.object is None and uri.id is None:
        raise ConfigError(
            "the PKCS#11 URI names no key; add object=<label> and/or id=<%-encoded bytes>"
        )


def _open_locked(module: Pkcs11Module, uri: Pkcs11Uri, pin: str | None) -> Pkcs11Signer:
    anchor = module.acquire_anchor(uri, pin)
    try:
        return _open_key(module, anchor, uri)
    except BaseException:
        anchor.release()
        raise


def _open_key(module: Pkcs11Module, anchor: _Anchor, uri: Pkcs11Uri) -> Pkcs11Signer:
    """`_checked_key`, recovering once if the shared session was lost since its last use."""
    try:
        try:
            return _checked_key(module, anchor, uri)
        except p11x.PKCS11Error as exc:
            if not _recoverable(exc):
                raise
            logger.warning("%s: %s while opening a key; reopening once", anchor.where, _ckr(exc))
            anchor.reopen()
            return _checked_key(module, anchor, uri)
    except p11x.PKCS11Error as exc:
        what = f"key {uri.key_description} in {anchor.where}"
        raise SignerUnavailableError(f"opening {what} failed: {_ckr(exc)}") from exc


def _checked_key(module: Pkcs11Module, anchor: _Anchor, uri: Pkcs11Uri) -> Pkcs11Signer:
    """Find the key, check it, read its public JWK and prove the pair matches."""
    what = f"key {uri.key_description} in {anchor.where}"
    if not anchor.healthy():
        # Lost since its last use (or an earlier recovery failed): reopen before searching.
        logger.warning("%s: the shared session was lost; reopening it", anchor.where)
        anchor.reopen()
    session = anchor.session
    assert session is not None
    key = _find_private_key(session, uri, what)
    curve = _curve_of(bytes(key[Attribute.EC_PARAMS]))
    if curve != "P-256":
        raise UnsupportedKeyError(f"{what} is an EC {curve} key; ES256 needs P-256 (secp256r1)")
    if _attribute(key, Attribute.SIGN) is False:
        raise UnsupportedKeyError(f"{what} may not sign (CKA_SIGN is false)")
    if _attribute(key, Attribute.SENSITIVE) is False:
        raise UnsupportedKeyError(
            f"{what} is not sensitive (CKA_SENSITIVE false): its private value can be read "
            "out of the token; generate a new key with 'dpop keygen'"
        )
    if _attribute(key, Attribute.EXTRACTABLE):
        logger.warning("%s is extractable (CKA_EXTRACTABLE true): it can be wrapped out", what)
    if Mechanism.ECDSA not in anchor.mechanisms:
        raise UnsupportedKeyError(
            f"{anchor.where} does not offer CKM_ECDSA, which ES256 with a host-side SHA-256 needs"
        )
    point = _public_point(session, key, what)
    jwk = ec_public_jwk(point)
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise UnsupportedKeyError(f"the public point of {what} is not on P-256") from exc
    # One signature at open proves the public key we will publish belongs to this private
    # key (a label can pair mismatched objects) and that the token signs as we expect.
    probe = key.sign(hashlib.sha256(_SELF_TEST_MESSAGE).digest(), mechanism=Mechanism.ECDSA)
    check_signature(probe, source=f"PKCS#11 {what}")
    try:
        public.verify(raw_to_der_signature(probe), _SELF_TEST_MESSAGE, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise UnsupportedKeyError(
            f"the public key stored with {what} does not match the private key; "
            "fix the CKA_ID/label of the token's objects"
        ) from exc
    label = str(_attribute(key, Attribute.LABEL) or "")
    key_id = bytes(_attribute(key, Attribute.ID) or b"")
    return Pkcs11Signer(
        module=module,
        anchor=anchor,
        selector=dataclasses.replace(uri, pin_value=None),
        key=key,
        jwk=jwk,
        label=label,
        key_id=key_id,
    )


def open_pkcs11_signer(uri: str, pin: str | None = None) -> Pkcs11Signer:
    """Open the EC P-256 key an RFC 7512 URI names, and check it.

    Args:
        uri: ``pkcs11:token=...;object=...[;id=...][?module-path=...&pin-source=file:...]``.
        pin: the user PIN; wins over ``pin-value``/``pin-source`` in the URI, which win over
            ``DPOP_PIN``. The module is ``module-path``, else ``DPOP_PKCS11_MODULE``, else the
            installed SoftHSM2.

    Raises:
        ConfigError: the URI is malformed or names no key.
        SignerUnavailableError: module missing or unloadable, token absent (the message lists
            the tokens present).
        PinError: PIN missing or wrong (never retried).
        KeyNotFoundError: no key, or several keys, match.
        UnsupportedKeyError: RSA, P-384, not sensitive, public key only, or no CKM_ECDSA.
    """
    return Pkcs11Signer.open(uri, pin=pin)


def generate_pkcs11_key(uri: str, pin: str | None = None) -> Pkcs11Signer:
    """Generate a P-256 key pair in the token and return its open signer.

    The private key is a token object, private, sensitive, never extractable, allowed to sign
    and nothing else; the public key is a token object allowed to verify. The label is the
    URI's ``object``; the id is its ``id``, or 2 random bytes (the widest id a YubiHSM 2 keeps).

    Raises:
        ConfigError: no ``object=`` label, or an object with that label or id exists already
            (keys are never overwritten).
        SignerError: the token refused to generate the key (the message names why).
    """
    parsed = parse_pkcs11_uri(uri)
    if parsed.object is None:
        raise ConfigError("generating a PKCS#11 key needs a label: add object=<label> to the URI")
    secret = resolve_pin(parsed, pin)
    module = pkcs11_module(resolve_module(parsed))
    return module.call(_generate_locked, module, parsed, secret)


def _generate_locked(module: Pkcs11Module, uri: Pkcs11Uri, pin: str | None) -> Pkcs11Signer:
    anchor = module.acquire_anchor(uri, pin)
    try:
        key_id = _generate_key_pair(anchor, uri)
        return _open_key(module, anchor, dataclasses.replace(uri, id=key_id))
    except BaseException:
        anchor.release()
        raise


def _generate_key_pair(anchor: _Anchor, uri: Pkcs11Uri) -> bytes:
    assert uri.object is not None
    where = anchor.where
    missing = {Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA} - anchor.mechanisms
    if missing:
        names = ", ".join(sorted(f"CKM_{m.name}" for m in missing))
        raise UnsupportedKeyError(f"{where} does not offer {names}; it cannot make an ES256 key")
    try:
        # The anchor holds the login; a read-write session opened without a PIN shares it.
        session = anchor.token.open(rw=True)
    except p11x.PKCS11Error as exc:
        raise SignerUnavailableError(
            f"cannot open a read-write session on {where}: {_ckr(exc)}"
        ) from exc
    try:
        if list(session.get_objects({Attribute.LABEL: uri.object})):
            raise ConfigError(
                f"{where} already has an object labelled {uri.object!r}; keys are never "
                "overwritten: choose another object= label"
            )
        key_id = uri.id if uri.id is not None else _free_id(session)
        if list(session.get_objects({Attribute.ID: key_id})):
            raise ConfigError(
                f"{where} already has an object with id {key_id.hex()}; choose another id="
            )
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        params.generate_keypair(
            store=True,
            label=uri.object,
            id=key_id,
            public_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
                Attribute.DERIVE: False,
            },
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DERIVE: False,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
            },
        )
    except p11x.PKCS11Error as exc:
        raise SignerError(f"generating key {uri.object!r} in {where} failed: {_ckr(exc)}") from exc
    finally:
        _close_quietly(session)  # opened without a PIN: closing it does not log out
    logger.info("generated EC P-256 key %r (id %s) in %s", uri.object, key_id.hex(), where)
    return key_id


def _free_id(session: pkcs11.Session) -> bytes:
    for _ in range(64):
        candidate = secrets.token_bytes(2)
        if candidate != b"\x00\x00" and not list(session.get_objects({Attribute.ID: candidate})):
            return candidate
    raise ConfigError("could not find a free 2-byte CKA_ID in 64 tries; give one with id=")
