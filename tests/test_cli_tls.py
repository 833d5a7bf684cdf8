"""TLS as ``dpop`` does it: the system's trust store by default, ``--cacert`` for a private CA.

A CA and a certificate for 127.0.0.1 are made at test time (`make_tls_files`); the token
endpoint and the API are a `StubServer` speaking TLS with that certificate. No network.
"""

from __future__ import annotations

import json

import pytest

from tests.cli_support import (
    TlsFiles,
    assert_ok,
    assert_one_line_error,
    dpop,
    json_answer,
    make_tls_files,
    stub_server,
    token_route,
)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(tls_files):
    routes = {"/token": token_route(), "/api": lambda r: json_answer(200, {"ok": True})}
    with stub_server(routes, tls=(tls_files.cert, tls_files.key)) as server:
        yield server


def env_for(server, pem_key_path, **extra):
    return {
        "DPOP_KEY": pem_key_path,
        "DPOP_TOKEN_URL": server.url + "/token",
        "DPOP_CLIENT_ID": "c",
        "DPOP_CLIENT_SECRET": "tls-test-secret",
        **extra,
    }


def test_a_private_ca_is_not_trusted_by_default_and_the_error_says_so(tls_server, pem_key_path):
    result = dpop("request", tls_server.url + "/api", env=env_for(tls_server, pem_key_path))
    line = assert_one_line_error(result, code=5, says="certificate")
    # It says how to fix it, in the command line's words, not "is the server running".
    for hint in ("--cacert", "DPOP_CA_BUNDLE", "ca_bundle"):
        assert hint in line
    assert "server is running" not in line
    assert not tls_server.requests_to("/token")  # nothing was sent over the failed handshake


def test_cacert_option_variable_and_config_key(tls_server, tls_files, pem_key_path, tmp_path):
    env = env_for(tls_server, pem_key_path)
    by_option = dpop("request", "--cacert", str(tls_files.ca), tls_server.url + "/api", env=env)
    assert json.loads(assert_ok(by_option).out) == {"ok": True}
    by_env = dpop("token", "--bare", env={**env, "DPOP_CA_BUNDLE": str(tls_files.ca)})
    assert assert_ok(by_env).out.strip() == "stub-access-token-0123456789"
    # In a config file, a relative ca_bundle is relative to the file.
    (tmp_path / "ca.pem").write_bytes(tls_files.ca.read_bytes())
    (tmp_path / "dpop.toml").write_text('ca_bundle = "ca.pem"\n')
    by_file = dpop("token", "--bare", "--config", str(tmp_path / "dpop.toml"), env=env)
    assert assert_ok(by_file).out.strip() == "stub-access-token-0123456789"
    # Both the token request and the API request went over TLS to the stub.
    assert len(tls_server.requests_to("/token")) == 3
    assert len(tls_server.requests_to("/api")) == 1


def test_the_system_store_honours_ssl_cert_file(tls_server, tls_files, pem_key_path):
    # truststore uses OpenSSL's system locations on Linux, which SSL_CERT_FILE overrides:
    # a CA installed "in the system" is trusted without --cacert.
    env = env_for(tls_server, pem_key_path, SSL_CERT_FILE=str(tls_files.ca))
    assert assert_ok(dpop("token", "--bare", env=env)).out.strip()


def test_a_bad_ca_bundle_is_a_configuration_error(tls_server, pem_key_path, tmp_path):
    env = env_for(tls_server, pem_key_path)
    missing = dpop("token", "--cacert", str(tmp_path / "none.pem"), env=env)
    assert_one_line_error(missing, code=2, says="does not exist")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    junk = dpop("token", "--cacert", str(tmp_path / "junk.pem"), env=env)
    assert_one_line_error(junk, code=2, says="CA bundle")


def test_doctor_names_the_certificate_problem(tls_server, tls_files, pem_key_path):
    env = env_for(tls_server, pem_key_path)
    result = dpop("doctor", "--json", env=env)
    assert result.code == 1, result.err
    steps = {s["step"]: s for s in json.loads(result.out)["steps"]}
    reachable = steps["token endpoint reachable"]
    assert reachable["status"] == "fail"
    assert "certificate" in reachable["detail"]
    assert "--cacert" in reachable["detail"]
    trusted = dpop("doctor", "--json", "--cacert", str(tls_files.ca), env=env)
    steps = {s["step"]: s for s in json.loads(trusted.out)["steps"]}
    assert steps["token endpoint reachable"]["status"] == "ok", trusted.out
