"""Server-side DPoP verification: proofs, DPoP-bound JWT access tokens, client assertions.

This is what a resource server (or our local test servers in `dpop_signer.testing`) uses to
decide whether a request carries a valid DPoP proof (RFC 9449 §4.3), whether its access token
is bound to the proof's key (``ath``, §7; ``cnf.jkt``, §6.1), and whether a nonce is needed
(§8, §9). Algorithms are accepted from an allow-list (``algorithms=``; `ACCEPTED_ALGORITHMS`,
ES256, ES384, EdDSA and PS256, by default; ES512 and RS256 only when a caller lists them), never
``none`` or HMAC, and each signature must have its algorithm's exact form with the header key:
ECDSA r||s of the curve's width, 64 bytes for Ed25519, the modulus' length for RSA of 2048 bits
or more (`dpop_signer.algorithms.check_signature_form`). A verifier that accepts fewer
algorithms has fewer ways to be confused.

>>> claims = verify_proof(  # doctest: +SKIP
...     request.headers["DPoP"], htm="GET", htu=str(request.url), access_token=token
... )

Every failure raises `VerificationError` whose ``error`` is the OAuth error code to answer with:
``invalid_dpop_proof``, ``use_dpop_nonce``, ``invalid_token`` or (for client assertions)
``invalid_client``. Messages are one line and never contain the proof, token or nonce.

The test suite's independent oracle (``tests/oracle.py``) deliberately shares no code with this
module.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from dpop_signer.algorithms import ALGORITHMS, get_algorithm, verify_signature
from dpop_signer.errors import VerificationError
from dpop_signer.jose import b64url_decode, b64url_encode, b64url_json, is_nonce, peek_claims
from dpop_signer.jwk import jwk_thumbprint, public_key_of_jwk
from dpop_signer.signers.base import Signer

__all__ = [
    "ACCEPTED_ALGORITHMS",
    "INVALID_CLIENT",
    "INVALID_DPOP_PROOF",
    "INVALID_TOKEN",
    "SUPPORTED_ALGORITHMS",
    "USE_DPOP_NONCE",
    "JtiReplayCache",
    "VerifiedProof",
    "access_token_claims_unverified",
    "comparable_uri",
    "issue_access_token",
    "verify_access_token",
    "verify_client_assertion",
    "verify_proof",
    "verify_proof_details",
]

ACCEPTED_ALGORITHMS = ("ES256", "ES384", "EdDSA", "PS256")
"""JWS algorithms accepted for proofs, tokens and assertions unless ``algorithms=`` says others."""

SUPPORTED_ALGORITHMS = tuple(ALGORITHMS)
"""Every algorithm an ``algorithms=`` allow-list may name: those, ES512 and RS256."""

INVALID_DPOP_PROOF = "invalid_dpop_proof"
USE_DPOP_NONCE = "use_dpop_nonce"
INVALID_TOKEN = "invalid_token"
INVALID_CLIENT = "invalid_client"

MAX_JWT_LENGTH = 8192
"""Longer compact JWS values are refused before any parsing (bounds the work per request)."""

MAX_JTI_LENGTH = 256

# RFC 7517 §9.2 / RFC 7518 §6: members that only a private (or symmetric) JWK has.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS = {"http": 80, "https": 443}

_Fail = Callable[..., VerificationError]


@dataclass(frozen=True)
class VerifiedProof:
    """A DPoP proof that passed every check: its header, claims and key thumbprint."""

    header: dict[str, Any]
    claims: dict[str, Any]
    jwk: dict[str, Any]
    jkt: str
    """RFC 7638 thumbprint of the proof key: what ``cnf.jkt`` of a token bound to it holds."""

    @property
    def jti(self) -> str:
        """The proof's unique identifier (safe to log)."""
        return str(self.claims["jti"])


