"""Bulk ES256 verification for the signer tests, through `cryptography` and `tests.oracle` only."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests import oracle

_ECDSA = ec.ECDSA(hashes.SHA256())


def verify_all(jwk: dict[str, Any], pairs: Iterable[tuple[bytes, bytes]]) -> int:
    """Verify every (message, r||s) against the JWK; return how many had r or s < 2**248.

    The public key is built from the JWK alone, so a wrong JWK fails here too.
    """
    public = oracle.public_key_of(jwk)
    leading_zero = 0
    for message, signature in pairs:
        assert len(signature) == 64, f"signature is {len(signature)} bytes"
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        public.verify(encode_dss_signature(r, s), message, _ECDSA)  # raises InvalidSignature
        if signature[0] == 0 or signature[32] == 0:
            leading_zero += 1
    return leading_zero


def check_jwk_shape(jwk: dict[str, Any]) -> None:
    """Exactly kty, crv, x, y; EC P-256; 32-byte base64url coordinates without padding."""
    assert set(jwk) == {"kty", "crv", "x", "y"}, sorted(jwk)
    assert jwk["kty"] == "EC"
    assert jwk["crv"] == "P-256"
    for name in ("x", "y"):
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", jwk[name]), jwk[name]
        assert len(base64.urlsafe_b64decode(jwk[name] + "=")) == 32
