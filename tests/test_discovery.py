"""Discovery (RFC 8414) and the issuer audience of private_key_jwt (draft-ietf-oauth-rfc7523bis).

Metadata misbehaviour comes from small stub servers on 127.0.0.1 (tests/cli_support.py); the
happy paths and the strict-audience server are the local AS (`start_local_servers`), whose
client-assertion check is `dpop_signer.verify.verify_client_assertion`. The CLI runs as a real
subprocess. Expected URLs and audiences are written out by hand.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from dpop_signer.config import build_auth, load_settings
from dpop_signer.discovery import (
    ServerMetadata,
    discover,
    fetch_metadata,
    forget_discovered,
    metadata_problems,
    metadata_urls,
)
from dpop_signer.errors import (
    ConfigError,
    OAuthError,
    ServerUnreachableError,
    TokenEndpointError,
    VerificationError,
)
from dpop_signer.signers.base import Signer
from dpop_signer.testing.servers import start_local_servers
from dpop_signer.tokens import ClientCredentialsTokenSource
from dpop_signer.verify import verify_client_assertion
from tests.cli_support import assert_ok, dpop, json_answer, stub_server, token_route
from tests.servers_fixtures import HandKey


@pytest.fixture(autouse=True)
def _fresh_discovery() -> Iterator[None]:
    forget_discovered()
    yield
    forget_discovered()


def _claims(jws: str) -> dict[str, Any]:
    part = jws.split(".")[1]
    value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(value, dict)
    return value


def _metadata(issuer: str, **extra: Any) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "dpop_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        **extra,
    }


# --- where metadata is looked for --------------------------------------------------------------


def test_metadata_urls_insert_the_well_known_path_before_the_issuer_path() -> None:
    assert metadata_urls("https://as.example") == [
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration",
    ]
    assert metadata_urls("https://as.example/") == [
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration",
    ]
    assert metadata_urls("https://as.example:8443/realms/a/") == [
        "https://as.example:8443/.well-known/oauth-authorization-server/realms/a",
        "https://as.example:8443/.well-known/openid-configuration/realms/a",
        "https://as.example:8443/realms/a/.well-known/openid-configuration",
    ]


@pytest.mark.parametrize(
    ("issuer", "says"),
    [
        ("http://as.example", "not https"),
        ("https://as.example/?tenant=1", "query or fragment"),
        ("https://as.example/#x", "query or fragment"),
        ("ftp://as.example", "http"),
    ],
)
def test_invalid_issuers_are_configuration_errors(issuer: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings({"issuer": issuer}, env={})


# --- fetching and checking ---------------------------------------------------------------------


def test_second_url_is_used_when_the_first_is_missing_and_the_result_is_cached() -> None:
    routes: dict[str, Any] = {}
    with stub_server(routes) as server:
        issuer = server.url + "/tenant"
        routes["/.well-known/openid-configuration/tenant"] = lambda _r: json_answer(
            200, _metadata(issuer)
        )
        first = discover(issuer, timeout=5)
        again = discover(issuer, timeout=5)
        paths = [r.path for r in server.received]
    assert first is again
    assert first.token_endpoint == issuer + "/token"
    assert first.url == server.url + "/.well-known/openid-configuration/tenant"
    assert first.dpop_signing_alg_values_supported == ("ES256",)
    # One fetch for two calls: the RFC 8414 URL (404), then the OpenID one.
    assert paths == [
        "/.well-known/oauth-authorization-server/tenant",
        "/.well-known/openid-configuration/tenant",
    ]


def test_a_document_naming_another_issuer_is_refused() -> None:
    routes: dict[str, Any] = {}
    with stub_server(routes) as server:
        routes["/.well-known/oauth-authorization-server"] = lambda _r: json_answer(
            200, _metadata("https://impostor.example")
        )
        with (
            httpx.Client(timeout=5) as client,
            pytest.raises(OAuthError, match="must match exactly") as info,
        ):
            fetch_metadata(server.url, client)
        # The OpenID URL is not tried after a mismatch: the server is not the one configured.
        assert [r.path for r in server.received] == ["/.well-known/oauth-authorization-server"]
    assert "impostor.example" in str(info.value)


def test_no_document_anywhere_names_every_url_tried() -> None:
    with (
        stub_server({}) as server,
        httpx.Client(timeout=5) as client,
        pytest.raises(ServerUnreachableError) as info,
    ):
        fetch_metadata(server.url, client)
    message = str(info.value)
    assert "/.well-known/oauth-authorization-server: HTTP 404" in message
    assert "/.well-known/openid-configuration: HTTP 404" in message
    assert "--token-url" in message


def test_a_redirect_is_not_followed() -> None:
    routes = {
        "/.well-known/oauth-authorization-server": lambda _r: (
            302,
            {"Location": "https://elsewhere.example/meta"},
            b"",
        )
    }
    with stub_server(routes) as server, httpx.Client(timeout=5) as client:
        with pytest.raises(
            OAuthError, match=r"redirects \(HTTP 302\) to https://elsewhere\.example"
        ):
            fetch_metadata(server.url, client)
        assert len(server.received) == 1


def test_malformed_lists_are_refused() -> None:
    routes: dict[str, Any] = {}
    with stub_server(routes) as server:
        routes["/.well-known/oauth-authorization-server"] = lambda _r: json_answer(
            200, _metadata(server.url, dpop_signing_alg_values_supported="ES256")
        )
        with httpx.Client(timeout=5) as client, pytest.raises(OAuthError, match="array"):
            fetch_metadata(server.url, client)


def test_metadata_problems_name_the_setting_that_fixes_them() -> None:
    metadata = ServerMetadata(
        issuer="https://as.example",
        token_endpoint="https://as.example/token",
        url="https://as.example/.well-known/oauth-authorization-server",
        dpop_signing_alg_values_supported=("PS256",),
        token_endpoint_auth_methods_supported=("private_key_jwt",),
        token_endpoint_auth_signing_alg_values_supported=("PS256",),
    )
    problems = dict(
        metadata_problems(
            metadata,
            dpop_algorithm="ES256",
            client_auth="client_secret_basic",
            assertion_algorithm="ES256",
        )
    )
    assert set(problems) == {"key", "client_auth"}  # the assertion check is for pkjwt only
    assert "ES256" in problems["key"]
    assert "PS256" in problems["key"]
    both = dict(
        metadata_problems(
            metadata,
            dpop_algorithm="PS256",
            client_auth="private_key_jwt",
            assertion_algorithm="ES256",
        )
    )
    assert set(both) == {"assertion_key"}
    # Lists that are not published are no problem.
    bare = ServerMetadata("https://as.example", "https://as.example/token", "u")
    assert metadata_problems(bare, dpop_algorithm="ES256", client_auth="none") == []


# --- settings: the token URL from discovery, and what does not fit -----------------------------


def test_build_auth_takes_the_token_endpoint_and_token_url_still_wins(pem_signer: Signer) -> None:
    with start_local_servers() as servers:
        base = {
            "issuer": servers.as_url,
            "client_id": servers.client_id,
            "client_secret": servers.client_secret,
        }
        auth = build_auth(load_settings(base, env={}), pem_signer)
        assert auth.token_source.token_url == servers.as_url + "/token"
        with httpx.Client(timeout=10) as client:
            assert auth.get_token(client).is_dpop
        given = load_settings({**base, "token_url": servers.as_url + "/other"}, env={})
        assert build_auth(given, pem_signer).token_source.token_url == servers.as_url + "/other"
        # The metadata was read once for both.
        assert servers.authorization_server.issued_tokens == 1


def test_a_key_whose_algorithm_is_not_offered_is_refused_before_any_request(
    pem_signer: Signer,
) -> None:
    routes: dict[str, Any] = {"/token": token_route()}
    with stub_server(routes) as server:
        routes["/.well-known/oauth-authorization-server"] = lambda _r: json_answer(
            200,
            _metadata(
                server.url,
                dpop_signing_alg_values_supported=["PS256", "EdDSA"],
                token_endpoint_auth_methods_supported=["client_secret_post"],
            ),
        )
        settings = load_settings(
            {"issuer": server.url, "client_id": "c", "client_secret": "s3cret-value"}, env={}
        )
        with pytest.raises(ConfigError) as info:
            build_auth(settings, pem_signer)
        assert server.requests_to("/token") == []
    message = str(info.value)
    assert f"the DPoP key signs {pem_signer.algorithm}" in message
    assert "PS256, EdDSA" in message
    assert "client_auth client_secret_basic is not offered" in message


# --- the assertion audience --------------------------------------------------------------------


def _pkjwt_form(source: ClientCredentialsTokenSource) -> dict[str, str]:
    request = source.build_request(proof="p.p.p", client_assertion=source.client_assertion(0))
    return dict(parse_qsl(request.content.decode("ascii")))


def test_assertion_aud_is_the_issuer_as_one_string(pem_signer: Signer) -> None:
    def source(**options: Any) -> ClientCredentialsTokenSource:
        return ClientCredentialsTokenSource(
            "https://as.example/oauth2/token",
            "svc",
            client_auth="private_key_jwt",
            assertion_signer=pem_signer,
            **options,
        )

    by_issuer = _claims(_pkjwt_form(source(issuer="https://as.example"))["client_assertion"])
    assert by_issuer["aud"] == "https://as.example"
    legacy = source(issuer="https://as.example", assertion_audience="token_endpoint")
    assert _claims(_pkjwt_form(legacy)["client_assertion"])["aud"] == (
        "https://as.example/oauth2/token"
    )
    # No issuer known: the token endpoint, as before.
    assert _claims(_pkjwt_form(source())["client_assertion"])["aud"] == (
        "https://as.example/oauth2/token"
    )
    with pytest.raises(ConfigError, match="assertion_audience"):
        source(assertion_audience="both")


def test_a_strict_server_accepts_the_issuer_and_refuses_the_token_endpoint(
    pem_signer: Signer,
) -> None:
    jwk = dict(pem_signer.public_jwk)
    with start_local_servers(client_secret=None, client_jwk=jwk) as servers:
        servers.authorization_server.assertion_audience = "issuer"
        base = {"client_id": servers.client_id, "client_auth": "private_key_jwt"}
        with httpx.Client(timeout=10) as client:
            ok = build_auth(load_settings({**base, "issuer": servers.as_url}, env={}), pem_signer)
            assert ok.get_token(client).is_dpop
            for options in (
                {"issuer": servers.as_url, "assertion_audience": "token_endpoint"},
                {"token_url": servers.token_url},  # no issuer known
            ):
                refused = build_auth(load_settings({**base, **options}, env={}), pem_signer)
                with pytest.raises(TokenEndpointError) as info:
                    refused.get_token(client)
                assert info.value.error == "invalid_client"
                assert "is not the issuer identifier" in str(info.value)
        # The default server still accepts the token endpoint (RFC 7523 §3 as published).
        servers.authorization_server.assertion_audience = "issuer_or_token_endpoint"
        legacy = build_auth(
            load_settings({**base, "token_url": servers.token_url}, env={}), pem_signer
        )
        with httpx.Client(timeout=10) as client:
            assert legacy.get_token(client).is_dpop


def test_verify_client_assertion_follows_rfc7523bis() -> None:
    key = HandKey()
    issuer, endpoint = "https://as.example", "https://as.example/token"

    def check(aud: object, **options: Any) -> dict[str, Any]:
        assertion = key.client_assertion("c1", "unused", aud=aud)
        return verify_client_assertion(assertion, client_id="c1", key=key.jwk, **options)

    assert check(issuer, issuer=issuer)["aud"] == issuer
    with pytest.raises(VerificationError, match="array") as info:
        check([issuer], issuer=issuer)
    assert info.value.error == "invalid_client"
    with pytest.raises(VerificationError, match="not the issuer identifier"):
        check(endpoint, issuer=issuer)
    with pytest.raises(VerificationError, match="not the issuer identifier"):
        check(issuer + "/", issuer=issuer)  # simple string comparison
    assert check(endpoint, issuer=issuer, token_endpoint=endpoint)["aud"] == endpoint
    # The RFC 7523 §3 form as first published: an array naming one of them.
    assert check([endpoint, "x"], audiences={endpoint})["aud"] == [endpoint, "x"]
    with pytest.raises(ValueError, match="issuer="):
        check(issuer, issuer=issuer, audiences={issuer})


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_token_and_doctor_with_only_the_issuer(pem_key_path: str) -> None:
    with start_local_servers() as servers:
        env = {
            "DPOP_KEY": pem_key_path,
            "DPOP_ISSUER": servers.as_url,
            "DPOP_CLIENT_ID": servers.client_id,
            "DPOP_CLIENT_SECRET": servers.client_secret,
        }
        token = assert_ok(dpop("token", env=env))
        assert json.loads(token.out)["token_type"].lower() == "dpop"
        doctor = assert_ok(dpop("doctor", env=env))
        config = assert_ok(dpop("config", "--assertion-audience", "token_endpoint", env=env))
    steps = {}
    for line in doctor.out.splitlines():
        mark, _, rest = line.partition(" ")
        step, _, detail = rest.partition(": ")
        steps[step] = (mark, detail)
    assert steps["issuer metadata"][0] == "✓"
    assert f"names issuer {servers.as_url}" in steps["issuer metadata"][1]
    assert f"token_endpoint {servers.as_url}/token is used" in steps["issuer metadata"][1]
    assert steps["discovery advertises ES256"][0] == "✓"
    assert steps["client authentication offered"] == (
        "✓",
        "token_endpoint_auth_methods_supported lists client_secret_basic",
    )
    assert steps["DPoP token issued"][0] == "✓"
    assert f'issuer = "{servers.as_url}"  # from DPOP_ISSUER' in config.out
    assert 'assertion_audience = "token_endpoint"  # from --assertion-audience' in config.out


def test_cli_doctor_shows_what_does_not_fit(pem_key_path: str) -> None:
    routes: dict[str, Any] = {"/token": token_route()}
    with stub_server(routes) as server:
        routes["/.well-known/oauth-authorization-server"] = lambda _r: json_answer(
            200,
            _metadata(
                server.url,
                dpop_signing_alg_values_supported=["PS256"],
                token_endpoint_auth_methods_supported=["private_key_jwt"],
            ),
        )
        result = dpop(
            "doctor",
            "--json",
            env={
                "DPOP_KEY": pem_key_path,
                "DPOP_ISSUER": server.url,
                "DPOP_CLIENT_ID": "c",
                "DPOP_CLIENT_SECRET": "a-client-secret",
            },
        )
        # Doctor's reachability probe is a GET; a token request would be a POST.
        token_requests = [r for r in server.requests_to("/token") if r.method == "POST"]
    assert result.code == 1, result.both
    steps = {s["step"]: s for s in json.loads(result.out)["steps"]}
    assert steps["discovery advertises ES256"]["status"] == "fail"
    assert "PS256" in steps["discovery advertises ES256"]["detail"]
    assert steps["client authentication offered"]["status"] == "fail"
    assert "client_secret_basic is not offered" in steps["client authentication offered"]["detail"]
    assert steps["DPoP token issued"]["status"] == "skip"
    assert token_requests == []
