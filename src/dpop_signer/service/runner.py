"""Run an ASGI application on uvicorn, on a socket we bound ourselves.

Binding here rather than in uvicorn gives the service control of what uvicorn would otherwise
decide: a unix socket created with mode 0600 (uvicorn chmods its own to 0666), port 0 resolved
before the ``listening`` log line (tests and supervisors read the real port from it), and no
``X-Forwarded-For`` trust (a local caller must not choose the address in the audit log).

Uvicorn parses HTTP with httptools (a dependency: with its pure-Python h11 parser the service
spends about twice the CPU per request). It handles SIGTERM and SIGINT: it stops accepting, lets
in-flight requests finish (up to ``graceful_timeout``), runs the application's shutdown (closing
the HTTP client and the HSM session) and returns; the process then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from dpop_signer.service.logs import log_event
from dpop_signer.service.security import Listen, remove_unix_socket

__all__ = ["serve_app"]


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, listen: Listen, sock: socket.socket) -> None:
        super().__init__(config)
        self._listen = listen
        self._sock = sock
        self.stopped_by: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # Uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die
            # by the signal; the shutdown was complete, so exit 0 instead (systemd: clean stop).
            self.stopped_by = list(getattr(self, "_captured_signals", []))
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            port = None if self._listen.is_unix else self._sock.getsockname()[1]
            log_event("listening", address=self._listen.describe(port))


def serve_app(
    app: ASGIApp,
    listen: Listen,
    sock: socket.socket,
    *,
    graceful_timeout: int = 10,
    **fields: object,
) -> bool:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT; False when startup failed.

    ``fields`` are added to the ``starting`` log line (mode, origins, ...).
    """
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout,
    )
    server = _Server(config, listen, sock)
    log_event("starting", logging.INFO, address=listen.describe(), **fields)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        remove_unix_socket(listen)
    if server.stopped_by:
        log_event("exit", signal=signal.Signals(server.stopped_by[-1]).name)
    return server.started
