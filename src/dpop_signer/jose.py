"""JOSE and HTTP grammar helpers shared by the client, the verifier and the service.

One home for what used to be written in four or five places:

- base64url without padding (RFC 7515 §2): `b64url_encode`, `b64url_bytes` (the hot path of
  proofs, which assembles bytes), `b64url_decode` (strict: no padding, no standard alphabet),
  `b64url_json` (a JSON object as a compact JWS segment);
- the grammars a DPoP client checks before it puts a value into a header or a claim: an HTTP
  method is an RFC 9110 §5.6.2 ``token``, an access token is an RFC 9110 §11.2 ``token68``, a
  nonce is RFC 9449 §8.1 ``1*NQCHAR`` (`TOKEN`, `TOKEN68`, `NQCHAR`, `is_token68`, `is_nonce`;
  the ``*_PATTERN`` strings are the same grammars for pydantic fields);
- `peek_claims`: the payload of a compact JWS read without any check, for logs and displays.

Pure functions over ``str`` and ``bytes``; nothing here imports the rest of the package.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "NQCHAR",
    "NQCHAR_PATTERN",
    "TOKEN",
    "TOKEN68",
    "TOKEN68_PATTERN",
    "b64url_bytes",
    "b64url_decode",
    "b64url_encode",
    "b64url_json",
    "is_nonce",
    "is_token68",
    "peek_claims",
]

TOKEN68_PATTERN = r"[A-Za-z0-9\-._~+/]+=*"
"""RFC 9110 §11.2 ``token68`` (RFC 6750 §2.1 ``b64token``): what an access token may be."""
NQCHAR_PATTERN = r"[\x21\x23-\x5B\x5D-\x7E]+"
"""RFC 9449 §8.1 ``nonce = 1*NQCHAR``: printable ASCII without space, quote or backslash."""

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""RFC 9110 §5.6.2 ``token`` (a method, an auth scheme); use ``fullmatch``."""
TOKEN68 = re.compile(TOKEN68_PATTERN)
"""`TOKEN68_PATTERN` compiled; use ``fullmatch``."""
NQCHAR = re.compile(NQCHAR_PATTERN)
"""`NQCHAR_PATTERN` compiled; use ``fullmatch``."""

_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url_bytes(data: bytes) -> bytes:
    """Base64url without padding, as ASCII bytes (what a signer signs)."""
    # base64.urlsafe_b64encode minus two layers of Python calls: this runs twice per proof.
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return b64url_bytes(data).decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; raises `ValueError` on bad input."""
    if not isinstance(text, str) or any(c in text for c in "+/= \n"):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_json(value: Mapping[str, Any]) -> str:
    """``value`` as compact JSON (UTF-8), base64url: one segment of a compact JWS."""
    return b64url_encode(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def is_nonce(value: object) -> bool:
    """True when ``value`` is a syntactically valid DPoP nonce (``1*NQCHAR``, RFC 9449 §8.1)."""
    return isinstance(value, str) and NQCHAR.fullmatch(value) is not None


def is_token68(value: object) -> bool:
    """True when ``value`` can be an ``Authorization`` credential (RFC 9110 §11.2 token68)."""
    return isinstance(value, str) and TOKEN68.fullmatch(value) is not None


def peek_claims(jws: str) -> dict[str, Any] | None:
    """The payload of a compact JWS as a JSON object, unverified; None when it is not one.

    For logs, records and displays only (which ``cnf.jkt`` a token carried, a proof's ``jti``);
    never base a decision on it.
    """
    parts = jws.split(".") if isinstance(jws, str) else ()
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None
