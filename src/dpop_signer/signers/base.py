"""The `Signer` protocol: the only thing above this layer knows about a key.

A signer holds (or reaches) one private key and turns a JWS signing input into that key's JWS
signature. The algorithm follows the key (`dpop_signer.algorithms`): ES256 for EC P-256 (the
default everywhere), ES384 for P-384, ES512 for P-521, EdDSA for Ed25519, and PS256 - or RS256
when asked for by name - for RSA. It never hands out key material: the layers above see the
``algorithm``, the public JWK and signatures, nothing else. Backends live next to this module
(`pem`, `pkcs11`).

Callers on an event loop use `sign_async`, which takes a backend's own async path when it has
one (a PKCS#11 module is reached through its worker thread) and otherwise runs ``sign`` in a
thread, so that a slow or network HSM never blocks the loop.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from dpop_signer.errors import SigningFailedError
from dpop_signer.jwk import SIGNATURE_SIZE, PublicJwk

__all__ = ["ALGORITHM", "AsyncSigner", "Signer", "check_signature", "close_signer", "sign_async"]

ALGORITHM = "ES256"
"""The default JWS algorithm: ECDSA P-256 with SHA-256 (RFC 7518 §3.4), what keys are made for."""


@runtime_checkable
class Signer(Protocol):
    """A key that signs but never shows its private half."""

    @property
    def algorithm(self) -> str:
        """The JWS ``alg`` the key signs with: ES256, ES384, ES512, EdDSA, PS256 or RS256."""
        ...

    @property
    def public_jwk(self) -> PublicJwk:
        """The public key as a JWK with exactly the members its RFC 7638 thumbprint hashes."""
        ...

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with `algorithm`; return the JWS signature (ES256: 64 bytes r||s)."""
        ...


@runtime_checkable
class AsyncSigner(Signer, Protocol):
    """A signer with its own non-blocking path."""

    async def sign_async(self, message: bytes) -> bytes:
        """Like `Signer.sign`, without blocking the event loop."""
        ...


async def sign_async(signer: Signer, message: bytes) -> bytes:
    """Sign without blocking the running event loop.

    Uses the signer's own ``sign_async`` when it has one; otherwise runs ``sign`` in the default
    executor, because an unknown signer may do I/O.
    """
    # getattr, not isinstance(signer, AsyncSigner): a runtime-checkable Protocol check costs
    # ~13 µs, half a PEM signature, on every proof.
    own = getattr(signer, "sign_async", None)
    if own is not None:
        result: bytes = await own(message)
        return result
    return await asyncio.get_running_loop().run_in_executor(None, signer.sign, message)


def close_signer(signer: Signer) -> None:
    """Release what ``signer`` holds (a PKCS#11 login, a session), if it holds anything.

    ``close`` is not part of the `Signer` protocol: a caller's own signer may have nothing to
    release.
    """
    close = getattr(signer, "close", None)
    if callable(close):
        close()


def check_signature(
    signature: bytes, *, source: str, size: int = SIGNATURE_SIZE, algorithm: str = ALGORITHM
) -> bytes:
    """Return ``signature`` if it is exactly ``size`` bytes, else raise `SigningFailedError`.

    ``size`` is the width of ``algorithm``'s signatures with the key: 64 for ES256 (the
    default), 96 for ES384, 132 for ES512, 64 for EdDSA, the modulus' length for PS256/RS256.
    A backend that returns DER, a truncated value or the wrong curve's width would otherwise
    produce proofs that every server rejects for reasons nobody can see.
    """
    if len(signature) != size:
        form = "r||s" if algorithm.startswith("ES") else "signature"
        raise SigningFailedError(
            f"{source} returned a {len(signature)}-byte signature, not the {size}-byte "
            f"{algorithm} {form}; check that the key and mechanism are those of {algorithm}"
        )
    return signature
