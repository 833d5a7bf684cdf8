"""``dpop demo``: the whole DPoP flow, end to end, on this machine, with a readable log.

It starts the in-package authorization and resource servers (`dpop_signer.testing.servers`) on
free 127.0.0.1 ports, with nonces demanded on both sides so that the log shows the full dance of
RFC 9449: a token request that the server answers with ``use_dpop_nonce`` (§8), the retry with
the nonce, the DPoP-bound token (§5), then the API call with ``ath`` (§7) and its own nonce
demand (§9). The key is the one in ``DPOP_KEY`` (``make demo`` points it at the development
SoftHSM2 token) or, when none is set, a temporary PEM key, and the demo says which. Its last
line says what was proven: the API accepted a token bound to this key's thumbprint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO

from dpop_signer.config import ENV_PREFIX, build_auth, build_signer, load_settings
from dpop_signer.console import SessionLog, mask, mask_uri
from dpop_signer.errors import OAuthError
from dpop_signer.signers.base import close_signer
from dpop_signer.tokens import USER_AGENT

__all__ = ["run_demo"]

_DEMO_PATH = "/api/hello"


def run_demo(*, key: str | None, require_nonce: bool, out: IO[str]) -> None:
    """Run the demo, printing to ``out``.

    Raises:
        DPoPSignerError: the key cannot be opened or the flow fails.
        OAuthError: the API did not answer 200.
    """
    import httpx

    from dpop_signer.jwk import jwk_thumbprint
    from dpop_signer.signers.pem import generate_pem_key
    from dpop_signer.testing.servers import start_local_servers

    # Only the key and its PIN come from the environment: the servers are ours, and a stray
    # DPOP_TOKEN_URL or DPOP_CLIENT_AUTH from the user's shell must not redirect the demo.
    env = {
        name: value
        for name, value in os.environ.items()
        if name in (f"{ENV_PREFIX}KEY", f"{ENV_PREFIX}PIN", f"{ENV_PREFIX}PIN_FILE")
    }
    with tempfile.TemporaryDirectory(prefix="dpop-demo-") as workdir:
        settings = load_settings({"key": key}, env=env)
        if settings.key is None:
            pem = Path(workdir, "demo-key.pem")
            generate_pem_key(pem).close()
            settings = settings.with_values("the demo", key=str(pem), pin=None)
            _say(
                out,
                "no DPOP_KEY set: using a temporary PEM key (in memory, development only); "
                "`make demo` uses the SoftHSM2 development token instead",
            )
        assert settings.key is not None
        signer = build_signer(settings)
        jkt = jwk_thumbprint(signer.public_jwk)
        try:
            kind = "PKCS#11 token" if settings.key.startswith("pkcs11:") else "PEM file"
            _say(out, f"key: {mask_uri(settings.key)} ({kind})")
            _say(out, f"key thumbprint (jkt): {jkt}")
            with start_local_servers(require_nonce=require_nonce) as servers:
                _say(out, f"authorization server: {servers.as_url} (token endpoint /token)")
                _say(out, f"resource server:      {servers.rs_url}")
                _say(
                    out,
                    f"nonces are {'demanded' if require_nonce else 'not demanded'} by both; "
                    f"client {servers.client_id!r} authenticates with client_secret_basic",
                )
                settings = settings.with_values(
                    "the demo",
                    token_url=servers.token_url,
                    client_id=servers.client_id,
                    client_secret=servers.client_secret,
                )
                auth = build_auth(settings, signer)
                log = SessionLog(out, token_url=servers.token_url)
                print(file=out)
                with httpx.Client(
                    auth=auth,
                    event_hooks=log.hooks(),
                    timeout=10.0,
                    headers={"User-Agent": USER_AGENT},
                ) as client:
                    response = client.get(servers.rs_url + _DEMO_PATH)
                    body = response.read()
        finally:
            close_signer(signer)

    print(file=out)
    _say(out, f"API response: {response.status_code} {response.reason_phrase}")
    try:
        shown = json.dumps(json.loads(body), indent=2)
    except ValueError:
        shown = mask(body.decode("utf-8", "replace"))
    print(shown, file=out, flush=True)
    if response.status_code != 200:
        raise OAuthError(
            f"the demo API answered {response.status_code}, not 200; this is a bug in "
            "dpop-signer or its local servers, please report it with the log above"
        )
    print(file=out)
    _say(
        out,
        f"proven: the API accepted a DPoP-bound token for jkt {jkt}, with a fresh proof "
        "signed by the key for each request",
    )


def _say(out: IO[str], text: str) -> None:
    print(f"* {text}", file=out, flush=True)
