"""``--profile fapi2``: the FAPI 2.0 client rules, checked before any request.

The authorization server is a TLS stub on 127.0.0.1 (a private CA made at test time, trusted
with ``--cacert``) serving RFC 8414 metadata and a token endpoint that records what it got; a
plain-http stub stands for the endpoints FAPI 2.0 refuses. ``dpop`` runs as a subprocess.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import pytest

from dpop_signer.config import load_settings
from dpop_signer.profiles import check_profile
from dpop_signer.signers.base import Signer
from tests.cli_support import (
    StubServer,
    TlsFiles,
    assert_ok,
    dpop,
    json_answer,
    make_tls_files,
    stub_server,
    token_route,
)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("fapi-tls"))


def _serve_metadata(server: StubServer, routes: dict[str, Any], **extra: Any) -> None:
    document = {
        "issuer": server.url,
        "token_endpoint": server.url + "/token",
        "dpop_signing_alg_values_supported": ["PS256", "ES256", "EdDSA"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["PS256", "ES256", "EdDSA"],
    }
    document.update(extra)
    document = {k: v for k, v in document.items() if v is not None}
    routes["/.well-known/oauth-authorization-server"] = lambda _r: json_answer(200, document)


@pytest.fixture
def fapi_server(tls_files: TlsFiles) -> Iterator[tuple[StubServer, dict[str, Any]]]:
    routes: dict[str, Any] = {"/token": token_route()}
    with stub_server(routes, tls=(tls_files.cert, tls_files.key)) as server:
        _serve_metadata(server, routes)
        yield server, routes


def _env(server: StubServer, key: str, tls: TlsFiles, **extra: str) -> dict[str, str]:
    return {
        "DPOP_KEY": key,
        "DPOP_ISSUER": server.url,
        "DPOP_CLIENT_ID": "fapi-client",
        "DPOP_CLIENT_AUTH": "private_key_jwt",
        "DPOP_CA_BUNDLE": str(tls.ca),
        "DPOP_PROFILE": "fapi2",
        **extra,
    }


def _claims(jws: str) -> dict[str, Any]:
    part = jws.split(".")[1]
    value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(value, dict)
    return value


def test_a_conforming_client_gets_its_token_with_the_issuer_as_aud(
    fapi_server: tuple[StubServer, dict[str, Any]], tls_files: TlsFiles, pem_key_path: str
) -> None:
    server, _ = fapi_server
    result = assert_ok(dpop("token", env=_env(server, pem_key_path, tls_files)))
    assert json.loads(result.out)["token_type"] == "DPoP"
    posts = [r for r in server.requests_to("/token") if r.method == "POST"]
    assert len(posts) == 1
    form = dict(parse_qsl(posts[0].body.decode("ascii")))
    assert _claims(form["client_assertion"])["aud"] == server.url
    assert "client_secret" not in form
    assert "authorization" not in posts[0].headers
    assert server.url.startswith("https://")


def test_every_broken_rule_is_named_with_its_setting_and_nothing_is_sent(
    pem_key_path: str, tls_files: TlsFiles
) -> None:
    with stub_server({"/token": token_route()}) as plain:
        result = dpop(
            "token",
            "--profile",
            "fapi2",
            "--accept-bearer",
            env={
                "DPOP_KEY": pem_key_path,
                "DPOP_TOKEN_URL": plain.url + "/token",
                "DPOP_CLIENT_ID": "c",
                "DPOP_CLIENT_SECRET": "a-client-secret",
            },
        )
        sent = plain.received
    assert result.code == 2, result.both
    line = result.err.strip()
    assert line.startswith("error: ")
    assert "\n" not in line
    for rule, setting in (
        ("sender-constrained tokens", "--refuse-bearer"),
        ("client authentication", "DPOP_CLIENT_AUTH"),
        ("assertion audience", "--issuer"),
        ("https endpoints", "--token-url"),
        ("metadata agrees", "DPOP_ISSUER"),
    ):
        assert f"profile fapi2 ({rule})" in line, rule
        start = line.index(f"profile fapi2 ({rule})")
        assert setting in line[start:], (rule, setting)
    assert "profile fapi2 (algorithms)" not in line  # an ES256 key is allowed
    assert "a-client-secret" not in result.both
    assert sent == []


def test_doctor_profile_shows_one_step_per_rule(
    fapi_server: tuple[StubServer, dict[str, Any]], tls_files: TlsFiles, pem_key_path: str
) -> None:
    server, routes = fapi_server
    good = assert_ok(dpop("doctor", "--json", env=_env(server, pem_key_path, tls_files)))
    steps = {s["step"]: s for s in json.loads(good.out)["steps"]}
    rules = [
        "fapi2 sender-constrained tokens",
        "fapi2 client authentication",
        "fapi2 assertion audience",
        "fapi2 algorithms",
        "fapi2 https endpoints",
        "fapi2 metadata agrees",
    ]
    assert [steps[r]["status"] for r in rules] == ["ok"] * len(rules)
    assert steps["fapi2 assertion audience"]["detail"] == f"aud is the issuer {server.url}"
    assert steps["assertion audience"]["status"] == "ok"
    assert steps["DPoP token issued"]["status"] == "ok"

    # The server stops saying it does DPoP: the metadata no longer agrees.
    _serve_metadata(server, routes, dpop_signing_alg_values_supported=None)
    bad = dpop("doctor", "--json", env=_env(server, pem_key_path, tls_files))
    assert bad.code == 1
    steps = {s["step"]: s for s in json.loads(bad.out)["steps"]}
    assert steps["fapi2 metadata agrees"]["status"] == "fail"
    assert "dpop_signing_alg_values_supported" in steps["fapi2 metadata agrees"]["detail"]
    assert steps["DPoP token issued"]["status"] == "skip"


def test_a_token_url_that_disagrees_with_the_metadata_fails_the_profile(
    fapi_server: tuple[StubServer, dict[str, Any]], tls_files: TlsFiles, pem_key_path: str
) -> None:
    server, _ = fapi_server
    env = _env(server, pem_key_path, tls_files, DPOP_TOKEN_URL=server.url + "/elsewhere")
    result = dpop("token", env=env)
    assert result.code == 2, result.both
    assert "profile fapi2 (metadata agrees)" in result.err
    assert "is not the issuer's token_endpoint" in result.err
    assert [r for r in server.received if r.method == "POST"] == []


def test_commands_that_only_sign_check_the_key_rule(pem_key_path: str, pem_signer: Signer) -> None:
    result = assert_ok(dpop("jwk", "--profile", "fapi2", env={"DPOP_KEY": pem_key_path}))
    assert json.loads(result.out)["kty"] == "EC"
    settings = load_settings({"key": pem_key_path, "profile": "fapi2"}, env={})
    results = check_profile(settings, signer=pem_signer, client=False)
    assert [(r.rule, r.status) for r in results] == [("algorithms", "ok")]
    assert check_profile(load_settings({}, env={}), signer=pem_signer) == []


def test_profile_names_are_checked(pem_key_path: str) -> None:
    result = dpop("jwk", env={"DPOP_KEY": pem_key_path, "DPOP_PROFILE": "fapi1"})
    assert result.code == 2
    assert "profile from DPOP_PROFILE: must be 'fapi2'" in result.err
