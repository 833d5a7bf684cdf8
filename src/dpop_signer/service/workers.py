"""``--workers N``: N processes serving one listening socket, supervised by the first.

One Python process signs and parses HTTP on one core; N worker processes use N. The parent
checks the configuration once (it opens the key and closes it again, so a wrong PIN is tried
once, not N times), binds the socket, and forks the workers, which inherit the socket and open
their own signer (a PKCS#11 session never crosses a fork: `dpop_signer.signers.pkcs11_library`
starts the module afresh in each child). The kernel spreads connections over the workers.

The parent only supervises: SIGTERM, SIGINT and SIGHUP are passed on to every worker; a worker
that dies is started again (at most ``_RESTARTS`` times a minute: a crash loop stops the
service with exit status 1); the parent exits once every worker has, 0 when each one did.

Counters are per process; each worker writes its own to a file in a private directory about
once a second, and ``/metrics`` in any worker answers with the sum (`SharedMetrics`), so a
scrape is honest whichever worker it reaches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from dpop_signer.service.logs import log_event
from dpop_signer.service.metrics import Metrics

__all__ = ["SharedMetrics", "run_workers"]

_RESTARTS = 5
"""Most worker restarts in a minute before the service gives up."""
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_workers(count: int, work: Callable[[int], bool]) -> bool:
    """Fork ``count`` workers running ``work(index)``; supervise them until all have exited.

    Returns True when every worker exited cleanly after a stop signal (or by itself with 0).
    """
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    restarts: deque[float] = deque()

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):  # exited; reaped below
                os.kill(pid, signum)

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which exits below
            for signum in _FORWARDED:
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                code = 0 if work(index) else 1
            finally:
                os._exit(code)
        children[pid] = index

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    clean = True
    try:
        for index in range(count):
            spawn(index)
        log_event("workers", count=count, pids=sorted(children))
        while children:
            pid, status = os.wait()
            index = children.pop(pid, -1)
            if index < 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                clean = clean and code == 0
                continue
            log_event("worker_exited", logging.ERROR, worker=index, status=code)
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > 60:
                restarts.popleft()
            if len(restarts) > _RESTARTS:
                log_event("workers_crash_loop", logging.ERROR, restarts=len(restarts))
                clean = False
                forward(signal.SIGTERM, None)
                continue
            spawn(index)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return clean


class SharedMetrics:
    """Each worker's counters in a file of a private directory; `render` sums them all."""

    def __init__(self, directory: Path, index: int, metrics: Metrics) -> None:
        """Write ``metrics`` as worker ``index`` into ``directory`` (made mode 0700)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._directory = directory
        self._path = directory / f"worker-{index}.json"
        self._metrics = metrics
        self._written = 0.0

    def write(self, every: float = 1.0) -> None:
        """Write this worker's counters, at most once per ``every`` seconds."""
        now = time.monotonic()
        if now - self._written < every:
            return
        self._written = now
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self._metrics.snapshot()))
        os.replace(temporary, self._path)  # readers never see half a file

    def render(self) -> str:
        """The Prometheus text of every worker's counters added up (this one's current)."""
        self.write(every=0.0)
        total = Metrics()
        for path in sorted(self._directory.glob("worker-*.json")):
            try:
                total.merge(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a worker being restarted; its next write brings it back
        total.signer_state = self._metrics.signer_state
        return total.render()
