"""An independent DPoP proof verifier for the tests: the oracle every proof we make must pass.

It shares no code with `dpop_signer` on purpose (stdlib ``json``/``base64``/``hashlib``,
``urllib.parse`` and ``cryptography`` directly), so a bug in the builder cannot hide behind the
same bug here. It applies every check of RFC 9449 §4.3 that a server can apply to one proof,
plus ``ath`` (§7) and the ``cnf.jkt`` binding (§6.1). Algorithms: ES256 unless ``algs`` lists
more of ES384, ES512 (RFC 7518 §3.4), EdDSA with Ed25519 (RFC 8037 §3.1), PS256 (RFC 7518 §3.5)
and RS256 (§3.3), each written out here from the RFCs.
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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
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
    """RFC 7638 §3: required members, lexicographic order, no white space, SHA-256.

    EC: crv, kty, x, y (§3.2); RSA: e, kty, n (§3.2); OKP: crv, kty, x (RFC 8037 §2).
    """
    if jwk["kty"] == "RSA":
        canon = '{"e":"' + jwk["e"] + '","kty":"RSA","n":"' + jwk["n"] + '"}'
    elif jwk["kty"] == "OKP":
        canon = '{"crv":"' + jwk["crv"] + '","kty":"OKP","x":"' + jwk["x"] + '"}'
    else:
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


# alg -> (kty, crv, bytes per coordinate / r / s, hash) for the ECDSA algorithms, RFC 7518 §3.4.
_ECDSA_ALGS: dict[str, tuple[str, int, ec.EllipticCurve, hashes.HashAlgorithm]] = {
    "ES256": ("P-256", 32, ec.SECP256R1(), hashes.SHA256()),
    "ES384": ("P-384", 48, ec.SECP384R1(), hashes.SHA384()),
    "ES512": ("P-521", 66, ec.SECP521R1(), hashes.SHA512()),
}
_MEMBERS = {"EC": {"kty", "crv", "x", "y"}, "OKP": {"kty", "crv", "x"}, "RSA": {"kty", "n", "e"}}
_KTY = {"ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP", "PS256": "RSA", "RS256": "RSA"}


def public_key_of(jwk: dict[str, Any], alg: str = "ES256") -> Any:
    """The public key of ``jwk`` for ``alg``; refuses members of the wrong size or curve."""
    if alg in _ECDSA_ALGS:
        crv, size, curve, _ = _ECDSA_ALGS[alg]
        if jwk.get("kty") != "EC" or jwk.get("crv") != crv:
            raise OracleError(f"jwk is not EC {crv}, which {alg} needs")
        x = _b64d(jwk["x"], "jwk.x")
        y = _b64d(jwk["y"], "jwk.y")
        if len(x) != size or len(y) != size:
            raise OracleError(f"jwk coordinates are not {size} bytes")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        )
        return numbers.public_key()
    if alg == "EdDSA":
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise OracleError("jwk is not OKP Ed25519 (RFC 8037 §2)")
        raw = _b64d(jwk["x"], "jwk.x")
        if len(raw) != 32:
            raise OracleError("Ed25519 jwk x is not 32 bytes")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if jwk.get("kty") != "RSA":
        raise OracleError(f"jwk is not RSA, which {alg} needs")
    n, e = _b64d(jwk["n"], "jwk.n"), _b64d(jwk["e"], "jwk.e")
    if n[:1] == b"\x00" or e[:1] == b"\x00":
        raise OracleError("RSA n or e has leading zero octets (RFC 7518 §6.3.1.1)")
    if int.from_bytes(n, "big").bit_length() < 2048:
        raise OracleError("RSA key is shorter than 2048 bits (RFC 7518 §3.3, §3.5)")
    return rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()


def verify_jws(alg: str, jwk: dict[str, Any], signing_input: bytes, signature: bytes) -> None:
    """Verify a JWS signature of ``alg`` with ``jwk``, checking its exact form first."""
    key = public_key_of(jwk, alg)
    try:
        if alg in _ECDSA_ALGS:
            _, size, _, digest = _ECDSA_ALGS[alg]
            if len(signature) != 2 * size:
                raise OracleError(f"{alg} signature is {len(signature)} bytes, not {2 * size}")
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            key.verify(der, signing_input, ec.ECDSA(digest))
        elif alg == "EdDSA":
            if len(signature) != 64:
                raise OracleError(f"Ed25519 signature is {len(signature)} bytes, not 64")
            key.verify(signature, signing_input)
        else:
            modulus_bytes = (key.key_size + 7) // 8
            if len(signature) != modulus_bytes:
                raise OracleError(f"{alg} signature is not {modulus_bytes} bytes (the modulus)")
            scheme = (
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
                if alg == "PS256"
                else padding.PKCS1v15()
            )
            key.verify(signature, signing_input, scheme, hashes.SHA256())
    except InvalidSignature as exc:
        raise OracleError("signature does not verify with the header jwk") from exc


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
    algs: tuple[str, ...] = ("ES256",),
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
    # 5. alg: asymmetric, supported; we accept exactly those in algs (ES256 by default)
    alg = header.get("alg")
    if alg not in algs or alg not in _KTY:
        raise OracleError(f"alg is {alg!r}, not one of {algs}")
    checks.append("5:alg")
    # 7. jwk public only, exactly the members of its key type
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise OracleError("jwk header missing")
    want = _MEMBERS[_KTY[alg]]
    if set(jwk) != want:
        raise OracleError(f"jwk members are {sorted(jwk)}, want exactly {sorted(want)}")
    if alg == "ES256" and (jwk["kty"] != "EC" or jwk["crv"] != "P-256"):
        raise OracleError("jwk is not EC P-256")
    if expected_jwk is not None and jwk != expected_jwk:
        raise OracleError("jwk is not the signer's public key")
    checks.append("7:public-jwk")
    # 6. signature over the exact bytes received
    verify_jws(alg, jwk, f"{h64}.{c64}".encode("ascii"), _b64d(s64, "signature"))
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
