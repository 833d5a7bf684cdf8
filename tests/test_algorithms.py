"""Every algorithm through every backend: ES256, ES384, ES512, EdDSA, PS256 and RS256.

A key of every kind is made in SoftHSM2 (by our `generate_key` and by python-pkcs11 directly)
and in PEM (by `generate_key` and by ``cryptography`` directly); each signs proofs that the
independent oracle (tests/oracle.py: ``cryptography`` only, written from RFC 7518/8037) and
oidc-provider (which verifies with panva's ``jose``) accept, with the RFC 7638 thumbprint the
server binds the token to. The verifier is checked with hand-made proofs of every algorithm and
signatures of the wrong form. Expected values come from the RFCs' own examples or from
``cryptography``, never from the code under test.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from dpop_signer import generate_key, load_signer
from dpop_signer.errors import ConfigError, UnsupportedKeyError, VerificationError
from dpop_signer.jwk import jwk_thumbprint
from dpop_signer.proof import DPoPProofBuilder
from dpop_signer.signers.base import Signer, close_signer
from dpop_signer.verify import SUPPORTED_ALGORITHMS, verify_proof
from tests import oracle
from tests.cli_support import assert_ok, dpop
from tests.conftest import SoftHsmToken
from tests.interop_fixtures import OidcProvider

ALGS = ("ES256", "ES384", "ES512", "EdDSA", "PS256", "RS256")
# RFC 7518 §3.4 (r||s), RFC 8032 §5.1.6 (Ed25519), RFC 8017 (modulus length of RSA-2048).
SIGNATURE_BYTES = {"ES256": 64, "ES384": 96, "ES512": 132, "EdDSA": 64, "PS256": 256, "RS256": 256}
MEMBERS = {"EC": ["crv", "kty", "x", "y"], "OKP": ["crv", "kty", "x"], "RSA": ["e", "kty", "n"]}
KTY = {"ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP", "PS256": "RSA", "RS256": "RSA"}
CRV = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521", "EdDSA": "Ed25519"}
HTU = "https://api.example.com/v1/things"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: object) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def open_again(signer: Signer, ref: str, alg: str) -> Signer:
    """The same key opened again: a token's key by its URI (RS256 there needs alg=)."""
    uri = getattr(signer, "uri", None)
    if uri is not None:
        assert ("alg=RS256" in uri) == (alg == "RS256"), uri
        return load_signer(uri, pin="1234")
    return load_signer(ref, alg="RS256" if alg == "RS256" else None)


