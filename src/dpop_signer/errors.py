"""The one exception tree of dpop-signer.

Every error the package raises on purpose derives from `DPoPSignerError`, so a caller (or the
CLI, which prints ``str(exc)`` on one line) needs a single ``except``. Third-party exceptions
(python-pkcs11, cryptography, pydantic) are wrapped at the boundary where they occur and chained
with ``from``; they never reach the caller bare.

```
DPoPSignerError
├── ConfigError                 invalid, missing or contradictory settings
├── InvalidKeyError             a JWK or public key that is no usable EC/OKP/RSA key
├── SignerError                 anything the key backend does wrong
│   ├── SignerUnavailableError  module will not load, token absent, device or session lost
│   │   ├── KeyChangedError     the token now holds a different key under the same name
│   │   └── SignerTimeoutError  the module did not answer within the signing deadline
│   ├── KeyNotFoundError        no key, or more than one key, matches the reference
│   ├── UnsupportedKeyError     a key no supported algorithm fits (secp256k1, RSA-1024, public only)
│   ├── PinError                wrong, locked or missing PIN or passphrase; never retried
│   └── SigningFailedError      the backend failed to sign or returned a malformed signature
├── ProofError                  invalid input for a DPoP proof (method, URL, token)
├── VerificationError           a DPoP proof or access token fails an RFC 9449 check
└── OAuthError                  an authorization or resource server misbehaved or refused us
    ├── TokenEndpointError      RFC 6749 §5.2 error response (.error, .error_description, .status)
    ├── InvalidTokenResponseError  unparseable §5.1 response, or a token_type we did not ask for
    ├── UseDPoPNonceError       a nonce demand we cannot meet (none sent, same one repeated)
    ├── ServerFailedError       the server answered HTTP 5xx without an OAuth error: it is failing
    └── ServerUnreachableError  connection refused, timed out, or the wrong kind of server
```

A bug in dpop-signer itself (an internal invariant that does not hold) is a `RuntimeError`, never
one of these: these say what is wrong with the world, not with the code.

An `OAuthError` from a token request carries ``retry_after``: when the next one is sent.

Messages are one line, name what was involved (module, token, key, URL) and say how to fix it.
They never contain a PIN, passphrase, client secret, access token, nonce or whole proof.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DPoPSignerError",
    "InvalidKeyError",
    "InvalidTokenResponseError",
    "KeyChangedError",
    "KeyNotFoundError",
    "OAuthError",
    "PinError",
    "ProofError",
    "ServerFailedError",
    "ServerUnreachableError",
    "SignerError",
    "SignerTimeoutError",
    "SignerUnavailableError",
    "SigningFailedError",
    "TokenEndpointError",
    "UnsupportedKeyError",
    "UseDPoPNonceError",
    "VerificationError",
]


class DPoPSignerError(Exception):
    """Base of every error dpop-signer raises on purpose.

    The message is folded onto one line, because the CLI prints it as the whole diagnosis.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        """The one-line message."""
        return str(self.args[0])


class ConfigError(DPoPSignerError):
    """Raised when settings are invalid, missing or contradict each other."""


class InvalidKeyError(DPoPSignerError, ValueError):
    """Raised when a JWK or public key is not a usable EC, OKP or RSA key (RFC 7517, 7518, 8037).

    Also a `ValueError`, as `jwk_thumbprint` and the JWK helpers raised before it existed.
    """


class SignerError(DPoPSignerError):
    """Raised when the key backend cannot do what was asked."""


class SignerUnavailableError(SignerError):
    """Raised when the PKCS#11 module, the token or the device cannot be reached."""


class KeyChangedError(SignerUnavailableError):
    """Raised when a key found again is not the key the signer was opened with.

    Proofs carry the public JWK read at open; a key swapped under the same label or id would
    sign proofs that verify against nothing, so the signer refuses until it is opened (or
    rotated) explicitly.
    """


class SignerTimeoutError(SignerUnavailableError):
    """Raised when the module does not answer within the signing deadline (``sign_timeout``).

    The stuck call finishes in its own thread; the signer answers again once it returns.
    """


class KeyNotFoundError(SignerError):
    """Raised when no key, or more than one key, matches the reference."""


class UnsupportedKeyError(SignerError):
    """Raised when the key is not an EC P-256 private key usable for ES256."""


class PinError(SignerError):
    """Raised when the PIN or passphrase is wrong, locked or missing. Never retried."""


class SigningFailedError(SignerError):
    """Raised when the backend fails to sign or returns a malformed signature."""


class ProofError(DPoPSignerError, ValueError):
    """Raised when the input for a DPoP proof is invalid (method, URL, access token)."""


class VerificationError(DPoPSignerError):
    """Raised when a DPoP proof or DPoP-bound access token fails a check (RFC 9449 §4.3).

    ``error`` is the OAuth error code a server would answer with (``invalid_dpop_proof``,
    ``use_dpop_nonce`` or ``invalid_token``).
    """

    def __init__(self, message: str, *, error: str = "invalid_dpop_proof") -> None:
        super().__init__(message)
        self.error = error


class OAuthError(DPoPSignerError):
    """Raised when an authorization or resource server misbehaves or refuses the request.

    ``retry_after``: for a failed token request, seconds until `dpop_signer.DPoPAuth` sends the
    next one (its backoff, or the server's ``Retry-After`` if longer); ``None`` otherwise.
    """

    retry_after: float | None = None


class TokenEndpointError(OAuthError):
    """Raised when the token endpoint answers with an RFC 6749 §5.2 error response."""

    def __init__(
        self,
        message: str,
        *,
        error: str,
        error_description: str | None = None,
        status: int,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.error_description = error_description
        self.status = status


class InvalidTokenResponseError(OAuthError):
    """Raised when a token response is malformed or carries a token type we did not ask for."""


class UseDPoPNonceError(OAuthError):
    """Raised when a server demands a DPoP nonce that cannot be met (RFC 9449 §8, §9)."""


class ServerUnreachableError(OAuthError):
    """Raised when a server cannot be reached, times out, or is not the server expected."""


class ServerFailedError(OAuthError):
    """Raised when a server answers HTTP 5xx without an OAuth error: it is failing, not refusing.

    Worth trying again later (the token fetch backs off); the CLI exits with the network status.
    """
