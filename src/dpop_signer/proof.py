"""DPoP proofs (RFC 9449 §4): a compact JWS per request, signed by a `Signer`.

A proof is ``b64url(header) "." b64url(claims) "." b64url(signature)``. The header
``{"typ":"dpop+jwt","alg":"ES256","jwk":{...}}`` (``alg`` and ``jwk`` are the signer's: ES256,
ES384, ES512, EdDSA, PS256 or RS256) never changes for one key, so the builder encodes it once,
with the width every signature of that key must have; per proof only the claims are
serialized, from a template in which just the parts that vary (``jti``, ``htu``, ``iat``,
``ath``, ``nonce``) are filled in. Every variable part is either validated to need no JSON
escaping (``htm`` is an RFC 9110 token, ``nonce`` is ``1*NQCHAR``, ``ath`` and the default
``jti`` are base64url) or escaped by `json.dumps` (``htu``, only when it contains a quote, a
backslash or a control character). A proof then costs one
signature plus a few microseconds, which is why this is not built on a general JOSE library.

>>> builder = DPoPProofBuilder(load_signer("key.pem"))  # doctest: +SKIP
>>> proof = builder.build("GET", "https://api.example/v1/things?page=2", access_token=token)
... # doctest: +SKIP

The ``htu`` of a request URL is `dpop_signer.urls.normalize_htu` (re-exported here, as are
`is_nonce` from `dpop_signer.jose` and `origin_of`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import NamedTuple

import httpx

from dpop_signer.errors import ProofError
from dpop_signer.jose import TOKEN, TOKEN68, b64url_bytes, b64url_encode, is_nonce
from dpop_signer.jwk import SIGNATURE_SIZE, jwk_signature_size, jwk_thumbprint
from dpop_signer.signers.base import Signer, check_signature, sign_async

# Re-exported: these were defined here before `dpop_signer.urls` and `dpop_signer.jose` held
# them, and `from dpop_signer.proof import normalize_htu` is public.
from dpop_signer.urls import normalize_htu, origin_of

__all__ = [
    "DPoPProofBuilder",
    "PreparedProof",
    "access_token_hash",
    "compact_jws",
    "default_jti",
    "is_nonce",
    "normalize_htu",
    "origin_of",
]

_JSON_SAFE = re.compile(r"[\x20\x21\x23-\x5B\x5D-\x7E]*")  # printable ASCII minus " and \
_COMMON_METHODS = frozenset(
    {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT"}
)

_JTI_BYTES = 16
_JTI_BATCH = 64
_jti_pool: list[str] = []
if hasattr(os, "register_at_fork"):
    # A child must not hand out the jtis its parent may also hand out: start it empty.
    os.register_at_fork(after_in_child=_jti_pool.clear)


def default_jti() -> str:
    """128 random bits, base64url (22 characters): above the 96 bits RFC 9449 §4.2 asks for.

    The bits come from `os.urandom` in batches of 64 (one system call instead of 64, ~0.35 µs
    saved per proof); each jti is popped from the batch exactly once (``list.pop`` is atomic),
    so no two proofs share one, and a forked child starts with an empty batch.
    """
    try:
        return _jti_pool.pop()
    except IndexError:
        return _refill_jtis()


def _refill_jtis() -> str:
    raw = os.urandom(_JTI_BYTES * _JTI_BATCH)
    jtis = [b64url_encode(raw[i : i + _JTI_BYTES]) for i in range(0, len(raw), _JTI_BYTES)]
    jti = jtis.pop()
    _jti_pool.extend(jtis)
    return jti


def access_token_hash(token: str) -> str:
    """The ``ath`` claim: base64url(SHA-256(ASCII(access token))) (RFC 9449 §4.2, §7).

    Raises:
        ProofError: ``token`` is not an RFC 9110 token68 (what an ``Authorization`` header can
            carry).
    """
    if not isinstance(token, str) or TOKEN68.fullmatch(token) is None:
        raise ProofError(
            "access token is not a token68 string (RFC 9110 §11.2) and cannot be sent in an "
            "Authorization header; check what the token endpoint returned"
        )
    return b64url_encode(hashlib.sha256(token.encode("ascii")).digest())


def _htu_json(url: str | httpx.URL) -> str:
    # The htu as a JSON string literal. Strings (the usual input) hit a cache: this runs for
    # every proof, and normalizing even a cached parse costs more than the lookup.
    if isinstance(url, str):
        return _htu_json_of_str(url)
    return _json_string(normalize_htu(url))


@functools.lru_cache(maxsize=512)
def _htu_json_of_str(url: str) -> str:
    return _json_string(normalize_htu(url))


def _json_string(text: str) -> str:
    # json.dumps only for the rare value that needs escaping.
    if _JSON_SAFE.fullmatch(text) is not None:
        return f'"{text}"'
    return json.dumps(text)


def compact_jws(
    signing_input: str,
    signature: bytes,
    *,
    source: str = "signer",
    size: int = SIGNATURE_SIZE,
    algorithm: str = "ES256",
) -> str:
    """Join a JWS signing input and its signature into compact form (RFC 7515).

    ``size`` is the width ``algorithm``'s signatures must have: 64 bytes of r||s for ES256 (the
    default), see `dpop_signer.jwk.jwk_signature_size` for the others.

    Raises:
        SigningFailedError: the signature is not exactly ``size`` bytes.
    """
    if len(signature) != size:
        check_signature(signature, source=source, size=size, algorithm=algorithm)
    return f"{signing_input}.{b64url_encode(signature)}"


class PreparedProof(NamedTuple):
    """A proof waiting for its signature: what `DPoPProofBuilder.prepare` returns."""

    signing_input: str
    """``b64url(header) "." b64url(claims)``; sign ``signing_input.encode("ascii")``."""
    jti: str
    """The proof's ``jti``, for logs (it identifies the proof without revealing it)."""


