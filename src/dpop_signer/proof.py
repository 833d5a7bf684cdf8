"""DPoP proofs (RFC 9449 §4): a compact JWS per request, signed by a `Signer`.

A proof is ``b64url(header) "." b64url(claims) "." b64url(r||s)``. The header
``{"typ":"dpop+jwt","alg":"ES256","jwk":{...}}`` never changes for one key, so the builder
encodes it once; per proof only the claims are serialized, from a template in which just the
parts that vary (``jti``, ``htu``, ``iat``, ``ath``, ``nonce``) are filled in. Every variable
part is either validated to need no JSON escaping (``htm`` is an RFC 9110 token, ``nonce`` is
``1*NQCHAR``, ``ath`` and the default ``jti`` are base64url) or escaped by `json.dumps` (``htu``,
only when it contains a quote, a backslash or a control character). A proof then costs one
signature plus a few microseconds, which is why this is not built on a general JOSE library.

>>> builder = DPoPProofBuilder(load_signer("key.pem"))  # doctest: +SKIP
>>> proof = builder.build("GET", "https://api.example/v1/things?page=2", access_token=token)
... # doctest: +SKIP

`normalize_htu` is the one place where a request URL becomes an ``htu`` (§4.2, §4.3 check 9):
scheme and host in lower case, default port dropped, no query or fragment, and the path
byte-for-byte as httpx puts it on the wire (percent-encoding kept, never decoded).
"""

from __future__ import annotations

