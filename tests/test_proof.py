"""DPoPProofBuilder, normalize_htu, access_token_hash: every proof is judged by tests/oracle.py."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest

from dpop_signer import load_signer
from dpop_signer.errors import ProofError, SigningFailedError
from dpop_signer.proof import (
    DPoPProofBuilder,
    access_token_hash,
    normalize_htu,
    origin_of,
)
from dpop_signer.signers.base import Signer
from tests import oracle

RFC_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
RFC_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"  # RFC 9449 §7.1


def _part(proof: str, index: int) -> dict[str, Any]:
    segment = proof.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


class Plain:
    """A signer with no async path of its own (so sign_async must use a thread)."""

    def __init__(self, inner: Signer, *, cut: int = 0) -> None:
        self.inner = inner
        self.cut = cut
        self.calls = 0

    @property
    def algorithm(self) -> str:
        return self.inner.algorithm

    @property
    def public_jwk(self) -> Any:
        return self.inner.public_jwk

    def sign(self, message: bytes) -> bytes:
        self.calls += 1
        signature = self.inner.sign(message)
        return signature[: len(signature) - self.cut]


def test_proof_passes_the_oracle_with_exact_header_and_claims(pem_signer: Signer) -> None:
    builder = DPoPProofBuilder(pem_signer)
    proof = builder.build("GET", "https://api.example.com/v1/things?page=2#top")
    checked = oracle.check_proof(
        proof,
        htm="GET",
        url="https://api.example.com/v1/things",
        expected_jwk=dict(pem_signer.public_jwk),
    )
    assert checked.header == {"typ": "dpop+jwt", "alg": "ES256", "jwk": dict(pem_signer.public_jwk)}
    assert set(checked.claims) == {"jti", "htm", "htu", "iat"}
    assert checked.claims["htu"] == "https://api.example.com/v1/things"
    assert builder.jkt == oracle.thumbprint(dict(pem_signer.public_jwk))


def test_access_token_and_nonce_add_ath_and_nonce(pem_signer: Signer) -> None:
    builder = DPoPProofBuilder(pem_signer)
    proof = builder.build(
        "POST",
        "https://api.example.com/x",
        access_token=RFC_TOKEN,
        nonce="eyJ7S_zG.eyJH0-Z.HX4w-7v",
    )
    checked = oracle.check_proof(
        proof,
        htm="POST",
        url="https://api.example.com/x",
        access_token=RFC_TOKEN,
        nonce="eyJ7S_zG.eyJH0-Z.HX4w-7v",
    )
    assert checked.claims["ath"] == RFC_ATH
    assert list(checked.claims) == ["jti", "htm", "htu", "iat", "ath", "nonce"]
    # The one-entry ath cache must not leak a previous token's hash into the next proof.
    other = builder.build("GET", "https://api.example.com/x", access_token="other.token")
    oracle.check_proof(
        other, htm="GET", url="https://api.example.com/x", access_token="other.token"
    )


def test_access_token_hash_matches_rfc_9449_example() -> None:
    assert access_token_hash(RFC_TOKEN) == RFC_ATH


def test_header_segment_is_encoded_once_and_shared(pem_signer: Signer) -> None:
    builder = DPoPProofBuilder(pem_signer)
    proofs = [builder.build("GET", "https://a.example/") for _ in range(3)]
    assert {p.split(".")[0] for p in proofs} == {builder.header_segment}
    assert _part(proofs[0], 0) == {"typ": "dpop+jwt", "alg": "ES256", "jwk": pem_signer.public_jwk}


def test_jti_is_fresh_and_long_enough(pem_signer: Signer) -> None:
    builder = DPoPProofBuilder(pem_signer)
    jtis = {_part(builder.build("GET", "https://a.example/"), 1)["jti"] for _ in range(500)}
    assert len(jtis) == 500
    for jti in jtis:
        # 16 random bytes in base64url without padding: 22 characters, 128 bits
        assert len(jti) == 22
        assert len(base64.urlsafe_b64decode(jti + "==")) == 16


def test_clock_offset_and_injected_clock_and_jti(pem_signer: Signer) -> None:
    builder = DPoPProofBuilder(pem_signer, clock=lambda: 1_700_000_000.9, jti=lambda: 'j"\\-é' * 4)
    claims = _part(builder.build("GET", "https://a.example/"), 1)
    assert claims["iat"] == 1_700_000_000
    assert claims["jti"] == 'j"\\-é' * 4  # escaped by JSON and read back intact
    builder.clock_offset = 3600.2
    assert _part(builder.build("GET", "https://a.example/"), 1)["iat"] == 1_700_003_601
    builder.clock_offset = -30.0
    assert _part(builder.build("GET", "https://a.example/"), 1)["iat"] == 1_699_999_970


@pytest.mark.parametrize(
    ("url", "htu"),
    [
        ("https://API.Example.COM/a", "https://api.example.com/a"),
        ("HTTPS://api.example.com/a", "https://api.example.com/a"),
        ("HTTPS://API.example.com:443/a%2Fb", "https://api.example.com/a%2Fb"),
        ("HTTP://api.example.com:80/", "http://api.example.com/"),
        ("https://api.example.com:443/x", "https://api.example.com/x"),
        ("http://api.example.com:80/x", "http://api.example.com/x"),
        ("http://api.example.com:443/x", "http://api.example.com:443/x"),
        ("https://api.example.com:8443/x", "https://api.example.com:8443/x"),
        (
            "https://api.example.com/a%2Fb/%7E/c%20d?x=1&y=%2F#frag",
            "https://api.example.com/a%2Fb/%7E/c%20d",
        ),
        ("https://api.example.com/caf%C3%A9", "https://api.example.com/caf%C3%A9"),
        ("https://api.example.com", "https://api.example.com/"),
        ("https://api.example.com?x=1", "https://api.example.com/"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("https://[2001:DB8::1]:443/x", "https://[2001:db8::1]/x"),
        ("https://user:pw@api.example.com/x", "https://api.example.com/x"),
        ("https://bücher.example/x", "https://xn--bcher-kva.example/x"),
        ('https://api.example.com/a"b', "https://api.example.com/a%22b"),
    ],
)
def test_htu_normalization(pem_signer: Signer, url: str, htu: str) -> None:
    assert normalize_htu(url) == htu
    assert normalize_htu(httpx.URL(url)) == htu
    # And the proof passes the independent check against the URL httpx puts on the wire.
    proof = DPoPProofBuilder(pem_signer).build("GET", url)
    oracle.check_proof(proof, htm="GET", url=str(httpx.URL(url)))
    assert _part(proof, 1)["htu"] == htu


def test_htu_with_a_backslash_is_json_escaped(pem_signer: Signer) -> None:
    url = "https://api.example.com/a\\b"
    proof = DPoPProofBuilder(pem_signer).build("GET", url)
    assert _part(proof, 1)["htu"] == "https://api.example.com/a\\b"
    oracle.check_proof(proof, htm="GET", url=str(httpx.URL(url)))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://api.example.com/x",
        "/relative/path",
        "api.example.com/x",
        "https://",
        "",
        "mailto:a@b",
    ],
)
def test_htu_must_be_an_absolute_http_url(pem_signer: Signer, url: str) -> None:
    with pytest.raises(ProofError, match="htu"):
        DPoPProofBuilder(pem_signer).build("GET", url)


def test_bad_url_message_omits_the_query() -> None:
    with pytest.raises(ProofError) as info:
        normalize_htu("ftp://h.example/p?api_key=SECRET123")
    assert "SECRET123" not in str(info.value)


@pytest.mark.parametrize("htm", ["", "GET ", 'G"ET', "GE\\T", "PO ST", "GET\n", 42])
def test_htm_must_be_a_method_token(pem_signer: Signer, htm: Any) -> None:
    with pytest.raises(ProofError, match="htm"):
        DPoPProofBuilder(pem_signer).build(htm, "https://a.example/")


def test_unusual_but_valid_method_is_kept_as_is(pem_signer: Signer) -> None:
    proof = DPoPProofBuilder(pem_signer).build("PROPFIND", "https://a.example/")
    oracle.check_proof(proof, htm="PROPFIND", url="https://a.example/")


@pytest.mark.parametrize("token", ["", "a b", 'a"b', "tok=en", "tökén", "a\\b"])
def test_access_token_must_be_token68(pem_signer: Signer, token: str) -> None:
    with pytest.raises(ProofError, match="token68") as info:
        DPoPProofBuilder(pem_signer).build("GET", "https://a.example/", access_token=token)
    assert token not in str(info.value) or not token


@pytest.mark.parametrize("nonce", ["", "a b", 'a"b', "a\\b", "é", "a\tb"])
def test_nonce_must_be_nqchar(pem_signer: Signer, nonce: str) -> None:
    with pytest.raises(ProofError, match="NQCHAR"):
        DPoPProofBuilder(pem_signer).build("GET", "https://a.example/", nonce=nonce)


def test_malformed_signature_is_refused(pem_signer: Signer) -> None:
    with pytest.raises(SigningFailedError, match="63-byte"):
        DPoPProofBuilder(Plain(pem_signer, cut=1)).build("GET", "https://a.example/")


def test_build_async_signs_through_the_async_path(pem_signer: Signer) -> None:
    plain = Plain(pem_signer)
    builder = DPoPProofBuilder(plain)

    async def main() -> list[str]:
        return list(
            await asyncio.gather(
                *(
                    builder.build_async("PUT", "https://a.example/x", access_token=RFC_TOKEN)
                    for _ in range(20)
                )
            )
        )

    proofs = asyncio.run(main())
    assert plain.calls == 20
    for proof in proofs:
        oracle.check_proof(proof, htm="PUT", url="https://a.example/x", access_token=RFC_TOKEN)


def test_prepare_and_finish_make_the_same_kind_of_proof(pem_signer: Signer) -> None:
    builder = DPoPProofBuilder(pem_signer)
    prepared = builder.prepare("DELETE", "https://a.example/x", nonce="n-1")
    proof = builder.finish(prepared, pem_signer.sign(prepared.signing_input.encode("ascii")))
    checked = oracle.check_proof(proof, htm="DELETE", url="https://a.example/x", nonce="n-1")
    assert checked.claims["jti"] == prepared.jti


def test_pkcs11_signed_proof_passes_the_oracle(pkcs11_key_uri: str) -> None:
    signer = load_signer(pkcs11_key_uri)
    try:
        builder = DPoPProofBuilder(signer)
        proof = builder.build("GET", "https://api.example.com/x", access_token=RFC_TOKEN)
        oracle.check_proof(
            proof,
            htm="GET",
            url="https://api.example.com/x",
            access_token=RFC_TOKEN,
            expected_jkt=builder.jkt,
        )
        proof = asyncio.run(builder.build_async("POST", "https://as.example/token"))
        oracle.check_proof(proof, htm="POST", url="https://as.example/token")
    finally:
        getattr(signer, "close", lambda: None)()


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://API.example/x?y", "https://api.example:443"),
        ("http://api.example/x", "http://api.example:80"),
        ("http://api.example:8080", "http://api.example:8080"),
        ("https://[::1]/", "https://[::1]:443"),
    ],
)
def test_origin_of(url: str, origin: str) -> None:
    assert origin_of(url) == origin
    assert origin_of(httpx.URL(url)) == origin


def test_repr_shows_no_key_material(pem_signer: Signer) -> None:
    text = repr(DPoPProofBuilder(pem_signer))
    assert "jkt=" in text
    assert str(dict(pem_signer.public_jwk)["x"]) not in text
