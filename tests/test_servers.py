"""The local AS and RS over real sockets on 127.0.0.1, driven by hand-made proofs.

Proofs, client assertions and token checks are built here with ``cryptography`` directly
(tests.servers_fixtures.HandKey), never with dpop_signer.proof, so the servers are tested
against an independent client. Every proof a server receives is also re-checked by the oracle
(autouse ``oracle_check``); proofs sent broken on purpose are exempted by name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from dpop_signer.testing import ServerThread, start_local_servers
from dpop_signer.testing.servers import LocalServers, NonceBook
from tests import oracle
from tests.fault_servers import FaultServers
from tests.servers_fixtures import HandKey, OracleCheck

GRANT = {"grant_type": "client_credentials"}
BASIC = ("demo-client", "demo-secret")


@pytest.fixture
def key() -> HandKey:
    return HandKey()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def unpad(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def get_token(
    client: httpx.Client, servers: LocalServers, key: HandKey, *, nonce: str | None = None
) -> str:
    response = client.post(
        servers.token_url,
        data=GRANT,
        auth=BASIC,
        headers={"DPoP": key.proof("POST", servers.token_url, nonce=nonce)},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def call(
    client: httpx.Client,
    key: HandKey,
    token: str,
    url: str,
    *,
    method: str = "GET",
    nonce: str | None = None,
    htu: str | None = None,
    **kwargs: object,
) -> httpx.Response:
    proof = key.proof(method, htu or url.split("?")[0], access_token=token, nonce=nonce)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    return client.request(method, url, headers=headers, **kwargs)  # type: ignore[arg-type]


# --- authorization server -----------------------------------------------------------------


def test_metadata_and_jwks(local_servers: LocalServers, client: httpx.Client) -> None:
    meta = client.get(local_servers.as_url + "/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == local_servers.as_url
    assert meta["token_endpoint"] == local_servers.token_url
    assert meta["dpop_signing_alg_values_supported"] == ["ES256"]
    jwks = client.get(meta["jwks_uri"]).json()
    assert [k["kty"] for k in jwks["keys"]] == ["EC"]
    assert "d" not in jwks["keys"][0]


def test_token_is_a_dpop_bound_jwt_signed_by_the_published_key(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    response = client.post(
        local_servers.token_url,
        data={**GRANT, "scope": "read write", "resource": "https://api.example/"},
        auth=BASIC,
        headers={"DPoP": key.proof("POST", local_servers.token_url)},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "DPoP"
    assert body["expires_in"] == 3600
    assert body["scope"] == "read write"
    assert response.headers["cache-control"] == "no-store"
    # Verify the token independently: JWKS key, cryptography, our own base64/json.
    jwk = client.get(local_servers.as_url + "/jwks").json()["keys"][0]
    h, c, s = body["access_token"].split(".")
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(unpad(jwk["x"]), "big"),
        int.from_bytes(unpad(jwk["y"]), "big"),
        ec.SECP256R1(),
    ).public_key()
    raw = unpad(s)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{h}.{c}".encode(), ec.ECDSA(hashes.SHA256()))
    assert json.loads(unpad(h))["typ"] == "at+jwt"
    claims = json.loads(unpad(c))
    assert claims["cnf"] == {"jkt": key.jkt}
    assert claims["iss"] == local_servers.as_url
    assert claims["aud"] == "https://api.example/"
    assert claims["client_id"] == "demo-client"
    assert claims["exp"] - claims["iat"] == 3600
    assert local_servers.authorization_server.last_token_request["auth_method"] == (
        "client_secret_basic"
    )


def test_client_secret_post(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    response = client.post(
        local_servers.token_url,
        data={**GRANT, "client_id": "demo-client", "client_secret": "demo-secret"},
        headers={"DPoP": key.proof("POST", local_servers.token_url)},
    )
    assert response.status_code == 200
    assert local_servers.authorization_server.last_token_request["auth_method"] == (
        "client_secret_post"
    )


@pytest.mark.parametrize(
    ("auth", "data", "basic_challenge"),
    [
        (("demo-client", "wrong"), {}, True),
        (("someone-else", "demo-secret"), {}, True),
        (None, {"client_id": "demo-client", "client_secret": "wrong"}, False),
        (None, {"client_id": "demo-client"}, False),
    ],
)
def test_bad_client_credentials_are_invalid_client(
    local_servers: LocalServers,
    client: httpx.Client,
    key: HandKey,
    auth: tuple[str, str] | None,
    data: dict[str, str],
    basic_challenge: bool,
) -> None:
    response = client.post(
        local_servers.token_url,
        data={**GRANT, **data},
        auth=auth,  # type: ignore[arg-type]  # None: no Authorization header
        headers={"DPoP": key.proof("POST", local_servers.token_url)},
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert ("www-authenticate" in response.headers) is basic_challenge
    assert "wrong" not in response.text
    assert "demo-secret" not in response.text


def test_two_client_authentication_methods_are_refused(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    response = client.post(
        local_servers.token_url,
        data={**GRANT, "client_secret": "demo-secret"},
        auth=BASIC,
        headers={"DPoP": key.proof("POST", local_servers.token_url)},
    )
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


def test_private_key_jwt(
    local_servers_factory: Callable[..., LocalServers], client: httpx.Client, key: HandKey
) -> None:
    assertion_key = HandKey()
    servers = local_servers_factory(
        client_id="jwt-client", client_secret=None, client_jwk=assertion_key.jwk
    )

    def request(assertion: str) -> httpx.Response:
        return client.post(
            servers.token_url,
            data={
                **GRANT,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            },
            headers={"DPoP": key.proof("POST", servers.token_url)},
        )

    assertion = assertion_key.client_assertion("jwt-client", servers.token_url)
    assert request(assertion).status_code == 200
    assert servers.authorization_server.last_token_request["client_id"] == "jwt-client"
    replayed = request(assertion)
    assert (replayed.status_code, replayed.json()["error"]) == (401, "invalid_client")
    assert "already used" in replayed.json()["error_description"]
    by_issuer = assertion_key.client_assertion("jwt-client", servers.as_url)
    assert request(by_issuer).status_code == 200
    forged = HandKey().client_assertion("jwt-client", servers.token_url)
    assert request(forged).status_code == 401


def test_unsupported_grant_type(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    response = client.post(
        local_servers.token_url,
        data={"grant_type": "password"},
        auth=BASIC,
        headers={"DPoP": key.proof("POST", local_servers.token_url)},
    )
    assert (response.status_code, response.json()["error"]) == (400, "unsupported_grant_type")


def test_token_endpoint_requires_exactly_one_proof(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    none = client.post(local_servers.token_url, data=GRANT, auth=BASIC)
    assert (none.status_code, none.json()["error"]) == (400, "invalid_dpop_proof")
    two = client.post(
        local_servers.token_url,
        data=GRANT,
        auth=BASIC,
        headers=[
            ("DPoP", key.proof("POST", local_servers.token_url)),
            ("DPoP", key.proof("POST", local_servers.token_url)),
        ],
    )
    assert (two.status_code, two.json()["error"]) == (400, "invalid_dpop_proof")
    assert local_servers.authorization_server.issued_tokens == 0


def test_token_endpoint_rejects_a_bad_proof(
    local_servers: LocalServers, client: httpx.Client, key: HandKey, oracle_check: OracleCheck
) -> None:
    proof = key.proof("POST", local_servers.as_url + "/other")
    oracle_check.exempt(proof)
    response = client.post(local_servers.token_url, data=GRANT, auth=BASIC, headers={"DPoP": proof})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_dpop_proof")
    assert "htu" in response.json()["error_description"]


def test_token_endpoint_refuses_a_replayed_proof(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    proof = key.proof("POST", local_servers.token_url)
    first = client.post(local_servers.token_url, data=GRANT, auth=BASIC, headers={"DPoP": proof})
    again = client.post(local_servers.token_url, data=GRANT, auth=BASIC, headers={"DPoP": proof})
    assert first.status_code == 200
    assert (again.status_code, again.json()["error"]) == (400, "invalid_dpop_proof")


def test_as_nonce_demand_retry_and_rotation(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    as_ = local_servers.authorization_server
    as_.require_nonce = True
    url = local_servers.token_url
    demand = client.post(url, data=GRANT, auth=BASIC, headers={"DPoP": key.proof("POST", url)})
    assert demand.status_code == 400
    assert demand.json()["error"] == "use_dpop_nonce"
    first = demand.headers["dpop-nonce"]
    ok = client.post(
        url, data=GRANT, auth=BASIC, headers={"DPoP": key.proof("POST", url, nonce=first)}
    )
    assert ok.status_code == 200
    assert ok.headers["dpop-nonce"] == first  # sent on 200s too
    second = as_.rotate_nonce()
    previous_still_ok = client.post(
        url, data=GRANT, auth=BASIC, headers={"DPoP": key.proof("POST", url, nonce=first)}
    )
    assert previous_still_ok.status_code == 200
    assert previous_still_ok.headers["dpop-nonce"] == second
    as_.rotate_nonce()
    too_old = client.post(
        url, data=GRANT, auth=BASIC, headers={"DPoP": key.proof("POST", url, nonce=first)}
    )
    assert (too_old.status_code, too_old.json()["error"]) == (400, "use_dpop_nonce")
    assert too_old.headers["dpop-nonce"] not in (first, second)


def test_nonce_book_rotates_on_a_clock_and_keeps_the_previous_nonce() -> None:
    clock = [1000.0]
    book = NonceBook(rotation=60.0, clock=lambda: clock[0])
    first = book.current
    clock[0] += 59
    assert book.current == first
    clock[0] += 2
    second = book.current
    assert second != first
    assert book.accepted() == (second, first)
    clock[0] += 61
    assert first not in book.accepted()
    assert book.was_issued(first)
    assert not book.was_issued("never-issued")


@pytest.mark.parametrize("mode", ["error_500", "html"])
def test_as_broken_modes(
    local_servers: FaultServers, client: httpx.Client, key: HandKey, mode: str
) -> None:
    local_servers.authorization_server.mode = mode  # type: ignore[assignment]
    response = client.post(
        local_servers.token_url,
        data=GRANT,
        auth=BASIC,
        headers={"DPoP": key.proof("POST", local_servers.token_url)},
    )
    if mode == "error_500":
        assert response.status_code == 500
    else:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
    assert local_servers.authorization_server.issued_tokens == 0


def test_as_bearer_mode(local_servers: FaultServers, client: httpx.Client, key: HandKey) -> None:
    local_servers.authorization_server.mode = "bearer"
    response = client.post(
        local_servers.token_url,
        data=GRANT,
        auth=BASIC,
        headers={"DPoP": key.proof("POST", local_servers.token_url)},
    )
    assert response.json()["token_type"] == "Bearer"


def test_as_nonce_always_and_nonce_repeat(
    local_servers: FaultServers, client: httpx.Client, key: HandKey
) -> None:
    as_ = local_servers.authorization_server
    url = local_servers.token_url

    def post(nonce: str | None) -> httpx.Response:
        return client.post(
            url, data=GRANT, auth=BASIC, headers={"DPoP": key.proof("POST", url, nonce=nonce)}
        )

    as_.mode = "nonce_always"
    first = post(None)
    second = post(first.headers["dpop-nonce"])
    assert [first.status_code, second.status_code] == [400, 400]
    assert second.json()["error"] == "use_dpop_nonce"
    assert first.headers["dpop-nonce"] != second.headers["dpop-nonce"]
    as_.mode = "nonce_repeat"
    third = post(None)
    fourth = post(third.headers["dpop-nonce"])
    assert [third.status_code, fourth.status_code] == [400, 400]
    assert third.headers["dpop-nonce"] == fourth.headers["dpop-nonce"]
    assert as_.issued_tokens == 0


def test_as_slow_mode_delays_the_answer(local_servers: FaultServers, key: HandKey) -> None:
    local_servers.authorization_server.mode = "slow"
    local_servers.authorization_server.slow_seconds = 1.0
    with httpx.Client(timeout=0.2) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post(
            local_servers.token_url,
            data=GRANT,
            auth=BASIC,
            headers={"DPoP": key.proof("POST", local_servers.token_url)},
        )


def test_token_lifetime_switch(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    local_servers.authorization_server.token_lifetime = 3
    response = client.post(
        local_servers.token_url,
        data=GRANT,
        auth=BASIC,
        headers={"DPoP": key.proof("POST", local_servers.token_url)},
    )
    assert response.json()["expires_in"] == 3
    claims = json.loads(unpad(response.json()["access_token"].split(".")[1]))
    assert claims["exp"] - claims["iat"] == 3


def test_every_response_has_a_date_and_clock_skew_moves_it(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    for server in local_servers.servers:
        server.clock_skew = 3600.0
    responses = [
        client.get(local_servers.as_url + "/jwks"),
        client.get(local_servers.as_url + "/nowhere"),
        client.get(local_servers.api_url + "/x"),
    ]
    for response in responses:
        skew = parsedate_to_datetime(response.headers["date"]).timestamp() - time.time()
        assert 3590 < skew < 3610
        assert len(response.headers.get_list("date")) == 1


def test_skewed_server_judges_iat_by_its_own_clock(
    local_servers: LocalServers, client: httpx.Client, key: HandKey, oracle_check: OracleCheck
) -> None:
    local_servers.authorization_server.clock_skew = 1000.0
    url = local_servers.token_url
    naive = key.proof("POST", url)  # not exempt: the oracle checks it at its own iat
    stale = client.post(url, data=GRANT, auth=BASIC, headers={"DPoP": naive})
    assert stale.status_code == 400
    assert "in the future" not in stale.json()["error_description"]
    assert "in the past" in stale.json()["error_description"]
    server_time = parsedate_to_datetime(stale.headers["date"]).timestamp()
    adjusted = key.proof("POST", url, iat=server_time)
    assert client.post(url, data=GRANT, auth=BASIC, headers={"DPoP": adjusted}).status_code == 200


# --- resource server ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
def test_api_echoes_after_verifying_token_and_proof(
    local_servers: LocalServers, client: httpx.Client, key: HandKey, method: str
) -> None:
    token = get_token(client, local_servers, key)
    url = local_servers.api_url + "/things/42?verbose=1"
    body = b'{"n": 1}' if method in ("POST", "PUT", "PATCH") else b""
    response = call(client, key, token, url, method=method, content=body)
    assert response.status_code == 200, response.text
    echo = response.json()
    assert echo["ok"] is True
    assert (echo["method"], echo["path"]) == (method, "/api/things/42")
    assert (echo["client_id"], echo["jkt"]) == ("demo-client", key.jkt)
    assert (echo["body_len"], echo["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def test_api_reads_a_5_mb_body(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    token = get_token(client, local_servers, key)
    body = bytes(range(256)) * (5 * 1024 * 1024 // 256)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    response = call(
        client, key, token, local_servers.api_url + "/upload", method="POST", content=chunks()
    )
    assert response.status_code == 200
    assert response.json()["body_len"] == len(body)
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_api_answers_a_nonce_demand_to_a_large_upload(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    token = get_token(client, local_servers, key)
    local_servers.resource_server.require_nonce = True
    body = b"z" * (5 * 1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    url = local_servers.api_url + "/upload"
    demand = call(client, key, token, url, method="POST", content=chunks())
    assert demand.status_code == 401  # seen as an answer, not a broken pipe
    retry = call(
        client, key, token, url, method="POST", content=body, nonce=demand.headers["dpop-nonce"]
    )
    assert retry.json()["body_len"] == len(body)


def test_api_error_with_non_ascii_in_the_proof_is_still_a_clean_401(
    local_servers: LocalServers, client: httpx.Client, key: HandKey, oracle_check: OracleCheck
) -> None:
    token = get_token(client, local_servers, key)
    odd = key.proof("GET", "http://héllo.example/☃", access_token=token)
    oracle_check.exempt(odd)
    response = client.get(
        local_servers.api_url + "/x", headers={"Authorization": f"DPoP {token}", "DPoP": odd}
    )
    assert response.status_code == 401
    assert 'error="invalid_dpop_proof"' in response.headers["www-authenticate"]


def test_api_streams_n_bytes(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    token = get_token(client, local_servers, key)
    url = local_servers.api_url + "/stream?bytes=3000001"
    proof = key.proof("GET", local_servers.api_url + "/stream", access_token=token)
    received = 0
    with client.stream("GET", url, headers={"Authorization": f"DPoP {token}", "DPoP": proof}) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes():
            received += len(chunk)
    assert received == 3000001


def test_api_htu_is_the_path_as_sent(
    local_servers: LocalServers, client: httpx.Client, key: HandKey, oracle_check: OracleCheck
) -> None:
    token = get_token(client, local_servers, key)
    url = local_servers.api_url + "/a%2Fb"
    assert call(client, key, token, url).status_code == 200
    decoded = key.proof("GET", local_servers.api_url + "/a/b", access_token=token)
    oracle_check.exempt(decoded)
    response = client.get(url, headers={"Authorization": f"DPoP {token}", "DPoP": decoded})
    assert response.status_code == 401
    assert 'error="invalid_dpop_proof"' in response.headers["www-authenticate"]


def test_api_without_token_gets_a_bare_challenge(
    local_servers: LocalServers, client: httpx.Client
) -> None:
    response = client.get(local_servers.api_url + "/x")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'DPoP algs="ES256"'


def test_api_refuses_a_dpop_token_sent_as_bearer(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    token = get_token(client, local_servers, key)
    url = local_servers.api_url + "/x"
    response = client.get(
        url,
        headers={
            "Authorization": f"Bearer {token}",
            "DPoP": key.proof("GET", url, access_token=token),
        },
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('DPoP error="invalid_token"')


def test_api_scheme_is_case_insensitive(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    token = get_token(client, local_servers, key)
    url = local_servers.api_url + "/x"
    response = client.get(
        url,
        headers={
            "Authorization": f"dpop {token}",
            "DPoP": key.proof("GET", url, access_token=token),
        },
    )
    assert response.status_code == 200


def test_api_rejects_proof_from_another_key(
    local_servers: LocalServers, client: httpx.Client, key: HandKey, oracle_check: OracleCheck
) -> None:
    token = get_token(client, local_servers, key)
    thief = HandKey()
    oracle_check.exempt_where(lambda seen: seen.endpoint == "api")  # bound to another key
    response = call(client, thief, token, local_servers.api_url + "/x")
    assert response.status_code == 401
    assert 'error="invalid_dpop_proof"' in response.headers["www-authenticate"]
    assert "bound" in response.headers["www-authenticate"]


def test_api_rejects_wrong_ath_and_replay(
    local_servers: LocalServers, client: httpx.Client, key: HandKey, oracle_check: OracleCheck
) -> None:
    token = get_token(client, local_servers, key)
    url = local_servers.api_url + "/x"
    wrong = key.proof("GET", url, access_token=token + "x")
    oracle_check.exempt(wrong)
    response = client.get(url, headers={"Authorization": f"DPoP {token}", "DPoP": wrong})
    assert 'error="invalid_dpop_proof"' in response.headers["www-authenticate"]
    proof = key.proof("GET", url, access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    assert client.get(url, headers=headers).status_code == 200
    replay = client.get(url, headers=headers)
    assert replay.status_code == 401
    assert "already used" in replay.headers["www-authenticate"]


def test_api_rejects_expired_and_foreign_tokens(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    local_servers.authorization_server.token_lifetime = 2
    token = get_token(client, local_servers, key)
    local_servers.resource_server.clock_skew = 5.0  # the RS lives 5 s later: the token expired
    expired = call(client, key, token, local_servers.api_url + "/x")
    assert expired.status_code == 401
    assert 'error="invalid_token"' in expired.headers["www-authenticate"]
    local_servers.resource_server.clock_skew = 0.0
    with start_local_servers() as other:
        foreign = get_token(client, other, key)
    response = call(client, key, foreign, local_servers.api_url + "/x")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_rs_nonce_demand_and_retry(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    token = get_token(client, local_servers, key)
    local_servers.resource_server.require_nonce = True
    url = local_servers.api_url + "/x"
    demand = call(client, key, token, url)
    assert demand.status_code == 401
    assert demand.headers["www-authenticate"].startswith('DPoP error="use_dpop_nonce"')
    nonce = demand.headers["dpop-nonce"]
    ok = call(client, key, token, url, nonce=nonce)
    assert ok.status_code == 200
    assert ok.headers["dpop-nonce"] == nonce
    # The AS keeps its own nonces: the RS nonce means nothing there.
    assert local_servers.authorization_server.nonces.was_issued(nonce) is False


def test_rs_failure_modes(local_servers: FaultServers, client: httpx.Client, key: HandKey) -> None:
    token = get_token(client, local_servers, key)
    rs = local_servers.resource_server
    url = local_servers.api_url + "/x"
    rs.mode = "invalid_token_always"
    for _ in range(2):
        r = call(client, key, token, url)
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    rs.mode = "nonce_always"
    a = call(client, key, token, url)
    b = call(client, key, token, url, nonce=a.headers["dpop-nonce"])
    assert 'error="use_dpop_nonce"' in b.headers["www-authenticate"]
    assert a.headers["dpop-nonce"] != b.headers["dpop-nonce"]
    rs.mode = "nonce_repeat"
    c = call(client, key, token, url)
    d = call(client, key, token, url, nonce=c.headers["dpop-nonce"])
    assert d.status_code == 401
    assert c.headers["dpop-nonce"] == d.headers["dpop-nonce"]
    rs.mode = "error_500"
    assert call(client, key, token, url).status_code == 500
    rs.mode = "ok"
    assert call(client, key, token, url).status_code == 200


def test_rs_slow_mode(local_servers: FaultServers, client: httpx.Client, key: HandKey) -> None:
    token = get_token(client, local_servers, key)
    local_servers.resource_server.mode = "slow"
    local_servers.resource_server.slow_seconds = 1.0
    with httpx.Client(timeout=0.2) as impatient, pytest.raises(httpx.ReadTimeout):
        call(impatient, key, token, local_servers.api_url + "/x")


def test_audience_and_one_sided_nonce_switches(
    local_servers_factory: Callable[..., LocalServers], client: httpx.Client, key: HandKey
) -> None:
    servers = local_servers_factory(
        audience="https://api.example/", rs_require_nonce=True, as_require_nonce=False
    )
    assert servers.authorization_server.require_nonce is False
    assert servers.resource_server.require_nonce is True
    plain = get_token(client, servers, key)  # no nonce needed at the AS
    url = servers.api_url + "/x"
    demand = call(client, key, plain, url)
    nonce = demand.headers["dpop-nonce"]
    wrong_audience = call(client, key, plain, url, nonce=nonce)
    assert 'error="invalid_token"' in wrong_audience.headers["www-authenticate"]
    assert "audience" in wrong_audience.headers["www-authenticate"]
    response = client.post(
        servers.token_url,
        data={**GRANT, "resource": "https://api.example/"},
        auth=BASIC,
        headers={"DPoP": key.proof("POST", servers.token_url)},
    )
    scoped = response.json()["access_token"]
    assert call(client, key, scoped, url, nonce=nonce).status_code == 200


def test_records_and_counters(
    local_servers: LocalServers, client: httpx.Client, key: HandKey
) -> None:
    local_servers.resource_server.require_nonce = True
    token = get_token(client, local_servers, key)
    url = local_servers.api_url + "/p%41th?x=1"
    demand = call(client, key, token, url)
    call(client, key, token, url, nonce=demand.headers["dpop-nonce"])
    client.get(local_servers.api_url + "/no-proof")
    as_, rs = local_servers.servers
    assert (as_.token_requests, rs.api_requests) == (1, 3)
    assert rs.statuses == {401: 2, 200: 1}
    assert as_.statuses == {200: 1}
    token_seen, first, second = local_servers.seen()
    assert (token_seen.endpoint, token_seen.method, token_seen.url) == (
        "token",
        "POST",
        local_servers.token_url,
    )
    assert (first.url, first.access_token, first.nonce, first.jkt) == (url, token, None, key.jkt)
    assert (first.status, first.error) == (401, "use_dpop_nonce")
    assert (second.nonce, second.status, second.error) == (demand.headers["dpop-nonce"], 200, None)
    assert first.detail is not None
    assert "nonce" in first.detail
    assert "eyJ" not in repr(second)  # proofs and tokens stay out of reprs
    rs.clear()
    assert (rs.seen, rs.api_requests) == ([], 0)


def test_oracle_check_catches_a_bad_proof(
    local_servers: LocalServers, client: httpx.Client, key: HandKey, oracle_check: OracleCheck
) -> None:
    bad = key.proof("POST", local_servers.token_url, claims={"jti": "short"})
    client.post(local_servers.token_url, data=GRANT, auth=BASIC, headers={"DPoP": bad})
    assert [p for p in oracle_check.failures() if "jti" in p]
    oracle_check.exempt(bad)
    assert oracle_check.failures() == []
    assert oracle_check.checked >= 1


def test_oracle_check_sees_servers_started_outside_the_fixtures(
    client: httpx.Client, key: HandKey, oracle_check: OracleCheck
) -> None:
    with start_local_servers() as servers:
        get_token(client, servers, key)
    assert [seen.endpoint for seen in oracle_check.seen] == ["token"]
    assert oracle.check_proof(oracle_check.seen[0].proof, htm="POST", url=servers.token_url)


def test_rs_metadata(local_servers: LocalServers, client: httpx.Client) -> None:
    meta = client.get(local_servers.rs_url + "/.well-known/oauth-protected-resource").json()
    assert meta["authorization_servers"] == [local_servers.as_url]
    assert meta["dpop_bound_access_tokens_required"] is True


# --- ServerThread -------------------------------------------------------------------------


def hello_app() -> Starlette:
    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/", hello)])


def test_server_thread_serves_and_stops(client: httpx.Client) -> None:
    server = ServerThread(hello_app(), name="hello")
    assert server.url == f"http://127.0.0.1:{server.port}"
    with server:
        assert server.running
        response = client.get(server.url + "/")
        assert response.text == "hello"
        assert "date" in response.headers
    assert not server.running
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", server.port))
    server.stop()  # idempotent


def test_server_thread_refuses_non_loopback_and_double_start() -> None:
    with pytest.raises(ValueError, match="loopback"):
        ServerThread(hello_app(), host="0.0.0.0")
    with ServerThread(hello_app()) as server, pytest.raises(RuntimeError, match="already started"):
        server.start()


def test_local_servers_urls_and_stop() -> None:
    servers = start_local_servers()
    assert servers.token_url == servers.as_url + "/token"
    assert servers.api_url == servers.rs_url + "/api"
    assert servers.as_url != servers.rs_url
    assert servers.as_url.startswith("http://127.0.0.1:")
    servers.stop()
    servers.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(servers.api_url + "/x", timeout=2)
