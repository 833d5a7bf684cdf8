"""Public JWKs (EC, OKP, RSA), RFC 7638 thumbprints, and the r||s <-> DER boundary.

Everything here is pure and key-free: it turns public keys into the JWK that a DPoP proof
carries in its header (RFC 9449 §4.2) - EC points (RFC 7518 §6.2), Ed25519 keys (RFC 8037 §2)
and RSA moduli (RFC 7518 §6.3) - computes the thumbprint an authorization server binds a token
to (``cnf.jkt``, RFC 9449 §6.1, RFC 7638), builds a ``cryptography`` public key back from a
JWK (refusing anything malformed), and converts ECDSA signatures between the fixed-width JWS
form (RFC 7518 §3.4) and the DER form that ``cryptography`` speaks.

>>> jwk = ec_public_jwk(bytes([4]) + bytes(range(64)))
>>> sorted(jwk)
['crv', 'kty', 'x', 'y']
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import TypedDict

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dpop_signer.errors import InvalidKeyError, SigningFailedError, UnsupportedKeyError
from dpop_signer.jose import b64url_decode, b64url_encode  # public here since before jose.py

__all__ = [
    "COORDINATE_SIZE",
    "CRV_OF_CURVE",
    "SIGNATURE_SIZE",
    "EcPublicJwk",
    "OkpPublicJwk",
    "PublicJwk",
    "PublicKey",
    "RsaPublicJwk",
    "b64url_decode",
    "b64url_encode",
    "der_to_raw_signature",
    "ec_public_jwk",
    "jwk_signature_size",
    "jwk_thumbprint",
    "okp_public_jwk",
    "public_jwk_of_key",
    "public_key_of_jwk",
    "raw_to_der_signature",
    "rsa_public_jwk",
]

COORDINATE_SIZE = 32
"""Bytes in one P-256 coordinate, and in each of r and s."""

SIGNATURE_SIZE = 2 * COORDINATE_SIZE
"""Bytes in an ES256 JWS signature: r||s, each left-padded to 32 bytes (RFC 7518 §3.4)."""

ED25519_KEY_SIZE = 32
"""Bytes in an Ed25519 public key (RFC 8032 §5.1.5), the JWK's ``x`` (RFC 8037 §2)."""

# Uncompressed point length -> (JWK crv, coordinate bytes, cryptography curve).
_EC_CURVES: dict[int, tuple[str, int, type[ec.EllipticCurve]]] = {
    65: ("P-256", 32, ec.SECP256R1),
    97: ("P-384", 48, ec.SECP384R1),
    133: ("P-521", 66, ec.SECP521R1),
}
_CURVE_BY_CRV = {crv: (size, curve) for crv, size, curve in _EC_CURVES.values()}
CRV_OF_CURVE = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
"""JWK ``crv`` of each supported curve, by its SEC 2 (OpenSSL, ``cryptography``) name."""

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
"""The ``cryptography`` public keys a JWK here can stand for."""


class EcPublicJwk(TypedDict):
    """An EC public key (P-256, P-384, P-521) with exactly the members RFC 7638 hashes."""

    kty: str
    crv: str
    x: str
    y: str


class OkpPublicJwk(TypedDict):
    """An Ed25519 public key (RFC 8037 §2): ``kty`` ``OKP``, ``crv``, ``x``."""

    kty: str
    crv: str
    x: str


class RsaPublicJwk(TypedDict):
    """An RSA public key (RFC 7518 §6.3.1): ``kty`` ``RSA``, ``n``, ``e``."""

    kty: str
    n: str
    e: str


PublicJwk = EcPublicJwk | OkpPublicJwk | RsaPublicJwk
"""Any public JWK a signer publishes: exactly the members its RFC 7638 thumbprint hashes."""


