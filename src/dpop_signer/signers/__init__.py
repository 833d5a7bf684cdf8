"""The signer layer: where the private key lives, and the only layer that touches it.

`load_signer` and `generate_key` take one reference string and pick the backend from it: an
RFC 7512 ``pkcs11:`` URI goes to `Pkcs11Signer` (HSM, YubiHSM 2, SoftHSM2), anything else is
the path of a PEM file for `PemSigner` (development only: the key is then in process memory).

>>> signer = load_signer("pkcs11:token=dpop-dev;object=dpop-es256", pin="1234")  # doctest: +SKIP
>>> signer.public_jwk["crv"]  # doctest: +SKIP
'P-256'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpop_signer.algorithms import DEFAULT_ALGORITHM
from dpop_signer.signers.base import (
    ALGORITHM,
    AsyncSigner,
    Signer,
    check_signature,
    close_signer,
    sign_async,
)
from dpop_signer.signers.pem import PemSigner, generate_pem_key
from dpop_signer.signers.pin import resolve_pin

if TYPE_CHECKING:
    from dpop_signer.signers.pkcs11 import Pkcs11Signer

__all__ = [
    "ALGORITHM",
    "AsyncSigner",
    "PemSigner",
    "Pkcs11Signer",
    "Signer",
    "check_signature",
    "close_signer",
    "generate_key",
    "is_pkcs11_ref",
    "load_signer",
    "sign_async",
]


def is_pkcs11_ref(ref: str) -> bool:
    """True when ``ref`` is an RFC 7512 PKCS#11 URI rather than a file path."""
    return ref[:7].lower() == "pkcs11:"


def load_signer(
    ref: str,
    *,
    pin: str | None = None,
    sign_timeout: float | None = 5.0,
    alg: str | None = None,
) -> Signer:
    """Open the key that ``ref`` names; it signs with the algorithm the key implies.

    EC P-256 signs ES256, P-384 ES384, P-521 ES512, Ed25519 EdDSA, RSA (2048 bits or more)
    PS256 - or RS256 when ``alg="RS256"`` (a PKCS#11 URI may say ``alg=RS256`` instead).

    Args:
        ref: an RFC 7512 ``pkcs11:`` URI, or the path of a PEM private key.
        pin: the token PIN or PEM passphrase. For PKCS#11 it wins over ``pin-value`` /
            ``pin-source`` in the URI, which win over the ``DPOP_PIN`` environment variable.
            For PEM, ``DPOP_PIN`` is used when ``pin`` is None and the file is encrypted.
        sign_timeout: for PKCS#11, seconds a caller waits for the module at most before
            `SignerTimeoutError` (None: no deadline). A PEM key signs in memory and never stalls.
        alg: the JWS algorithm; it must fit the key, and is needed only to make an RSA key
            sign RS256 rather than PS256.

    Raises:
        DPoPSignerError: a subclass naming what is wrong (see `dpop_signer.errors`).
    """
    if is_pkcs11_ref(ref):
        from dpop_signer.signers.pkcs11 import open_pkcs11_signer

        return open_pkcs11_signer(ref, pin=pin, sign_timeout=sign_timeout, alg=alg)
    return PemSigner.from_file(ref, pin=resolve_pin(ref, pin), alg=alg)


def generate_key(ref: str, *, pin: str | None = None, alg: str | None = None) -> Signer:
    """Create a new key for ``alg`` at ``ref`` and return its signer.

    ``alg`` is ES256 (EC P-256, the default), ES384 (P-384), ES512 (P-521), EdDSA (Ed25519), or
    PS256 / RS256 (RSA, 2048 bits). A PEM file is written with mode 0600 and never overwritten
    (``pin`` encrypts it). In a token the private key is a token object, private, sensitive and
    never extractable, with the URI's ``object`` label and ``id``; an existing label is refused.
    Neither records the algorithm: open an RS256 key with ``alg="RS256"`` (or ``alg=RS256`` in
    its URI), or it signs PS256.
    """
    if is_pkcs11_ref(ref):
        from dpop_signer.signers.pkcs11 import generate_pkcs11_key

        return generate_pkcs11_key(ref, pin=pin, alg=alg)
    return generate_pem_key(ref, pin=pin, alg=alg or DEFAULT_ALGORITHM)


def __getattr__(name: str) -> object:
    # Pkcs11Signer is re-exported lazily: importing python-pkcs11 costs start-up time that a
    # PEM-only user should not pay.
    if name == "Pkcs11Signer":
        from dpop_signer.signers.pkcs11 import Pkcs11Signer

        return Pkcs11Signer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
