"""What is particular to `DPoPRequestsAuth` (the shared behaviour is in tests/test_conformance.py).

Against the real local servers on 127.0.0.1; the autouse oracle re-checks every proof.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import requests

from dpop_signer.errors import ServerUnreachableError
from dpop_signer.requests import DPoPRequestsAuth
from dpop_signer.signers.base import Signer
from dpop_signer.testing.servers import LocalServers
from tests import oracle


def auth_for(servers: LocalServers, signer: Signer, **options: object) -> DPoPRequestsAuth:
    return DPoPRequestsAuth(
        signer,
        token_url=servers.token_url,
        client_id=servers.client_id,
        client_secret=servers.client_secret,
        **options,  # type: ignore[arg-type]
    )


def test_the_session_it_is_set_on_also_sends_its_token_requests(
    local_servers: LocalServers, pem_signer: Signer
) -> None:
    with requests.Session() as session:
        session.trust_env = False
        session.auth = auth_for(local_servers, pem_signer, session=session)
        response = session.get(f"{local_servers.api_url}/x", timeout=30)
    assert response.status_code == 200
    assert local_servers.authorization_server.token_requests == 1
    assert [seen.access_token for seen in local_servers.authorization_server.seen] == [None]


def test_a_seekable_file_body_is_sent_again_on_a_nonce_demand(
    local_servers_factory: object, pem_signer: Signer, tmp_path: Path
) -> None:
    servers = local_servers_factory(rs_require_nonce=True)  # type: ignore[operator]
    path = tmp_path / "body.bin"
    data = bytes(range(256)) * 100
    path.write_bytes(data)
    with requests.Session() as session, path.open("rb") as body:
        session.auth = auth_for(servers, pem_signer)
        response = session.post(f"{servers.api_url}/upload", data=body, timeout=30)
    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert [r.status_code for r in response.history] == [401]
    assert servers.resource_server.api_requests == 2


def test_headers_and_get_token(local_servers: LocalServers, pem_signer: Signer) -> None:
    auth = auth_for(local_servers, pem_signer)
    url = f"{local_servers.api_url}/by-hand"
    headers = auth.headers("GET", url)
    token = auth.get_token()
    assert headers["Authorization"] == f"DPoP {token.value}"
    oracle.check_proof(
        headers["DPoP"],
        htm="GET",
        url=url,
        access_token=token.value,
        nonce=None,
        expected_jkt=auth.jkt,
    )
    response = requests.get(url, headers=headers, timeout=30)
    assert response.status_code == 200
    assert local_servers.authorization_server.token_requests == 1


def test_unreachable_token_endpoint_is_our_error_chained_from_requests(
    pem_signer: Signer,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    auth = DPoPRequestsAuth(
        pem_signer, token_url=f"http://127.0.0.1:{port}/token", client_id="c", client_secret="s"
    )
    with pytest.raises(ServerUnreachableError, match="cannot reach the token endpoint") as info:
        requests.get(f"http://127.0.0.1:{port}/api", auth=auth, timeout=30)
    assert isinstance(info.value.__cause__, requests.ConnectionError)