class DPoPProofBuilder:
    """Builds RFC 9449 DPoP proofs signed by one `Signer`.

    Args:
        signer: The key; its ``algorithm`` and public JWK go into every proof header.
        clock: Seconds since the epoch; ``iat`` is ``int(clock() + clock_offset)``.
        jti: Returns a fresh ``jti`` per proof; the default has 128 random bits. Injected only
            by tests: a ``jti`` must never repeat.
        clock_offset: Seconds to add to ``clock()`` so that ``iat`` is in the server's time;
            `dpop_signer.DPoPAuth` sets it from the ``Date`` header of responses.

    Thread-safe: a builder keeps no per-proof state.
    """

    def __init__(
        self,
        signer: Signer,
        *,
        clock: Callable[[], float] = time.time,
        jti: Callable[[], str] = default_jti,
        clock_offset: float = 0.0,
    ) -> None:
        self._signer = signer
        self._clock = clock
        self._jti = jti
        self._jti_is_base64url = jti is default_jti
        self.clock_offset = clock_offset
        jwk = dict(signer.public_jwk)
        header = {"typ": "dpop+jwt", "alg": signer.algorithm, "jwk": jwk}
        self._prefix = (
            b64url_bytes(json.dumps(header, separators=(",", ":")).encode("utf-8")) + b"."
        )
        self._jkt = jwk_thumbprint(jwk)
        self._algorithm = signer.algorithm
        self._size = jwk_signature_size(jwk)
        self._source = f"signer {type(signer).__name__}"
        # One-entry cache: a client sends the same access token for many requests in a row.
        self._ath_cache: tuple[str | None, str] = (None, "")

    @property
    def signer(self) -> Signer:
        """The signer every proof of this builder is signed with."""
        return self._signer

    @property
    def jkt(self) -> str:
        """RFC 7638 thumbprint of the signer's public JWK: the ``cnf.jkt`` tokens are bound to."""
        return self._jkt

    @property
    def header_segment(self) -> str:
        """The encoded protected header, the same for every proof of this builder."""
        return self._prefix[:-1].decode("ascii")

    def build(
        self,
        htm: str,
        htu: str | httpx.URL,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
    ) -> str:
        """Build and sign one proof.

        Args:
            htm: The request method, exactly as sent (``"GET"``, ``"POST"``).
            htu: The request URL; it is normalized with `normalize_htu`, so the full URL with
                its query may be passed.
            access_token: The access token the request carries; adds ``ath``.
            nonce: The server-provided nonce (RFC 9449 §8, §9); adds ``nonce``.

        Raises:
            ProofError: ``htm``, ``htu``, ``access_token`` or ``nonce`` is malformed.
            SignerError: the signer failed.
        """
        message = self._message(htm, htu, access_token, nonce, self._jti())
        return self._seal(message, self._signer.sign(message))

    async def build_async(
        self,
        htm: str,
        htu: str | httpx.URL,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
    ) -> str:
        """Like `build`, signing through the signer's async path (`signers.sign_async`)."""
        message = self._message(htm, htu, access_token, nonce, self._jti())
        return self._seal(message, await sign_async(self._signer, message))

    def prepare(
        self,
        htm: str,
        htu: str | httpx.URL,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
    ) -> PreparedProof:
        """The unsigned half of `build`, for callers that sign elsewhere (an I/O-free flow).

        Sign ``prepared.signing_input.encode("ascii")`` with `signer` and pass the signature to
        `finish`.
        """
        jti = self._jti()
        message = self._message(htm, htu, access_token, nonce, jti)
        return PreparedProof(message.decode("ascii"), jti)

    def finish(self, prepared: PreparedProof, signature: bytes) -> str:
        """Attach the signature of ``prepared.signing_input``; returns the compact proof."""
        return compact_jws(
            prepared.signing_input,
            signature,
            source=self._source,
            size=self._size,
            algorithm=self._algorithm,
        )

    def _seal(self, message: bytes, signature: bytes) -> str:
        # `compact_jws` for the bytes the hot path already has: no str round trip.
        if len(signature) != self._size:
            check_signature(
                signature, source=self._source, size=self._size, algorithm=self._algorithm
            )
        return b".".join((message, b64url_bytes(signature))).decode("ascii")

    def _message(
        self,
        htm: str,
        htu: str | httpx.URL,
        access_token: str | None,
        nonce: str | None,
        jti: str,
    ) -> bytes:
        # The signing input as ASCII bytes: b64url(header) "." b64url(claims). This runs once
        # per proof, so the common cases (a common method, a str URL seen before, the default
        # jti, the same token as last time) take the shortest path.
        if (type(htm) is not str or htm not in _COMMON_METHODS) and (
            not isinstance(htm, str) or TOKEN.fullmatch(htm) is None
        ):
            raise ProofError(
                f"htm {htm!r} is not an HTTP method (an RFC 9110 token such as GET or POST)"
            )
        if self._jti_is_base64url:
            jti_json = jti
        elif isinstance(jti, str) and jti:
            jti_json = json.dumps(jti)[1:-1]
        else:
            raise ProofError("the jti source returned an empty or non-string jti")
        htu_json = _htu_json_of_str(htu) if type(htu) is str else _htu_json(htu)
        iat = int(self._clock() + self.clock_offset)
        if access_token is None:
            claims = f'{{"jti":"{jti_json}","htm":"{htm}","htu":{htu_json},"iat":{iat}'
        else:
            cached_token, ath = self._ath_cache
            if access_token != cached_token:
                ath = access_token_hash(access_token)
                self._ath_cache = (access_token, ath)
            claims = (
                f'{{"jti":"{jti_json}","htm":"{htm}","htu":{htu_json},"iat":{iat},"ath":"{ath}"'
            )
        if nonce is None:
            claims += "}"
        elif is_nonce(nonce):
            claims += f',"nonce":"{nonce}"}}'
        else:
            raise ProofError(
                "nonce is not a valid DPoP nonce (RFC 9449 §8.1: 1*NQCHAR, printable ASCII "
                "without space, quote or backslash)"
            )
        return self._prefix + b64url_bytes(claims.encode("ascii"))

    def __repr__(self) -> str:
        return f"DPoPProofBuilder(jkt={self._jkt!r}, clock_offset={self.clock_offset:+.1f})"
