"""jwk.py: RFC 7638 thumbprints against the RFCs' own vectors, and the r||s <-> DER boundary."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given
from hypothesis import strategies as st

from dpop_signer.errors import SigningFailedError, UnsupportedKeyError
from dpop_signer.jwk import (
    b64url_decode,
    b64url_encode,
    der_to_raw_signature,
    ec_public_jwk,
    jwk_thumbprint,
    raw_to_der_signature,
)
from tests import oracle

# RFC 7638 §3.1: the RSA key of RFC 7517 Appendix A.1 and its thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
        "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQ"
        "R0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bF"
        "TWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

# RFC 9449 §4.1 / §6.1: the proof key of the examples and the cnf.jkt bound to it.
RFC9449_JWK = {
    "kty": "EC",
    "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
    "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
    "crv": "P-256",
}
RFC9449_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


def test_rfc7638_vector() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT


def test_rfc9449_vector() -> None:
    assert jwk_thumbprint(RFC9449_JWK) == RFC9449_JKT
    assert oracle.thumbprint(RFC9449_JWK) == RFC9449_JKT


def test_thumbprint_ignores_members_outside_the_required_set() -> None:
    extra = {**RFC9449_JWK, "kid": "k1", "use": "sig", "alg": "ES256"}
    assert jwk_thumbprint(extra) == RFC9449_JKT


def test_thumbprint_refuses_unknown_key_type() -> None:
    with pytest.raises(ValueError, match="oct"):
        jwk_thumbprint({"kty": "oct", "k": "AAAA"})


def test_ec_public_jwk_of_a_real_key_matches_the_oracle() -> None:
    for _ in range(20):
        public = ec.generate_private_key(ec.SECP256R1()).public_key()
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        jwk = ec_public_jwk(point)
        assert list(jwk) == ["kty", "crv", "x", "y"]
        numbers = public.public_numbers()
        assert base64.urlsafe_b64decode(jwk["x"] + "=") == numbers.x.to_bytes(32, "big")
        assert base64.urlsafe_b64decode(jwk["y"] + "=") == numbers.y.to_bytes(32, "big")
        assert jwk_thumbprint(jwk) == oracle.thumbprint(dict(jwk))


@pytest.mark.parametrize(
    "point",
    [
        b"\x02" + bytes(32),  # compressed
        b"\x04" + bytes(80),  # no supported curve's width (P-384 is 96, P-521 132)
        b"\x05" + bytes(64),  # not uncompressed
        b"",
    ],
)
def test_ec_public_jwk_refuses_what_is_not_an_uncompressed_point(point: bytes) -> None:
    with pytest.raises(UnsupportedKeyError):
        ec_public_jwk(point)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xfe", bytes(range(256))])
def test_b64url_round_trip_without_padding(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert "+" not in text
    assert "/" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize("text", ["AA==", "a+b/", "a b", 123])
def test_b64url_decode_refuses_padding_and_standard_alphabet(text: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - b64url_decode's contract is ValueError
        b64url_decode(text)  # type: ignore[arg-type]


def test_der_to_raw_hand_vector_with_short_r_and_s_needing_a_sign_byte() -> None:
    # r = 0x7f (one byte), s = 0x80 (DER needs a 0x00 sign byte): written out by hand.
    der = bytes.fromhex("300702017f02020080")
    raw = der_to_raw_signature(der)
    assert raw == bytes(31) + b"\x7f" + bytes(31) + b"\x80"
    assert raw_to_der_signature(raw) == der


@pytest.mark.parametrize(
    ("r", "s"),
    [
        (1, 1),
        (0x00FF << 240, 2**256 - 1),  # r starts with a zero byte, s is all ones
        (2**255, 2**248 - 1),  # s starts with a zero byte
        (2**200 + 7, 2**247),  # both shorter than 32 bytes
    ],
)
def test_der_raw_round_trip_keeps_leading_zeros(r: int, s: int) -> None:
    raw = der_to_raw_signature(encode_dss_signature(r, s))
    assert len(raw) == 64
    assert raw == r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert decode_dss_signature(raw_to_der_signature(raw)) == (r, s)


@given(st.integers(1, 2**256 - 1), st.integers(1, 2**256 - 1))
def test_der_raw_round_trip_property(r: int, s: int) -> None:
    raw = der_to_raw_signature(encode_dss_signature(r, s))
    assert raw == r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert decode_dss_signature(raw_to_der_signature(raw)) == (r, s)


def test_der_to_raw_refuses_integers_wider_than_p256() -> None:
    with pytest.raises(SigningFailedError):
        der_to_raw_signature(encode_dss_signature(2**256, 1))


def test_der_to_raw_refuses_garbage() -> None:
    with pytest.raises(SigningFailedError):
        der_to_raw_signature(b"\x30\x03\x02\x01")


@pytest.mark.parametrize("size", [0, 63, 65, 72])
def test_raw_to_der_refuses_the_wrong_width(size: int) -> None:
    with pytest.raises(ValueError, match="64"):
        raw_to_der_signature(bytes(size))