class JtiReplayCache:
    """Remembers recently seen proof ``jti`` values and refuses a second use (RFC 9449 §11.1).

    Bounded in time and size: an entry is kept for ``window`` seconds (make it at least the
    verifier's ``max_age + max_future``, after which ``iat`` alone rejects the proof), and at most
    ``max_entries`` are kept; past that the oldest are forgotten first. Thread-safe.
    """

    def __init__(self, *, window: float = 360.0, max_entries: int = 100_000) -> None:
        if window <= 0 or max_entries <= 0:
            raise ValueError("window and max_entries must be positive")
        self.window = window
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def check_and_store(self, jti: str, *, scope: str = "", now: float | None = None) -> None:
        """Record ``jti`` (within ``scope``, e.g. the ``htu``); raise if it was seen already.

        Raises:
            VerificationError: ``invalid_dpop_proof``: the ``jti`` was used within the window.
        """
        current = time.time() if now is None else now
        key = f"{scope}\x00{jti}"
        with self._lock:
            # Entries are in insertion order, so expired ones sit at the front.
            while self._seen:
                oldest_key, stamp = next(iter(self._seen.items()))
                if stamp > current - self.window:
                    break
                del self._seen[oldest_key]
            if key in self._seen:
                raise VerificationError(
                    f"DPoP proof jti {_short(jti)} was already used; send a fresh proof with a "
                    "new jti on every request",
                    error=INVALID_DPOP_PROOF,
                )
            self._seen[key] = current
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)


def verify_proof(
    proof: str,
    *,
    htm: str,
    htu: str,
    access_token: str | None = None,
    nonce: str | Collection[str] | None = None,
    now: float | None = None,
    max_age: float = 300.0,
    max_future: float = 60.0,
    jkt: str | None = None,
    replay: JtiReplayCache | None = None,
    algorithms: Collection[str] = ACCEPTED_ALGORITHMS,
) -> dict[str, Any]:
    """Verify one DPoP proof against the request it came with; return its claims.

    Applies RFC 9449 §4.3: a well-formed compact JWS, the required claims, ``typ`` ``dpop+jwt``,
    ``alg`` in ``algorithms`` (``none`` and HMAC never), a signature of that algorithm's exact
    form that verifies with the header ``jwk``, no private key members, ``htm`` equal to the
    method, ``htu`` equal to the request URL (query and fragment ignored, RFC 3986
    §6.2.2/§6.2.3 normalisation on both sides), the nonce, and ``iat`` within
    [now - max_age, now + max_future]; with ``access_token`` the ``ath`` (§7.1), with ``jkt``
    the key binding (§6.1), with ``replay`` the ``jti`` (§11.1).

    Args:
        proof: The value of the request's single ``DPoP`` header.
        htm: The request method, e.g. ``"GET"`` (compared exactly).
        htu: The request URL as received (query and fragment are ignored).
        access_token: The access token sent with the proof; its hash must be in ``ath``.
        nonce: The nonce the server expects (or several acceptable ones, e.g. the current and
            the previous one); ``None`` if the server does not use nonces.
        now: The server's clock, seconds since the epoch (default ``time.time()``).
        max_age: How old ``iat`` may be, in seconds.
        max_future: How far ``iat`` may be ahead of ``now`` (client clock skew), in seconds.
        jkt: The ``cnf.jkt`` the access token is bound to; the proof key must match it.
        replay: A cache that refuses a ``jti`` seen before; updated only for a valid proof.
        algorithms: The allow-list of JWS algorithms (default `ACCEPTED_ALGORITHMS`: ES256,
            ES384, EdDSA, PS256); ES512 and RS256 may be added, nothing outside
            `SUPPORTED_ALGORITHMS`.

    Returns:
        The proof's claims.

    Raises:
        VerificationError: ``error`` is ``use_dpop_nonce`` when the nonce is missing or not
            an accepted one, else ``invalid_dpop_proof`` (a key that is not the token's
            ``cnf.jkt`` included, as Spring Security answers it).
    """
    return verify_proof_details(
        proof,
        htm=htm,
        htu=htu,
        access_token=access_token,
        nonce=nonce,
        now=now,
        max_age=max_age,
        max_future=max_future,
        jkt=jkt,
        replay=replay,
        algorithms=algorithms,
    ).claims


