"""The local DPoP servers with fault modes: servers that misbehave on purpose, for this repository.

`dpop_signer.testing.servers` ships well-behaved servers only; the faults the client must
survive live here, built on the hooks of those servers (`RecordingServer.on_request`,
`RecordingServer.refusal`, `LocalAuthorizationServer.token_type`):

- `FaultyAuthorizationServer`: ``mode`` (`AsMode`), ``slow_seconds``, ``stall_until`` (a stalled
  token endpoint) and ``unavailable_retry_after`` (503 with ``Retry-After``);
- `FaultyResourceServer`: ``mode`` (`RsMode`) and ``slow_seconds``.

Every switch is an attribute a test may flip while the servers run. `start_fault_servers` is
`start_local_servers` with these servers and the switches ``as_mode``, ``rs_mode`` and
``slow_seconds``; the ``local_servers*`` fixtures (``tests/servers_fixtures.py``) use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from dpop_signer.testing.servers import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    LocalAuthorizationServer,
    LocalResourceServer,
    LocalServers,
    RecordingServer,
    Refusal,
)
from dpop_signer.verify import INVALID_TOKEN, USE_DPOP_NONCE

__all__ = [
    "AsMode",
    "FaultServers",
    "FaultyAuthorizationServer",
    "FaultyResourceServer",
    "RsMode",
    "start_fault_servers",
]

AsMode = Literal["ok", "error_500", "html", "bearer", "nonce_always", "nonce_repeat", "slow"]
"""Authorization server behaviour: ``ok``; ``error_500`` (500 text); ``html`` (200 HTML page);
``bearer`` (a valid token with ``token_type`` Bearer); ``nonce_always`` (every request is a
``use_dpop_nonce`` demand with a new nonce); ``nonce_repeat`` (every request is a demand with the
same nonce); ``slow`` (sleep ``slow_seconds`` first)."""

RsMode = Literal["ok", "error_500", "invalid_token_always", "nonce_always", "nonce_repeat", "slow"]
"""Resource server behaviour: as `AsMode`, plus ``invalid_token_always`` (401 invalid_token)."""


def _repeat_nonce(server: RecordingServer) -> str:
    """A nonce the server's book issued (so the proof record shows it as expected), not current."""
    nonce = server.nonces.rotate()
    server.nonces.rotate()
    return nonce


def _nonce_refusal(
    server: RecordingServer, mode: str, repeat_nonce: str, who: str
) -> Refusal | None:
    """The ``use_dpop_nonce`` demand of the ``nonce_always`` / ``nonce_repeat`` modes."""
    if mode == "nonce_always":
        return Refusal(USE_DPOP_NONCE, f"{who} requires nonce", server.nonces.rotate())
    if mode == "nonce_repeat":
        return Refusal(USE_DPOP_NONCE, f"{who} requires nonce", repeat_nonce)
    return None


class FaultyAuthorizationServer(LocalAuthorizationServer):
    """`LocalAuthorizationServer` plus fault switches, all flippable while it runs."""

    def __init__(
        self,
        *,
        mode: AsMode = "ok",
        slow_seconds: float = 2.0,
        stall_until: float | None = None,
        unavailable_retry_after: str | None = None,
        **options: Any,
    ) -> None:
        """Create the server (not started); see `LocalAuthorizationServer` for the rest.

        Args:
            mode: See `AsMode`.
            slow_seconds: Delay for ``slow`` mode.
            stall_until: A stalled token endpoint: until this ``time.time()`` every token
                request waits (at most 60 s), then is answered as usual.
            unavailable_retry_after: When set, every token request is answered ``503`` with
                this ``Retry-After`` header value.
            **options: `LocalAuthorizationServer` arguments.
        """
        super().__init__(**options)
        self.mode: AsMode = mode
        self.slow_seconds = slow_seconds
        self.stall_until = stall_until
        self.unavailable_retry_after = unavailable_retry_after
        self.repeat_nonce = _repeat_nonce(self)
        """The one nonce ``nonce_repeat`` mode demands over and over."""

    async def on_request(self, request: Request) -> Response | None:
        stall_until = self.stall_until
        if stall_until is not None and stall_until > time.time():
            # Read first (Starlette keeps it): a client that gave up must not turn the late
            # read into a ClientDisconnect traceback.
            await request.body()
            await asyncio.sleep(min(stall_until - time.time(), 60.0))
        if self.unavailable_retry_after is not None:
            return PlainTextResponse(
                "Service Unavailable",
                status_code=503,
                headers={"Retry-After": self.unavailable_retry_after},
            )
        mode = self.mode
        if mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        elif mode == "error_500":
            return PlainTextResponse("Internal Server Error", status_code=500)
        elif mode == "html":
            return HTMLResponse("<!doctype html><html><body><h1>Sign in</h1></body></html>")
        return None

    def refusal(self) -> Refusal | None:
        return _nonce_refusal(self, self.mode, self.repeat_nonce, "authorization server")

    def token_type(self) -> str:
        return "Bearer" if self.mode == "bearer" else super().token_type()


