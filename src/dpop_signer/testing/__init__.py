"""Demo and test support shipped with the package: well-behaved local DPoP servers on 127.0.0.1.

Not needed in production. For ``dpop demo`` and users' own tests: `start_local_servers` starts
an authorization server and a resource server (see `dpop_signer.testing.servers`, whose hooks
let a subclass watch proofs or misbehave); `ServerThread` runs any ASGI app on a loopback port.
"""

from __future__ import annotations

from dpop_signer.testing.server_thread import ServerThread
from dpop_signer.testing.servers import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    LocalAuthorizationServer,
    LocalResourceServer,
    LocalServers,
    SeenProof,
    start_local_servers,
)

__all__ = [
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "LocalAuthorizationServer",
    "LocalResourceServer",
    "LocalServers",
    "SeenProof",
    "ServerThread",
    "start_local_servers",
]