def verify_proof_details(
    proof: str,
    *,
    htm: str,
    htu: str,
    access_token: str | None = None,
    nonce: str | Collection[str] | None = None,
    now: float | None = None,
    max_age: float = 300.0,
    max_future: float = 60.0,
    jkt: str | None = None,
    replay: JtiReplayCache | None = None,
    algorithms: Collection[str] = ACCEPTED_ALGORITHMS,
) -> VerifiedProof:
    """Like `verify_proof`, but also return the header, the public JWK and its thumbprint.

    An authorization server needs the thumbprint to bind the token it issues (``cnf.jkt``).

    Raises:
        VerificationError: as `verify_proof`.
    """

    def fail(message: str, error: str = INVALID_DPOP_PROOF) -> VerificationError:
        return VerificationError(f"DPoP proof {message}", error=error)

    # §4.3 check 2: one well-formed compact JWS (check 1, one header, is the caller's).
    header, claims, signing_input, signature = _decode_jws(proof, "DPoP proof", fail)
    # Check 3: required claims and their types.
    for name in ("jti", "htm", "htu", "iat"):
        if name not in claims:
            raise fail(f"has no {name!r} claim; a proof needs jti, htm, htu and iat")
    jti, iat = claims["jti"], claims["iat"]
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_LENGTH:
        raise fail(f"jti must be a non-empty string of at most {MAX_JTI_LENGTH} characters")
    if not isinstance(claims["htm"], str) or not isinstance(claims["htu"], str):
        raise fail("htm and htu must be strings")
    if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
        raise fail("iat must be a NumericDate (seconds since the epoch)")
    # Check 4: typ.
    if header.get("typ") != "dpop+jwt":
        raise fail(f"header typ is {_shown(header.get('typ'))}, not 'dpop+jwt' (RFC 9449 §4.2)")
    # Check 5: an asymmetric algorithm that policy allows.
    alg = _check_alg(header, fail, algorithms)
    # Check 7 before 6: never build a key from, or trust, a JWK that carries private members.
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise fail("header has no 'jwk' object carrying the public key")
    private = sorted(_PRIVATE_MEMBERS.intersection(jwk))
    if private:
        raise fail(f"header jwk contains private key members {private}; send only the public key")
    # Check 6: the signature verifies with the header key.
    _verify_jws(alg, jwk, signing_input, signature, fail)
    # Check 8: htm is the request method (methods are case-sensitive, RFC 9110 §9.1).
    if claims["htm"] != htm:
        raise fail(f"htm {_shown(claims['htm'])} does not match the request method {htm!r}")
    # Check 9: htu is the request URL, ignoring query and fragment.
    want = comparable_uri(htu)
    try:
        got = comparable_uri(claims["htu"])
    except ValueError as exc:
        raise fail("htu is not an absolute http(s) URL") from exc
    if got != want:
        raise fail(f"htu {_shown(claims['htu'])} does not match the request URL {want!r}")
    # Check 10: the nonce the server supplied (§8 at the AS, §9 at an RS).
    if nonce is not None:
        accepted = {nonce} if isinstance(nonce, str) else set(nonce)
        presented = claims.get("nonce")
        if presented is None:
            raise fail("has no nonce claim but the server requires one", USE_DPOP_NONCE)
        if not is_nonce(presented):
            raise fail("nonce claim is not a string of NQCHAR (RFC 9449 §8.1)")
        if presented not in accepted:
            raise fail(
                "nonce is not the server's current nonce; retry with the new one", USE_DPOP_NONCE
            )
    # Check 11: iat within the acceptance window.
    current = time.time() if now is None else now
    offset = iat - current
    if offset < -max_age:
        raise fail(
            f"iat is {-offset:.0f} s in the past (at most {max_age:.0f} s allowed); "
            "check the client clock or learn the offset from the server's Date header"
        )
    if offset > max_future:
        raise fail(
            f"iat is {offset:.0f} s in the future (at most {max_future:.0f} s allowed); "
            "check the client clock or learn the offset from the server's Date header"
        )
    # Check 12a: ath binds the proof to the access token sent with it.
    if access_token is not None:
        if "ath" not in claims:
            raise fail("has no 'ath' claim although an access token accompanies it (§7.1)")
        if not access_token.isascii() or claims["ath"] != _ath(access_token):
            raise fail("ath is not the SHA-256 hash of the access token sent with it")
    # Check 12b: the proof key is the key the token is bound to.
    thumbprint = jwk_thumbprint(jwk)
    if jkt is not None and not secrets.compare_digest(thumbprint, jkt):
        raise fail(
            f"key (jkt {thumbprint[:10]}...) is not the key the access token is bound to "
            f"(cnf.jkt {jkt[:10]}...)"
        )
    if replay is not None:
        replay.check_and_store(jti, scope=want, now=current)
    return VerifiedProof(header=header, claims=claims, jwk=jwk, jkt=thumbprint)


