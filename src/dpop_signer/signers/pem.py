"""`PemSigner`: an ES256 key held in a PEM file, for development and tests.

The key is in process memory, which is exactly what production deployments avoid; use a
PKCS#11 token there. PKCS#8 and SEC1 ("EC PRIVATE KEY") PEM are accepted, encrypted or not;
the passphrase comes through ``pin``. Anything but a P-256 private key is refused when the file
is loaded, not when the first signature fails.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dpop_signer.errors import (
    ConfigError,
    PinError,
    SignerUnavailableError,
    UnsupportedKeyError,
)
from dpop_signer.jwk import EcPublicJwk, der_to_raw_signature, ec_public_jwk
from dpop_signer.signers.base import ALGORITHM

__all__ = ["PemSigner", "generate_pem_key"]

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class PemSigner:
    """Signs with an EC P-256 private key loaded from a PEM file.

    >>> signer = PemSigner.from_file("dev-key.pem")  # doctest: +SKIP
    >>> len(signer.sign(b"header.claims"))  # doctest: +SKIP
    64
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, *, source: str = "PEM key") -> None:
        """Wrap an already loaded key; prefer `from_file`."""
        if not isinstance(key.curve, ec.SECP256R1):
            raise UnsupportedKeyError(
                f"{source} is an EC {key.curve.name} key; ES256 needs P-256 (secp256r1)"
            )
        self._key = key
        self._source = source
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self._jwk = ec_public_jwk(point)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, pin: str | None = None) -> PemSigner:
        """Load a PKCS#8 or SEC1 PEM private key; ``pin`` is the passphrase if it is encrypted.

        Raises:
            SignerUnavailableError: the file is missing or unreadable.
            PinError: the key is encrypted and the passphrase is missing or wrong.
            UnsupportedKeyError: the file holds no P-256 private key (RSA, P-384, public only,
                garbage).
        """
        where = f"PEM key file {os.fspath(path)!r}"
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise SignerUnavailableError(
                f"{where} does not exist; create one with 'dpop keygen --key {os.fspath(path)}'"
            ) from exc
        except OSError as exc:
            raise SignerUnavailableError(f"{where} cannot be read: {exc.strerror}") from exc
        return cls(_load_private_key(data, pin, where), source=where)

    @property
    def algorithm(self) -> str:
        """Always ``"ES256"``."""
        return ALGORITHM

    @property
    def public_jwk(self) -> EcPublicJwk:
        """The public JWK (``kty, crv, x, y``); a fresh copy, so callers cannot alter ours."""
        return dict(self._jwk)  # type: ignore[return-value]

    def sign(self, message: bytes) -> bytes:
        """ES256-sign ``message``; return 64 bytes r||s."""
        # DER -> r||s happens here and nowhere else for this backend.
        return der_to_raw_signature(self._key.sign(message, _ECDSA_SHA256))

    async def sign_async(self, message: bytes) -> bytes:
        """Sign inline: an in-memory signature (~25 µs) is cheaper than a thread hop."""
        return self.sign(message)

    def close(self) -> None:
        """Nothing to release; present so every signer can be closed the same way."""

    def __enter__(self) -> PemSigner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PemSigner({self._source!r}, kid={self._jwk['x'][:8]}...)"


def _load_private_key(data: bytes, pin: str | None, where: str) -> ec.EllipticCurvePrivateKey:
    if b"-----BEGIN" not in data:
        raise UnsupportedKeyError(f"{where} is not PEM; expected a P-256 private key in PEM")
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise UnsupportedKeyError(f"{where} holds only a public key; a private key is needed")
    encrypted = b"ENCRYPTED" in data
    password = pin.encode("utf-8") if (pin and encrypted) else None
    if encrypted and password is None:
        raise PinError(f"{where} is encrypted; pass pin= (its passphrase)")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:
        raise PinError(f"{where} is encrypted; pass pin= (its passphrase)") from exc
    except ValueError as exc:
        if encrypted:
            raise PinError(f"wrong passphrase for {where}") from exc
        raise UnsupportedKeyError(
            f"{where} holds no readable private key; expected a P-256 key in PKCS#8 or SEC1 PEM"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise UnsupportedKeyError(f"{where} uses an unsupported key algorithm") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise UnsupportedKeyError(f"{where} is a {kind} key; ES256 needs an EC P-256 key")
    return key


def generate_pem_key(path: str | os.PathLike[str], *, pin: str | None = None) -> PemSigner:
    """Write a new P-256 key to ``path`` (mode 0600, PKCS#8, encrypted when ``pin`` is given).

    Raises:
        ConfigError: ``path`` exists already (a key is never overwritten) or its folder is
            missing.
    """
    where = f"PEM key file {os.fspath(path)!r}"
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(pin.encode("utf-8"))
        if pin
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    try:
        # O_EXCL: refuse to overwrite, atomically; 0o600 before any byte is written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{where} exists already; keys are never overwritten") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create {where}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return PemSigner(key, source=where)
