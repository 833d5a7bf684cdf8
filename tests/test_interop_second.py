"""Interop with a second independent pair: authgent-server and express-oauth2-jwt-bearer.

The first pair is oidc-provider and jose (tests/test_interop_oidc_provider.py). This one shares
no code with it nor with dpop_signer: authgent-server is a Python OAuth 2.1 server that verifies
DPoP proofs with PyJWT, the RS is Auth0's express-oauth2-jwt-bearer on jose 4 (fixtures in
tests/interop2_fixtures.py). The harness tests prove with hand-made proofs that both servers
check what matters, so the client tests cannot pass against servers that check nothing.

authgent-server 0.3.4 departs from RFC 9449 in ways a client meets; each test below that shows
one names the rule, and the client tests show that dpop_signer stays correct regardless:

- a nonce demand at the token endpoint is HTTP 401, not 400 (§8 / RFC 6749 §5.2);
- an invalid proof at the token endpoint is HTTP 401, not 400 (§5 / RFC 6749 §5.2);
- a replayed token-request proof, and one without ``jti``, are accepted (§11.1; §4.2 and
  §4.3 check 3).

express-oauth2-jwt-bearer 1.10 keeps no ``jti`` record, so a replayed proof passes it alone
(§11.1); rs2.mjs adds that check, and a test shows the library without it.

Every proof that reached a server is re-checked with tests/oracle.py from the servers' records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from dpop_signer.signers.base import Signer
from tests import oracle
from tests.cli_support import assert_absent, assert_ok, dpop
from tests.interop2_fixtures import Authgent, AuthgentStack, ExpressRs
from tests.servers_fixtures import HandKey
from tests.test_cli import jwk_of_pem
from tests.test_interop_oidc_provider import RequestLog, _jwt_claims, _tamper_signature

pytestmark = pytest.mark.interop

StackFactory = Callable[[str], AuthgentStack]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="module")
def hsm_signer(request: pytest.FixtureRequest) -> Iterator[Signer]:
    from dpop_signer import load_signer

    signer = load_signer(request.getfixturevalue("pkcs11_key_uri"))
    yield signer
    close = getattr(signer, "close", None)
    if close is not None:
        close()


def _hand_token(
    http: httpx.Client, stack: AuthgentStack, proof: str, **form: str
) -> httpx.Response:
    data = {"grant_type": "client_credentials", "scope": "api:read", "resource": stack.rs.url}
    data.update(form)
    return http.post(
        stack.authgent.token_url, data=data, auth=stack.client, headers={"DPoP": proof}
    )


def _api(http: httpx.Client, url: str, token: str, proof: str) -> httpx.Response:
    return http.get(url, headers={"Authorization": f"DPoP {token}", "DPoP": proof})


def _recheck_token_requests(authgent: Authgent, jkt: str, log: RequestLog | None = None) -> int:
    """Run the oracle on every proof the AS received in this test; return how many.

    With ``log`` (the client's request hook), what the client sent to the token endpoint must
    be exactly what the AS recorded.
    """
    entries = authgent.requests()
    if log is not None:
        sent = log.to(authgent.token_url)
        assert [(r.method, str(r.url), r.headers.get("DPoP")) for r in sent] == [
            (e["method"], e["url"], e["dpop"]) for e in entries
        ]
    issued: set[str] = set()
    for entry in entries:
        assert entry["dpop"], f"token request {entry['seq']} carried no DPoP proof"
        nonce = _jwt_claims(entry["dpop"]).get("nonce")
        # A nonce in a proof must be one the AS handed out earlier in this test.
        assert nonce is None or nonce in issued, f"token request {entry['seq']}: unknown nonce"
        oracle.check_proof(
            entry["dpop"], htm=entry["method"], url=entry["url"], nonce=nonce, expected_jkt=jkt
        )
        if entry["dpop_nonce"] is not None:
            issued.add(entry["dpop_nonce"])
    return len(entries)


def _recheck_api_requests(rs: ExpressRs, jkt: str) -> int:
    """Run the oracle on every proof the RS received in this test; return how many."""
    entries = rs.seen()
    for entry in entries:
        oracle.check_proof(
            entry["proof"],
            htm=entry["method"],
            url=entry["url"],
            access_token=entry["access_token"],
            expected_jkt=jkt,
        )
    return len(entries)


# --- the harness, proven with hand-made proofs ------------------------------------------------


def test_harness_hand_made_proofs_get_a_bound_token_and_the_rs_refuses_broken_ones(
    authgent_stack: StackFactory, http: httpx.Client
) -> None:
    stack = authgent_stack("plain")
    key = HandKey()
    granted = _hand_token(http, stack, key.proof("POST", stack.authgent.token_url))
    assert granted.status_code == 200, granted.text
    assert granted.json()["token_type"] == "DPoP"
    token = granted.json()["access_token"]
    claims = _jwt_claims(token)
    assert claims["cnf"] == {"jkt": key.jkt}
    assert claims["aud"] == stack.rs.url
    assert claims["iss"] == stack.authgent.issuer
    assert claims["client_id"] == stack.client[0]

    url = stack.rs.url + "things/a%2Fb"
    good = _api(http, url + "?x=1", token, key.proof("GET", url, access_token=token))
    assert good.status_code == 200, good.text
    assert (good.json()["jkt"], good.json()["path"]) == (key.jkt, "/things/a%2Fb")

    def refused(response: httpx.Response) -> tuple[int, str]:
        assert response.headers["WWW-Authenticate"].startswith("DPoP ")
        return response.status_code, response.json()["error"]

    # express-oauth2-jwt-bearer answers a bad proof with 400 (RFC 9449 §7.1 shows 401) and a
    # key that does not match cnf.jkt with 401 invalid_token.
    wrong_ath = key.proof("GET", url, access_token=token, claims={"ath": oracle.ath_of("x")})
    assert refused(_api(http, url, token, wrong_ath)) == (400, "invalid_dpop_proof")
    wrong_htu = key.proof("GET", stack.rs.url + "other", access_token=token)
    assert refused(_api(http, url, token, wrong_htu)) == (400, "invalid_dpop_proof")
    wrong_htm = key.proof("POST", url, access_token=token)
    assert refused(_api(http, url, token, wrong_htm)) == (400, "invalid_dpop_proof")
    other_key = HandKey().proof("GET", url, access_token=token)
    assert refused(_api(http, url, token, other_key)) == (401, "invalid_token")
    forged = _tamper_signature(token)
    forged_proof = key.proof("GET", url, access_token=forged)
    assert refused(_api(http, url, forged, forged_proof)) == (401, "invalid_token")
    bearer = http.get(url, headers={"Authorization": f"Bearer {token}"})
    assert (bearer.status_code, bearer.json()["error"]) == (400, "invalid_request")

    # The AS refuses a proof for another URL and one not signed by its jwk.
    other_url = _hand_token(http, stack, key.proof("POST", stack.authgent.issuer + "/other"))
    assert other_url.json()["error"] == "invalid_dpop_proof"
    tampered = _hand_token(
        http, stack, _tamper_signature(key.proof("POST", stack.authgent.token_url))
    )
    assert tampered.json()["error"] == "invalid_dpop_proof"

    first = stack.rs.seen()[0]
    assert first["status"] == 200
    oracle.check_proof(
        first["proof"], htm="GET", url=first["url"], access_token=token, expected_jkt=key.jkt
    )


def test_rs_refuses_a_replayed_proof(authgent_stack: StackFactory, http: httpx.Client) -> None:
    stack = authgent_stack("plain")
    key = HandKey()
    token = _hand_token(http, stack, key.proof("POST", stack.authgent.token_url)).json()
    url = stack.rs.url + "replay"
    proof = key.proof("GET", url, access_token=token["access_token"])
    assert _api(http, url, token["access_token"], proof).status_code == 200
    again = _api(http, url, token["access_token"], proof)
    assert (again.status_code, again.json()["error"]) == (401, "invalid_dpop_proof")
    assert 'error="invalid_dpop_proof"' in again.headers["WWW-Authenticate"]


def test_deviation_express_oauth2_jwt_bearer_alone_accepts_a_replayed_proof_rfc9449_11_1(
    authgent_stack: StackFactory, http: httpx.Client
) -> None:
    # RFC 9449 §11.1: a server detects replay by remembering jti values for the proofs' window.
    # express-oauth2-jwt-bearer 1.10 checks that jti is present and nothing more.
    stack = authgent_stack("plain")
    stack.rs.configure(replay_check=False)
    key = HandKey()
    token = _hand_token(http, stack, key.proof("POST", stack.authgent.token_url)).json()
    url = stack.rs.url + "replay"
    proof = key.proof("GET", url, access_token=token["access_token"])
    statuses = [_api(http, url, token["access_token"], proof).status_code for _ in range(2)]
    assert statuses == [200, 200]


def test_deviation_authgent_refuses_an_invalid_proof_with_401_not_400_rfc9449_5(
    authgent_stack: StackFactory, http: httpx.Client
) -> None:
    # RFC 9449 §5: an invalid proof at the token endpoint is an RFC 6749 §5.2 error response,
    # which is HTTP 400 (401 is for invalid_client only).
    stack = authgent_stack("plain")
    key = HandKey()
    response = _hand_token(http, stack, key.proof("POST", stack.authgent.issuer + "/other"))
    assert (response.status_code, response.json()["error"]) == (401, "invalid_dpop_proof")


def test_deviation_authgent_accepts_replayed_and_jti_less_token_proofs_rfc9449_11_1_4_2(
    authgent_stack: StackFactory, http: httpx.Client
) -> None:
    # RFC 9449 §11.1: replay detection by jti; §4.2: jti is REQUIRED and §4.3 check 3 refuses
    # a proof without a required claim. authgent-server 0.3.4 does neither at the token endpoint.
    stack = authgent_stack("plain")
    key = HandKey()
    proof = key.proof("POST", stack.authgent.token_url)
    assert [_hand_token(http, stack, proof).status_code for _ in range(2)] == [200, 200]
    no_jti = key.proof("POST", stack.authgent.token_url, drop=("jti",))
    assert _hand_token(http, stack, no_jti).status_code == 200


def test_deviation_authgent_demands_a_nonce_with_401_not_400_rfc9449_8(
    authgent_stack: StackFactory, http: httpx.Client
) -> None:
    # RFC 9449 §8: the AS answers a proof without its nonce with the RFC 6749 §5.2 error
    # use_dpop_nonce (HTTP 400) and a DPoP-Nonce header. authgent-server says 401 (with a DPoP
    # WWW-Authenticate challenge, as a resource server would, §9).
    stack = authgent_stack("nonce")
    key = HandKey()
    demand = _hand_token(http, stack, key.proof("POST", stack.authgent.token_url))
    assert (demand.status_code, demand.json()["error"]) == (401, "use_dpop_nonce")
    assert demand.headers["WWW-Authenticate"].startswith("DPoP ")
    nonce = demand.headers["DPoP-Nonce"]
    granted = _hand_token(http, stack, key.proof("POST", stack.authgent.token_url, nonce=nonce))
    assert granted.status_code == 200, granted.text
    assert _jwt_claims(granted.json()["access_token"])["cnf"] == {"jkt": key.jkt}


# --- DPoPAuth against authgent-server and express-oauth2-jwt-bearer ----------------------------


@pytest.mark.parametrize(
    ("mode", "key", "client_auth"),
    [
        ("plain", "pem", "client_secret_basic"),
        ("plain", "softhsm", "client_secret_post"),
        ("nonce", "pem", "client_secret_post"),
        ("nonce", "softhsm", "client_secret_basic"),
    ],
)
def test_auth_gets_a_bound_token_calls_the_api_and_its_proofs_cannot_be_replayed(
    authgent_stack: StackFactory,
    request: pytest.FixtureRequest,
    http: httpx.Client,
    mode: str,
    key: str,
    client_auth: str,
) -> None:
    from dpop_signer.auth import DPoPAuth

    stack = authgent_stack(mode)
    signer = request.getfixturevalue("pem_signer" if key == "pem" else "hsm_signer")
    assert isinstance(signer, Signer)
    jkt = oracle.thumbprint(dict(signer.public_jwk))
    auth = DPoPAuth(
        signer,
        token_url=stack.authgent.token_url,
        client_id=stack.client[0],
        client_secret=stack.client[1],
        client_auth=client_auth,  # type: ignore[arg-type]
        scope="api:read api:write",
        resource=stack.rs.url,
    )
    log = RequestLog()
    body = b"x" * 2000
    with httpx.Client(auth=auth, event_hooks={"request": [log]}, trust_env=False) as client:
        token = auth.get_token(client)
        assert token.token_type.lower() == "dpop"
        assert _jwt_claims(token.value)["cnf"] == {"jkt": jkt}
        got = client.get(stack.rs.url + "items?page=2")
        posted = client.post(stack.rs.url + "items", content=body)
        deleted = client.delete(stack.rs.url + "items/7")
    for response, method in ((got, "GET"), (posted, "POST"), (deleted, "DELETE")):
        assert response.status_code == 200, response.text
        assert (response.json()["method"], response.json()["jkt"]) == (method, jkt)
        assert response.json()["client_id"] == stack.client[0]
    assert posted.json()["body_length"] == len(body)
    token_request = log.to(stack.authgent.token_url)[0]
    assert ("authorization" in token_request.headers) == (client_auth == "client_secret_basic")

    entries = stack.authgent.requests()
    if mode == "nonce":
        # One demand (HTTP 401, authgent's deviation from §8), one retry with its nonce.
        assert [(e["status"], e["error"]) for e in entries] == [
            (401, "use_dpop_nonce"),
            (200, None),
        ]
        assert "nonce" not in _jwt_claims(entries[0]["dpop"])
        assert _jwt_claims(entries[1]["dpop"])["nonce"] == entries[0]["dpop_nonce"]
    else:
        assert [(e["status"], e["error"]) for e in entries] == [(200, None)]
    assert entries[-1]["token_type"] == "DPoP"
    assert _recheck_token_requests(stack.authgent, jkt, log) == len(entries)
    assert _recheck_api_requests(stack.rs, jkt) == 3

    # Every proof the client made is fresh; one of them sent again is refused as a replay.
    proofs = [r.headers["DPoP"] for r in log.sent]
    assert len({_jwt_claims(p)["jti"] for p in proofs}) == len(proofs)
    last = stack.rs.seen()[-1]
    replayed = http.request(
        last["method"],
        last["url"],
        headers={"Authorization": f"DPoP {last['access_token']}", "DPoP": last["proof"]},
    )
    assert (replayed.status_code, replayed.json()["error"]) == (401, "invalid_dpop_proof")


# --- the dpop CLI against authgent-server and express-oauth2-jwt-bearer -------------------------


@pytest.mark.parametrize("key", ["pem", "softhsm"])
def test_cli_token_and_request_meet_the_nonce_demand(
    authgent_stack: StackFactory, request: pytest.FixtureRequest, key: str
) -> None:
    stack = authgent_stack("nonce")
    if key == "pem":
        key_ref = request.getfixturevalue("pem_key_path")
        jkt = oracle.thumbprint(jwk_of_pem(key_ref))
    else:
        key_ref = request.getfixturevalue("pkcs11_key_uri")
        jkt = oracle.thumbprint(dict(request.getfixturevalue("hsm_signer").public_jwk))
    env = {
        "DPOP_KEY": key_ref,
        "DPOP_TOKEN_URL": stack.authgent.token_url,
        "DPOP_CLIENT_ID": stack.client[0],
        "DPOP_CLIENT_SECRET": stack.client[1],
        "DPOP_RESOURCE": stack.rs.url,
        "DPOP_SCOPE": "api:read",
    }

    token = json.loads(assert_ok(dpop("token", env=env)).out)
    assert token["token_type"] == "DPoP"
    assert _jwt_claims(token["access_token"])["cnf"] == {"jkt": jkt}
    result = assert_ok(dpop("request", "-v", "-i", stack.rs.url + "cli?page=1", env=env))
    assert result.out.startswith("HTTP/1.1 200")
    echo: dict[str, Any] = json.loads(result.out.replace("\r\n", "\n").split("\n\n", 1)[1])
    assert (echo["jkt"], echo["query"]) == (jkt, "?page=1")
    assert "use_dpop_nonce" in result.err

    entries = stack.authgent.requests()
    # Each command is a new process: each meets the demand once and retries once.
    assert [(e["status"], e["error"]) for e in entries] == [
        (401, "use_dpop_nonce"),
        (200, None),
    ] * 2
    _recheck_token_requests(stack.authgent, jkt)
    assert _recheck_api_requests(stack.rs, jkt) == 1
    seen = [e["dpop"] for e in entries] + [e["proof"] for e in stack.rs.seen()]
    assert_absent(result.both, [stack.client[1], token["access_token"], *seen])