def comparable_uri(url: str) -> str:
    """Normalise an HTTP(S) URL for the ``htu`` comparison (RFC 9449 §4.3 check 9).

    Applies RFC 3986 §6.2.2 (lower-case scheme and host, upper-case percent-encoding hex digits,
    unreserved characters decoded) and §6.2.3 (default port dropped, empty path is ``/``), and
    drops query and fragment. Dot segments are left alone: no client sends them on purpose.
    This is the *server's* lenient comparison of two URLs; a client must still send ``htu``
    byte-exact (see ``dpop_signer.proof.normalize_htu``).

    Raises:
        ValueError: not an absolute http or https URL.
    """
    parts: SplitResult = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("not an absolute http(s) URL")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError("not an absolute http(s) URL: invalid port") from exc
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"

    def pct(match: re.Match[str]) -> str:
        byte = int(match.group(1), 16)
        return chr(byte) if byte in _UNRESERVED else f"%{match.group(1).upper()}"

    path = _PCT.sub(pct, parts.path) or "/"
    return f"{scheme}://{netloc}{path}"


# --- access tokens (RFC 9068 JWT profile, DPoP-bound by cnf.jkt) --------------------------


def issue_access_token(
    signer: Signer,
    *,
    issuer: str,
    audience: str | list[str],
    client_id: str,
    jkt: str,
    lifetime: float,
    scope: str | None = None,
    kid: str | None = None,
    now: float | None = None,
) -> str:
    """Issue a DPoP-bound JWT access token (RFC 9068 with ``cnf.jkt``, RFC 9449 §6.1).

    Signed by ``signer`` with its algorithm (any `Signer`: the local AS keeps an in-memory key).
    """
    issued = int(time.time() if now is None else now)
    header: dict[str, Any] = {"typ": "at+jwt", "alg": signer.algorithm}
    if kid is not None:
        header["kid"] = kid
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": client_id,
        "aud": audience,
        "client_id": client_id,
        "iat": issued,
        "exp": issued + max(1, math.ceil(lifetime)),
        "jti": b64url_encode(secrets.token_bytes(16)),
        "cnf": {"jkt": jkt},
    }
    if scope:
        claims["scope"] = scope
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}".encode("ascii")
    return f"{signing_input.decode('ascii')}.{b64url_encode(signer.sign(signing_input))}"


def verify_access_token(
    token: str,
    *,
    key: Mapping[str, Any],
    issuer: str | None = None,
    audience: str | None = None,
    now: float | None = None,
    leeway: float = 0.0,
    algorithms: Collection[str] = ACCEPTED_ALGORITHMS,
) -> dict[str, Any]:
    """Verify a JWT access token issued by `issue_access_token`; return its claims.

    Checks ``typ`` ``at+jwt`` (so a DPoP proof or ID token cannot pass as an access token,
    RFC 9068 §4), a signature in one of ``algorithms`` with the issuer's public JWK ``key``,
    ``exp``, ``iss`` and ``aud`` when given, and that the token is DPoP-bound (``cnf.jkt`` present).

    Raises:
        VerificationError: ``error`` is ``invalid_token``.
    """

    def fail(message: str, error: str = INVALID_TOKEN) -> VerificationError:
        return VerificationError(f"access token {message}", error=error)

    header, claims, signing_input, signature = _decode_jws(token, "access token", fail)
    if str(header.get("typ", "")).lower() not in ("at+jwt", "application/at+jwt"):
        raise fail(f"header typ is {_shown(header.get('typ'))}, not 'at+jwt'")
    _verify_jws(_check_alg(header, fail, algorithms), key, signing_input, signature, fail)
    current = time.time() if now is None else now
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise fail("has no numeric exp claim")
    if current >= exp + leeway:
        raise fail(f"expired {current - exp:.0f} s ago; fetch a new token")
    if issuer is not None and claims.get("iss") != issuer:
        raise fail(f"issuer {_shown(claims.get('iss'))} is not {issuer!r}")
    if audience is not None:
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if audience not in auds:
            raise fail(f"audience {_shown(aud)} does not include {audience!r}")
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict) or not isinstance(cnf.get("jkt"), str):
        raise fail("is not DPoP-bound (no cnf.jkt claim)")
    return claims