@pytest.fixture(params=["pem", "softhsm"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """A function that returns a fresh key reference (PEM path or SoftHSM2 URI) for a label."""
    if request.param == "pem":
        return lambda label: str(tmp_path / f"{label}.pem")
    softhsm: SoftHsmToken = request.getfixturevalue("softhsm")
    return lambda label: softhsm.uri(label, **{"pin-value": softhsm.pin})


@pytest.fixture
def made(backend: Callable[[str], str], request: pytest.FixtureRequest) -> Iterator[Signer]:
    alg = request.param
    ref = backend(unique(f"alg-{alg}"))
    signer = generate_key(ref, alg=alg)
    try:
        again = open_again(signer, ref, alg)
    finally:
        close_signer(signer)
    yield again
    close_signer(again)


@pytest.mark.parametrize("made", ALGS, indirect=True)
def test_a_key_of_every_kind_signs_proofs_the_oracle_accepts(made: Signer) -> None:
    alg = made.algorithm
    jwk = dict(made.public_jwk)
    assert sorted(jwk) == MEMBERS[KTY[alg]]
    assert jwk["kty"] == KTY[alg]
    assert jwk.get("crv") == CRV.get(alg)
    builder = DPoPProofBuilder(made)
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    for _ in range(3):  # ECDSA and PSS are randomized: several signatures, each checked
        proof = builder.build("GET", HTU + "?page=2", access_token=token)
        checked = oracle.check_proof(
            proof, htm="GET", url=HTU, access_token=token, expected_jwk=jwk, algs=(alg,)
        )
        assert checked.header["alg"] == alg
        assert len(base64.urlsafe_b64decode(proof.split(".")[2] + "==")) == SIGNATURE_BYTES[alg]
        assert checked.jkt == builder.jkt
        verify_proof(proof, htm="GET", htu=HTU, access_token=token, algorithms=SUPPORTED_ALGORITHMS)


@pytest.mark.parametrize("alg", ALGS)
def test_pem_keys_made_by_cryptography_load_with_the_independent_jwk(
    tmp_path: Path, alg: str
) -> None:
    key: Any = {
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "ES384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "ES512": lambda: ec.generate_private_key(ec.SECP521R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
        "PS256": lambda: rsa.generate_private_key(65537, 3072),
        "RS256": lambda: rsa.generate_private_key(65537, 2048),
    }[alg]()
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signer = load_signer(str(path), alg="RS256" if alg == "RS256" else None)
    assert signer.algorithm == alg
    public = key.public_key()
    expected: dict[str, Any]
    if KTY[alg] == "RSA":
        numbers = public.public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        expected = {"kty": "RSA", "n": b64(n), "e": "AQAB"}
    elif alg == "EdDSA":
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        expected = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
    else:
        size = (public.curve.key_size + 7) // 8
        numbers = public.public_numbers()
        expected = {
            "kty": "EC",
            "crv": CRV[alg],
            "x": b64(numbers.x.to_bytes(size, "big")),
            "y": b64(numbers.y.to_bytes(size, "big")),
        }
    assert signer.public_jwk == expected
    proof = DPoPProofBuilder(signer).build("POST", HTU)
    oracle.check_proof(proof, htm="POST", url=HTU, expected_jwk=dict(expected), algs=(alg,))


def test_rfc7638_and_rfc8037_thumbprint_examples() -> None:
    # RFC 7638 §3.1 (RSA) and RFC 8037 Appendix A.3 (Ed25519): the RFCs' own results.
    rsa_jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6"
        "tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-6"
        "5YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyr"
        "dkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKn"
        "qDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(rsa_jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    okp_jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(okp_jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert oracle.thumbprint(okp_jwk) == jwk_thumbprint(okp_jwk)


# --- PKCS#11: keys made outside dpop-signer, alg= in the URI, key identity on re-find ----------


def test_softhsm_keys_made_by_python_pkcs11_open_with_their_algorithm(
    softhsm: SoftHsmToken,
) -> None:
    from asn1crypto.core import ObjectIdentifier
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    from dpop_signer.signers.pkcs11 import pkcs11_module

    labels = {alg: unique(f"ext-{alg}") for alg in ("ES384", "EdDSA", "PS256")}
    safe = {Attribute.SIGN: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}

    def make(module: Any) -> None:
        # python-pkcs11 directly, in the process's one loaded module, under its lock.
        token = module.lib.get_token(token_label=softhsm.label)
        with token.open(rw=True, user_pin=softhsm.pin) as s:
            p384 = s.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp384r1")}, True
            )
            p384.generate_keypair(store=True, label=labels["ES384"], private_template=safe)
            ed = s.create_domain_parameters(
                KeyType.EC_EDWARDS,
                {Attribute.EC_PARAMS: ObjectIdentifier("1.3.101.112").dump()},
                local=True,
            )
            ed.generate_keypair(
                store=True,
                label=labels["EdDSA"],
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                private_template=safe,
            )
            s.generate_keypair(
                KeyType.RSA, 2048, store=True, label=labels["PS256"], private_template=safe
            )

    module = pkcs11_module(softhsm.module)
    module.call(make, module)
    for alg, label in labels.items():
        with load_signer(softhsm.uri(label), pin=softhsm.pin) as signer:  # type: ignore[attr-defined]
            assert signer.algorithm == alg
            proof = DPoPProofBuilder(signer).build("GET", HTU)
            oracle.check_proof(proof, htm="GET", url=HTU, algs=(alg,))


def test_rsa_key_in_a_token_signs_rs256_only_when_the_uri_says_so(softhsm: SoftHsmToken) -> None:
    uri = softhsm.uri(unique("rsa-choice"))
    with generate_key(uri, pin=softhsm.pin, alg="PS256") as made:  # type: ignore[attr-defined]
        plain = made.uri
    assert "alg=" not in plain
    with load_signer(plain, pin=softhsm.pin) as ps:  # type: ignore[attr-defined]
        assert ps.algorithm == "PS256"
    with load_signer(plain + "&alg=RS256", pin=softhsm.pin) as rs:  # type: ignore[attr-defined]
        assert rs.algorithm == "RS256"
        oracle.check_proof(
            DPoPProofBuilder(rs).build("GET", HTU), htm="GET", url=HTU, algs=("RS256",)
        )
    with pytest.raises(UnsupportedKeyError, match="alg ES256 does not fit an RSA key") as info:
        load_signer(plain + "&alg=ES256", pin=softhsm.pin)
    assert "\n" not in str(info.value)
    assert softhsm.pin not in str(info.value)
    with pytest.raises(ConfigError, match="alg=RS256 but alg='PS256' was passed"):
        load_signer(plain + "&alg=RS256", pin=softhsm.pin, alg="PS256")
    with pytest.raises(ConfigError, match="alg=HS256 is not a supported algorithm"):
        load_signer(plain + "&alg=HS256", pin=softhsm.pin)


@pytest.mark.parametrize("alg", ["ES384", "EdDSA", "PS256"])
def test_lost_session_refinds_and_proves_a_key_of_another_kind(
    softhsm: SoftHsmToken, alg: str
) -> None:
    from dpop_signer.signers.pkcs11 import Pkcs11Signer, generate_pkcs11_key

    signer: Pkcs11Signer = generate_pkcs11_key(
        softhsm.uri(unique(f"refind-{alg}")), pin=softhsm.pin, alg=alg
    )
    with signer:
        jwk = dict(signer.public_jwk)
        anchor = signer._anchor

        def close() -> None:
            assert anchor.session is not None
            anchor.session.close()

        signer.module.call(close)
        message = b"header.claims after a lost session"
        oracle.verify_jws(alg, jwk, message, signer.sign(message))
        assert signer.public_jwk == jwk


# --- the verifier: hand-made proofs of every algorithm -----------------------------------------


def hand_proof(alg: str, *, tamper: Callable[[bytes], bytes] | None = None) -> str:
    """A DPoP proof made with ``cryptography`` directly, as RFC 7518/8037 spell each algorithm."""
    claims = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": HTU, "iat": int(time.time())}
    if KTY[alg] == "EC":
        curve, digest, size = {
            "ES256": (ec.SECP256R1(), hashes.SHA256(), 32),
            "ES384": (ec.SECP384R1(), hashes.SHA384(), 48),
            "ES512": (ec.SECP521R1(), hashes.SHA512(), 66),
        }[alg]
        key: Any = ec.generate_private_key(curve)
        numbers = key.public_key().public_numbers()
        jwk = {
            "kty": "EC",
            "crv": CRV[alg],
            "x": b64(numbers.x.to_bytes(size, "big")),
            "y": b64(numbers.y.to_bytes(size, "big")),
        }

        def sign(data: bytes) -> bytes:
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}

        def sign(data: bytes) -> bytes:
            return bytes(key.sign(data))

    else:
        key = rsa.generate_private_key(65537, 2048)
        n = key.public_key().public_numbers().n
        jwk = {"kty": "RSA", "n": b64(n.to_bytes(256, "big")), "e": "AQAB"}
        pad = (
            padding.PSS(padding.MGF1(hashes.SHA256()), 32) if alg == "PS256" else padding.PKCS1v15()
        )

        def sign(data: bytes) -> bytes:
            return bytes(key.sign(data, pad, hashes.SHA256()))

    head = f"{b64json({'typ': 'dpop+jwt', 'alg': alg, 'jwk': jwk})}.{b64json(claims)}"
    signature = sign(head.encode())
    return f"{head}.{b64((tamper or (lambda s: s))(signature))}"


