"""The public surface that outside checks call (docs/architecture.md, "Contracts"): pinned by hand.

Adding a public name is a decision; removing or renaming one breaks callers. Either must show
up here as a deliberate edit, as httpx pins its own ``__all__``.
"""

from __future__ import annotations

import inspect

import httpx
import pytest

import dpop_signer
from dpop_signer.signers.base import close_signer

# The names the contract promises importable from dpop_signer, plus the rest of the error tree.
CONTRACT = {
    "Signer",
    "PemSigner",
    "Pkcs11Signer",
    "load_signer",
    "generate_key",
    "jwk_thumbprint",
    "DPoPProofBuilder",
    "DPoPAuth",
    "DPoPSignerError",
}
EXPORTED = CONTRACT | {
    "AccessToken",
    "ClientCredentialsTokenSource",
    "ConfigError",
    "InvalidKeyError",
    "InvalidTokenResponseError",
    "KeyChangedError",
    "KeyNotFoundError",
    "NonceCache",
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
    "__version__",
    "verify_proof",
}


def test_all_is_exactly_the_pinned_surface() -> None:
    assert set(dpop_signer.__all__) == EXPORTED
    assert len(dpop_signer.__all__) == len(set(dpop_signer.__all__))


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(dpop_signer, name) is not None


def test_every_deliberate_error_derives_from_the_base() -> None:
    errors = [getattr(dpop_signer, n) for n in EXPORTED if n.endswith("Error")]
    assert len(errors) == 19
    for error in errors:
        assert issubclass(error, dpop_signer.DPoPSignerError), error


def test_call_signatures_match_the_contract() -> None:
    load = inspect.signature(dpop_signer.load_signer).parameters
    assert list(load) == ["ref", "pin", "sign_timeout", "alg"]
    assert load["pin"].kind is inspect.Parameter.KEYWORD_ONLY
    assert load["sign_timeout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert load["sign_timeout"].default == 5.0
    generate = inspect.signature(dpop_signer.generate_key).parameters
    assert list(generate) == ["ref", "pin", "alg"]
    build = inspect.signature(dpop_signer.DPoPProofBuilder.build).parameters
    assert list(build)[:3] == ["self", "htm", "htu"]
    assert build["access_token"].kind is inspect.Parameter.KEYWORD_ONLY
    assert build["nonce"].kind is inspect.Parameter.KEYWORD_ONLY
    auth = inspect.signature(dpop_signer.DPoPAuth).parameters
    for name in ("token_url", "client_id", "client_secret", "scope"):
        assert auth[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert issubclass(dpop_signer.DPoPAuth, httpx.Auth)


def test_both_backends_satisfy_the_signer_protocol(pem_key_path: str, pkcs11_key_uri: str) -> None:
    for ref in (pem_key_path, pkcs11_key_uri):
        signer = dpop_signer.load_signer(ref)
        try:
            assert isinstance(signer, dpop_signer.Signer)
            assert signer.algorithm == "ES256"
            assert set(signer.public_jwk) == {"kty", "crv", "x", "y"}
            assert len(signer.sign(b"header.claims")) == 64
        finally:
            close_signer(signer)


def test_the_package_ships_its_type_information() -> None:
    from importlib.resources import files

    assert files("dpop_signer").joinpath("py.typed").is_file()