def access_token_claims_unverified(token: str) -> dict[str, Any] | None:
    """The claims of a JWT access token without any check, or ``None`` if it is not a JWT.

    For records and logs only (e.g. to know which ``cnf.jkt`` a rejected token carried); never
    base a decision on it.
    """
    return peek_claims(token)


# --- client assertions (RFC 7523 §3, private_key_jwt) ---------------------------------------


def verify_client_assertion(
    assertion: str,
    *,
    client_id: str,
    key: Mapping[str, Any],
    issuer: str | None = None,
    token_endpoint: str | None = None,
    audiences: Collection[str] | None = None,
    now: float | None = None,
    max_lifetime: float = 600.0,
    leeway: float = 30.0,
    replay: JtiReplayCache | None = None,
) -> dict[str, Any]:
    """Verify a ``private_key_jwt`` client assertion (RFC 7523 §3, RFC 7521 §4.2).

    ``iss`` and ``sub`` must be ``client_id``; ``exp`` must be in the future but not more than
    ``max_lifetime`` away, ``jti`` present (refused a second time with ``replay``), and the ES256
    signature must verify with the client's registered public JWK ``key``.

    The audience follows draft-ietf-oauth-rfc7523bis with ``issuer``: ``aud`` must be the
    issuer identifier as its sole value, one JSON string (not an array), compared as a simple
    string. ``token_endpoint`` is for servers that also still accept the token endpoint URL
    (the same exact, single-string comparison). ``audiences`` instead is the rule of RFC 7523
    §3 as first published (``aud`` names one of them, an array allowed); give one or the other.

    Raises:
        VerificationError: ``error`` is ``invalid_client``.
        ValueError: neither ``issuer`` nor ``audiences`` is given, or both are.
    """
    if (issuer is None) == (audiences is None):
        raise ValueError("verify_client_assertion needs issuer= (or audiences=), not both")
    if token_endpoint is not None and issuer is None:
        raise ValueError("token_endpoint= goes with issuer=")

    def fail(message: str, error: str = INVALID_CLIENT) -> VerificationError:
        return VerificationError(f"client assertion {message}", error=error)

    header, claims, signing_input, signature = _decode_jws(assertion, "client assertion", fail)
    _verify_jws(_check_alg(header, fail), key, signing_input, signature, fail)
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise fail(f"iss and sub must both be the client_id {client_id!r}")
    _check_assertion_aud(claims.get("aud"), issuer, token_endpoint, audiences, fail)
    current = time.time() if now is None else now
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise fail("has no numeric exp claim")
    if current >= exp + leeway:
        raise fail(f"expired {current - exp:.0f} s ago")
    if exp - current > max_lifetime:
        raise fail(f"expires {exp - current:.0f} s from now, more than {max_lifetime:.0f} s")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and not isinstance(nbf, bool) and nbf > current + leeway:
        raise fail("is not valid yet (nbf in the future)")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise fail("has no jti claim")
    if replay is not None:
        try:
            replay.check_and_store(jti, scope=f"client-assertion:{client_id}", now=current)
        except VerificationError as exc:
            raise fail(f"jti {_short(jti)} was already used; sign a new assertion") from exc
    return claims


