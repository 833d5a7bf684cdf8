"""What is particular to `DPoPMiddleware` (the shared behaviour is in tests/test_conformance.py).

Against the real local servers on 127.0.0.1; the autouse oracle re-checks every proof.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import pytest

from dpop_signer.aiohttp import DPoPMiddleware
from dpop_signer.errors import ServerUnreachableError
from dpop_signer.jwk import PublicJwk
from dpop_signer.signers.base import Signer
from dpop_signer.testing.servers import LocalServers
from dpop_signer.tokens import AccessToken

TIMEOUT = aiohttp.ClientTimeout(total=30)


class LoopWatchingSigner:
    """Signs only once the event loop has run while it waited: a blocked loop never would."""

    algorithm = "ES256"

    def __init__(self, inner: Signer) -> None:
        self._inner = inner
        self.loop_ran = threading.Event()
        self.off_loop = 0
        self.loop_thread: int | None = None

    @property
    def public_jwk(self) -> PublicJwk:
        return self._inner.public_jwk

    def sign(self, message: bytes) -> bytes:
        assert threading.get_ident() != self.loop_thread, "signed on the event loop's thread"
        self.loop_ran.clear()
        assert self.loop_ran.wait(timeout=10), "the event loop did not run while signing"
        self.off_loop += 1
        return self._inner.sign(message)


def middleware(servers: LocalServers, signer: Signer, **options: object) -> DPoPMiddleware:
    return DPoPMiddleware(
        signer,
        token_url=servers.token_url,
        client_id=servers.client_id,
        client_secret=servers.client_secret,
        **options,  # type: ignore[arg-type]
    )


def test_signing_never_blocks_the_event_loop(
    local_servers: LocalServers, pem_signer: Signer
) -> None:
    signer = LoopWatchingSigner(pem_signer)
    dpop = middleware(local_servers, signer)

    async def main() -> list[int]:
        signer.loop_thread = threading.get_ident()
        stop = asyncio.Event()

        async def heartbeat() -> None:
            for _ in range(100_000):  # bounded; stop ends it
                signer.loop_ran.set()
                if stop.is_set():
                    return
                await asyncio.sleep(0.001)

        beat = asyncio.create_task(heartbeat())
        async with aiohttp.ClientSession(middlewares=(dpop,), timeout=TIMEOUT) as session:

            async def get(i: int) -> int:
                async with session.get(f"{local_servers.api_url}/h/{i}") as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(get(i) for i in range(5)))
        stop.set()
        await asyncio.wait_for(beat, timeout=10)
        return list(statuses)

    assert asyncio.run(main()) == [200] * 5
    assert signer.off_loop == 6  # one token request and five API requests


def test_token_requests_do_not_go_through_the_middleware(
    local_servers: LocalServers, pem_signer: Signer
) -> None:
    dpop = middleware(local_servers, pem_signer)

    async def main() -> tuple[int, str, AccessToken]:
        async with aiohttp.ClientSession(middlewares=(dpop,), timeout=TIMEOUT) as session:
            token = await dpop.get_token(session)
            async with session.get(f"{local_servers.api_url}/x") as response:
                body = await response.json()
            return response.status, body["jkt"], token

    status, jkt, token = asyncio.run(main())
    assert (status, jkt) == (200, dpop.jkt)
    assert token == dpop.token
    assert local_servers.authorization_server.token_requests == 1
    # the token endpoint saw a proof for itself only, never an Authorization: DPoP header
    assert [seen.access_token for seen in local_servers.authorization_server.seen] == [None]


def test_unreachable_token_endpoint_is_our_error(pem_signer: Signer) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    dpop = DPoPMiddleware(
        pem_signer,
        token_url=f"http://127.0.0.1:{port}/token",
        client_id="c",
        client_secret="s",
    )

    async def main() -> None:
        async with (
            aiohttp.ClientSession(middlewares=(dpop,), timeout=TIMEOUT) as session,
            session.get(f"http://127.0.0.1:{port}/api"),
        ):
            pass

    with pytest.raises(ServerUnreachableError, match="cannot reach the token endpoint") as info:
        asyncio.run(main())
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectionError)
