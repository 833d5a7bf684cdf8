"""``dpop token``, ``request``, ``doctor`` and ``demo`` as subprocesses against the local servers.

The servers run in this test process (`start_local_servers` via the ``local_servers*``
fixtures), so every proof the CLI sends is recorded there and re-checked by the independent
oracle (the autouse ``oracle_check`` fixture of tests/servers_fixtures.py), and the tests know
every real secret value (client secret, tokens, proofs, nonces) to assert that none leaks.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket

import pytest

from dpop_signer import __version__
from dpop_signer.testing.servers import DEMO_CLIENT_SECRET, LocalServers
from tests import oracle
from tests.cli_support import Result, assert_absent, assert_ok, assert_one_line_error, dpop
from tests.test_cli import jwk_of_pem, run_on_terminal

JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{16,}\.")


def env_for(servers: LocalServers, key: str, **extra: str | None) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "DPOP_KEY": key,
        "DPOP_TOKEN_URL": servers.token_url,
        "DPOP_CLIENT_ID": servers.client_id,
        "DPOP_CLIENT_SECRET": DEMO_CLIENT_SECRET,
    }
    env.update(extra)
    return env


def secrets_seen(servers: LocalServers) -> list[str | None]:
    values: list[str | None] = [DEMO_CLIENT_SECRET]
    for seen in servers.seen():
        values += [seen.proof, seen.access_token, seen.nonce]
    return values


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def claims_of(jwt: str) -> dict:
    return json.loads(oracle._b64d(jwt.split(".")[1], "claims"))


# --- token ---------------------------------------------------------------------------------


def test_token_from_environment(local_servers, pem_key_path):
    result = assert_ok(dpop("token", env=env_for(local_servers, pem_key_path)))
    response = json.loads(result.out)
    assert response["token_type"] == "DPoP"
    assert claims_of(response["access_token"])["cnf"]["jkt"] == oracle.thumbprint(
        jwk_of_pem(pem_key_path)
    )
    assert local_servers.authorization_server.token_requests == 1
    assert result.err == ""


def test_token_from_options_with_secret_file_and_post_auth(
    local_servers_factory, pem_key_path, tmp_path
):
    servers = local_servers_factory(require_nonce=True)
    secret = tmp_path / "secret"
    secret.write_text(DEMO_CLIENT_SECRET + "\n")
    result = dpop(
        "token",
        "--key",
        pem_key_path,
        "--token-url",
        servers.token_url,
        "--client-id",
        servers.client_id,
        "--client-secret-file",
        str(secret),
        "--client-auth",
        "client_secret_post",
        "--timeout",
        "5",
        "--leeway",
        "10",
    )
    assert json.loads(assert_ok(result).out)["token_type"] == "DPoP"
    assert servers.authorization_server.last_token_request["auth_method"] == "client_secret_post"


@pytest.mark.parametrize(
    ("field", "option", "variable", "from_env", "from_option"),
    [
        ("scope", "--scope", "DPOP_SCOPE", "read", "read write"),
        ("resource", "--resource", "DPOP_RESOURCE", "https://a.example/", "https://b.example/"),
        ("audience", "--audience", "DPOP_AUDIENCE", "urn:aud:env", "urn:aud:option"),
        (
            "auth_method",
            "--client-auth",
            "DPOP_CLIENT_AUTH",
            "client_secret_post",
            "client_secret_basic",
        ),
    ],
)
def test_option_and_variable_reach_the_token_request(
    local_servers, pem_key_path, field, option, variable, from_env, from_option
):
    env = env_for(local_servers, pem_key_path, **{variable: from_env})
    assert_ok(dpop("token", env=env))
    assert local_servers.authorization_server.last_token_request[field] == from_env
    assert_ok(dpop("token", option, from_option, env=env))
    assert local_servers.authorization_server.last_token_request[field] == from_option


def test_accept_bearer_by_option_and_variable(local_servers_factory, pem_key_path):
    servers = local_servers_factory(as_mode="bearer")
    env = env_for(servers, pem_key_path)
    line = assert_one_line_error(dpop("token", env=env), code=4, says="bearer")
    # The hint names the option and the variable, not the Python argument.
    assert "--accept-bearer" in line
    assert "DPOP_ACCEPT_BEARER" in line
    assert "accept_bearer=True" not in line
    for args, extra in ((["--accept-bearer"], {}), ([], {"DPOP_ACCEPT_BEARER": "true"})):
        result = assert_ok(dpop("token", *args, env={**env, **extra}))
        assert json.loads(result.out)["token_type"] == "Bearer"
    # An option beats the variable in both directions.
    refused = dpop("token", "--refuse-bearer", env={**env, "DPOP_ACCEPT_BEARER": "true"})
    assert_one_line_error(refused, code=4, says="bearer")


def test_token_with_private_key_jwt(local_servers_factory, pem_key_path):
    servers = local_servers_factory(client_secret=None, client_jwk=jwk_of_pem(pem_key_path))
    result = dpop(
        "token",
        "--client-auth",
        "private_key_jwt",
        env={
            "DPOP_KEY": pem_key_path,
            "DPOP_TOKEN_URL": servers.token_url,
            "DPOP_CLIENT_ID": servers.client_id,
        },
    )
    assert json.loads(assert_ok(result).out)["token_type"] == "DPoP"


def test_token_secret_on_command_line_warns(local_servers, pem_key_path):
    env = env_for(local_servers, pem_key_path)
    del env["DPOP_CLIENT_SECRET"]
    result = assert_ok(dpop("token", "--client-secret", DEMO_CLIENT_SECRET, env=env))
    assert "warning: --client-secret on the command line" in result.err
    assert DEMO_CLIENT_SECRET not in result.err


def test_config_file_and_precedence(local_servers, pem_key_path, tmp_path):
    dead = f"http://127.0.0.1:{closed_port()}/token"
    cfg = tmp_path / "dpop.toml"
    cfg.write_text(
        f'key = "{pem_key_path}"\n'
        f'token-url = "{dead}"\n'
        f'client_id = "{local_servers.client_id}"\n'
        f'client-secret = "wrong-secret"\n'
    )
    # The file alone: wrong secret and a dead URL, so it fails, naming the dead URL.
    assert_one_line_error(dpop("token", "--config", str(cfg)), code=5, says="127.0.0.1")
    # The environment beats the file ...
    env = {"DPOP_TOKEN_URL": local_servers.token_url, "DPOP_CLIENT_SECRET": DEMO_CLIENT_SECRET}
    assert_ok(dpop("token", "--config", str(cfg), env=env))
    # ... and an option beats the environment.
    env_dead = {"DPOP_TOKEN_URL": dead, "DPOP_CLIENT_SECRET": DEMO_CLIENT_SECRET}
    both = dpop("token", "--config", str(cfg), "--token-url", local_servers.token_url, env=env_dead)
    assert_ok(both)


# --- request -------------------------------------------------------------------------------


def test_request_get_prints_the_body(local_servers, pem_key_path):
    result = assert_ok(
        dpop(
            "request",
            local_servers.api_url + "/things?x=1",
            env=env_for(local_servers, pem_key_path),
        )
    )
    body = json.loads(result.out)
    assert body["ok"] is True
    assert body["path"] == "/api/things"
    assert body["method"] == "GET"
    assert body["jkt"] == oracle.thumbprint(jwk_of_pem(pem_key_path))


def test_request_post_data_file_headers_include(local_servers, pem_key_path, tmp_path):
    payload = b'{"amount": 42, "currency": "EUR"}'
    data = tmp_path / "body.json"
    data.write_bytes(payload)
    result = assert_ok(
        dpop(
            "request",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-H",
            "X-Request-Id: abc-123",
            "-d",
            f"@{data}",
            "-i",
            local_servers.api_url + "/orders/7",
            env=env_for(local_servers, pem_key_path),
        )
    )
    head, _, body = result.out.partition("\n\n")
    assert head.splitlines()[0] == "HTTP/1.1 200 OK"
    assert "content-type: application/json" in head.lower()
    answer = json.loads(body)
    assert answer["method"] == "PUT"
    assert answer["body_sha256"] == hashlib.sha256(payload).hexdigest()
    seen = [s for s in local_servers.resource_server.seen if s.status == 200]
    assert [s.method for s in seen] == ["PUT"]


def test_request_data_literal_implies_post(local_servers, pem_key_path):
    result = dpop(
        "request", "-d", "a=1&b=2", local_servers.api_url, env=env_for(local_servers, pem_key_path)
    )
    answer = json.loads(assert_ok(result).out)
    assert answer["method"] == "POST"
    assert answer["body_sha256"] == hashlib.sha256(b"a=1&b=2").hexdigest()


def test_request_verbose_log_is_masked(local_servers_factory, tmp_path):
    servers = local_servers_factory(require_nonce=True)
    key = tmp_path / "k.pem"
    pin = "pem-pin-for-log-test"
    assert_ok(dpop("keygen", "--key", str(key), env={"DPOP_PIN": pin}))
    result = assert_ok(
        dpop("request", "-v", servers.api_url + "/x", env=env_for(servers, str(key), DPOP_PIN=pin))
    )
    log = result.err
    for expected in (
        "* token request (client_credentials): POST " + servers.token_url,
        "> POST /token HTTP/1.1",
        "use_dpop_nonce",
        "* API request: GET " + servers.api_url + "/x",
        "< HTTP/1.1 200 OK",
        "Authorization: Basic demo-client:…(11 chars)",
    ):
        assert expected in log
    # Both nonce dances happened (AS and RS), so nonces were really in play.
    assert servers.authorization_server.token_requests == 2
    assert_absent(result.both, [pin, *secrets_seen(servers)])
    assert not JWT_LIKE.search(log)
    assert json.loads(result.out)["ok"] is True


def test_request_http_error_exits_non_zero(local_servers_factory, pem_key_path):
    servers = local_servers_factory(rs_mode="invalid_token_always")
    result = dpop("request", servers.api_url + "/x", env=env_for(servers, pem_key_path))
    # The API refuses even a fresh token: an OAuth refusal (4), not a plain HTTP status (1).
    assert_one_line_error(result, code=4, says="401")
    assert_absent(result.both, secrets_seen(servers))


def test_request_404_exits_non_zero(local_servers, pem_key_path):
    result = dpop(
        "request", local_servers.rs_url + "/nowhere", env=env_for(local_servers, pem_key_path)
    )
    assert_one_line_error(result, code=1, says="404")


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["request", "not a url"], 2, "URL"),
        (["request", "ftp://127.0.0.1/x"], 2, "http"),
        (["request", "-H", "broken", "{api}"], 2, "Name: value"),
        (["request", "-H", "Authorization: Bearer x", "{api}"], 2, "set by dpop"),
        (["request", "-d", "@{tmp}/missing", "{api}"], 2, "cannot be read"),
        (["request"], 2, "missing argument 'url'"),
        (["token", "--timeout", "soon"], 2, "timeout"),
        (["token", "--client-auth", "magic"], 2, "client-auth"),
        (["token", "--token-url", "notaurl"], 2, "token_url from --token-url"),
    ],
)
def test_request_usage_errors(local_servers, pem_key_path, tmp_path, args, code, says):
    argv = [a.format(api=local_servers.api_url, tmp=tmp_path) for a in args]
    assert_one_line_error(
        dpop(*argv, env=env_for(local_servers, pem_key_path)), code=code, says=says
    )


def test_missing_settings_are_listed(pem_key_path):
    result = dpop("token", env={"DPOP_KEY": pem_key_path})
    line = assert_one_line_error(result, code=2)
    for name in ("--token-url", "DPOP_TOKEN_URL", "--client-id", "DPOP_CLIENT_ID"):
        assert name in line


def test_unreachable_token_endpoint(pem_key_path):
    url = f"http://127.0.0.1:{closed_port()}/token"
    env = {"DPOP_KEY": pem_key_path, "DPOP_TOKEN_URL": url, "DPOP_CLIENT_ID": "c"}
    for command in (["token"], ["request", "http://127.0.0.1:9/api"]):
        result = dpop(*command, env={**env, "DPOP_CLIENT_SECRET": "some-secret-1"})
        assert_one_line_error(result, code=5, says="127.0.0.1")
        assert_absent(result.both, ["some-secret-1"])


def test_unreachable_api(local_servers, pem_key_path):
    url = f"http://127.0.0.1:{closed_port()}/api"
    result = dpop("request", url, env=env_for(local_servers, pem_key_path))
    assert_one_line_error(result, code=5, says="connect")
    assert_absent(result.both, secrets_seen(local_servers))


def test_rejected_client_secret(local_servers, pem_key_path):
    env = env_for(local_servers, pem_key_path, DPOP_CLIENT_SECRET="not-the-secret-9")
    for command in (["token"], ["request", local_servers.api_url]):
        result = dpop(*command, env=env)
        assert_one_line_error(result, code=4, says="invalid_client")
        assert_absent(result.both, ["not-the-secret-9", *secrets_seen(local_servers)])
        # With -v the log of the refused exchange precedes the error, masked as well.
        verbose = dpop(command[0], "-v", *command[1:], env=env)
        assert verbose.code == 4
        assert "< HTTP/1.1 401" in verbose.err
        assert verbose.err.rstrip().splitlines()[-1].startswith("error: ")
        assert "Traceback" not in verbose.both
        assert_absent(verbose.both, ["not-the-secret-9", *secrets_seen(local_servers)])


@pytest.mark.parametrize(
    ("mode", "code", "says"), [("bearer", 4, "bearer"), ("error_500", 5, "500")]
)
def test_misbehaving_authorization_server(local_servers_factory, pem_key_path, mode, code, says):
    servers = local_servers_factory(as_mode=mode)
    result = dpop("token", env=env_for(servers, pem_key_path))
    assert_one_line_error(result, code=code, says=says)
    assert_absent(result.both, secrets_seen(servers))


# --- doctor --------------------------------------------------------------------------------


def doctor_lines(result: Result) -> dict[str, str]:
    lines = {}
    for line in result.out.splitlines():
        mark, _, rest = line.partition(" ")
        step, _, detail = rest.partition(": ")
        lines[step] = f"{mark} {detail}"
    return lines


def test_doctor_all_green_with_a_pem_key(local_servers, pem_key_path):
    result = assert_ok(dpop("doctor", env=env_for(local_servers, pem_key_path)))
    steps = doctor_lines(result)
    for step in (
        "key file readable",
        "EC P-256",
        "sign and verify",
        "token endpoint reachable",
        "discovery advertises ES256",
        "DPoP token issued",
        "token bound to this key",
    ):
        assert steps[step].startswith("✓"), (step, result.out)
    assert oracle.thumbprint(jwk_of_pem(pem_key_path)) in steps["token bound to this key"]
    assert_absent(result.both, secrets_seen(local_servers))


def test_doctor_fails_a_token_endpoint_that_is_not_there(local_servers, pem_key_path):
    env = env_for(local_servers, pem_key_path, DPOP_TOKEN_URL=local_servers.as_url + "/no-token")
    result = dpop("doctor", env=env)
    assert result.code == 1
    steps = doctor_lines(result)
    assert steps["token endpoint reachable"].startswith("✗"), result.out
    assert "404" in steps["token endpoint reachable"]
    report = json.loads(dpop("doctor", "--json", env=env).out)
    assert report["ok"] is False
    by_step = {step["step"]: step for step in report["steps"]}
    assert by_step["token endpoint reachable"]["status"] == "fail"
    assert by_step["sign and verify"]["status"] == "ok"
    assert by_step["DPoP token issued"]["status"] == "skip"
    green = json.loads(
        assert_ok(dpop("doctor", "--json", env=env_for(local_servers, pem_key_path))).out
    )
    assert green["ok"] is True
    assert {step["status"] for step in green["steps"]} == {"ok"}


def test_missing_client_secret_is_named(local_servers, pem_key_path):
    env = env_for(local_servers, pem_key_path, DPOP_CLIENT_SECRET=None)
    line = assert_one_line_error(dpop("token", env=env), code=4, says="invalid_client")
    assert "no client secret is configured" in line
    for hint in ("--client-secret-file", "DPOP_CLIENT_SECRET_FILE", "--client-auth none"):
        assert hint in line


def test_missing_client_secret_is_asked_for_on_a_terminal(local_servers, pem_key_path):
    args = [
        "token",
        "--bare",
        "--key",
        pem_key_path,
        "--token-url",
        local_servers.token_url,
        "--client-id",
        local_servers.client_id,
    ]
    output, status = run_on_terminal(args, DEMO_CLIENT_SECRET, prompt=b"client secret for")
    assert status == 0, output
    assert JWT_LIKE.search(output)
    assert DEMO_CLIENT_SECRET not in output  # hidden input


def test_doctor_reports_a_rejected_secret(local_servers, pem_key_path):
    env = env_for(local_servers, pem_key_path, DPOP_CLIENT_SECRET="wrong-secret-77")
    result = dpop("doctor", env=env)
    assert result.code == 1
    assert "Traceback" not in result.both
    steps = doctor_lines(result)
    assert steps["sign and verify"].startswith("✓")
    assert steps["DPoP token issued"].startswith("✗")
    assert "fix: check client_id" in steps["DPoP token issued"]
    assert_absent(result.both, ["wrong-secret-77"])


def test_doctor_unreachable_and_no_key(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/token"
    result = dpop("doctor", env={"DPOP_TOKEN_URL": url, "DPOP_CLIENT_ID": "c"})
    assert result.code == 1
    steps = doctor_lines(result)
    assert steps["key configured"].startswith("✗")
    assert steps["token endpoint reachable"].startswith("✗")
    assert steps["discovery advertises ES256"].startswith("-")
    assert "Traceback" not in result.both


@pytest.mark.softhsm
def test_doctor_with_softhsm_key(local_servers, softhsm, pkcs11_key_uri):
    uri = pkcs11_key_uri.split("?")[0]
    result = assert_ok(dpop("doctor", env=env_for(local_servers, uri, DPOP_PIN=softhsm.pin)))
    steps = doctor_lines(result)
    for step in (
        "module loads",
        "token present",
        "login",
        "key found",
        "EC P-256",
        "CKM_ECDSA offered",
        "sign and verify",
        "DPoP token issued",
        "token bound to this key",
    ):
        assert steps[step].startswith("✓"), (step, result.out)


@pytest.mark.softhsm
def test_doctor_wrong_pin_fails_login_once(local_servers, softhsm, pkcs11_key_uri):
    uri = pkcs11_key_uri.split("?")[0]
    result = dpop("doctor", env=env_for(local_servers, uri, DPOP_PIN="00000000"))
    assert result.code == 1
    steps = doctor_lines(result)
    assert steps["module loads"].startswith("✓")
    assert steps["token present"].startswith("✓")
    assert steps["login"].startswith("✗")
    assert steps["key found"].startswith("-")
    assert "sign and verify" not in steps  # nothing signs after a failed login
    assert "00000000" not in result.both
    # One wrong try does not lock the token: the right PIN works right after.
    assert_ok(dpop("thumbprint", "--key", uri, env={"DPOP_PIN": softhsm.pin}))


# --- demo ----------------------------------------------------------------------------------


def check_demo(result: Result) -> None:
    assert_ok(result)
    out = result.out
    assert "* token request (client_credentials)" in out
    assert "* API request: GET" in out
    assert "cnf.jkt=" in out
    tail = out[out.index("* API response:") :]
    assert tail.startswith("* API response: 200 OK")
    body, _, last = tail.split("\n", 1)[1].rstrip("\n").rpartition("\n\n")
    assert json.loads(body)["ok"] is True
    # The last line says what was proven, for the key the demo announced.
    jkt = re.search(r"^\* key thumbprint \(jkt\): (\S+)$", out, re.M)
    assert jkt is not None
    assert last.startswith(f"* proven: the API accepted a DPoP-bound token for jkt {jkt[1]}")
    assert json.loads(body)["jkt"] == jkt[1]
    assert "retrying once with the server's nonce" in out
    assert "answered once" not in out
    assert f"User-Agent: dpop-signer/{__version__}" in out
    # One key, one URI: the key is named once.
    assert len(re.findall(r"^\* key: ", out, re.M)) == 1
    assert not JWT_LIKE.search(out)
    assert DEMO_CLIENT_SECRET not in out


def test_demo_falls_back_to_a_temporary_pem_key():
    result = dpop("demo")
    check_demo(result)
    assert "temporary PEM key" in result.out


@pytest.mark.softhsm
def test_demo_with_the_softhsm_key(softhsm, pkcs11_key_uri):
    uri = pkcs11_key_uri.split("?")[0]
    result = dpop("demo", env={"DPOP_KEY": uri, "DPOP_PIN": softhsm.pin})
    check_demo(result)
    assert "(PKCS#11 token)" in result.out


def test_demo_with_a_bad_key_is_one_line(tmp_path):
    result = dpop("demo", "--key", str(tmp_path / "none.pem"))
    assert_one_line_error(result, code=3, says="does not exist")
