"""Run an ASGI application on uvicorn, on a socket we bound ourselves.

Binding here rather than in uvicorn gives the service control of what uvicorn would otherwise
decide: a unix socket created with mode 0600 (uvicorn chmods its own to 0666), port 0 resolved
before the ``listening`` log line (tests and supervisors read the real port from it), and no
``X-Forwarded-For`` trust (a local caller must not choose the address in the audit log).

Uvicorn parses HTTP with httptools (a dependency: with its pure-Python h11 parser the service
spends about twice the CPU per request). It handles SIGTERM and SIGINT: it stops accepting, lets
in-flight requests finish (up to ``graceful_timeout``), runs the application's shutdown (closing
the HTTP client and the HSM session) and returns; the process then exits 0.

No API key is needed to open a connection, so connections cost the caller nothing and must cost
the service little. Uvicorn closes idle keep-alive connections but has no timer for a connection
that never sends (or slowly sends) its headers or body, and no cap on connections: every socket
holds a file descriptor until the process runs out and accept() fails in a loop. `_GuardedHttp`
adds what is missing (`ConnectionLimits`):

- ``read_timeout``: the request headers must arrive within it, and the body may pause no longer
  than it between two reads (a slow-loris caller is closed; a stall of ours, when the
  application stops reading, does not count);
- ``max_connections``: below ``RLIMIT_NOFILE`` (read at start, room left for the HSM, logs and
  outgoing connections); a connection beyond it first evicts the longest-waiting connection that
  has no request in progress, and is closed at once when there is none. asyncio accepts up to
  ``backlog`` connections in one go before any of them is seen here, so the room is split:
  a quarter (at most 1024) for the backlog, the rest for connections;
- at shutdown, connections still sending their request are closed (their callers get nothing
  either way), so the graceful wait is for requests that can still be answered;
- the authority of an absolute-form request target (RFC 9112 §3.2.2), which ASGI scopes drop,
  is passed on for `dpop_signer.service.http.LoopbackHostMiddleware`.

Event-loop errors (a failing accept(), a callback's exception) go through
`dpop_signer.service.logs.LoopErrorLog`: one JSON line per kind per interval, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dpop_signer.service.http import TARGET_AUTHORITY
from dpop_signer.service.logs import LoopErrorLog, log_event
from dpop_signer.service.security import Listen, remove_unix_socket

__all__ = ["DEFAULT_READ_TIMEOUT", "KEEP_ALIVE_TIMEOUT", "ConnectionLimits", "serve_app"]

DEFAULT_READ_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 5
"""Seconds an idle keep-alive connection stays open after an answer (uvicorn closes it)."""

# File descriptors kept free of callers' connections: the listening socket, the HSM library,
# log files, the event loop, and httpx's pool of outgoing connections (100 by default: the
# proxy's upstream requests, the token endpoint).
_RESERVED_FDS = 160
_MIN_CONNECTIONS = 8
LISTEN_QUEUE = 1024
_MAX_BACKLOG = 1024


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a caller may take to send a request, and how many connections may be open."""

    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_connections: int | None = None
    accept_batch: int | None = None
    """Most connections one wake-up accepts; 1 for ``--workers``, so that the worker that
    wakes first does not take every waiting connection and leave its siblings idle."""

    def plan(self) -> tuple[int, int]:
        """``(connection cap, accept backlog)`` for the soft ``RLIMIT_NOFILE`` of now.

        Both together stay below the limit after the reserved descriptors: asyncio accepts a
        whole backlog before the cap can close a connection, and each holds a descriptor.
        """
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        room = max(2 * _MIN_CONNECTIONS, soft - _RESERVED_FDS)
        backlog = max(_MIN_CONNECTIONS, min(_MAX_BACKLOG, room // 4))
        cap = room - backlog
        if self.accept_batch is not None:
            backlog = min(backlog, self.accept_batch)
        if self.max_connections is not None:
            cap = min(cap, self.max_connections)
        return cap, backlog


# The phases of a connection, for the timers and for eviction.
_HEADERS, _BODY, _APP, _IDLE = "headers", "body", "app", "idle"


class _GuardedHttp(HttpToolsProtocol):
    """Uvicorn's httptools protocol with read timers, a connection cap and target authority."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    cap: ClassVar[int] = 1024

    _phase = _HEADERS
    _since = 0.0
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept, evicting an idle connection when at the cap; start the header timer."""
        if len(self.connections) >= self.cap and not self._evict_one():
            # Nothing to evict: every connection has a request in progress. Refuse this one
            # rather than let descriptors run out (then accept() itself fails, for everyone).
            transport.abort()
            return
        super().connection_made(transport)
        self._enter(_HEADERS, self.limits.read_timeout, self._read_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel the timer; uvicorn does the rest."""
        self._cancel_timer()
        if self.transport is None:  # refused in connection_made: uvicorn never saw it
            return
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        """A request starts: on a kept-alive connection, its headers get a timer too."""
        super().on_message_begin()
        if self._phase != _HEADERS:
            self._enter(_HEADERS, self.limits.read_timeout, self._read_timed_out)

    def on_headers_complete(self) -> None:
        """Pass an absolute-form target's authority on; time the body from here."""
        if not self.url.startswith(b"/"):
            # An absolute-form target (RFC 9112 §3.2.2): ASGI keeps only its path.
            with contextlib.suppress(httptools.HttpParserInvalidURLError):
                parsed = httptools.parse_url(self.url)
                if parsed.host:
                    authority = parsed.host
                    if parsed.port is not None:
                        authority += b":%d" % parsed.port
                    extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
                    extensions[TARGET_AUTHORITY] = authority
        self._enter(_BODY, self.limits.read_timeout, self._read_timed_out)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        """Body bytes arrived: the caller is alive, restart the body timer."""
        self._enter(_BODY, self.limits.read_timeout, self._read_timed_out)
        super().on_body(body)

    def on_message_complete(self) -> None:
        """The request is read; the application's time is not the caller's fault."""
        self._enter(_APP, None, None)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """Answered: idle until the next request (uvicorn's keep-alive timer runs)."""
        # Answered before the body was read (a 401, a 413): the body timer keeps running, or
        # a caller could hold the connection by sending nothing more.
        if self._phase != _BODY:
            self._enter(_IDLE, None, None)
        super().on_response_complete()

    def shutdown(self) -> None:
        """Close connections still sending their request; let the others finish."""
        if self._phase in (_HEADERS, _BODY) and self.transport is not None:
            self.transport.close()
            return
        super().shutdown()

    # -- helpers ----------------------------------------------------------------------------

    def _enter(self, phase: str, timeout: float | None, callback: Any) -> None:
        self._phase = phase
        self._since = time.monotonic()
        self._cancel_timer()
        if timeout is not None:
            self._timer = self.loop.call_later(timeout, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _read_timed_out(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._phase == _BODY and self.flow is not None and self.flow.read_paused:
            # We stopped reading (the application is behind): not the caller's delay.
            self._enter(_BODY, self.limits.read_timeout, self._read_timed_out)
            return
        log_event("client_timeout", logging.DEBUG, phase=self._phase, caller=self._caller())
        self.transport.close()

    def _evict_one(self) -> bool:
        oldest: _GuardedHttp | None = None
        for connection in self.connections:
            if (
                isinstance(connection, _GuardedHttp)
                and connection._phase in (_HEADERS, _IDLE)
                and (connection.cycle is None or connection.cycle.response_complete)
                and connection.transport is not None
                and not connection.transport.is_closing()
                and (oldest is None or connection._since < oldest._since)
            ):
                oldest = connection
        if oldest is None:
            return False
        log_event("connection_evicted", logging.DEBUG, caller=oldest._caller())
        oldest.transport.abort()  # abort: no lingering close holds the descriptor
        self.connections.discard(oldest)
        return True

    def _caller(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unix"


class _Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        listen: Listen,
        sock: socket.socket,
        on_reload: Callable[[], None] | None,
    ) -> None:
        super().__init__(config)
        self._listen = listen
        self._sock = sock
        self._on_reload = on_reload
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
        # asyncio's default handler writes a traceback per failed accept(), thousands a second
        # when descriptors run out; ours writes one JSON line per kind per interval.
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(LoopErrorLog())
        if self._on_reload is not None:
            # On the loop, not in a signal handler: the reload swaps objects requests use.
            loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        await super().startup(sockets)
        if self.started:
            # asyncio listened with the small backlog it also accepts per wake-up (each
            # accepted socket holds a descriptor); the kernel's queue holds none of ours, so
            # it may be long again.
            self._sock.listen(LISTEN_QUEUE)
            port = None if self._listen.is_unix else self._sock.getsockname()[1]
            log_event("listening", address=self._listen.describe(port))


def serve_app(
    app: ASGIApp,
    listen: Listen,
    sock: socket.socket,
    *,
    graceful_timeout: int = 10,
    limits: ConnectionLimits | None = None,
    on_reload: Callable[[], None] | None = None,
    owner: bool = True,
    **fields: object,
) -> bool:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT; False when startup failed.

    ``on_reload`` is called on the event loop for each SIGHUP. A worker of ``--workers`` is
    not the ``owner`` of the socket: the supervisor removes a unix socket at the end.
    ``fields`` are added to the ``starting`` log line (mode, origins, ...).
    """
    limits = limits or ConnectionLimits()
    cap, backlog = limits.plan()
    # A class per run: uvicorn builds protocols from a class, and these are its settings.
    protocol: type[_GuardedHttp] = type(
        "GuardedHttp", (_GuardedHttp,), {"limits": limits, "cap": cap}
    )
    config = uvicorn.Config(
        app,
        http=protocol,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        # Also how many connections asyncio accepts per wake-up (and the listen queue).
        backlog=backlog,
    )
    server = _Server(config, listen, sock, on_reload)
    log_event(
        "starting",
        logging.INFO,
        address=listen.describe(),
        max_connections=protocol.cap,
        read_timeout=limits.read_timeout,
        **fields,
    )
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        if owner:
            remove_unix_socket(listen)
    if server.stopped_by:
        log_event("exit", signal=signal.Signals(server.stopped_by[-1]).name)
    return server.started
