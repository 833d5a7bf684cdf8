"""The JWS algorithms dpop-signer signs and verifies with, and what each one asks of a key.

One table, read by every backend (`dpop_signer.signers`), the proof builder and the verifier, so
that the pairing of an ``alg`` with a key type, curve, hash and signature width is written once:

========  ===============  =========  ==========================================  ============
alg       key              hash       signature (JWS form)                        RFC
========  ===============  =========  ==========================================  ============
ES256     EC P-256         SHA-256    r||s, 32 + 32 bytes                         7518 §3.4
ES384     EC P-384         SHA-384    r||s, 48 + 48 bytes                         7518 §3.4
ES512     EC P-521         SHA-512    r||s, 66 + 66 bytes                         7518 §3.4
EdDSA     OKP Ed25519      (none)     64 bytes                                    8037 §3.1
PS256     RSA, >= 2048 bit SHA-256    RSASSA-PSS, MGF1-SHA-256, 32-byte salt;     7518 §3.5
                                      the modulus' length
RS256     RSA, >= 2048 bit SHA-256    RSASSA-PKCS1-v1_5; the modulus' length      7518 §3.3
========  ===============  =========  ==========================================  ============

**The algorithm follows the key.** An EC or Ed25519 key has exactly one algorithm. An RSA key
has two: PS256 unless RS256 is asked for by name (`algorithm_for_key`), because RFC 9449 servers
and FAPI 2.0 prefer PSS and PKCS#1 v1.5 is kept only for servers that demand it. ES256 stays the
default of everything that makes a key.

>>> algorithm_for_key("EC", "P-384").name
'ES384'
>>> algorithm_for_key("RSA", None).name
'PS256'
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from dpop_signer.errors import UnsupportedKeyError
from dpop_signer.jwk import CRV_OF_CURVE, PublicKey, raw_to_der_signature

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "MIN_RSA_BITS",
    "RSA_KEYGEN_BITS",
    "JwsAlgorithm",
    "algorithm_for_key",
    "check_signature_form",
    "get_algorithm",
    "pss_padding",
    "verify_signature",
]

MIN_RSA_BITS = 2048
"""Smallest RSA modulus accepted for PS256/RS256, signing or verifying (RFC 7518 §3.3, §3.5)."""

RSA_KEYGEN_BITS = 2048
"""Modulus of RSA keys that ``dpop keygen --alg PS256|RS256`` makes: the smallest allowed, since
a DPoP key signs every request and a 3072-bit signature costs about three times as much."""

DEFAULT_ALGORITHM = "ES256"


@dataclass(frozen=True)
class JwsAlgorithm:
    """One JWS ``alg`` and what it needs: key type, curve, hash, width of each signature."""

    name: str
    kty: str
    """JWK key type: ``EC``, ``OKP`` or ``RSA``."""
    crv: str | None
    """JWK curve (``P-256``, ``Ed25519``...); None for RSA."""
    hash_name: str | None
    """The hashlib name of the message hash (``sha256``...); None for EdDSA, which hashes inside."""
    coordinate_size: int
    """Bytes per EC coordinate and per r and s; the Ed25519 public key size; 0 for RSA."""

    @property
    def hasher(self) -> Callable[[bytes], _Hash] | None:
        """The hashlib constructor of `hash_name`, or None."""
        return None if self.hash_name is None else getattr(hashlib, self.hash_name)

    @property
    def fixed_signature_size(self) -> int | None:
        """Bytes in every signature (ECDSA r||s, Ed25519); None for RSA (the modulus' length)."""
        if self.kty == "EC":
            return 2 * self.coordinate_size
        if self.kty == "OKP":
            return 64
        return None


ALGORITHMS: dict[str, JwsAlgorithm] = {
    alg.name: alg
    for alg in (
        JwsAlgorithm("ES256", "EC", "P-256", "sha256", 32),
        JwsAlgorithm("ES384", "EC", "P-384", "sha384", 48),
        JwsAlgorithm("ES512", "EC", "P-521", "sha512", 66),
        JwsAlgorithm("EdDSA", "OKP", "Ed25519", None, 32),
        JwsAlgorithm("PS256", "RSA", None, "sha256", 0),
        JwsAlgorithm("RS256", "RSA", None, "sha256", 0),
    )
}
"""Every algorithm dpop-signer can sign with, by JWS name."""

_RSA_ALGORITHMS = ("PS256", "RS256")


def get_algorithm(name: str) -> JwsAlgorithm:
    """The `JwsAlgorithm` called ``name`` (case-sensitive, as in a JWS header).

    Raises:
        UnsupportedKeyError: no such algorithm here; the message lists those that are.
    """
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise UnsupportedKeyError(
            f"algorithm {name!r} is not supported; choose one of {', '.join(ALGORITHMS)}"
        ) from None


def algorithm_for_key(kty: str, crv: str | None, requested: str | None = None) -> JwsAlgorithm:
    """The algorithm a key of type ``kty`` (and curve ``crv``) signs with.

    ``requested`` (an ``alg=`` the caller gave) must fit the key; for an RSA key it chooses
    between PS256 (the default) and RS256.

    Raises:
        UnsupportedKeyError: the key type or curve has no algorithm here, or ``requested``
            does not fit the key.
    """
    if kty == "RSA":
        if requested is None:
            return ALGORITHMS["PS256"]
        if requested in _RSA_ALGORITHMS:
            return ALGORITHMS[requested]
        raise UnsupportedKeyError(
            f"alg {requested} does not fit an RSA key; use PS256 (the default) or RS256"
        )
    for alg in ALGORITHMS.values():
        if alg.kty == kty and alg.crv == crv:
            if requested is not None and requested != alg.name:
                raise UnsupportedKeyError(
                    f"alg {requested} does not fit an {kty} {crv} key, which signs {alg.name}; "
                    f"leave alg out or give alg={alg.name}"
                )
            return alg
    raise UnsupportedKeyError(
        f"a {kty} {crv or ''} key has no supported algorithm; use EC P-256 (ES256, the default), "
        "P-384 (ES384), P-521 (ES512), Ed25519 (EdDSA) or RSA of 2048 bits or more (PS256, RS256)"
    )


_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def pss_padding() -> padding.PSS:
    """RFC 7518 §3.5 PS256 padding: MGF1 with SHA-256, a salt as long as the hash (32 bytes)."""
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def check_signature_form(alg: JwsAlgorithm, key: PublicKey, signature: bytes) -> None:
    """Refuse a signature whose exact form cannot be ``alg``'s with ``key``.

    ECDSA: r||s of the curve's width (RFC 7518 §3.4; DER is refused); Ed25519: 64 bytes
    (RFC 8032 §5.1.6); RSA: as long as the modulus (RFC 8017 §8.1.2, §8.2.2), of 2048 bits or
    more.

    Raises:
        ValueError: the key does not fit ``alg``, or the signature is not its form; one line.
    """
    if alg.kty == "EC":
        if not isinstance(key, ec.EllipticCurvePublicKey) or alg.crv != CRV_OF_CURVE.get(
            key.curve.name
        ):
            raise ValueError(f"key is not EC {alg.crv}, which {alg.name} needs")
        want = 2 * alg.coordinate_size
        if len(signature) != want:
            raise ValueError(
                f"signature is {len(signature)} bytes, not the {want}-byte {alg.name} r||s"
            )
    elif alg.kty == "OKP":
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"key is not Ed25519, which {alg.name} needs")
        if len(signature) != 64:
            raise ValueError(f"signature is {len(signature)} bytes, not the 64-byte Ed25519 one")
    else:
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"key is not RSA, which {alg.name} needs")
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        want = (key.key_size + 7) // 8
        if len(signature) != want:
            raise ValueError(f"signature is {len(signature)} bytes, not the modulus length {want}")


def verify_signature(alg: JwsAlgorithm, key: PublicKey, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``alg``'s JWS signature of ``message`` by ``key``.

    Raises:
        ValueError: as `check_signature_form` (a malformed signature is not merely wrong).
    """
    check_signature_form(alg, key, signature)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            assert alg.hash_name is not None
            key.verify(
                raw_to_der_signature(signature, len(signature)),
                message,
                ec.ECDSA(_HASHES[alg.hash_name]()),
            )
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif alg.name == "PS256":
            key.verify(signature, message, pss_padding(), hashes.SHA256())
        else:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