def ec_public_jwk(point: bytes) -> EcPublicJwk:
    """Build the JWK of an uncompressed EC point ``04 || X || Y`` on P-256, P-384 or P-521.

    The curve follows from the length (65, 97 or 133 bytes).

    Raises:
        UnsupportedKeyError: the point is compressed or of no supported curve's length.
    """
    curve = _EC_CURVES.get(len(point))
    if curve is None or point[0] != 4:
        raise UnsupportedKeyError(
            f"EC public point of {len(point)} bytes is not an uncompressed P-256, P-384 or "
            "P-521 point; use a key on one of those curves"
        )
    crv, size, _ = curve
    return {
        "kty": "EC",
        "crv": crv,
        "x": b64url_encode(point[1 : 1 + size]),
        "y": b64url_encode(point[1 + size :]),
    }


def okp_public_jwk(public: bytes) -> OkpPublicJwk:
    """Build the JWK of a 32-byte Ed25519 public key (RFC 8037 §2).

    Raises:
        UnsupportedKeyError: ``public`` is not 32 bytes.
    """
    if len(public) != ED25519_KEY_SIZE:
        raise UnsupportedKeyError(
            f"Ed25519 public key of {len(public)} bytes; it must be {ED25519_KEY_SIZE}"
        )
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(public)}


def rsa_public_jwk(modulus: int, exponent: int) -> RsaPublicJwk:
    """Build the JWK of an RSA public key: ``n`` and ``e`` as minimal big-endian base64url.

    RFC 7518 §6.3.1 wants Base64urlUInt (no leading zero octets), or thumbprints differ.
    """
    return {"kty": "RSA", "n": _uint(modulus), "e": _uint(exponent)}


