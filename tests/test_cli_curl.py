"""``dpop request`` with curl's habits, ``dpop token --bare`` and ``dpop headers``.

The API is a `StubServer` that records what it received, so each test checks the bytes that
really went out; proofs are checked by the independent ``tests/oracle.py``.
"""

from __future__ import annotations

import json

import pytest

from dpop_signer import __version__
from tests import oracle
from tests.cli_support import (
    Received,
    assert_ok,
    assert_one_line_error,
    dpop,
    json_answer,
    stub_server,
    token_route,
)
from tests.test_cli import jwk_of_pem

TOKEN = "stub-access-token-0123456789"


def echo(request: Received):
    return json_answer(
        200,
        {
            "method": request.method,
            "body": request.body.decode(),
            "type": request.headers.get("content-type"),
        },
    )


def redirect(to: str, status: int = 302):
    return lambda _r: (status, {"Location": to}, b"")


@pytest.fixture
def api():
    routes = {
        "/token": token_route(TOKEN),
        "/echo": echo,
        "/missing": lambda _r: (404, {"Content-Type": "text/plain"}, b"not here\n"),
    }
    with stub_server(routes) as server:
        yield server


def env_for(server, key):
    return {
        "DPOP_KEY": key,
        "DPOP_TOKEN_URL": server.url + "/token",
        "DPOP_CLIENT_ID": "c",
        "DPOP_CLIENT_SECRET": "curl-test-secret",
    }


def test_repeated_data_is_joined_like_curl(api, pem_key_path, tmp_path):
    (tmp_path / "part").write_text("c=3")
    args = ["-d", "a=1", "-d", "b=2", "-d", f"@{tmp_path / 'part'}", api.url + "/echo"]
    reply = json.loads(assert_ok(dpop("request", *args, env=env_for(api, pem_key_path))).out)
    assert reply == {
        "method": "POST",
        "body": "a=1&b=2&c=3",
        "type": "application/x-www-form-urlencoded",
    }


def test_json_sets_the_body_and_both_content_headers(api, pem_key_path):
    result = dpop(
        "request", "--json", '{"n": 1}', api.url + "/echo", env=env_for(api, pem_key_path)
    )
    reply = json.loads(assert_ok(result).out)
    assert reply == {"method": "POST", "body": '{"n": 1}', "type": "application/json"}
    assert api.requests_to("/echo")[0].headers["accept"] == "application/json"
    both = dpop("request", "-d", "a", "--json", "{}", api.url, env=env_for(api, pem_key_path))
    assert_one_line_error(both, code=2, says="--json")


def test_output_file_fail_and_silent(api, pem_key_path, tmp_path):
    env = env_for(api, pem_key_path)
    out = tmp_path / "reply.json"
    written = assert_ok(dpop("request", "-o", str(out), api.url + "/echo", env=env))
    assert written.out == ""
    assert json.loads(out.read_text())["method"] == "GET"
    # Without -f the body of an error is printed (as curl does), and the status is 1.
    plain = dpop("request", api.url + "/missing", env=env)
    assert plain.code == 1
    assert plain.out == "not here\n"
    assert "404" in plain.err
    failed = dpop("request", "-f", api.url + "/missing", env=env)
    assert (failed.code, failed.out) == (1, "")
    silent = dpop("request", "-s", "-f", api.url + "/missing", env=env)
    assert (silent.code, silent.out, silent.err) == (1, "", "")


def test_a_redirect_without_l_says_how_to_follow_it(api, pem_key_path):
    api.routes["/old"] = redirect("/echo")
    result = dpop("request", api.url + "/old", env=env_for(api, pem_key_path))
    assert result.code == 0
    assert "302" in result.err
    assert "-L" in result.err
    assert not api.requests_to("/echo")


def test_l_follows_with_a_fresh_proof_and_keeps_the_token_at_home(api, pem_key_path):
    jwk = jwk_of_pem(pem_key_path)
    with stub_server({"/elsewhere": echo}) as other:
        api.routes["/old"] = redirect("/new", 301)
        api.routes["/new"] = redirect(other.url + "/elsewhere", 307)
        result = dpop("request", "-L", "-i", api.url + "/old", env=env_for(api, pem_key_path))
        assert assert_ok(result).out.count("HTTP/1.1 30") == 2
        first, second = api.requests_to("/old")[0], api.requests_to("/new")[0]
        proofs = []
        for request, path in ((first, "/old"), (second, "/new")):
            assert request.headers["authorization"] == f"DPoP {TOKEN}"
            proofs.append(
                oracle.check_proof(
                    request.headers["dpop"],
                    htm="GET",
                    url=api.url + path,
                    access_token=TOKEN,
                    expected_jwk=jwk,
                )
            )
        assert proofs[0].claims["jti"] != proofs[1].claims["jti"]
        # Another origin gets neither the token nor a proof.
        (away,) = other.requests_to("/elsewhere")
        assert "authorization" not in away.headers
        assert "dpop" not in away.headers


def test_see_other_after_post_becomes_get_without_the_body(api, pem_key_path):
    api.routes["/form"] = redirect("/echo", 303)
    result = dpop("request", "-L", "-d", "a=1", api.url + "/form", env=env_for(api, pem_key_path))
    assert json.loads(assert_ok(result).out) == {"method": "GET", "body": "", "type": None}


def test_a_redirect_loop_is_one_error_line(api, pem_key_path):
    api.routes["/loop"] = redirect("/loop")
    result = dpop("request", "-L", api.url + "/loop", env=env_for(api, pem_key_path))
    assert_one_line_error(result, says="redirects")
    assert len(api.requests_to("/loop")) == 21


def test_token_bare_and_headers_for_curl(api, pem_key_path):
    env = env_for(api, pem_key_path)
    assert assert_ok(dpop("token", "--bare", env=env)).out == TOKEN + "\n"
    lines = assert_ok(dpop("headers", "post", api.url + "/echo?x=1", env=env)).out.splitlines()
    assert len(lines) == 2
    assert lines[0] == f"Authorization: DPoP {TOKEN}"
    name, _, proof = lines[1].partition(": ")
    assert name == "DPoP"
    oracle.check_proof(
        proof,
        htm="POST",
        url=api.url + "/echo?x=1",
        access_token=TOKEN,
        expected_jwk=jwk_of_pem(pem_key_path),
    )


def test_requests_carry_our_user_agent(api, pem_key_path):
    assert_ok(dpop("request", api.url + "/echo", env=env_for(api, pem_key_path)))
    agents = {r.headers.get("user-agent") for r in api.received}
    assert agents == {f"dpop-signer/{__version__}"}
    assert {r.path for r in api.received} == {"/token", "/echo"}
