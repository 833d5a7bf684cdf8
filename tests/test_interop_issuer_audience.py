"""private_key_jwt with an HSM-held key against oidc-provider, found through its issuer.

The client is configured the way a deployment would be (`load_settings` + `build_auth`): only
the issuer is given; the token endpoint comes from oidc-provider's metadata (it serves only
``/.well-known/openid-configuration``, so the RFC 8414 URL is tried first and the OpenID one
found second), and the client assertion's ``aud`` is the issuer as one string
(draft-ietf-oauth-rfc7523bis). The assertion key lives in SoftHSM2. What the client sent is
read back from its own request log and checked here, independently of dpop_signer's code;
oidc-provider and the ``jose`` resource server decide whether it is accepted.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from dpop_signer.config import build_auth, load_settings
from dpop_signer.discovery import forget_discovered
from dpop_signer.signers.base import Signer
from tests.interop_fixtures import JoseResourceServer, OidcProvider
from tests.oracle import thumbprint

pytestmark = pytest.mark.interop

ProviderFactory = Callable[..., OidcProvider]


@pytest.fixture(scope="module")
def hsm_signer(pkcs11_key_uri: str) -> Iterator[Signer]:
    from dpop_signer import load_signer
    from dpop_signer.signers.base import close_signer

    signer = load_signer(pkcs11_key_uri)
    yield signer
    close_signer(signer)


@pytest.fixture(autouse=True)
def _fresh_discovery() -> Iterator[None]:
    forget_discovered()
    yield
    forget_discovered()


def _assertion_claims(request: httpx.Request) -> dict[str, Any]:
    form = dict(parse_qsl(request.content.decode("ascii")))
    parts = form["client_assertion"].split(".")
    assert len(parts) == 3
    claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    assert isinstance(claims, dict)
    return claims


@pytest.mark.parametrize("assertion_audience", ["issuer", "token_endpoint"])
def test_hsm_private_key_jwt_through_discovery(
    oidc_provider: ProviderFactory,
    jose_rs: JoseResourceServer,
    hsm_signer: Signer,
    pkcs11_key_uri: str,
    assertion_audience: str,
) -> None:
    provider = oidc_provider()
    registered = provider.register_client(
        jwk=dict(hsm_signer.public_jwk), auth_method="private_key_jwt"
    )
    settings = load_settings(
        {
            "key": pkcs11_key_uri,
            "issuer": provider.issuer,
            "client_id": registered["client_id"],
            "client_auth": "private_key_jwt",
            "assertion_audience": assertion_audience,
            "resource": [jose_rs.url],
            "scope": "api:read",
        },
        env={},
    )
    sent: list[httpx.Request] = []
    auth = build_auth(settings, hsm_signer)
    # The token endpoint was not given: it came from the issuer's metadata.
    assert auth.token_source.token_url == provider.token_url
    with httpx.Client(
        auth=auth, event_hooks={"request": [sent.append]}, trust_env=False, timeout=10.0
    ) as http:
        response = http.get(jose_rs.url + "issuer-aud")
    assert response.status_code == 200, response.text
    assert response.json()["client_id"] == registered["client_id"]
    assert response.json()["jkt"] == thumbprint(dict(hsm_signer.public_jwk))

    token_requests = [r for r in sent if str(r.url) == provider.token_url]
    assert len(token_requests) == 1
    claims = _assertion_claims(token_requests[0])
    expected = provider.issuer if assertion_audience == "issuer" else provider.token_url
    # One JSON string, not an array (draft-ietf-oauth-rfc7523bis).
    assert claims["aud"] == expected
    assert isinstance(claims["aud"], str)
    assert claims["iss"] == claims["sub"] == registered["client_id"]
    # oidc-provider answered 200 to exactly this request.
    assert [(e["status"], e["error"]) for e in provider.requests()] == [(200, None)]


def test_an_issuer_that_differs_from_the_servers_by_a_slash_is_refused_before_any_request(
    oidc_provider: ProviderFactory, hsm_signer: Signer, pkcs11_key_uri: str
) -> None:
    from dpop_signer.errors import OAuthError

    provider = oidc_provider()
    assert not provider.issuer.endswith("/")
    settings = load_settings(
        {
            "key": pkcs11_key_uri,
            "issuer": provider.issuer + "/",
            "client_id": "anyone",
            "client_auth": "private_key_jwt",
        },
        env={},
    )
    with pytest.raises(OAuthError, match=r"must match exactly \(RFC 8414 §3.3\)") as info:
        build_auth(settings, hsm_signer)
    assert f"names issuer {json.dumps(provider.issuer)}" in str(info.value)
    assert provider.requests() == []  # no token request was sent