def _uint(value: int) -> str:
    return b64url_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def public_jwk_of_key(key: object) -> PublicJwk:
    """The JWK of a ``cryptography`` public key (EC P-256/384/521, Ed25519 or RSA).

    Raises:
        UnsupportedKeyError: any other key type or curve.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in CRV_OF_CURVE:
            raise UnsupportedKeyError(
                f"EC {key.curve.name} keys are not supported; use P-256, P-384 or P-521"
            )
        return ec_public_jwk(key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint))
    if isinstance(key, ed25519.Ed25519PublicKey):
        return okp_public_jwk(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return rsa_public_jwk(numbers.n, numbers.e)
    kind = type(key).__name__.removeprefix("_").replace("PublicKey", "")
    raise UnsupportedKeyError(
        f"{kind} keys are not supported; use EC P-256/P-384/P-521, Ed25519 or RSA"
    )


def public_key_of_jwk(jwk: Mapping[str, object]) -> PublicKey:
    """The ``cryptography`` public key of a public JWK, checked member by member.

    Cached: a client sends the same key with every proof.

    Raises:
        ValueError: an unsupported ``kty``/``crv``, a member that is missing, not canonical
            base64url or of the wrong length, a point not on its curve, or an RSA modulus
            shorter than 2048 bits; the message says which, in one line.
    """
    kty = jwk.get("kty")
    if kty == "EC":
        members: tuple[object, ...] = (kty, jwk.get("crv"), jwk.get("x"), jwk.get("y"))
    elif kty == "OKP":
        members = (kty, jwk.get("crv"), jwk.get("x"))
    elif kty == "RSA":
        members = (kty, jwk.get("n"), jwk.get("e"))
    else:
        raise InvalidKeyError(f"key type {str(kty)[:20]!r} is not EC, OKP or RSA")
    if not all(isinstance(m, str) for m in members):
        raise InvalidKeyError(f"key has no valid {kty} members (strings expected)")
    return _public_key(members)


@functools.lru_cache(maxsize=1024)
def _public_key(members: tuple[str, ...]) -> PublicKey:
    kty = members[0]
    if kty == "EC":
        _, crv, x, y = members
        if crv not in _CURVE_BY_CRV:
            raise InvalidKeyError(f"key curve {crv[:20]!r} is not P-256, P-384 or P-521")
        size, curve = _CURVE_BY_CRV[crv]
        x_bytes, y_bytes = _decoded(x, "x"), _decoded(y, "y")
        if len(x_bytes) != size or len(y_bytes) != size:
            raise InvalidKeyError(f"key coordinates are not {size} bytes each, as {crv} needs")
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x_bytes, "big"), int.from_bytes(y_bytes, "big"), curve()
            ).public_key()
        except ValueError as exc:
            raise InvalidKeyError(f"key is not a point on the {crv} curve") from exc
    if kty == "OKP":
        _, crv, x = members
        if crv != "Ed25519":
            raise InvalidKeyError(f"OKP curve {crv[:20]!r} is not Ed25519")
        raw = _decoded(x, "x")
        if len(raw) != ED25519_KEY_SIZE:
            raise InvalidKeyError(f"Ed25519 key x is {len(raw)} bytes, not {ED25519_KEY_SIZE}")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    _, n, e = members
    n_bytes, e_bytes = _decoded(n, "n"), _decoded(e, "e")
    if n_bytes[:1] == b"\x00" or e_bytes[:1] == b"\x00":
        raise InvalidKeyError("key n or e has leading zero octets (RFC 7518 §6.3.1)")
    modulus, exponent = int.from_bytes(n_bytes, "big"), int.from_bytes(e_bytes, "big")
    if modulus.bit_length() < 2048:
        raise InvalidKeyError(f"RSA key is {modulus.bit_length()} bits; at least 2048 are required")
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError as exc:
        raise InvalidKeyError("key is not a valid RSA public key") from exc


def _decoded(value: str, name: str) -> bytes:
    try:
        raw = b64url_decode(value)
    except ValueError as exc:
        raise InvalidKeyError(f"key member {name} is not base64url") from exc
    if not raw or b64url_encode(raw) != value:
        raise InvalidKeyError(f"key member {name} is not canonical base64url")
    return raw


def jwk_signature_size(jwk: Mapping[str, object]) -> int:
    """Bytes in every JWS signature a key makes: r||s for EC, 64 for Ed25519, len(n) for RSA.

    Raises:
        ValueError: the JWK is not one of those (see `public_key_of_jwk`).
    """
    key = public_key_of_jwk(jwk)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return 2 * ((key.curve.key_size + 7) // 8)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 64
    return (key.key_size + 7) // 8


def jwk_thumbprint(jwk: Mapping[str, object]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding.

    Only the required members take part, in lexicographic order, with no white space
    (RFC 7638 §3.2): ``crv, kty, x, y`` for EC, ``e, kty, n`` for RSA, ``crv, kty, x`` for OKP
    (RFC 8037 §2).
    """
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
        "OKP": ("crv", "kty", "x"),
    }
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in required:
        raise InvalidKeyError(f"cannot compute a thumbprint for key type {kty!r}")
    members = {name: jwk[name] for name in required[kty]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def der_to_raw_signature(der: bytes, coordinate_size: int = COORDINATE_SIZE) -> bytes:
    """Convert a DER ECDSA-Sig-Value to r||s (RFC 7518 §3.4): 64 bytes for P-256 by default.

    Each integer is left-padded to ``coordinate_size`` bytes (48 for P-384, 66 for P-521):
    about 1 signature in 128 has an r or s that starts with a zero byte, and dropping it would
    make the JWS signature invalid.

    Raises:
        SigningFailedError: the DER is malformed or r or s does not fit.
    """
    try:
        r, s = decode_dss_signature(der)
        return r.to_bytes(coordinate_size, "big") + s.to_bytes(coordinate_size, "big")
    except (ValueError, OverflowError) as exc:
        raise SigningFailedError("backend returned a malformed DER ECDSA signature") from exc


def raw_to_der_signature(raw: bytes, size: int = SIGNATURE_SIZE) -> bytes:
    """Convert ``size``-byte r||s (64 for ES256) to a DER ECDSA-Sig-Value for ``cryptography``."""
    if len(raw) != size:
        raise InvalidKeyError(f"ECDSA signature must be {size} bytes, got {len(raw)}")
    half = size // 2
    return encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )
