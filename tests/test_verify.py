"""dpop_signer.verify: accepts hand-made proofs, refuses each RFC 9449 §4.3 violation.

Proofs here are made by hand with ``cryptography`` (tests.servers_fixtures.HandKey), never by
dpop_signer.proof, and expected values come from the RFC or from the test's own arithmetic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpop_signer.errors import DPoPSignerError, VerificationError
from dpop_signer.verify import (
    JtiReplayCache,
    comparable_uri,
    issue_access_token,
    verify_access_token,
    verify_client_assertion,
    verify_proof,
    verify_proof_details,
)
from tests.servers_fixtures import HandKey

HTU = "https://api.example.com/v1/things"
TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: object) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


@pytest.fixture(scope="module")
def key() -> HandKey:
    return HandKey()


def rejects(proof: str, *, error: str = "invalid_dpop_proof", match: str, **kwargs) -> None:
    params = {"htm": "GET", "htu": HTU, **kwargs}
    with pytest.raises(VerificationError, match=match) as info:
        verify_proof(proof, **params)
    assert info.value.error == error
    message = str(info.value)
    assert "\n" not in message
    if len(proof) > 8:
        assert proof not in message


# --- acceptance ---------------------------------------------------------------------------


def test_accepts_a_hand_made_proof_and_returns_its_claims(key: HandKey) -> None:
    proof = key.proof("GET", HTU)
    claims = verify_proof(proof, htm="GET", htu=HTU)
    assert claims["htm"] == "GET"
    assert claims["htu"] == HTU
    assert isinstance(claims["jti"], str)


def test_details_carry_the_key_thumbprint(key: HandKey) -> None:
    details = verify_proof_details(key.proof("POST", HTU), htm="POST", htu=HTU)
    assert details.jkt == key.jkt  # the oracle's thumbprint, independent code
    assert details.jwk == key.jwk
    assert details.header["typ"] == "dpop+jwt"


def test_accepts_proof_with_token_nonce_and_binding(key: HandKey) -> None:
    proof = key.proof("POST", HTU, access_token=TOKEN, nonce="n-1")
    claims = verify_proof(proof, htm="POST", htu=HTU, access_token=TOKEN, nonce="n-1", jkt=key.jkt)
    assert claims["nonce"] == "n-1"


def test_accepts_any_of_several_nonces(key: HandKey) -> None:
    proof = key.proof("GET", HTU, nonce="previous")
    assert verify_proof(proof, htm="GET", htu=HTU, nonce=("current", "previous"))


def test_ignores_query_and_fragment_of_the_request_url(key: HandKey) -> None:
    proof = key.proof("GET", HTU)
    assert verify_proof(proof, htm="GET", htu=HTU + "?page=2#top")


@pytest.mark.parametrize(
    ("claimed", "received"),
    [
        ("HTTPS://API.Example.COM/v1/things", HTU),  # case of scheme and host
        ("https://api.example.com:443/v1/things", HTU),  # default port
        ("https://api.example.com/v1/%7Ething", "https://api.example.com/v1/~thing"),
        ("https://api.example.com/a%2fb", "https://api.example.com/a%2Fb"),  # hex case
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"),  # empty path is "/"
    ],
)
def test_htu_comparison_normalises_per_rfc3986(key: HandKey, claimed: str, received: str) -> None:
    assert verify_proof(key.proof("GET", claimed), htm="GET", htu=received)


def test_htu_claim_is_compared_without_its_query_like_node_oidc_provider(key: HandKey) -> None:
    # RFC 9449 §4.3 check 9 ignores query and fragment; the strict "htu carries none" rule is
    # the oracle's job (tests/oracle.py), so sloppy third-party clients still interoperate.
    assert verify_proof(key.proof("GET", HTU + "?a=1"), htm="GET", htu=HTU)


def test_accepts_iat_at_the_edges_of_the_window(key: HandKey) -> None:
    now = 1_700_000_000
    verify_proof(key.proof("GET", HTU, iat=now - 300), htm="GET", htu=HTU, now=now)
    verify_proof(key.proof("GET", HTU, iat=now + 60), htm="GET", htu=HTU, now=now)


# --- RFC 9449 example vectors (dpop-anchors.md §5.1) ---------------------------------------

RFC_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
RFC_TOKEN_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0Vj"
    "NoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5"
    "VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TV"
    "CIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8l"
    "P4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
)
RFC_RESOURCE_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0Vj"
    "NoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5"
    "VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUI"
    "iwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2Mj"
    "I2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yR"
    "qzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA"
)


def test_rfc9449_token_request_proof_verifies() -> None:
    details = verify_proof_details(
        RFC_TOKEN_PROOF,
        htm="POST",
        htu="https://server.example.com/token",
        now=1562262616,
    )
    assert details.claims["jti"] == "-BwC3ESc6acc2lTc"
    assert details.jkt == RFC_JKT


def test_rfc9449_resource_proof_verifies_with_ath_and_cnf_jkt() -> None:
    claims = verify_proof(
        RFC_RESOURCE_PROOF,
        htm="GET",
        htu="https://resource.example.org/protectedresource",
        access_token=TOKEN,
        jkt=RFC_JKT,
        now=1562262618 + 5,
    )
    assert claims["ath"] == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


def test_rfc9449_resource_proof_is_stale_today() -> None:
    rejects(
        RFC_RESOURCE_PROOF,
        htm="GET",
        htu="https://resource.example.org/protectedresource",
        access_token=TOKEN,
        match="in the past",
    )


def test_rfc9449_resource_proof_refuses_another_token() -> None:
    rejects(
        RFC_RESOURCE_PROOF,
        htm="GET",
        htu="https://resource.example.org/protectedresource",
        access_token=TOKEN + "x",
        now=1562262618,
        match="ath",
    )


# --- one §4.3 violation at a time ---------------------------------------------------------


@pytest.mark.parametrize(
    "proof",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "eyJ.e30.AA",  # header not JSON
        "e30.e30.@@@",  # signature not base64url
        "W10.e30.AA",  # header is a JSON array
        "x" * 9000,
    ],
)
def test_rejects_malformed_compact_jws(proof: str) -> None:
    rejects(proof, match="DPoP proof")


@pytest.mark.parametrize("claim", ["jti", "htm", "htu", "iat"])
def test_rejects_missing_required_claim(key: HandKey, claim: str) -> None:
    rejects(key.proof("GET", HTU, drop=(claim,)), match=f"no '{claim}' claim")


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", None, "DPoP+JWT"])
def test_rejects_wrong_typ(key: HandKey, typ: str | None) -> None:
    rejects(key.proof("GET", HTU, header={"typ": typ}), match="typ")


def test_rejects_alg_none(key: HandKey) -> None:
    claims = {"jti": "j" * 22, "htm": "GET", "htu": HTU, "iat": int(time.time())}
    proof = f"{b64json({'typ': 'dpop+jwt', 'alg': 'none', 'jwk': key.jwk})}.{b64json(claims)}."
    rejects(proof, match="alg 'none' is not accepted")


def test_rejects_hs256_signed_with_the_public_key_as_secret(key: HandKey) -> None:
    header = b64json({"typ": "dpop+jwt", "alg": "HS256", "jwk": key.jwk})
    claims = b64json({"jti": "j" * 22, "htm": "GET", "htu": HTU, "iat": int(time.time())})
    mac = hmac.new(json.dumps(key.jwk).encode(), f"{header}.{claims}".encode(), hashlib.sha256)
    rejects(f"{header}.{claims}.{b64(mac.digest())}", match="alg 'HS256' is not accepted")


@pytest.mark.parametrize("alg", ["ES512", "RS256", "PS384", "ES256K"])
def test_rejects_algorithms_outside_the_default_allow_list(key: HandKey, alg: str) -> None:
    rejects(
        key.proof("GET", HTU, header={"alg": alg}),
        match=f"alg '{alg}' is not accepted.*only ES256, ES384, EdDSA, PS256$",
    )


@pytest.mark.parametrize("alg", ["ES384", "EdDSA", "PS256"])
def test_rejects_an_allowed_alg_that_does_not_fit_the_key(key: HandKey, alg: str) -> None:
    # A P-256 key under another allowed alg: check 6 refuses it before any verification.
    rejects(
        key.proof("GET", HTU, header={"alg": alg}),
        match=r"key is not (EC P-384|Ed25519|RSA), which",
    )


def test_allow_list_can_be_narrowed_and_never_widened_past_the_supported_set(key: HandKey) -> None:
    proof = key.proof("GET", HTU)
    assert verify_proof(proof, htm="GET", htu=HTU, algorithms=("ES256",))["htm"] == "GET"
    rejects(proof, algorithms=("EdDSA",), match="accepts only EdDSA$")
    with pytest.raises(ValueError, match="HS256"):
        verify_proof(proof, htm="GET", htu=HTU, algorithms=("ES256", "HS256"))


def test_rejects_private_key_in_header_jwk(key: HandKey) -> None:
    d = key.key.private_numbers().private_value.to_bytes(32, "big")
    proof = key.proof("GET", HTU, header={"jwk": {**key.jwk, "d": b64(d)}})
    rejects(proof, match=r"private key members \['d'\]")


def test_rejects_missing_jwk(key: HandKey) -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256"}
    claims = {"jti": "j" * 22, "htm": "GET", "htu": HTU, "iat": int(time.time())}
    rejects(key.sign_jws(header, claims), match="no 'jwk'")


def test_rejects_signature_by_another_key(key: HandKey) -> None:
    other = HandKey()
    proof = other.proof("GET", HTU, header={"jwk": key.jwk})
    rejects(proof, match="signature does not verify")


def test_rejects_tampered_claims(key: HandKey) -> None:
    header, _, signature = key.proof("GET", HTU).split(".")
    forged = b64json({"jti": "j" * 22, "htm": "DELETE", "htu": HTU, "iat": int(time.time())})
    rejects(f"{header}.{forged}.{signature}", htm="DELETE", match="signature does not verify")


def test_rejects_der_signature(key: HandKey) -> None:
    header, claims, signature = key.proof("GET", HTU).split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    rejects(f"{header}.{claims}.{b64(der)}", match="not the 64-byte ES256")


def test_rejects_jwk_point_off_the_curve(key: HandKey) -> None:
    bad = {
        **key.jwk,
        "y": b64(
            (int.from_bytes(base64.urlsafe_b64decode(key.jwk["y"] + "="), "big") ^ 1).to_bytes(
                32, "big"
            )
        ),
    }
    rejects(key.proof("GET", HTU, header={"jwk": bad}), match="not a point on the P-256 curve")


def test_rejects_non_p256_jwk(key: HandKey) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-384",
        "x": b64(p384.x.to_bytes(48, "big")),
        "y": b64(p384.y.to_bytes(48, "big")),
    }
    rejects(key.proof("GET", HTU, header={"jwk": jwk}), match="not EC P-256")


def test_rejects_crit_header(key: HandKey) -> None:
    rejects(key.proof("GET", HTU, header={"crit": ["exp"]}), match="crit")


@pytest.mark.parametrize("htm", ["POST", "get", "HEAD"])
def test_rejects_htm_mismatch(key: HandKey, htm: str) -> None:
    rejects(key.proof(htm, HTU), match="does not match the request method 'GET'")


@pytest.mark.parametrize(
    "htu",
    [
        "https://api.example.com/v1/thing",  # other path
        "https://api.example.com/v1/things/",  # trailing slash
        "http://api.example.com/v1/things",  # other scheme
        "https://api.example.com:8443/v1/things",  # other port
        "https://evil.example.com/v1/things",  # other host
        "https://api.example.com/v1%2Fthings",  # %2F is not /
        "/v1/things",  # not absolute
    ],
)
def test_rejects_htu_mismatch(key: HandKey, htu: str) -> None:
    rejects(key.proof("GET", htu), match="htu")


def test_rejects_stale_iat_and_names_the_skew(key: HandKey) -> None:
    now = 1_700_000_000
    rejects(key.proof("GET", HTU, iat=now - 301), now=now, match="301 s in the past")


def test_rejects_future_iat(key: HandKey) -> None:
    now = 1_700_000_000
    rejects(key.proof("GET", HTU, iat=now + 61), now=now, match="61 s in the future")


@pytest.mark.parametrize("iat", ["1700000000", True, None, [1]])
def test_rejects_non_numeric_iat(key: HandKey, iat: object) -> None:
    rejects(key.proof("GET", HTU, claims={"iat": iat}), match="iat must be a NumericDate")


@pytest.mark.parametrize("jti", ["", 123, "x" * 257])
def test_rejects_bad_jti(key: HandKey, jti: object) -> None:
    rejects(key.proof("GET", HTU, claims={"jti": jti}), match="jti")


def test_rejects_wrong_ath(key: HandKey) -> None:
    proof = key.proof("GET", HTU, access_token="another-token")
    rejects(proof, access_token=TOKEN, match="ath is not the SHA-256")


def test_rejects_missing_ath_when_a_token_is_sent(key: HandKey) -> None:
    rejects(key.proof("GET", HTU), access_token=TOKEN, match="no 'ath' claim")


def test_rejects_proof_key_other_than_the_token_binding(key: HandKey) -> None:
    proof = HandKey().proof("GET", HTU, access_token=TOKEN)
    rejects(proof, access_token=TOKEN, jkt=key.jkt, match="not the key the access token is bound")


def test_missing_nonce_is_a_nonce_demand(key: HandKey) -> None:
    rejects(key.proof("GET", HTU), nonce="abc", error="use_dpop_nonce", match="no nonce claim")


def test_stale_nonce_is_a_nonce_demand_and_not_echoed(key: HandKey) -> None:
    proof = key.proof("GET", HTU, nonce="old-nonce-value")
    with pytest.raises(VerificationError) as info:
        verify_proof(proof, htm="GET", htu=HTU, nonce="new-nonce-value")
    assert info.value.error == "use_dpop_nonce"
    assert "nonce-value" not in str(info.value)


def test_rejects_nonce_with_forbidden_characters(key: HandKey) -> None:
    rejects(key.proof("GET", HTU, nonce='a"b'), nonce='a"b', match="NQCHAR")


def test_replayed_jti_is_refused_and_a_failed_proof_is_not_remembered(key: HandKey) -> None:
    cache = JtiReplayCache()
    proof = key.proof("GET", HTU)
    rejects(proof, htm="POST", replay=cache, match="htm")
    assert len(cache) == 0
    verify_proof(proof, htm="GET", htu=HTU, replay=cache)
    rejects(proof, replay=cache, match="already used")


def test_errors_are_dpop_signer_errors(key: HandKey) -> None:
    with pytest.raises(DPoPSignerError):
        verify_proof(key.proof("GET", HTU), htm="PUT", htu=HTU)


def test_rejects_non_canonical_base64url(key: HandKey) -> None:
    header, claims, signature = key.proof("GET", HTU).split(".")
    # 64 bytes = 86 characters with 4 unused bits; setting one of them spells the same bytes.
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = last.index(signature[-1])
    twin = signature[:-1] + last[index ^ 1]
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(signature + "==")
    rejects(f"{header}.{claims}.{twin}", match="canonical")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=0), replacement=st.sampled_from("A_-.x0="))
def test_any_one_character_change_is_rejected(position: int, replacement: str) -> None:
    proof = PROOF_FOR_FUZZ
    position %= len(proof)
    if proof[position] == replacement:
        return
    mutated = proof[:position] + replacement + proof[position + 1 :]
    with pytest.raises(VerificationError):
        verify_proof(mutated, htm="GET", htu=HTU)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    header=st.dictionaries(st.sampled_from(["typ", "alg", "jwk", "crit", "kid"]), JSON, max_size=4),
    claims=st.dictionaries(
        st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce"]), JSON, max_size=6
    ),
)
def test_arbitrary_signed_json_fails_with_verification_error_only(
    header: dict, claims: dict
) -> None:
    proof = FUZZ_KEY.proof("GET", HTU, header=header, claims=claims)
    # jkt "j" matches no key, so every proof must end in VerificationError and nothing else.
    with pytest.raises(VerificationError):
        verify_proof(proof, htm="GET", htu=HTU, access_token=TOKEN, nonce="n", jkt="j")


FUZZ_KEY = HandKey()
PROOF_FOR_FUZZ = FUZZ_KEY.proof("GET", HTU, iat=time.time() + 10)


# --- the replay cache ---------------------------------------------------------------------


def test_replay_cache_forgets_after_the_window() -> None:
    cache = JtiReplayCache(window=10)
    cache.check_and_store("a", now=100)
    with pytest.raises(VerificationError):
        cache.check_and_store("a", now=109)
    cache.check_and_store("a", now=110.5)


def test_replay_cache_is_bounded() -> None:
    cache = JtiReplayCache(window=1000, max_entries=3)
    for i in range(5):
        cache.check_and_store(str(i), now=100 + i)
    assert len(cache) == 3
    cache.check_and_store("0", now=106)  # evicted, so accepted again
    with pytest.raises(VerificationError):
        cache.check_and_store("4", now=106)


def test_replay_cache_scopes_are_separate() -> None:
    cache = JtiReplayCache()
    cache.check_and_store("same", scope="https://a/x")
    cache.check_and_store("same", scope="https://b/x")


def test_replay_cache_refuses_bad_bounds() -> None:
    with pytest.raises(ValueError, match="positive"):
        JtiReplayCache(window=0)


# --- htu normalisation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTP://LocalHost:80/A/b?q#f", "http://localhost/A/b"),
        ("https://h:443", "https://h/"),
        ("https://h:8443/x", "https://h:8443/x"),
        ("http://[::1]:8080/p", "http://[::1]:8080/p"),
        ("http://h/%7e%41%2f%c3%a9", "http://h/~A%2F%C3%A9"),
    ],
)
def test_comparable_uri(url: str, expected: str) -> None:
    assert comparable_uri(url) == expected


@pytest.mark.parametrize("url", ["ftp://h/x", "/relative", "http:///nohost", "http://h:99999/"])
def test_comparable_uri_refuses_non_http_urls(url: str) -> None:
    with pytest.raises(ValueError, match="not an absolute http"):
        comparable_uri(url)


# --- access tokens ------------------------------------------------------------------------


def decode_and_check_es256(token: str, key: HandKey) -> tuple[dict, dict]:
    """Independent check of a JWT: split, decode, verify with cryptography directly."""
    h, c, s = token.split(".")
    raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.key.public_key().verify(der, f"{h}.{c}".encode(), ec.ECDSA(hashes.SHA256()))
    pad = lambda part: part + "=" * (-len(part) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(h))), json.loads(
        base64.urlsafe_b64decode(pad(c))
    )


def test_issued_access_token_is_an_es256_at_jwt_bound_to_the_key(key: HandKey) -> None:
    issuer_key = HandKey()
    token = issue_access_token(
        issuer_key,
        issuer="http://as",
        audience="http://rs",
        client_id="c1",
        jkt=key.jkt,
        lifetime=3,
        scope="read",
        kid="k1",
        now=1000,
    )
    header, claims = decode_and_check_es256(token, issuer_key)
    assert header == {"typ": "at+jwt", "alg": "ES256", "kid": "k1"}
    assert claims["cnf"] == {"jkt": key.jkt}
    assert (claims["iss"], claims["aud"], claims["client_id"], claims["sub"]) == (
        "http://as",
        "http://rs",
        "c1",
        "c1",
    )
    assert (claims["iat"], claims["exp"], claims["scope"]) == (1000, 1003, "read")
    verified = verify_access_token(
        token, key=issuer_key.jwk, issuer="http://as", audience="http://rs", now=1002
    )
    assert verified["cnf"]["jkt"] == key.jkt


@pytest.fixture(scope="module")
def issued() -> tuple[HandKey, str]:
    issuer_key = HandKey()
    token = issue_access_token(
        issuer_key,
        issuer="http://as",
        audience="http://rs",
        client_id="c",
        jkt="J",
        lifetime=60,
        now=1000,
    )
    return issuer_key, token


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"now": 1060}, "expired 0 s ago"),
        ({"issuer": "http://other"}, "issuer"),
        ({"audience": "http://other"}, "audience"),
        ({"key": HandKey().jwk}, "signature does not verify"),
    ],
)
def test_verify_access_token_rejects(issued: tuple[HandKey, str], kwargs: dict, match: str) -> None:
    issuer_key, token = issued
    params = {"key": issuer_key.jwk, "now": 1001, **kwargs}
    with pytest.raises(VerificationError, match=match) as info:
        verify_access_token(token, **params)
    assert info.value.error == "invalid_token"
    assert token not in str(info.value)


def test_a_dpop_proof_is_not_an_access_token(key: HandKey) -> None:
    with pytest.raises(VerificationError, match="typ") as info:
        verify_access_token(key.proof("GET", HTU), key=key.jwk)
    assert info.value.error == "invalid_token"


def test_unbound_token_is_refused() -> None:
    issuer_key = HandKey()
    token = issuer_key.sign_jws({"typ": "at+jwt", "alg": "ES256"}, {"exp": time.time() + 60})
    with pytest.raises(VerificationError, match="not DPoP-bound"):
        verify_access_token(token, key=issuer_key.jwk)


# --- client assertions (RFC 7523) ---------------------------------------------------------


def test_client_assertion_accepted_once(key: HandKey) -> None:
    cache = JtiReplayCache()
    assertion = key.client_assertion("c1", "http://as/token")
    claims = verify_client_assertion(
        assertion,
        client_id="c1",
        audiences={"http://as", "http://as/token"},
        key=key.jwk,
        replay=cache,
    )
    assert claims["sub"] == "c1"
    with pytest.raises(VerificationError, match="already used") as info:
        verify_client_assertion(
            assertion, client_id="c1", audiences={"http://as/token"}, key=key.jwk, replay=cache
        )
    assert info.value.error == "invalid_client"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"iss": "c2"}, "iss and sub"),
        ({"aud": "http://elsewhere"}, "audience"),
        ({"exp": 1}, "expired"),
        ({"exp": int(time.time()) + 3600}, "more than 600 s"),
        ({"jti": ""}, "no jti"),
    ],
)
def test_client_assertion_rejects(key: HandKey, extra: dict, match: str) -> None:
    assertion = key.client_assertion("c1", "http://as/token", **extra)
    with pytest.raises(VerificationError, match=match) as info:
        verify_client_assertion(
            assertion, client_id="c1", audiences={"http://as/token"}, key=key.jwk
        )
    assert info.value.error == "invalid_client"


def test_client_assertion_signed_by_another_key(key: HandKey) -> None:
    assertion = HandKey().client_assertion("c1", "http://as/token")
    with pytest.raises(VerificationError, match="signature"):
        verify_client_assertion(
            assertion, client_id="c1", audiences={"http://as/token"}, key=key.jwk
        )
