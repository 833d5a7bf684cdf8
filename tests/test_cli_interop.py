"""``dpop`` as a subprocess against panva's oidc-provider and a ``jose`` resource server.

Neither server shares code with dpop_signer. Every proof they received during a test is
re-checked with tests/oracle.py from the servers' own records.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests import oracle
from tests.cli_support import Result, assert_absent, assert_ok, assert_one_line_error, dpop
from tests.interop_fixtures import JoseResourceServer, OidcProvider
from tests.test_cli import jwk_of_pem
from tests.test_cli_servers import JWT_LIKE, doctor_lines

pytestmark = pytest.mark.interop


def env_for(provider: OidcProvider, rs: JoseResourceServer, key: str, **extra: str) -> dict:
    client_id, secret = provider.basic_client
    env = {
        "DPOP_KEY": key,
        "DPOP_TOKEN_URL": provider.token_url,
        "DPOP_CLIENT_ID": client_id,
        "DPOP_CLIENT_SECRET": secret,
        "DPOP_RESOURCE": rs.url,
        "DPOP_SCOPE": "api:read",
    }
    env.update(extra)
    return env


def recheck(provider: OidcProvider, rs: JoseResourceServer | None, jkt: str) -> list[str]:
    """Run the oracle over every proof both servers saw; return every secret value seen."""
    values: list[str] = []
    for entry in provider.requests():
        if entry["dpop"] is None:
            # Only `dpop doctor`'s reachability probe comes without a proof.
            assert entry["method"] == "GET", entry
            continue
        claims = json.loads(oracle._b64d(entry["dpop"].split(".")[1], "claims"))
        oracle.check_proof(
            entry["dpop"],
            htm=entry["method"],
            url=entry["url"],
            nonce=claims.get("nonce"),
            expected_jkt=jkt,
        )
        values += [entry["dpop"], entry.get("dpop_nonce") or ""]
    for entry in rs.seen() if rs is not None else []:
        nonce = None if entry["error"] == "use_dpop_nonce" else entry["required_nonce"]
        oracle.check_proof(
            entry["proof"],
            htm=entry["method"],
            url=entry["url"],
            access_token=entry["access_token"],
            nonce=nonce,
            expected_jkt=jkt,
        )
        values += [entry["proof"], entry["access_token"], entry.get("required_nonce") or ""]
    return values


def test_token_and_request_against_oidc_provider(
    oidc_provider: Callable[..., OidcProvider], jose_rs: JoseResourceServer, pem_key_path: str
) -> None:
    provider = oidc_provider(require_nonce=True)
    jose_rs.configure(require_nonce=True)
    jkt = oracle.thumbprint(jwk_of_pem(pem_key_path))
    env = env_for(provider, jose_rs, pem_key_path)

    token = json.loads(assert_ok(dpop("token", env=env)).out)
    assert token["token_type"] == "DPoP"
    claims = json.loads(oracle._b64d(token["access_token"].split(".")[1], "claims"))
    assert claims["cnf"]["jkt"] == jkt

    result = assert_ok(dpop("request", "-v", "-i", jose_rs.url + "things?page=1", env=env))
    assert result.out.startswith("HTTP/1.1 200")
    log = result.err
    assert "* token request (client_credentials): POST " + provider.token_url in log
    assert "use_dpop_nonce" in log
    assert not JWT_LIKE.search(log)
    seen = recheck(provider, jose_rs, jkt)
    assert_absent(result.both, [provider.basic_client[1], *seen])


def test_rejected_client_secret_at_oidc_provider(
    oidc_provider: Callable[..., OidcProvider], jose_rs: JoseResourceServer, pem_key_path: str
) -> None:
    provider = oidc_provider()
    env = env_for(provider, jose_rs, pem_key_path, DPOP_CLIENT_SECRET="definitely-wrong-1")
    result = dpop("token", env=env)
    assert_one_line_error(result, code=4, says="invalid_client")
    assert_absent(result.both, ["definitely-wrong-1", provider.basic_client[1]])
    recheck(provider, None, oracle.thumbprint(jwk_of_pem(pem_key_path)))


def test_client_secret_post_from_a_config_file(
    oidc_provider: Callable[..., OidcProvider],
    jose_rs: JoseResourceServer,
    pem_key_path: str,
    tmp_path,
) -> None:
    provider = oidc_provider()
    client_id, secret = provider.post_client
    (tmp_path / "secret").write_text(secret)
    cfg = tmp_path / "dpop.toml"
    cfg.write_text(
        f'key = "{pem_key_path}"\ntoken-url = "{provider.token_url}"\n'
        f'client-id = "{client_id}"\nclient-secret-file = "secret"\n'
        f'client-auth = "client_secret_post"\nresource = ["{jose_rs.url}"]\n'
    )
    result = assert_ok(dpop("request", "-v", jose_rs.url + "x", "--config", str(cfg)))
    assert json.loads(result.out)
    assert "client_secret=…" in result.err
    seen = recheck(provider, jose_rs, oracle.thumbprint(jwk_of_pem(pem_key_path)))
    assert_absent(result.both, [secret, *seen])


def test_doctor_against_oidc_provider(
    oidc_provider: Callable[..., OidcProvider], jose_rs: JoseResourceServer, pem_key_path: str
) -> None:
    provider = oidc_provider()
    result: Result = assert_ok(dpop("doctor", env=env_for(provider, jose_rs, pem_key_path)))
    steps = doctor_lines(result)
    assert steps["discovery advertises ES256"].startswith("✓")
    assert "openid-configuration" in steps["discovery advertises ES256"] or (
        "oauth-authorization-server" in steps["discovery advertises ES256"]
    )
    assert steps["DPoP token issued"].startswith("✓")
    assert steps["token bound to this key"].startswith("✓")
    recheck(provider, None, oracle.thumbprint(jwk_of_pem(pem_key_path)))


def test_proofs_from_dpop_proof_are_accepted_by_both_servers(
    oidc_provider: Callable[..., OidcProvider], jose_rs: JoseResourceServer, pem_key_path: str
) -> None:
    import httpx

    provider = oidc_provider()
    jkt = oracle.thumbprint(jwk_of_pem(pem_key_path))
    proof = assert_ok(dpop("proof", "--key", pem_key_path, "POST", provider.token_url)).out
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        response = http.post(
            provider.token_url,
            data={"grant_type": "client_credentials", "resource": jose_rs.url, "scope": "api:read"},
            auth=provider.basic_client,
            headers={"DPoP": proof.strip()},
        )
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        url = jose_rs.url + "items/1"
        api_proof = dpop(
            "proof", "--key", pem_key_path, "--access-token", "@-", "GET", url, stdin=token
        )
        api = http.get(
            url,
            headers={"Authorization": f"DPoP {token}", "DPoP": assert_ok(api_proof).out.strip()},
        )
        assert api.status_code == 200, api.text
    recheck(provider, jose_rs, jkt)