def _check_assertion_aud(
    aud: object,
    issuer: str | None,
    token_endpoint: str | None,
    audiences: Collection[str] | None,
    fail: _Fail,
) -> None:
    if audiences is not None:  # RFC 7523 §3 as first published
        auds = aud if isinstance(aud, list) else [aud]
        if not any(isinstance(a, str) and a in audiences for a in auds):
            raise fail(f"audience {_shown(aud)} names neither the token endpoint nor the issuer")
        return
    accepted = [issuer] if token_endpoint is None else [issuer, token_endpoint]
    if isinstance(aud, str) and aud in accepted:
        return
    if isinstance(aud, list):
        raise fail(
            f"audience {_shown(aud)} is an array; it must be the issuer identifier {issuer!r} "
            "as one string (draft-ietf-oauth-rfc7523bis)"
        )
    legacy = f" or the token endpoint {token_endpoint!r}" if token_endpoint is not None else ""
    raise fail(
        f"audience {_shown(aud)} is not the issuer identifier {issuer!r}{legacy} "
        "(draft-ietf-oauth-rfc7523bis)"
    )


# --- shared JWS plumbing ---------------------------------------------------------------------


def _decode_jws(
    token: object, what: str, fail: _Fail
) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Split and decode a compact JWS; return header, claims, signing input and signature."""
    if not isinstance(token, str) or not token:
        raise fail("is missing or empty")
    if len(token) > MAX_JWT_LENGTH:
        raise fail(f"is {len(token)} characters long, more than {MAX_JWT_LENGTH}")
    parts = token.split(".")
    if len(parts) != 3:
        raise fail(f"is not a compact JWS (found {len(parts)} dot-separated parts, need 3)")
    try:
        decoded = [b64url_decode(part) for part in parts]
        header = json.loads(decoded[0])
        claims = json.loads(decoded[1])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise fail("is not base64url-encoded JSON (RFC 7515 §7.1)") from exc
    # Only the canonical encoding: otherwise unused trailing bits give one JWS many spellings.
    if any(b64url_encode(raw) != part for raw, part in zip(decoded, parts, strict=True)):
        raise fail("is not canonical base64url (RFC 7515 §2)")
    signature = decoded[2]
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise fail("header and payload must be JSON objects")
    if "crit" in header:
        # RFC 7515 §4.1.11: we understand no extensions, so any critical one means reject.
        raise fail("header has a 'crit' member naming extensions this verifier does not support")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def _check_alg(
    header: Mapping[str, Any], fail: _Fail, allowed: Collection[str] = ACCEPTED_ALGORITHMS
) -> str:
    """The header's ``alg`` if ``allowed`` lists it (RFC 9449 §4.3 check 5), else fail."""
    unknown = sorted(set(allowed) - set(SUPPORTED_ALGORITHMS))
    if unknown:
        # A caller's mistake, not the sender's: "none" or "HS256" must never be allowed.
        raise ValueError(
            f"algorithms= names {unknown}; only {', '.join(SUPPORTED_ALGORITHMS)} can be allowed"
        )
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed:
        raise fail(
            f"alg {_shown(alg)} is not accepted; it must be an asymmetric algorithm, and this "
            f"verifier accepts only {', '.join(a for a in SUPPORTED_ALGORITHMS if a in allowed)}"
        )
    return alg


def _verify_jws(
    alg: str, jwk: Mapping[str, Any], signing_input: bytes, signature: bytes, fail: _Fail
) -> None:
    """Check 6: ``jwk`` fits ``alg``, the signature has ``alg``'s exact form and verifies."""
    try:
        public_key = public_key_of_jwk(jwk)
        valid = verify_signature(get_algorithm(alg), public_key, signing_input, signature)
    except ValueError as exc:  # a key that does not fit alg, or a signature of the wrong form
        raise fail(str(exc)) from exc
    if not valid:
        raise fail("signature does not verify with the key")


def _ath(access_token: str) -> str:
    """RFC 9449 §4.2: base64url(SHA-256(ASCII(access token)))."""
    return b64url_encode(hashlib.sha256(access_token.encode("ascii")).digest())


def _shown(value: object) -> str:
    """A short, safe rendering of an attacker-supplied value for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _short(jti: str) -> str:
    return repr(jti if len(jti) <= 24 else jti[:21] + "...")
