"""Test and demo support shipped with the package: local DPoP servers on 127.0.0.1.

Not needed in production. `start_local_servers` starts an authorization server and a resource
server (see `dpop_signer.testing.servers`); `ServerThread` runs any ASGI app on a loopback port.
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
