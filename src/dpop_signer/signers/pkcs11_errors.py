"""What python-pkcs11's exceptions mean, in one-line `dpop_signer.errors` messages.

python-pkcs11 exceptions carry no message; each one is wrapped in a `dpop_signer.errors` class
that names the module, token and key, never the PIN, and says what to do. Which failures a fresh
session can cure (`recoverable`) is decided here too.
"""

from __future__ import annotations

import os

from pkcs11 import exceptions as p11x

from dpop_signer.errors import (
    DPoPSignerError,
    PinError,
    SignerUnavailableError,
)

__all__ = [
    "ckr",
    "forked_error",
    "login_error",
    "missing_pin",
    "recoverable",
    "refused_again",
    "yubihsm_hint",
]

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


def recoverable(exc: p11x.PKCS11Error) -> bool:
    """Whether a fresh session (and login) may cure ``exc``: lost session, handle or device."""
    # CKR_CRYPTOKI_NOT_INITIALIZED has no class of its own in python-pkcs11.
    return isinstance(exc, _RECOVERABLE) or "not initialized" in str(exc)


def ckr(exc: BaseException) -> str:
    """Name a python-pkcs11 exception: its class, plus its text when it has one."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    return f"{name} ({text})" if text and type(exc) is p11x.PKCS11Error else name


def yubihsm_hint(path: str) -> str:
    """What a YubiHSM 2 module needs that is missing, as a message suffix ("" if nothing)."""
    if "yubihsm" in os.path.basename(path).lower() and not os.environ.get("YUBIHSM_PKCS11_CONF"):
        return (
            "; the YubiHSM 2 module needs YUBIHSM_PKCS11_CONF set to a yubihsm_pkcs11.conf "
            "containing connector=http://127.0.0.1:12345 (or yhusb://)"
        )
    return ""


def missing_pin(label: str) -> PinError:
    """The token needs a login and no PIN was given."""
    return PinError(
        f"token {label!r} needs a PIN: pass pin=, or add pin-source=file:/path/to/pin to the URI"
    )


def refused_again(first: PinError) -> PinError:
    """A PIN the token refused before: not sent again (tokens lock after a few wrong PINs)."""
    return PinError(
        f"{first.message.split(';')[0]}; this PIN was refused earlier in this process and is "
        "never sent to the token again: fix the PIN and reload the configuration, or restart"
    )


def login_error(exc: p11x.PKCS11Error, where: str) -> DPoPSignerError:
    """The error for a failed ``C_Login``: a `PinError` for every PIN problem."""
    never = "it was not retried (tokens lock after a few wrong PINs)"
    if isinstance(exc, p11x.PinIncorrect):
        return PinError(f"wrong PIN for {where}; {never}")
    if isinstance(exc, p11x.PinLocked):
        return PinError(
            f"the user PIN of {where} is locked; unlock it with the SO PIN (on a TPM: "
            "tpm2_dictionarylockout --clear-lockout)"
        )
    if isinstance(exc, p11x.PinLenRange | p11x.PinInvalid):
        return PinError(f"the PIN for {where} has the wrong length or characters; {never}")
    if isinstance(exc, p11x.PinExpired):
        return PinError(f"the user PIN of {where} has expired; change it with the token's tools")
    if isinstance(exc, p11x.UserPinNotInitialized):
        return PinError(f"{where} has no user PIN yet; initialize it with the SO PIN")
    return SignerUnavailableError(f"login to {where} failed: {ckr(exc)}")


def forked_error(path: str) -> SignerUnavailableError:
    """A signer used in a child process it was not opened in."""
    return SignerUnavailableError(
        f"this signer of PKCS#11 module {path} was opened before fork(); a child process must "
        "open its own signer (it can: the module is started afresh in the child)"
    )