import binascii
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
from dpop_signer.jwk import SIGNATURE_SIZE, jwk_thumbprint
from dpop_signer.signers.base import Signer, check_signature, sign_async

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

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 token (a method)
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 9110 §11.2 token68 (an access token)
_NQCHAR = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")  # RFC 9449 §8.1: nonce = 1*NQCHAR
_JSON_SAFE = re.compile(r"[\x20\x21\x23-\x5B\x5D-\x7E]*")  # printable ASCII minus " and \
_DEFAULT_PORTS = {"http": 80, "https": 443}
_COMMON_METHODS = frozenset(
    {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT"}
)


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(data: bytes) -> str:
    # base64.urlsafe_b64encode minus two layers of Python calls.
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _b64url_bytes(data: bytes) -> bytes:
    # The proof is assembled as bytes (what the signer needs) and decoded to str once.
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


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
    b2a = binascii.b2a_base64
    jtis = [
        b2a(raw[i : i + _JTI_BYTES], newline=False).translate(_URLSAFE).rstrip(b"=").decode()
        for i in range(0, len(raw), _JTI_BYTES)
    ]
    jti = jtis.pop()
    _jti_pool.extend(jtis)
    return jti


def is_nonce(value: object) -> bool:
    """True when ``value`` is a syntactically valid DPoP nonce (``1*NQCHAR``, RFC 9449 §8.1)."""
    return isinstance(value, str) and _NQCHAR.fullmatch(value) is not None


def access_token_hash(token: str) -> str:
    """The ``ath`` claim: base64url(SHA-256(ASCII(access token))) (RFC 9449 §4.2, §7).

    Raises:
        ProofError: ``token`` is not an RFC 9110 token68 (what an ``Authorization`` header can
            carry).
    """
    if not isinstance(token, str) or _TOKEN68.fullmatch(token) is None:
        raise ProofError(
            "access token is not a token68 string (RFC 9110 §11.2) and cannot be sent in an "
            "Authorization header; check what the token endpoint returned"
        )
    return _b64url(hashlib.sha256(token.encode("ascii")).digest())


class _UrlParts(NamedTuple):
    scheme: str
    host: str  # lower case, IPv6 literals in brackets, IDNA in its ASCII (xn--) form
    port: int | None  # None for the scheme's default port
    path: bytes  # as on the wire, without the query


def _url_parts(url: str | httpx.URL) -> _UrlParts:
    if isinstance(url, str):
        return _parse_str(url)
    if isinstance(url, httpx.URL):
        return _parts_of(url, url)
    raise ProofError(f"htu must be a str or httpx.URL, not {type(url).__name__}")


@functools.lru_cache(maxsize=512)
def _parse_str(url: str) -> _UrlParts:
    # Parsing a URL costs ~12 µs, a cache hit ~0.1 µs: callers sign the same few URLs again
    # and again. Errors are not cached, so a bad URL costs its parse each time.
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ProofError(f"htu {_shown(url)} is not a valid URL: {exc}") from exc
    return _parts_of(parsed, url)


def _parts_of(url: httpx.URL, shown: str | httpx.URL) -> _UrlParts:
    scheme = url.scheme
    if scheme not in _DEFAULT_PORTS:
        raise ProofError(
            f"htu {_shown(shown)} is not an absolute http(s) URL; DPoP proofs name the full "
            "request URL, e.g. https://api.example/v1/things"
        )
    try:
        host = url.raw_host.decode("ascii").lower()
    except UnicodeDecodeError as exc:  # pragma: no cover - httpx always IDNA-encodes
        raise ProofError(f"htu {_shown(shown)} has a host that is not ASCII") from exc
    if not host:
        raise ProofError(f"htu {_shown(shown)} has no host")
    if ":" in host:
        host = f"[{host}]"  # RFC 3986 §3.2.2: an IPv6 literal is written in brackets
    port = url.port
    if port == _DEFAULT_PORTS[scheme]:
        # httpx drops an explicit default port itself, but not when the scheme was upper case.
        port = None
    return _UrlParts(scheme, host, port, url.raw_path.partition(b"?")[0] or b"/")


def normalize_htu(url: str | httpx.URL) -> str:
    """The ``htu`` claim for a request to ``url`` (RFC 9449 §4.2, §4.3 check 9).

    Scheme and host are lower-cased (RFC 3986 §6.2.2.1), the scheme's default port is dropped
    (§6.2.3), query and fragment are removed, user info is dropped (it is not part of the
    target URI, RFC 9110 §7.1), IPv6 hosts keep their brackets and international hosts take
    their ASCII (``xn--``) form. The path is exactly what httpx sends on the wire: percent-
    encoding is kept as it is, never decoded, so ``/a%2Fb`` stays ``/a%2Fb``.

    >>> normalize_htu("HTTPS://API.Example.com:443/a%2Fb?x=1#top")
    'https://api.example.com/a%2Fb'

    Raises:
        ProofError: ``url`` is not an absolute ``http`` or ``https`` URL with a host.
    """
    if type(url) is httpx.URL:
        # httpx makes a new URL object per request, so it cannot be a cache key itself; the
        # four parts an htu is made of are cheap to read (~0.4 µs against ~1.3 µs to build).
        key = (url.scheme, url.raw_host, url.port, url.raw_path.partition(b"?")[0])
        htu = _HTU_OF_URL_PARTS.get(key)
        if htu is None:
            htu = _normalize(url)
            if len(_HTU_OF_URL_PARTS) >= _HTU_CACHE_SIZE:
                _HTU_OF_URL_PARTS.clear()
            _HTU_OF_URL_PARTS[key] = htu
        return htu
    return _normalize(url)


_HTU_CACHE_SIZE = 512
_HTU_OF_URL_PARTS: dict[tuple[str, bytes, int | None, bytes], str] = {}


def _normalize(url: str | httpx.URL) -> str:
    scheme, host, port, path = _url_parts(url)
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{path.decode('ascii')}"


def origin_of(url: str | httpx.URL) -> str:
    """``scheme://host:port`` of ``url``, always with the port: the key of a nonce (§8, §9).

    >>> origin_of("https://API.example/x?y")
    'https://api.example:443'

    Raises:
        ProofError: ``url`` is not an absolute ``http`` or ``https`` URL with a host.
    """
    scheme, host, port, _ = _url_parts(url)
    return f"{scheme}://{host}:{_DEFAULT_PORTS[scheme] if port is None else port}"


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


def _shown(value: str | httpx.URL) -> str:
    # A URL in an error message: its query may hold secrets (api_key=...), so it is cut off.
    head = str(value).split("?", 1)[0].split("#", 1)[0]
    return repr(head if len(head) <= 200 else head[:200] + "...")


def compact_jws(signing_input: str, signature: bytes, *, source: str = "signer") -> str:
    """Join a JWS signing input and its 64-byte ES256 signature into compact form (RFC 7515).

    Raises:
        SigningFailedError: the signature is not exactly 64 bytes of r||s.
    """
    if len(signature) != SIGNATURE_SIZE:
        check_signature(signature, source=source)
    return f"{signing_input}.{_b64url(signature)}"


class PreparedProof(NamedTuple):
    """A proof waiting for its signature: what `DPoPProofBuilder.prepare` returns."""

    signing_input: str
    """``b64url(header) "." b64url(claims)``; sign ``signing_input.encode("ascii")``."""
    jti: str
    """The proof's ``jti``, for logs (it identifies the proof without revealing it)."""


class DPoPProofBuilder:
    """Builds RFC 9449 DPoP proofs signed by one `Signer`.

    Args:
        signer: The ES256 key. Its public JWK goes into every proof header.
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
            _b64url_bytes(json.dumps(header, separators=(",", ":")).encode("utf-8")) + b"."
        )
        self._jkt = jwk_thumbprint(jwk)
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
        return compact_jws(prepared.signing_input, signature, source=self._source)

    def _seal(self, message: bytes, signature: bytes) -> str:
        # `compact_jws` for the bytes the hot path already has: no str round trip.
        if len(signature) != SIGNATURE_SIZE:
            check_signature(signature, source=self._source)
        return b".".join((message, _b64url_bytes(signature))).decode("ascii")

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
            not isinstance(htm, str) or _TOKEN.fullmatch(htm) is None
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
        return self._prefix + _b64url_bytes(claims.encode("ascii"))

    def __repr__(self) -> str:
        return f"DPoPProofBuilder(jkt={self._jkt!r}, clock_offset={self.clock_offset:+.1f})"