@pytest.mark.parametrize("alg", ALGS)
def test_verifier_accepts_every_algorithm_it_is_allowed(alg: str) -> None:
    proof = hand_proof(alg)
    oracle.check_proof(proof, htm="GET", url=HTU, algs=(alg,))  # the hand proof is right
    assert verify_proof(proof, htm="GET", htu=HTU, algorithms=SUPPORTED_ALGORITHMS)["htu"] == HTU
    if alg in ("ES512", "RS256"):  # outside the default allow-list
        with pytest.raises(VerificationError, match=f"alg '{alg}' is not accepted"):
            verify_proof(proof, htm="GET", htu=HTU)
    else:
        assert verify_proof(proof, htm="GET", htu=HTU)["htm"] == "GET"


@pytest.mark.parametrize(
    ("alg", "tamper", "words"),
    [
        ("ES384", lambda s: s[:-1], "95 bytes, not the 96-byte ES384 r||s"),
        ("ES512", lambda s: s + b"\0", "133 bytes, not the 132-byte ES512 r||s"),
        ("EdDSA", lambda s: s[:63], "63 bytes, not the 64-byte Ed25519"),
        ("PS256", lambda s: b"\0" + s, "257 bytes, not the modulus length 256"),
        ("RS256", lambda s: s[1:], "255 bytes, not the modulus length 256"),
        ("PS256", lambda s: bytes([s[0] ^ 1]) + s[1:], "signature does not verify"),
        ("EdDSA", lambda s: bytes([s[0] ^ 1]) + s[1:], "signature does not verify"),
    ],
)
def test_verifier_checks_each_signature_form(
    alg: str, tamper: Callable[[bytes], bytes], words: str
) -> None:
    with pytest.raises(VerificationError, match=words) as info:
        verify_proof(
            hand_proof(alg, tamper=tamper), htm="GET", htu=HTU, algorithms=SUPPORTED_ALGORITHMS
        )
    assert info.value.error == "invalid_dpop_proof"
    assert "\n" not in str(info.value)


