"""Public EC JWKs, RFC 7638 thumbprints, and the r||s <-> DER boundary.

Everything here is pure and key-free: it turns public key points into the JWK that a DPoP proof
carries in its header (RFC 9449 §4.2), computes the thumbprint an authorization server binds a
token to (``cnf.jkt``, RFC 9449 §6.1), and converts ES256 signatures between the fixed-width
JWS form (RFC 7518 §3.4) and the DER form that ``cryptography`` speaks.

>>> jwk = ec_public_jwk(bytes([4]) + bytes(range(64)))
>>> sorted(jwk)
['crv', 'kty', 'x', 'y']
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TypedDict

from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from dpop_signer.errors import SigningFailedError, UnsupportedKeyError
from dpop_signer.jose import b64url_decode, b64url_encode  # public here since before jose.py

__all__ = [
    "COORDINATE_SIZE",
    "SIGNATURE_SIZE",
    "EcPublicJwk",
    "b64url_decode",
    "b64url_encode",
    "der_to_raw_signature",
    "ec_public_jwk",
    "jwk_thumbprint",
    "raw_to_der_signature",
]

COORDINATE_SIZE = 32
"""Bytes in one P-256 coordinate, and in each of r and s."""

SIGNATURE_SIZE = 2 * COORDINATE_SIZE
"""Bytes in an ES256 JWS signature: r||s, each left-padded to 32 bytes (RFC 7518 §3.4)."""


class EcPublicJwk(TypedDict):
    """A P-256 public key as a JWK with exactly the members RFC 7638 hashes."""

    kty: str
    crv: str
    x: str
    y: str


def ec_public_jwk(point: bytes) -> EcPublicJwk:
    """Build the JWK of an uncompressed P-256 point ``04 || X || Y``.

    Raises:
        UnsupportedKeyError: the point is compressed or not 65 bytes long (not P-256).
    """
    if len(point) != 1 + SIGNATURE_SIZE or point[0] != 4:
        raise UnsupportedKeyError(
            f"EC public point of {len(point)} bytes is not an uncompressed P-256 point; "
            "use a P-256 (secp256r1) key"
        )
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(point[1 : 1 + COORDINATE_SIZE]),
        "y": b64url_encode(point[1 + COORDINATE_SIZE :]),
    }


def jwk_thumbprint(jwk: Mapping[str, object]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding.

    Only the required members take part, in lexicographic order, with no white space
    (RFC 7638 §3.2): ``crv, kty, x, y`` for EC, ``e, kty, n`` for RSA, ``crv, kty, x`` for OKP.
    """
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
        "OKP": ("crv", "kty", "x"),
    }
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in required:
        raise ValueError(f"cannot compute a thumbprint for key type {kty!r}")
    members = {name: jwk[name] for name in required[kty]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def der_to_raw_signature(der: bytes) -> bytes:
    """Convert a DER ECDSA-Sig-Value to 64-byte r||s (RFC 7518 §3.4).

    Each integer is left-padded to 32 bytes: about 1 signature in 128 has an r or s that
    starts with a zero byte, and dropping it would make the JWS signature invalid.

    Raises:
        SigningFailedError: the DER is malformed or r or s does not fit in 32 bytes.
    """
    try:
        r, s = decode_dss_signature(der)
        return r.to_bytes(COORDINATE_SIZE, "big") + s.to_bytes(COORDINATE_SIZE, "big")
    except (ValueError, OverflowError) as exc:
        raise SigningFailedError("backend returned a malformed DER ECDSA signature") from exc


def raw_to_der_signature(raw: bytes) -> bytes:
    """Convert 64-byte r||s to a DER ECDSA-Sig-Value, as ``cryptography`` verifies it."""
    if len(raw) != SIGNATURE_SIZE:
        raise ValueError(f"ES256 signature must be {SIGNATURE_SIZE} bytes, got {len(raw)}")
    r = int.from_bytes(raw[:COORDINATE_SIZE], "big")
    s = int.from_bytes(raw[COORDINATE_SIZE:], "big")
    return encode_dss_signature(r, s)
