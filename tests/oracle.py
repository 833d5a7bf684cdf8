"""An independent DPoP proof verifier for the tests: the oracle every proof we make must pass.

It shares no code with `dpop_signer` on purpose (stdlib ``json``/``base64``/``hashlib``,
``urllib.parse`` and ``cryptography`` directly), so a bug in the builder cannot hide behind the
same bug here. It applies every check of RFC 9449 §4.3 that a server can apply to one proof,
plus ``ath`` (§7) and the ``cnf.jkt`` binding (§6.1).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_NQCHAR = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]+$")  # RFC 9449 §8.1: 1*NQCHAR


class OracleError(AssertionError):
    """A proof failed an RFC 9449 check."""


def _b64d(part: str, what: str) -> bytes:
    if not _B64URL.match(part):
        raise OracleError(f"{what} is not base64url without padding")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 §3: required members, lexicographic order, no white space, SHA-256."""
    canon = '{"crv":"' + jwk["crv"] + '","kty":"' + jwk["kty"] + '","x":"' + jwk["x"]
    canon += '","y":"' + jwk["y"] + '"}'
    return _b64e(hashlib.sha256(canon.encode()).digest())


def ath_of(access_token: str) -> str:
    return _b64e(hashlib.sha256(access_token.encode("ascii")).digest())


def expected_htu(url: str) -> str:
    """RFC 9449 §4.3 check 9 with RFC 3986 §6.2.2/§6.2.3 normalisation, written independently."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def public_key_of(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    x = _b64d(jwk["x"], "jwk.x")
    y = _b64d(jwk["y"], "jwk.y")
    if len(x) != 32 or len(y) != 32:
        raise OracleError("jwk coordinates are not 32 bytes")
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
    )
    return numbers.public_key()


def verify_es256(jwk: dict[str, Any], signing_input: bytes, signature: bytes) -> None:
    if len(signature) != 64:
        raise OracleError(f"ES256 signature is {len(signature)} bytes, not 64")
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        public_key_of(jwk).verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise OracleError("signature does not verify with the header jwk") from exc


@dataclass
class CheckedProof:
    header: dict[str, Any]
    claims: dict[str, Any]
    jkt: str
    checks: list[str] = field(default_factory=list)


def check_proof(
    proof: str,
    *,
    htm: str,
    url: str,
    access_token: str | None = None,
    nonce: str | None = None,
    now: float | None = None,
    max_age: float = 300.0,
    max_future: float = 60.0,
    expected_jkt: str | None = None,
    expected_jwk: dict[str, Any] | None = None,
) -> CheckedProof:
    """Apply RFC 9449 §4.3 checks 2-12 to one proof; raise `OracleError` on the first failure."""
    checks: list[str] = []
    # 2. a single well-formed compact JWS
    if not isinstance(proof, str) or proof.count(".") != 2 or any(c.isspace() for c in proof):
        raise OracleError("not a compact JWS with three parts")
    h64, c64, s64 = proof.split(".")
    try:
        header = json.loads(_b64d(h64, "header"))
        claims = json.loads(_b64d(c64, "claims"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise OracleError("header or claims are not JSON") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise OracleError("header or claims are not JSON objects")
    checks.append("2:well-formed")
    # 3. required claims
    for name in ("jti", "htm", "htu", "iat"):
        if name not in claims:
            raise OracleError(f"claim {name} missing")
    checks.append("3:claims")
    # 4. typ
    if header.get("typ") != "dpop+jwt":
        raise OracleError(f"typ is {header.get('typ')!r}, not dpop+jwt")
    checks.append("4:typ")
    # 5. alg: asymmetric, supported; we accept exactly ES256
    if header.get("alg") != "ES256":
        raise OracleError(f"alg is {header.get('alg')!r}, not ES256")
    checks.append("5:alg")
    # 7. jwk public only, exactly the EC members
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise OracleError("jwk header missing")
    if set(jwk) != {"kty", "crv", "x", "y"}:
        raise OracleError(f"jwk members are {sorted(jwk)}, want exactly crv, kty, x, y")
    if jwk["kty"] != "EC" or jwk["crv"] != "P-256":
        raise OracleError("jwk is not EC P-256")
    if expected_jwk is not None and jwk != expected_jwk:
        raise OracleError("jwk is not the signer's public key")
    checks.append("7:public-jwk")
    # 6. signature over the exact bytes received
    verify_es256(jwk, f"{h64}.{c64}".encode("ascii"), _b64d(s64, "signature"))
    checks.append("6:signature")
    # jti: >= 96 bits of randomness (§4.2)
    jti = claims["jti"]
    if not isinstance(jti, str) or len(jti) < 16:
        raise OracleError("jti is not a string of at least 96 bits (16 base64url characters)")
    # 8. htm
    if claims["htm"] != htm:
        raise OracleError(f"htm {claims['htm']!r} != request method {htm!r}")
    checks.append("8:htm")
    # 9. htu
    if claims["htu"] != expected_htu(url):
        raise OracleError(f"htu {claims['htu']!r} != {expected_htu(url)!r}")
    if "?" in claims["htu"] or "#" in claims["htu"]:
        raise OracleError("htu carries a query or fragment")
    checks.append("9:htu")
    # 10. nonce
    if nonce is not None:
        if claims.get("nonce") != nonce:
            raise OracleError("nonce claim does not match the server's nonce")
        if not _NQCHAR.match(claims["nonce"]):
            raise OracleError("nonce is not 1*NQCHAR")
    elif "nonce" in claims:
        raise OracleError("nonce claim present although no nonce was supplied")
    checks.append("10:nonce")
    # 11. iat within the window
    iat = claims["iat"]
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise OracleError("iat is not an integer NumericDate")
    current = time.time() if now is None else now
    if iat < current - max_age or iat > current + max_future:
        raise OracleError(f"iat is {iat - current:+.0f} s from now, outside the window")
    checks.append("11:iat")
    # 12a. ath
    if access_token is not None:
        if claims.get("ath") != ath_of(access_token):
            raise OracleError("ath does not hash the access token")
    elif "ath" in claims:
        raise OracleError("ath present although no access token accompanies the proof")
    checks.append("12a:ath")
    jkt = thumbprint(jwk)
    # 12b. cnf.jkt binding
    if expected_jkt is not None and jkt != expected_jkt:
        raise OracleError("proof key thumbprint does not match cnf.jkt")
    checks.append("12b:jkt")
    return CheckedProof(header=header, claims=claims, jkt=jkt, checks=checks)