def test_verifier_refuses_rsa_keys_under_2048_bits() -> None:
    key = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key under test
    n = key.public_key().public_numbers().n
    jwk = {"kty": "RSA", "n": b64(n.to_bytes(128, "big")), "e": "AQAB"}
    claims = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": HTU, "iat": int(time.time())}
    head = f"{b64json({'typ': 'dpop+jwt', 'alg': 'PS256', 'jwk': jwk})}.{b64json(claims)}"
    signature = key.sign(
        head.encode(), padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()
    )
    with pytest.raises(VerificationError, match="1024 bits; at least 2048"):
        verify_proof(f"{head}.{b64(signature)}", htm="GET", htu=HTU)


# --- the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES384", "EdDSA", "PS256"])
def test_keygen_alg_makes_that_kind_of_key(tmp_path: Path, alg: str) -> None:
    path = tmp_path / f"{alg}.pem"
    result = assert_ok(dpop("keygen", "--key", str(path), "--alg", alg))
    signer = load_signer(str(path))
    assert signer.algorithm == alg
    assert result.out.strip() == oracle.thumbprint(dict(signer.public_jwk))
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_keygen_refuses_an_unknown_alg(tmp_path: Path) -> None:
    result = dpop("keygen", "--key", str(tmp_path / "k.pem"), "--alg", "HS256")
    assert result.code == 2
    assert "HS256" in result.err
    assert "ES256" in result.err
    assert not (tmp_path / "k.pem").exists()


# --- oidc-provider: a token bound to the key of every kind ----------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        yield client


@pytest.mark.interop
@pytest.mark.parametrize("made", ALGS, indirect=True)
def test_oidc_provider_binds_a_token_to_a_key_of_every_kind(
    made: Signer, oidc_provider: Callable[..., OidcProvider], http: httpx.Client
) -> None:
    provider = oidc_provider()
    metadata = http.get(provider.issuer + "/.well-known/openid-configuration").json()
    assert made.algorithm in metadata["dpop_signing_alg_values_supported"]
    proof = DPoPProofBuilder(made).build("POST", provider.token_url)
    response = http.post(
        provider.token_url,
        # A loopback resource: as.mjs then issues a JWT access token, whose cnf.jkt we can read.
        data={
            "grant_type": "client_credentials",
            "scope": "api:read",
            "resource": "http://127.0.0.1:9/",
        },
        auth=provider.basic_client,
        headers={"DPoP": proof},
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    [entry] = provider.requests()
    assert entry["dpop"] == proof
    assert entry["status"] == 200
    checked = oracle.check_proof(proof, htm="POST", url=provider.token_url, algs=(made.algorithm,))
    # The server's own RFC 7638 thumbprint of our key, in the token it issued.
    part = response.json()["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert claims["cnf"] == {"jkt": checked.jkt}
