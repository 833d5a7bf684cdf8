"""PemSigner: signatures that verify, a JWK of the right shape, and one clear error per bad file."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from dpop_signer import (
    ConfigError,
    DPoPSignerError,
    PemSigner,
    PinError,
    SignerUnavailableError,
    UnsupportedKeyError,
    generate_key,
    jwk_thumbprint,
    load_signer,
)
from dpop_signer.signers import AsyncSigner, Signer, sign_async
from tests import oracle
from tests.sigcheck import check_jwk_shape, verify_all

PASSPHRASE = "correct horse battery"


def write_key(path: Path, key: object, *, fmt: str = "pkcs8", password: str | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    private_format = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "sec1": serialization.PrivateFormat.TraditionalOpenSSL,
    }[fmt]
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, private_format, encryption)  # type: ignore[attr-defined]
    )
    return str(path)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def expected_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }


def assert_one_line_without(exc: BaseException, *secrets: str) -> None:
    text = str(exc)
    assert text
    assert "\n" not in text
    for secret in secrets:
        assert secret not in text
        assert secret not in repr(exc)


@pytest.mark.parametrize("fmt", ["pkcs8", "sec1"])
def test_jwk_is_the_files_public_key(tmp_path: Path, fmt: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = PemSigner.from_file(write_key(tmp_path / "k.pem", key, fmt=fmt))
    check_jwk_shape(dict(signer.public_jwk))
    assert dict(signer.public_jwk) == expected_jwk(key)
    assert jwk_thumbprint(signer.public_jwk) == oracle.thumbprint(expected_jwk(key))
    assert signer.algorithm == "ES256"


def test_public_jwk_is_a_copy(pem_signer: PemSigner) -> None:
    jwk = pem_signer.public_jwk
    jwk["kty"] = "tampered"
    assert pem_signer.public_jwk["kty"] == "EC"


def test_is_a_signer_with_an_async_path(pem_signer: PemSigner) -> None:
    assert isinstance(pem_signer, Signer)
    assert isinstance(pem_signer, AsyncSigner)


def test_signatures_verify_with_cryptography_against_the_file_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = PemSigner.from_file(write_key(tmp_path / "k.pem", key))
    for i in range(200):
        message = f"header.claims-{i}".encode()
        signature = signer.sign(message)
        assert len(signature) == 64
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        key.public_key().verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))


@pytest.mark.slow
def test_20000_signatures_verify_including_leading_zero_ones(pem_signer: PemSigner) -> None:
    pairs = []
    for i in range(20_000):
        message = b"dpop-signing-input-" + i.to_bytes(4, "big")
        pairs.append((message, pem_signer.sign(message)))
    leading_zero = verify_all(dict(pem_signer.public_jwk), pairs)
    # About 2/256 of signatures have r or s below 2**248: ~156 expected, never 0 in practice.
    assert 40 <= leading_zero <= 400, leading_zero
    # Those are exactly the ones a DER->raw conversion that forgets the padding would break.
    for _, signature in pairs:
        assert len(signature) == 64


def test_sign_async_from_many_tasks(pem_signer: PemSigner) -> None:
    async def main() -> list[bytes]:
        return await asyncio.gather(*(sign_async(pem_signer, b"m%d" % i) for i in range(50)))

    signatures = asyncio.run(main())
    verify_all(dict(pem_signer.public_jwk), [(b"m%d" % i, s) for i, s in enumerate(signatures)])


def test_encrypted_key_opens_with_its_passphrase(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = write_key(tmp_path / "enc.pem", key, password=PASSPHRASE)
    signer = load_signer(path, pin=PASSPHRASE)
    assert dict(signer.public_jwk) == expected_jwk(key)


def test_encrypted_key_takes_the_passphrase_from_dpop_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = write_key(tmp_path / "enc.pem", key, fmt="sec1", password=PASSPHRASE)
    monkeypatch.setenv("DPOP_PIN", PASSPHRASE)
    assert dict(load_signer(path).public_jwk) == expected_jwk(key)


def test_encrypted_key_without_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPOP_PIN", raising=False)
    path = write_key(tmp_path / "enc.pem", ec.generate_private_key(ec.SECP256R1()), password="pw1")
    with pytest.raises(PinError) as info:
        load_signer(path)
    assert_one_line_without(info.value, "pw1")
    assert "passphrase" in str(info.value)


@pytest.mark.parametrize("fmt", ["pkcs8", "sec1"])
def test_encrypted_key_with_wrong_passphrase(tmp_path: Path, fmt: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = write_key(tmp_path / "enc.pem", key, fmt=fmt, password=PASSPHRASE)
    with pytest.raises(PinError) as info:
        load_signer(path, pin="wrong-passphrase-xyz")
    assert_one_line_without(info.value, "wrong-passphrase-xyz", PASSPHRASE)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SignerUnavailableError) as info:
        load_signer(str(tmp_path / "nope.pem"))
    assert_one_line_without(info.value)
    assert "nope.pem" in str(info.value)
    assert "keygen" in str(info.value)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(os.urandom(300))
    with pytest.raises(UnsupportedKeyError) as info:
        load_signer(str(path))
    assert_one_line_without(info.value)


def test_garbage_inside_pem_armour(tmp_path: Path) -> None:
    path = tmp_path / "armoured.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with pytest.raises(UnsupportedKeyError) as info:
        load_signer(str(path))
    assert_one_line_without(info.value)


def test_public_key_only(tmp_path: Path) -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    path = tmp_path / "pub.pem"
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(UnsupportedKeyError, match="public key") as info:
        load_signer(str(path))
    assert_one_line_without(info.value)


def test_rsa_key_under_2048_bits(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key under test
    path = write_key(tmp_path / "rsa.pem", weak)
    with pytest.raises(UnsupportedKeyError, match=r"RSA key of 1024 bits.*2048 bits or more"):
        load_signer(path)


def test_secp256k1_key(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k256.pem", ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(UnsupportedKeyError, match="secp256k1") as info:
        load_signer(path)
    assert_one_line_without(info.value)


def test_rsa_key_signs_ps256_unless_rs256_is_asked_for(tmp_path: Path) -> None:
    path = write_key(tmp_path / "rsa2048.pem", rsa.generate_private_key(65537, 2048))
    assert load_signer(path).algorithm == "PS256"
    assert load_signer(path, alg="RS256").algorithm == "RS256"
    with pytest.raises(UnsupportedKeyError, match="ES256 does not fit an RSA key") as info:
        load_signer(path, alg="ES256")
    assert_one_line_without(info.value)


def test_alg_that_does_not_fit_an_ec_key_is_refused(tmp_path: Path) -> None:
    path = write_key(tmp_path / "p384.pem", ec.generate_private_key(ec.SECP384R1()))
    assert load_signer(path).algorithm == "ES384"
    with pytest.raises(UnsupportedKeyError, match="ES256 does not fit an EC P-384 key") as info:
        load_signer(path, alg="ES256")
    assert_one_line_without(info.value)


def test_every_error_is_a_dpop_signer_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DPoPSignerError):
        load_signer(str(path))


def test_generate_writes_mode_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "new.pem"
    signer = generate_key(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert dict(load_signer(str(path)).public_jwk) == dict(signer.public_jwk)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        generate_key(str(path))
    assert path.read_bytes() == before


def test_generate_encrypted_then_load_with_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "enc-new.pem"
    signer = generate_key(str(path), pin=PASSPHRASE)
    assert b"ENCRYPTED" in path.read_bytes()
    assert dict(load_signer(str(path), pin=PASSPHRASE).public_jwk) == dict(signer.public_jwk)
    with pytest.raises(PinError):
        load_signer(str(path), pin="not-it")


def test_generated_signature_is_raw_r_s_not_der(tmp_path: Path) -> None:
    signer = generate_key(str(tmp_path / "k.pem"))
    signature = signer.sign(b"abc")
    assert len(signature) == 64
    with pytest.raises(ValueError, match=r"asn1|ASN\.1|pars"):
        decode_dss_signature(signature)  # raw r||s is not DER


def test_repr_shows_the_file_not_the_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = write_key(tmp_path / "k.pem", key, password=PASSPHRASE)
    signer = PemSigner.from_file(path, pin=PASSPHRASE)
    assert "k.pem" in repr(signer)
    assert PASSPHRASE not in repr(signer)
    with signer as same:
        assert same is signer
