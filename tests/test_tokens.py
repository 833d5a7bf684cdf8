"""ClientCredentialsTokenSource: request building and RFC 6749 §5.1/§5.2 parsing, no I/O."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from dpop_signer.errors import (
    ConfigError,
    InvalidTokenResponseError,
    ServerFailedError,
    TokenEndpointError,
)
from dpop_signer.signers.base import Signer
from dpop_signer.tokens import CLIENT_ASSERTION_TYPE, AccessToken, ClientCredentialsTokenSource
from tests import oracle

URL = "https://as.example/oauth/token"
SECRET = "s3cr3t:%+/é"
PROOF = "h.c.s"  # build_request treats the proof as opaque


def _source(**kwargs: Any) -> ClientCredentialsTokenSource:
    kwargs.setdefault("client_secret", SECRET)
    return ClientCredentialsTokenSource(URL, "svc client", **kwargs)


def _form(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode("ascii"), keep_blank_values=True)


def _response(status: int, **kwargs: Any) -> httpx.Response:
    response = httpx.Response(status, **kwargs)
    response.read()
    return response


def _b64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


# -- request building --------------------------------------------------------------------------


def test_client_secret_basic_form_urlencodes_id_and_secret_first() -> None:
    request = _source().build_request(proof=PROOF)
    assert request.method == "POST"
    assert request.url == URL
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    # RFC 6749 §2.3.1 by hand: space -> "+", ":" -> %3A, "%" -> %25, "+" -> %2B, "/" -> %2F,
    # "é" -> UTF-8 %C3%A9.
    assert base64.b64decode(encoded).decode("ascii") == "svc+client:s3cr3t%3A%25%2B%2F%C3%A9"
    assert _form(request) == {"grant_type": ["client_credentials"]}
    assert request.headers["dpop"] == PROOF
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["accept"] == "application/json"


def test_client_secret_post_puts_credentials_in_the_body() -> None:
    request = _source(client_auth="client_secret_post").build_request(proof=PROOF)
    assert "authorization" not in request.headers
    assert _form(request) == {
        "grant_type": ["client_credentials"],
        "client_id": ["svc client"],
        "client_secret": [SECRET],
    }


def test_public_client_sends_only_its_id() -> None:
    request = ClientCredentialsTokenSource(URL, "pub", client_auth="none").build_request(
        proof=PROOF
    )
    assert "authorization" not in request.headers
    assert _form(request) == {"grant_type": ["client_credentials"], "client_id": ["pub"]}


def test_scope_resources_and_audience() -> None:
    source = _source(
        scope="read write",
        resource=["https://api.example/a", "https://api.example/b"],
        audience="urn:api",
    )
    form = _form(source.build_request(proof=PROOF))
    assert form["scope"] == ["read write"]
    assert form["resource"] == ["https://api.example/a", "https://api.example/b"]
    assert form["audience"] == ["urn:api"]
    single = _form(_source(resource="https://api.example/").build_request(proof=PROOF))
    assert single["resource"] == ["https://api.example/"]


def test_private_key_jwt_assertion_is_rfc_7523_and_fresh_each_time(pem_signer: Signer) -> None:
    source = ClientCredentialsTokenSource(
        URL, "svc", client_auth="private_key_jwt", assertion_signer=pem_signer
    )
    first = source.client_assertion(1_700_000_000.7)
    second = source.client_assertion(1_700_000_000.7)
    h64, c64, s64 = first.split(".")
    oracle.verify_es256(
        dict(pem_signer.public_jwk),
        f"{h64}.{c64}".encode(),
        base64.urlsafe_b64decode(s64 + "=="),
    )
    assert _b64json(h64) == {"alg": "ES256", "typ": "JWT"}
    claims = _b64json(c64)
    assert {k: claims[k] for k in ("iss", "sub", "aud", "iat", "exp")} == {
        "iss": "svc",
        "sub": "svc",
        "aud": URL,
        "iat": 1_700_000_000,
        "exp": 1_700_000_060,
    }
    assert len(claims["jti"]) >= 16
    assert claims["jti"] != _b64json(second.split(".")[1])["jti"]
    form = _form(source.build_request(proof=PROOF, client_assertion=first))
    assert form["client_assertion_type"] == [CLIENT_ASSERTION_TYPE]
    assert form["client_assertion"] == [first]
    assert form["client_id"] == ["svc"]


def test_assertion_goes_with_private_key_jwt_only(pem_signer: Signer) -> None:
    with pytest.raises(ConfigError):
        _source().build_request(proof=PROOF, client_assertion="a.b.c")
    source = ClientCredentialsTokenSource(
        URL, "svc", client_auth="private_key_jwt", assertion_signer=pem_signer
    )
    with pytest.raises(ConfigError):
        source.build_request(proof=PROOF)
    with pytest.raises(ConfigError):
        _source().assertion_signing_input(0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"client_auth": "client_secret_jwt"}, "client_auth"),
        ({"client_secret": None}, "client secret"),
        ({"client_secret": ""}, "client secret"),
        ({"client_auth": "none"}, "does not use one"),
        ({"client_auth": "private_key_jwt", "client_secret": None}, "assertion_signer"),
        ({"resource": "not-a-uri"}, "RFC 8707"),
        ({"resource": ["https://api.example/#frag"]}, "RFC 8707"),
        ({"assertion_lifetime": 0}, "assertion_lifetime"),
    ],
)
def test_contradictory_settings_are_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        _source(**kwargs)
    assert SECRET not in str(info.value)


def test_assertion_signer_without_private_key_jwt_is_refused(pem_signer: Signer) -> None:
    with pytest.raises(ConfigError, match="private_key_jwt"):
        _source(assertion_signer=pem_signer)


@pytest.mark.parametrize("url", ["ftp://as.example/token", "/token", ""])
def test_token_url_must_be_http(url: str) -> None:
    with pytest.raises(ConfigError, match="token URL"):
        ClientCredentialsTokenSource(url, "svc", client_secret="x")


def test_missing_client_id() -> None:
    with pytest.raises(ConfigError, match="client_id"):
        ClientCredentialsTokenSource(URL, "", client_secret="x")


def test_repr_hides_the_secret() -> None:
    text = repr(_source())
    assert SECRET not in text
    assert "svc client" in text


# -- response parsing --------------------------------------------------------------------------


def test_success_response_becomes_an_access_token() -> None:
    body = {"access_token": "tok.en~+/==", "token_type": "DPoP", "expires_in": 300, "scope": "r"}
    token = _source().parse(_response(200, json=body), now=1000.0)
    assert token == AccessToken("tok.en~+/==", "DPoP", 1300.0, "r")
    assert token.raw == body
    assert token.is_dpop
    assert token.scheme == "DPoP"
    assert token.expires_in(1100.0) == 200.0
    assert "tok.en" not in repr(token)
    assert "tok.en" not in str(token)


@pytest.mark.parametrize("token_type", ["DPoP", "dpop", "DPOP", "dPoP"])
def test_token_type_is_case_insensitive(token_type: str) -> None:
    body = {"access_token": "t", "token_type": token_type}
    token = _source().parse(_response(200, json=body), now=0.0)
    assert token.is_dpop
    assert token.scheme == "DPoP"
    assert token.expires_at is None


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER"])
def test_bearer_is_refused_unless_opted_in(token_type: str) -> None:
    body = {"access_token": "secret-token-value", "token_type": token_type, "expires_in": 60}
    with pytest.raises(InvalidTokenResponseError, match="accept_bearer=True") as info:
        _source().parse(_response(200, json=body), now=0.0)
    assert "secret-token-value" not in str(info.value)
    token = _source(accept_bearer=True).parse(_response(200, json=body), now=0.0)
    assert not token.is_dpop
    assert token.scheme == "Bearer"


def test_unknown_token_type_is_refused_even_with_opt_in() -> None:
    body = {"access_token": "t", "token_type": "mac"}
    with pytest.raises(InvalidTokenResponseError, match="'mac'"):
        _source(accept_bearer=True).parse(_response(200, json=body), now=0.0)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"token_type": "DPoP"}, "no access_token"),
        ({"access_token": "", "token_type": "DPoP"}, "no access_token"),
        ({"access_token": 42, "token_type": "DPoP"}, "no access_token"),
        ({"access_token": "has space", "token_type": "DPoP"}, "token68"),
        ({"access_token": "t"}, "no token_type"),
        ({"access_token": "t", "token_type": "DPoP", "expires_in": "soon"}, "expires_in"),
        ({"access_token": "t", "token_type": "DPoP", "expires_in": -5}, "expires_in"),
        ({"access_token": "t", "token_type": "DPoP", "expires_in": True}, "expires_in"),
    ],
)
def test_malformed_success_responses(body: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidTokenResponseError, match=match) as info:
        _source().parse(_response(200, json=body), now=0.0)
    assert "has space" not in str(info.value)


def test_expires_in_as_a_digit_string_is_tolerated() -> None:
    body = {"access_token": "t", "token_type": "DPoP", "expires_in": "120"}
    assert _source().parse(_response(200, json=body), now=10.0).expires_at == 130.0


def test_error_response_carries_error_description_and_status() -> None:
    body = {"error": "invalid_client", "error_description": f"bad secret {SECRET}\n(again)"}
    with pytest.raises(TokenEndpointError) as info:
        _source().parse(_response(401, json=body), now=0.0)
    exc = info.value
    assert (exc.error, exc.status) == ("invalid_client", 401)
    assert exc.error_description == "bad secret *** (again)"
    message = str(exc)
    assert SECRET not in message
    assert "401" in message
    assert "invalid_client" in message
    assert "client secret" in message  # the hint
    assert "\n" not in message


def test_use_dpop_nonce_is_a_token_endpoint_error() -> None:
    response = _response(400, json={"error": "use_dpop_nonce"}, headers={"DPoP-Nonce": "n"})
    with pytest.raises(TokenEndpointError) as info:
        _source().parse(response, now=0.0)
    assert info.value.error == "use_dpop_nonce"


def test_server_error_without_oauth_body_is_a_server_failure_with_status_and_type() -> None:
    response = _response(500, text=f"Traceback ... secret={SECRET}")
    with pytest.raises(ServerFailedError) as info:
        _source().parse(response, now=0.0)
    message = str(info.value)
    assert "HTTP 500" in message
    assert "text/plain" in message
    assert "Traceback" not in message
    assert SECRET not in message


def test_server_error_with_oauth_body_is_a_token_endpoint_error() -> None:
    with pytest.raises(TokenEndpointError) as info:
        _source().parse(_response(503, json={"error": "temporarily_unavailable"}), now=0.0)
    assert info.value.status == 503


def test_html_page_is_not_a_token_response() -> None:
    response = _response(200, html=f"<html><body>Sign in {SECRET}</body></html>")
    with pytest.raises(InvalidTokenResponseError) as info:
        _source().parse(response, now=0.0)
    message = str(info.value)
    assert "text/html" in message
    assert "HTTP 200" in message
    assert "Sign in" not in message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("status", "kwargs", "match"),
    [
        (200, {"json": ["a", "list"]}, "not a JSON object"),
        (200, {"content": b""}, "no content type"),
        (302, {"headers": {"Location": "https://login.example/?state=SECRET"}}, "redirecting"),
        (404, {"text": "not found"}, "HTTP 404"),
        (400, {"json": {"no": "error member"}}, "HTTP 400"),
    ],
)
def test_other_unusable_responses(status: int, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidTokenResponseError, match=match) as info:
        _source().parse(_response(status, **kwargs), now=0.0)
    assert "SECRET" not in str(info.value)
