"""Interoperability with independent servers: panva's oidc-provider and a `jose` resource server.

The first tests prove the harness itself with proofs made by hand (``cryptography`` directly, no
dpop_signer code): the servers accept a correct proof and reject broken ones, so the `DPoPAuth`
tests below cannot pass against a server that checks nothing. Every proof that reaches a server
is re-checked with tests/oracle.py, taken from the servers' own records.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from dpop_signer.signers.base import Signer
from tests.interop_fixtures import JoseResourceServer, OidcProvider
from tests.oracle import ath_of, check_proof, thumbprint
from tests.servers_fixtures import HandKey

if TYPE_CHECKING:
    from dpop_signer.auth import DPoPAuth

pytestmark = pytest.mark.interop

ProviderFactory = Callable[..., OidcProvider]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt_claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(claims, dict)
    return claims


def _tamper_signature(jws: str) -> str:
    # The first base64url character of the signature carries 6 bits of r: changing it always
    # changes the signature.
    head, _, signature = jws.rpartition(".")
    return f"{head}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"


def _hand_token(
    http: httpx.Client,
    provider: OidcProvider,
    key: HandKey,
    resource: str,
    *,
    nonce: str | None = None,
) -> httpx.Response:
    return http.post(
        provider.token_url,
        data={"grant_type": "client_credentials", "resource": resource, "scope": "api:read"},
        auth=provider.basic_client,
        headers={"DPoP": key.proof("POST", provider.token_url, nonce=nonce)},
    )


class RequestLog:
    """An httpx ``request`` event hook: every request the client sends, token requests included."""

    def __init__(self) -> None:
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> None:
        self.sent.append(request)

    async def hook_async(self, request: httpx.Request) -> None:
        self.sent.append(request)

    def to(self, url: str) -> list[httpx.Request]:
        return [r for r in self.sent if str(r.url) == url]


def _recheck_token_requests(provider: OidcProvider, jkt: str, log: RequestLog | None = None) -> int:
    """Run the oracle on every proof the AS received in this test; return how many.

    With ``log`` (the client's request hook), the requests the client sent must be exactly the
    ones the AS recorded, so nothing was sent that the AS did not see and vice versa.
    """
    entries = provider.requests()
    if log is not None:
        sent = log.to(provider.token_url)
        assert [(r.method, str(r.url), r.headers.get("DPoP")) for r in sent] == [
            (e["method"], e["url"], e["dpop"]) for e in entries
        ]
    issued: set[str] = set()
    for entry in entries:
        assert entry["dpop"], f"token request {entry['seq']} carried no DPoP proof"
        nonce = _jwt_claims(entry["dpop"]).get("nonce")
        # A nonce in a proof must be one the AS handed out on an earlier response.
        assert nonce is None or nonce in issued, f"token request {entry['seq']}: unknown nonce"
        check_proof(
            entry["dpop"], htm=entry["method"], url=entry["url"], nonce=nonce, expected_jkt=jkt
        )
        if entry["dpop_nonce"] is not None:
            issued.add(entry["dpop_nonce"])
    return len(entries)


def _recheck_api_requests(rs: JoseResourceServer, jkt: str) -> int:
    """Run the oracle on every proof the RS received in this test; return how many."""
    entries = rs.seen()
    issued: set[str] = set()
    for entry in entries:
        nonce = _jwt_claims(entry["proof"]).get("nonce")
        if entry["status"] == 200 and entry["required_nonce"] is not None:
            expected = entry["required_nonce"]
        else:
            # A nonce in a proof must be one this server handed out on an earlier response.
            assert nonce is None or nonce in issued, f"request {entry['seq']}: unknown nonce"
            expected = nonce
        check_proof(
            entry["proof"],
            htm=entry["method"],
            url=entry["url"],
            access_token=entry["access_token"],
            nonce=expected,
            expected_jkt=jkt,
        )
        if entry["dpop_nonce"] is not None:
            issued.add(entry["dpop_nonce"])
    return len(entries)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        yield client


# --- the harness, proven with hand-made proofs ------------------------------------------------


def test_harness_hand_made_proofs_get_a_bound_token_and_reach_the_api(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, http: httpx.Client
) -> None:
    provider = oidc_provider()
    key = HandKey()
    jkt = thumbprint(key.jwk)

    response = _hand_token(http, provider, key, jose_rs.url)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"
    token = body["access_token"]
    claims = _jwt_claims(token)
    assert claims["cnf"] == {"jkt": jkt}
    assert claims["aud"] == jose_rs.url
    assert claims["client_id"] == provider.basic_client[0]

    url = jose_rs.url + "things/a%2Fb?x=1"
    api = http.get(
        url,
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", jose_rs.url + "things/a%2Fb", access_token=token),
        },
    )
    assert api.status_code == 200, api.text
    assert api.json()["jkt"] == jkt
    assert api.json()["path"] == "/things/a%2Fb"
    assert api.json()["client_id"] == provider.basic_client[0]

    assert _recheck_token_requests(provider, jkt) == 1
    assert _recheck_api_requests(jose_rs, jkt) == 1


def test_harness_servers_reject_broken_proofs(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, http: httpx.Client
) -> None:
    provider = oidc_provider()
    key = HandKey()
    token = _hand_token(http, provider, key, jose_rs.url).json()["access_token"]
    url = jose_rs.url + "items"

    def call(proof: str, access_token: str = token) -> httpx.Response:
        return http.get(url, headers={"Authorization": f"DPoP {access_token}", "DPoP": proof})

    wrong_ath = call(key.proof("GET", url, access_token=token, claims={"ath": ath_of(token + "x")}))
    assert (wrong_ath.status_code, wrong_ath.json()["error"]) == (401, "invalid_dpop_proof")
    wrong_htu = call(key.proof("GET", jose_rs.url + "other", access_token=token))
    assert (wrong_htu.status_code, wrong_htu.json()["error"]) == (401, "invalid_dpop_proof")
    wrong_htm = call(key.proof("POST", url, access_token=token))
    assert (wrong_htm.status_code, wrong_htm.json()["error"]) == (401, "invalid_dpop_proof")
    other_key = call(HandKey().proof("GET", url, access_token=token))
    assert (other_key.status_code, other_key.json()["error"]) == (401, "invalid_token")
    assert 'error="invalid_token"' in other_key.headers["WWW-Authenticate"]
    forged_token = _tamper_signature(token)
    forged = call(key.proof("GET", url, access_token=forged_token), access_token=forged_token)
    assert (forged.status_code, forged.json()["error"]) == (401, "invalid_token")

    replayed = key.proof("GET", url, access_token=token)
    assert call(replayed).status_code == 200
    again = call(replayed)
    assert (again.status_code, again.json()["error"]) == (401, "invalid_dpop_proof")

    # The AS rejects a proof for another URL and a proof that is not signed by its jwk.
    bad_htu = http.post(
        provider.token_url,
        data={"grant_type": "client_credentials", "resource": jose_rs.url},
        auth=provider.basic_client,
        headers={"DPoP": key.proof("POST", provider.issuer + "/other")},
    )
    assert (bad_htu.status_code, bad_htu.json()["error"]) == (400, "invalid_dpop_proof")
    tampered = _tamper_signature(key.proof("POST", provider.token_url))
    bad_sig = http.post(
        provider.token_url,
        data={"grant_type": "client_credentials", "resource": jose_rs.url},
        auth=provider.basic_client,
        headers={"DPoP": tampered},
    )
    assert (bad_sig.status_code, bad_sig.json()["error"]) == (400, "invalid_dpop_proof")


def test_harness_nonce_demands_at_both_servers(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, http: httpx.Client
) -> None:
    provider = oidc_provider(require_nonce=True)
    jose_rs.configure(require_nonce=True)
    key = HandKey()

    demand = _hand_token(http, provider, key, jose_rs.url)
    assert demand.status_code == 400
    assert demand.json()["error"] == "use_dpop_nonce"
    as_nonce = demand.headers["DPoP-Nonce"]
    granted = _hand_token(http, provider, key, jose_rs.url, nonce=as_nonce)
    assert granted.status_code == 200, granted.text
    token = granted.json()["access_token"]

    url = jose_rs.url + "nonce"
    first = http.get(
        url,
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", url, access_token=token),
        },
    )
    assert first.status_code == 401
    assert 'error="use_dpop_nonce"' in first.headers["WWW-Authenticate"]
    rs_nonce = first.headers["DPoP-Nonce"]
    second = http.get(
        url,
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("GET", url, access_token=token, nonce=rs_nonce),
        },
    )
    assert second.status_code == 200, second.text

    assert [e["error"] for e in provider.requests()] == ["use_dpop_nonce", None]
    assert [e["status"] for e in jose_rs.seen()] == [401, 200]
    _recheck_token_requests(provider, thumbprint(key.jwk))
    _recheck_api_requests(jose_rs, thumbprint(key.jwk))


def test_harness_wrong_client_secret_is_invalid_client(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, http: httpx.Client
) -> None:
    provider = oidc_provider()
    key = HandKey()
    response = http.post(
        provider.token_url,
        data={"grant_type": "client_credentials", "resource": jose_rs.url},
        auth=(provider.basic_client[0], "wrong-secret"),
        headers={"DPoP": key.proof("POST", provider.token_url)},
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_harness_private_key_jwt_client_registered_at_run_time(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, http: httpx.Client
) -> None:
    provider = oidc_provider()
    key = HandKey()
    client_id = provider.register_client(jwk=key.jwk)["client_id"]
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": provider.token_url,
        "jti": _b64(secrets.token_bytes(16)),
        "iat": now,
        "exp": now + 60,
    }
    assertion = key.sign_jws({"alg": "ES256", "typ": "JWT"}, claims)
    response = http.post(
        provider.token_url,
        data={
            "grant_type": "client_credentials",
            "resource": jose_rs.url,
            "client_id": client_id,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        headers={"DPoP": key.proof("POST", provider.token_url)},
    )
    assert response.status_code == 200, response.text
    assert _jwt_claims(response.json()["access_token"])["client_id"] == client_id


# --- our proof builder against the independent servers ----------------------------------------


@pytest.mark.parametrize(
    "path",
    ["items", "a%2Fb/c%20d", "%7Euser/caf%C3%A9", "x;y=1/z"],
)
def test_builder_proofs_pass_oidc_provider_and_jose(
    oidc_provider: ProviderFactory,
    jose_rs: JoseResourceServer,
    http: httpx.Client,
    pem_signer: Signer,
    path: str,
) -> None:
    from dpop_signer.proof import DPoPProofBuilder

    provider = oidc_provider()
    builder = DPoPProofBuilder(pem_signer)
    jkt = thumbprint(dict(pem_signer.public_jwk))
    response = http.post(
        provider.token_url,
        data={"grant_type": "client_credentials", "resource": jose_rs.url},
        auth=provider.basic_client,
        headers={"DPoP": builder.build("POST", provider.token_url)},
    )
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert _jwt_claims(token)["cnf"]["jkt"] == jkt

    # The full URL with query and fragment goes to the builder; the RS sees the raw path.
    url = f"{jose_rs.url}{path}?q=1&r=%20"
    api = http.get(
        url,
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": builder.build("GET", url + "#frag", access_token=token),
        },
    )
    assert api.status_code == 200, api.text
    assert api.json()["path"] == "/" + path
    assert _recheck_token_requests(provider, jkt) == 1
    assert _recheck_api_requests(jose_rs, jkt) == 1


# --- DPoPAuth against oidc-provider and the jose resource server -------------------------------


def _client(log: RequestLog, auth: httpx.Auth | None = None) -> httpx.Client:
    return httpx.Client(auth=auth, event_hooks={"request": [log]}, trust_env=False, timeout=10.0)


def _auth(
    signer: Signer,
    provider: OidcProvider,
    rs: JoseResourceServer,
    client: tuple[str, str | None] | None = None,
    **options: Any,
) -> DPoPAuth:
    from dpop_signer.auth import DPoPAuth

    client_id, secret = client or provider.basic_client
    options.setdefault("resource", rs.url)
    options.setdefault("scope", "api:read api:write")
    return DPoPAuth(
        signer, token_url=provider.token_url, client_id=client_id, client_secret=secret, **options
    )


@pytest.mark.parametrize("client_auth", ["client_secret_basic", "client_secret_post"])
def test_auth_fetches_bound_token_and_calls_api(
    oidc_provider: ProviderFactory,
    jose_rs: JoseResourceServer,
    pem_signer: Signer,
    client_auth: str,
) -> None:
    provider = oidc_provider()
    client = provider.basic_client if client_auth == "client_secret_basic" else provider.post_client
    auth = _auth(pem_signer, provider, jose_rs, client, client_auth=client_auth)
    jkt = thumbprint(dict(pem_signer.public_jwk))
    log = RequestLog()
    body = secrets.token_bytes(3000)
    with _client(log, auth) as http:
        token = auth.get_token(http)
        assert token.token_type.lower() == "dpop"
        claims = _jwt_claims(token.value)
        assert claims["cnf"] == {"jkt": jkt}
        assert auth.jkt == jkt
        assert claims["client_id"] == client[0]
        assert token.scope is not None
        assert set(token.scope.split()) == {"api:read", "api:write"}

        got = http.get(jose_rs.url + "items?page=2")
        posted = http.post(jose_rs.url + "items", content=body)
        deleted = http.delete(jose_rs.url + "items/7")
    for response, method in ((got, "GET"), (posted, "POST"), (deleted, "DELETE")):
        assert response.status_code == 200, response.text
        echo = response.json()
        assert (echo["method"], echo["jkt"], echo["client_id"]) == (method, jkt, client[0])
    assert posted.json()["body_length"] == len(body)
    assert posted.json()["body_sha256"] == _b64(hashlib.sha256(body).digest())
    # The request bodies of the client_secret_post client carry the secret, not a header.
    token_request = log.to(provider.token_url)[0]
    assert ("authorization" in token_request.headers) == (client_auth == "client_secret_basic")

    assert _recheck_token_requests(provider, jkt, log) == 1
    assert _recheck_api_requests(jose_rs, jkt) == 3


@pytest.fixture(scope="module")
def hsm_signer(request: pytest.FixtureRequest) -> Iterator[Signer]:
    from dpop_signer import load_signer

    uri = request.getfixturevalue("pkcs11_key_uri")
    signer = load_signer(uri)
    yield signer
    close = getattr(signer, "close", None)
    if close is not None:
        close()


@pytest.mark.parametrize(
    ("dpop_key", "assertion_key"),
    [("pem", None), ("softhsm", None), ("pem", "softhsm")],
    ids=["pem", "softhsm", "pem-dpop+softhsm-assertion"],
)
def test_auth_private_key_jwt(
    oidc_provider: ProviderFactory,
    jose_rs: JoseResourceServer,
    request: pytest.FixtureRequest,
    dpop_key: str,
    assertion_key: str | None,
) -> None:
    def signer_for(kind: str) -> Signer:
        fixture = "pem_signer" if kind == "pem" else "hsm_signer"
        signer = request.getfixturevalue(fixture)
        assert isinstance(signer, Signer)
        return signer

    provider = oidc_provider()
    signer = signer_for(dpop_key)
    assertion_signer = signer_for(assertion_key) if assertion_key else None
    registered = provider.register_client(
        jwk=dict((assertion_signer or signer).public_jwk), auth_method="private_key_jwt"
    )
    auth = _auth(
        signer,
        provider,
        jose_rs,
        (registered["client_id"], None),
        client_auth="private_key_jwt",
        assertion_signer=assertion_signer,
    )
    jkt = thumbprint(dict(signer.public_jwk))
    log = RequestLog()
    with _client(log, auth) as http:
        first = http.get(jose_rs.url + "pkjwt")
        second = http.get(jose_rs.url + "pkjwt")
    assert (first.status_code, second.status_code) == (200, 200), first.text
    assert first.json()["client_id"] == registered["client_id"]
    assert first.json()["jkt"] == jkt
    assert _recheck_token_requests(provider, jkt, log) == 1
    assert _recheck_api_requests(jose_rs, jkt) == 2


def test_auth_meets_token_endpoint_nonce_demand_with_one_retry(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, pem_signer: Signer
) -> None:
    provider = oidc_provider(require_nonce=True)
    auth = _auth(pem_signer, provider, jose_rs)
    log = RequestLog()
    with _client(log, auth) as http:
        responses = [http.get(jose_rs.url + f"n/{i}") for i in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    entries = provider.requests()
    assert [(e["status"], e["error"]) for e in entries] == [(400, "use_dpop_nonce"), (200, None)]
    first, second = (_jwt_claims(e["dpop"]) for e in entries)
    assert "nonce" not in first
    assert second["nonce"] == entries[0]["dpop_nonce"]
    jkt = thumbprint(dict(pem_signer.public_jwk))
    assert _recheck_token_requests(provider, jkt, log) == 2
    assert _recheck_api_requests(jose_rs, jkt) == 3


def test_auth_meets_resource_server_nonce_demand_with_one_retry(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, pem_signer: Signer
) -> None:
    provider = oidc_provider()
    jose_rs.configure(require_nonce=True)
    auth = _auth(pem_signer, provider, jose_rs)
    with _client(RequestLog(), auth) as http:
        responses = [http.get(jose_rs.url + f"rs-nonce/{i}") for i in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    seen = jose_rs.seen()
    # One demand, one retry; then the cached nonce is sent up front.
    assert [(e["status"], e["error"]) for e in seen] == [
        (401, "use_dpop_nonce"),
        (200, None),
        (200, None),
        (200, None),
    ]
    assert len(provider.requests()) == 1
    assert _recheck_api_requests(jose_rs, thumbprint(dict(pem_signer.public_jwk))) == 4


def test_auth_gives_up_when_resource_server_demands_a_new_nonce_every_time(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, pem_signer: Signer
) -> None:
    from dpop_signer.errors import UseDPoPNonceError

    provider = oidc_provider()
    jose_rs.configure(require_nonce=True, rotate_nonce=True)
    auth = _auth(pem_signer, provider, jose_rs)
    with _client(RequestLog(), auth) as http, pytest.raises(UseDPoPNonceError) as caught:
        http.get(jose_rs.url + "always-nonce")
    seen = jose_rs.seen()
    assert [e["error"] for e in seen] == ["use_dpop_nonce", "use_dpop_nonce"]
    message = str(caught.value)
    assert "nonce" in message
    for entry in seen:
        assert entry["required_nonce"] not in message
        assert entry["access_token"] not in message
        assert entry["proof"] not in message
    assert _recheck_api_requests(jose_rs, thumbprint(dict(pem_signer.public_jwk))) == 2


def test_async_client_concurrent_requests_share_one_token_despite_both_nonce_demands(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, pem_signer: Signer
) -> None:
    provider = oidc_provider(require_nonce=True)
    jose_rs.configure(require_nonce=True)
    auth = _auth(pem_signer, provider, jose_rs)
    log = RequestLog()
    count = 20

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            auth=auth, event_hooks={"request": [log.hook_async]}, trust_env=False, timeout=10.0
        ) as http:
            return await asyncio.gather(
                *(http.get(jose_rs.url + f"async/{i}") for i in range(count))
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * count
    jkt = thumbprint(dict(pem_signer.public_jwk))
    # Single flight: one demand and one retry at the token endpoint, whatever the concurrency.
    assert _recheck_token_requests(provider, jkt, log) == 2
    seen = jose_rs.seen()
    assert sum(e["status"] == 200 for e in seen) == count
    assert all(e["error"] == "use_dpop_nonce" for e in seen if e["status"] != 200)
    assert len(seen) <= 2 * count
    _recheck_api_requests(jose_rs, jkt)


@pytest.mark.slow
def test_auth_renews_short_lived_tokens_without_a_failed_request(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, pem_signer: Signer
) -> None:
    provider = oidc_provider(ttl=3)
    # The default leeway (30 s) is capped at half the lifetime: renewal 1.5 s before expiry, which
    # also covers oidc-provider's whole-second iat/exp.
    auth = _auth(pem_signer, provider, jose_rs)
    statuses: list[int] = []
    deadline = time.monotonic() + 4.5
    with _client(RequestLog(), auth) as http:
        for i in range(300):  # bounded by count and by time
            if time.monotonic() >= deadline:
                break
            statuses.append(http.get(jose_rs.url + f"renew/{i}").status_code)
            time.sleep(0.05)
    assert statuses
    assert set(statuses) == {200}
    tokens = provider.requests()
    assert all(e["status"] == 200 for e in tokens)
    # 3-s tokens renewed 1.5 s early over 4.5 s: at t=0, ~1.5, ~3 and perhaps ~4.5 s.
    assert 3 <= len(tokens) <= 5
    seen = jose_rs.seen()
    assert len({e["access_token"] for e in seen}) == len(tokens)
    assert all(e["status"] == 200 for e in seen)
    for entry in seen:
        assert _jwt_claims(entry["access_token"])["exp"] > entry["time"]
    _recheck_api_requests(jose_rs, thumbprint(dict(pem_signer.public_jwk)))


def test_auth_wrong_client_secret_is_token_endpoint_error_invalid_client(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, pem_signer: Signer
) -> None:
    from dpop_signer.errors import TokenEndpointError

    provider = oidc_provider()
    wrong = "wrong-secret-" + secrets.token_hex(8)
    auth = _auth(pem_signer, provider, jose_rs, (provider.basic_client[0], wrong))
    log = RequestLog()
    with _client(log, auth) as http, pytest.raises(TokenEndpointError) as caught:
        http.get(jose_rs.url + "never")
    assert caught.value.error == "invalid_client"
    assert caught.value.status == 401
    assert wrong not in str(caught.value)
    assert jose_rs.seen() == []
    assert _recheck_token_requests(provider, thumbprint(dict(pem_signer.public_jwk)), log) == 1


def test_auth_renews_once_on_invalid_token(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, pem_signer: Signer
) -> None:
    provider = oidc_provider()
    jose_rs.configure(invalid_token=1)
    auth = _auth(pem_signer, provider, jose_rs)
    with _client(RequestLog(), auth) as http:
        response = http.get(jose_rs.url + "revoked-once")
    assert response.status_code == 200, response.text
    seen = jose_rs.seen()
    assert [(e["status"], e["error"]) for e in seen] == [(401, "invalid_token"), (200, None)]
    assert seen[0]["access_token"] != seen[1]["access_token"]
    assert len(provider.requests()) == 2
    _recheck_api_requests(jose_rs, thumbprint(dict(pem_signer.public_jwk)))


def test_auth_invalid_token_twice_is_a_clear_error(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, pem_signer: Signer
) -> None:
    from dpop_signer.errors import OAuthError

    provider = oidc_provider()
    jose_rs.configure(invalid_token=-1)
    auth = _auth(pem_signer, provider, jose_rs)
    with _client(RequestLog(), auth) as http, pytest.raises(OAuthError) as caught:
        http.get(jose_rs.url + "revoked")
    message = str(caught.value)
    assert "invalid_token" in message
    seen = jose_rs.seen()
    assert [e["error"] for e in seen] == ["invalid_token", "invalid_token"]
    assert len(provider.requests()) == 2
    for entry in seen:
        assert entry["access_token"] not in message
    assert _recheck_api_requests(jose_rs, thumbprint(dict(pem_signer.public_jwk))) == 2


def test_auth_headers_for_another_http_stack(
    oidc_provider: ProviderFactory, jose_rs: JoseResourceServer, hsm_signer: Signer
) -> None:
    provider = oidc_provider()
    # No resource indicator: the fixture made the jose RS the AS's default resource.
    auth = _auth(hsm_signer, provider, jose_rs, resource=None)
    url = jose_rs.url + "elsewhere?x=1"
    with _client(RequestLog()) as http:
        headers = auth.headers(http, "PUT", url)
        response = http.put(url, headers=headers, content=b"{}")
    assert response.status_code == 200, response.text
    jkt = thumbprint(dict(hsm_signer.public_jwk))
    assert response.json()["jkt"] == jkt
    assert _jwt_claims(headers["Authorization"].split(" ", 1)[1])["aud"] == jose_rs.url
    assert _recheck_token_requests(provider, jkt) == 1
    assert _recheck_api_requests(jose_rs, jkt) == 1
