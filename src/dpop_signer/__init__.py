"""dpop-signer: OAuth 2.0 DPoP (RFC 9449) with an ES256 key that never leaves its token.

>>> import httpx
>>> from dpop_signer import DPoPAuth, load_signer
>>> signer = load_signer("pkcs11:token=dpop-dev;object=dpop-es256")  # doctest: +SKIP
>>> auth = DPoPAuth(signer, token_url="https://as.example/token", client_id="svc")  # doctest: +SKIP
>>> httpx.get("https://api.example/v1/things", auth=auth)  # doctest: +SKIP

Names are imported lazily, so ``import dpop_signer`` costs little until a layer is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dpop_signer.errors import (
    ConfigError,
    DPoPSignerError,
    InvalidKeyError,
    InvalidTokenResponseError,
    KeyChangedError,
    KeyNotFoundError,
    OAuthError,
    PinError,
    ProofError,
    ServerFailedError,
    ServerUnreachableError,
    SignerError,
    SignerTimeoutError,
    SignerUnavailableError,
    SigningFailedError,
    TokenEndpointError,
    UnsupportedKeyError,
    UseDPoPNonceError,
    VerificationError,
)

if TYPE_CHECKING:
    from dpop_signer.auth import DPoPAuth
    from dpop_signer.jwk import jwk_thumbprint
    from dpop_signer.nonces import NonceCache
    from dpop_signer.proof import DPoPProofBuilder
    from dpop_signer.signers import Signer, generate_key, load_signer
    from dpop_signer.signers.pem import PemSigner
    from dpop_signer.signers.pkcs11 import Pkcs11Signer
    from dpop_signer.tokens import AccessToken, ClientCredentialsTokenSource
    from dpop_signer.verify import verify_proof

__version__ = "0.1.0"

_LAZY = {
    "AccessToken": "dpop_signer.tokens",
    "ClientCredentialsTokenSource": "dpop_signer.tokens",
    "DPoPAuth": "dpop_signer.auth",
    "DPoPProofBuilder": "dpop_signer.proof",
    "NonceCache": "dpop_signer.nonces",
    "PemSigner": "dpop_signer.signers.pem",
    "Pkcs11Signer": "dpop_signer.signers.pkcs11",
    "Signer": "dpop_signer.signers",
    "generate_key": "dpop_signer.signers",
    "jwk_thumbprint": "dpop_signer.jwk",
    "load_signer": "dpop_signer.signers",
    "verify_proof": "dpop_signer.verify",
}

__all__ = [
    "AccessToken",
    "ClientCredentialsTokenSource",
    "ConfigError",
    "DPoPAuth",
    "DPoPProofBuilder",
    "DPoPSignerError",
    "InvalidKeyError",
    "InvalidTokenResponseError",
    "KeyChangedError",
    "KeyNotFoundError",
    "NonceCache",
    "OAuthError",
    "PemSigner",
    "PinError",
    "Pkcs11Signer",
    "ProofError",
    "ServerFailedError",
    "ServerUnreachableError",
    "Signer",
    "SignerError",
    "SignerTimeoutError",
    "SignerUnavailableError",
    "SigningFailedError",
    "TokenEndpointError",
    "UnsupportedKeyError",
    "UseDPoPNonceError",
    "VerificationError",
    "__version__",
    "generate_key",
    "jwk_thumbprint",
    "load_signer",
    "verify_proof",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
