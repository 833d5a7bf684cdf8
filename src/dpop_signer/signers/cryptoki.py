"""The PKCS#11 calls python-pkcs11 does not expose on their own, made through ctypes.

python-pkcs11 logs in only inside ``Token.open(user_pin=...)``, which leaks the session when the
PIN is wrong and fails when the application is logged in already; it has no call for a session's
state, for ``C_CloseAllSessions``, or for initializing a module again in a forked child. These
few functions of the module's ``CK_FUNCTION_LIST`` (PKCS#11 v2.40 §5) fill that gap.
"""

from __future__ import annotations

import ctypes
import sys

from pkcs11 import exceptions as p11x

__all__ = ["CKS_USER_FUNCTIONS", "Cryptoki"]


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
_ONE_POINTER = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


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
CKS_USER_FUNCTIONS = frozenset({1, 3})  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS

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


class Cryptoki:
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
        self._initialize = _ONE_POINTER(functions.C_Initialize)
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

    def initialize_in_child(self) -> bool:
        """``C_Initialize(NULL)`` in a forked child; False if the module says it already is.

        PKCS#11 v2.40 §5.4 has a child process initialize the library afresh; some modules
        (p11-kit) detect the fork and accept that, others (SoftHSM2) keep the parent's state and
        answer ``CKR_CRYPTOKI_ALREADY_INITIALIZED``, and must be finalized first.
        """
        rv = int(self._initialize(None))
        if rv == _CKR_CRYPTOKI_ALREADY_INITIALIZED:
            return False
        _check_rv(rv)
        return True

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