class FaultyResourceServer(LocalResourceServer):
    """`LocalResourceServer` plus fault switches, all flippable while it runs."""

    def __init__(
        self,
        authorization_server: LocalAuthorizationServer,
        *,
        mode: RsMode = "ok",
        slow_seconds: float = 2.0,
        **options: Any,
    ) -> None:
        """``options`` go to `LocalResourceServer`; ``mode``: see `RsMode`."""
        super().__init__(authorization_server, **options)
        self.mode: RsMode = mode
        self.slow_seconds = slow_seconds
        self.repeat_nonce = _repeat_nonce(self)
        """The one nonce ``nonce_repeat`` mode demands over and over."""

    async def on_request(self, request: Request) -> Response | None:
        if self.mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        elif self.mode == "error_500":
            return PlainTextResponse("Internal Server Error", status_code=500)
        return None

    def refusal(self) -> Refusal | None:
        if self.mode == "invalid_token_always":
            return Refusal(INVALID_TOKEN, "access token rejected (invalid_token_always)")
        return _nonce_refusal(self, self.mode, self.repeat_nonce, "resource server")


@dataclass
class FaultServers(LocalServers):
    """`LocalServers` whose servers have the fault switches."""

    authorization_server: FaultyAuthorizationServer
    resource_server: FaultyResourceServer


def start_fault_servers(
    *,
    require_nonce: bool = False,
    as_require_nonce: bool | None = None,
    rs_require_nonce: bool | None = None,
    token_lifetime: float = 3600.0,
    as_mode: AsMode = "ok",
    rs_mode: RsMode = "ok",
    slow_seconds: float = 2.0,
    clock_skew: float = 0.0,
    nonce_rotation: float | None = 60.0,
    client_id: str = DEMO_CLIENT_ID,
    client_secret: str | None = DEMO_CLIENT_SECRET,
    client_jwk: Mapping[str, Any] | None = None,
    audience: str | None = None,
) -> FaultServers:
    """Start `FaultyAuthorizationServer` and `FaultyResourceServer` as `start_local_servers` does.

    Same switches, plus ``as_mode`` (AS ``.mode``), ``rs_mode`` (RS ``.mode``) and
    ``slow_seconds`` (both).
    """
    authorization_server = FaultyAuthorizationServer(
        clients={},
        require_nonce=require_nonce if as_require_nonce is None else as_require_nonce,
        token_lifetime=token_lifetime,
        mode=as_mode,
        slow_seconds=slow_seconds,
        clock_skew=clock_skew,
        nonce_rotation=nonce_rotation,
    )
    authorization_server.register_client(client_id, secret=client_secret, jwk=client_jwk)
    resource_server = FaultyResourceServer(
        authorization_server,
        require_nonce=require_nonce if rs_require_nonce is None else rs_require_nonce,
        mode=rs_mode,
        slow_seconds=slow_seconds,
        clock_skew=clock_skew,
        nonce_rotation=nonce_rotation,
        audience=audience,
    )
    return FaultServers.start(
        authorization_server, resource_server, client_id=client_id, client_secret=client_secret
    )
