"""`ServerThread`: run an ASGI app with uvicorn on a loopback port in a background thread.

Used for the local test servers, ``dpop demo`` and tests that need a real HTTP server on
127.0.0.1 without a subprocess. The listening socket is bound before the thread starts, so the
port (and `ServerThread.url`) is known at once and nothing races for a "free" port.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

__all__ = ["ServerThread"]


class _QuickServer(uvicorn.Server):
    """uvicorn's server, polling for `should_exit` every 10 ms instead of every 100 ms.

    Tests start and stop servers by the hundred; uvicorn's own 100 ms tick made stopping one
    cost up to 0.2 s. `on_tick` keeps its once-per-second (every tenth call) semantics.
    """

    async def main_loop(self) -> None:
        polls = 0
        if await self.on_tick(0):  # sets the Date header and checks should_exit at once
            return
        while not self.should_exit:
            await asyncio.sleep(0.01)
            polls += 1
            if polls % 10 == 0 and await self.on_tick((polls // 10) % 864000):
                return


class ServerThread:
    """One uvicorn server on ``127.0.0.1`` (port 0 picks a free one) in a daemon thread.

    >>> with ServerThread(app) as server:  # doctest: +SKIP
    ...     httpx.get(server.url + "/health")

    `start` returns once the server accepts connections (or raises `RuntimeError`); `stop`
    asks it to exit, gives running requests ``shutdown_timeout`` seconds, and joins the thread.
    Logs are quiet (``log_level="warning"``, no access log) and uvicorn does not touch the
    process's logging configuration. Only loopback addresses are accepted.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "asgi",
        log_level: str = "warning",
        date_header: bool = True,
        startup_timeout: float = 10.0,
        shutdown_timeout: float = 5.0,
    ) -> None:
        """Prepare (not start) a server for ``app``.

        Args:
            app: Any ASGI 3 application.
            host: A loopback address; anything else raises `ValueError`.
            port: 0 for a free port chosen by the kernel.
            name: Used in the thread name and error messages.
            log_level: uvicorn's log level.
            date_header: Let uvicorn add a ``Date`` header; turn off for apps that set their own
                (the local servers do, to simulate clock skew).
            startup_timeout: Seconds `start` waits for the server to accept connections.
            shutdown_timeout: Seconds `stop` lets running requests finish.
        """
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"ServerThread listens on loopback only, not on {host!r}")
        self.name = name
        self._startup_timeout = startup_timeout
        self._shutdown_timeout = shutdown_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say TCP, and
        # without it Nagle + delayed ACKs add ~40 ms to every response written in two parts.
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._config = uvicorn.Config(
            app,
            log_level=log_level,
            log_config=None,
            access_log=False,
            lifespan="off",
            proxy_headers=False,  # the apps must see the request exactly as it came in
            server_header=False,
            date_header=date_header,
            timeout_graceful_shutdown=max(1, round(shutdown_timeout)),
            timeout_keep_alive=5,
        )
        self._server = _QuickServer(self._config)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the server thread is alive and accepting connections."""
        return self._thread is not None and self._thread.is_alive() and self._server.started

    def start(self) -> ServerThread:
        """Start serving; return once connections are accepted.

        Raises:
            RuntimeError: the server did not start within ``startup_timeout`` seconds, or was
                already started.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name} server was already started")
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"{self.name} server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} server did not start within {self._startup_timeout:.0f} s"
                )
            time.sleep(0.005)
        return self

    def stop(self, *, wait: bool = True) -> None:
        """Stop serving and join the thread (idempotent).

        With ``wait=False`` only ask it to stop, so several servers can wind down at once; call
        `stop` again (with ``wait=True``) to join.
        """
        self._server.should_exit = True
        if not wait:
            return
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(self._shutdown_timeout + 2.0)
            if thread.is_alive():
                # Graceful shutdown is stuck (a client that never reads): cut the connections.
                self._server.force_exit = True
                thread.join(2.0)
        self._socket.close()

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported by start(); a thread must not die silently
            self._error = exc

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ServerThread({self.name!r}, {self.url}, {state})"
