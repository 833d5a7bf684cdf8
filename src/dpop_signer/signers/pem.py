"""`PemSigner`: a key held in a PEM file, for development and tests.

The key is in process memory, which is exactly what production deployments avoid; use a
PKCS#11 token there. PKCS#8, SEC1 ("EC PRIVATE KEY") and PKCS#1 ("RSA PRIVATE KEY") PEM are
accepted, encrypted or not; the passphrase comes through ``pin``. The algorithm follows the key
(`dpop_signer.algorithms`): EC P-256 signs ES256, P-384 ES384, P-521 ES512, Ed25519 EdDSA, and
RSA (2048 bits or more) PS256, or RS256 when ``alg="RS256"`` is given. Any other key is refused
when the file is loaded, not when the first signature fails.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from dpop_signer.algorithms import (
    DEFAULT_ALGORITHM,
    MIN_RSA_BITS,
    RSA_KEYGEN_BITS,
    JwsAlgorithm,
    algorithm_for_key,
    get_algorithm,
    pss_padding,
)
from dpop_signer.errors import (
    ConfigError,
    PinError,
    SignerUnavailableError,
    UnsupportedKeyError,
)
from dpop_signer.jwk import CRV_OF_CURVE, PublicJwk, der_to_raw_signature, public_jwk_of_key

__all__ = ["PemSigner", "generate_pem_key"]

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}
_ECDSA = {
    "ES256": _ECDSA_SHA256,
    "ES384": ec.ECDSA(hashes.SHA384()),
    "ES512": ec.ECDSA(hashes.SHA512()),
}

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class PemSigner:
    """Signs with an EC, Ed25519 or RSA private key loaded from a PEM file.

    >>> signer = PemSigner.from_file("dev-key.pem")  # doctest: +SKIP
    >>> len(signer.sign(b"header.claims"))  # doctest: +SKIP
    64
    """

    def __init__(self, key: PrivateKey, *, source: str = "PEM key", alg: str | None = None) -> None:
        """Wrap an already loaded key; prefer `from_file`.

        ``alg`` must fit the key if given; for an RSA key it picks PS256 (default) or RS256.
        """
        self._algorithm = _algorithm_of(key, source, alg)
        self._source = source
        # ES* keep their own ECDSA object and r/s width: ES256's `sign` is one call and one
        # conversion, as before there were other algorithms.
        self._ec_key = key if isinstance(key, ec.EllipticCurvePrivateKey) else None
        self._ecdsa = _ECDSA.get(self._algorithm.name, _ECDSA_SHA256)
        self._width = self._algorithm.coordinate_size
        self._other_key = None if self._ec_key is not None else key
        self._jwk = public_jwk_of_key(key.public_key())

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, pin: str | None = None, alg: str | None = None
    ) -> PemSigner:
        """Load a PEM private key; ``pin`` is the passphrase if it is encrypted.

        ``alg`` must fit the key if given (for RSA: ``PS256``, the default, or ``RS256``).

        Raises:
            SignerUnavailableError: the file is missing or unreadable.
            PinError: the key is encrypted and the passphrase is missing or wrong.
            UnsupportedKeyError: the file holds no supported private key (RSA under 2048 bits,
                secp256k1, public only, garbage), or ``alg`` does not fit it.
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
        return cls(_load_private_key(data, pin, where), source=where, alg=alg)

    @property
    def algorithm(self) -> str:
        """The JWS ``alg`` of the key: ES256, ES384, ES512, EdDSA, PS256 or RS256."""
        return self._algorithm.name

    @property
    def public_jwk(self) -> PublicJwk:
        """The public JWK (exactly the RFC 7638 members); a fresh copy, so ours stays intact."""
        return dict(self._jwk)  # type: ignore[return-value]

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``; return the JWS signature (ES256: 64 bytes r||s)."""
        key = self._ec_key
        if key is not None:
            # DER -> r||s happens here and nowhere else for this backend.
            return der_to_raw_signature(key.sign(message, self._ecdsa), self._width)
        return self._sign_other(message)

    def _sign_other(self, message: bytes) -> bytes:
        key = self._other_key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(message)  # RFC 8037 §3.1: PureEdDSA, no prehash
        assert isinstance(key, rsa.RSAPrivateKey)
        if self._algorithm.name == "PS256":
            return key.sign(message, pss_padding(), hashes.SHA256())
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())

    async def sign_async(self, message: bytes) -> bytes:
        """Sign inline: an in-memory signature (~25 µs for ES256) is cheaper than a thread hop."""
        return self.sign(message)

    def close(self) -> None:
        """Nothing to release; present so every signer can be closed the same way."""

    def __enter__(self) -> PemSigner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        member = self._jwk.get("x") or self._jwk.get("n") or ""
        return f"PemSigner({self._source!r}, {self.algorithm}, kid={str(member)[:8]}...)"


def _algorithm_of(key: object, source: str, alg: str | None) -> JwsAlgorithm:
    if alg is not None:
        get_algorithm(alg)  # an unknown name is refused with the list of known ones
    if isinstance(key, ec.EllipticCurvePrivateKey):
        crv = CRV_OF_CURVE.get(key.curve.name)
        if crv is None:
            raise UnsupportedKeyError(
                f"{source} is an EC {key.curve.name} key; use P-256 (ES256), P-384 (ES384) or "
                "P-521 (ES512)"
            )
        return _fitting("EC", crv, alg, source)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return _fitting("OKP", "Ed25519", alg, source)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise UnsupportedKeyError(
                f"{source} is an RSA key of {key.key_size} bits; PS256 and RS256 need "
                f"{MIN_RSA_BITS} bits or more"
            )
        return _fitting("RSA", None, alg, source)
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
    raise UnsupportedKeyError(
        f"{source} is a {kind} key; use EC P-256/P-384/P-521, Ed25519 or RSA of 2048 bits or more"
    )


def _fitting(kty: str, crv: str | None, alg: str | None, source: str) -> JwsAlgorithm:
    try:
        return algorithm_for_key(kty, crv, alg)
    except UnsupportedKeyError as exc:
        raise UnsupportedKeyError(f"{source}: {exc.message}") from None


def _load_private_key(data: bytes, pin: str | None, where: str) -> PrivateKey:
    if b"-----BEGIN" not in data:
        raise UnsupportedKeyError(f"{where} is not PEM; expected a private key in PEM")
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
            f"{where} holds no readable private key; expected PKCS#8, SEC1 or PKCS#1 PEM"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise UnsupportedKeyError(f"{where} uses an unsupported key algorithm") from exc
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise UnsupportedKeyError(
            f"{where} is a {kind} key; use EC P-256/P-384/P-521, Ed25519 or RSA of 2048 bits "
            "or more"
        )
    return key


def new_private_key(alg: str) -> PrivateKey:
    """A fresh in-memory private key for ``alg`` (RSA: `RSA_KEYGEN_BITS` bits, e = 65537)."""
    algorithm = get_algorithm(alg)
    if algorithm.kty == "EC":
        return ec.generate_private_key(_CURVES[algorithm.name])
    if algorithm.kty == "OKP":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEYGEN_BITS)


def generate_pem_key(
    path: str | os.PathLike[str], *, pin: str | None = None, alg: str = DEFAULT_ALGORITHM
) -> PemSigner:
    """Write a new key for ``alg`` to ``path`` (mode 0600, PKCS#8, encrypted when ``pin`` is given).

    ``alg`` is ES256 (P-256, the default), ES384 (P-384), ES512 (P-521), EdDSA (Ed25519), or
    PS256/RS256 (RSA, 2048 bits). The file does not record the algorithm: load an RS256 key
    with ``alg="RS256"``, or it signs PS256.

    Raises:
        UnsupportedKeyError: ``alg`` is not one of those.
        ConfigError: ``path`` exists already (a key is never overwritten) or its folder is
            missing.
    """
    where = f"PEM key file {os.fspath(path)!r}"
    key = new_private_key(alg)
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
    return PemSigner(key, source=where, alg=alg)
