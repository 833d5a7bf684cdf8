"""Structured logs for the service: one JSON object per line on stderr.

Every line has ``ts`` (UTC, ISO 8601), ``level`` and ``event``; the other keys depend on the
event. Callers pass only values that are safe to log (method, URL without query, ``jti``,
``jkt``, status codes, error messages from `dpop_signer.errors`, which never carry secrets).
Uvicorn's and asyncio's loggers are routed through the same formatter (a third-party line keeps
its message and the exception's type, never a traceback), and uvicorn's access log is off: the
service writes its own ``request`` line without the query string. Event-loop errors go through
`LoopErrorLog`, which writes one line per kind of error per interval with the number of
repeats, so a failing ``accept()`` cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

__all__ = [
    "LIFECYCLE_EVENTS",
    "JsonFormatter",
    "LoopErrorLog",
    "configure_logging",
    "log_event",
    "logger",
]

logger = logging.getLogger("dpop_signer.service")
# Starting, listening and stopping are always logged, whatever --log-level says: supervisors
# and tests read the bound address from the "listening" line.
_lifecycle = logging.getLogger("dpop_signer.service.lifecycle")
LIFECYCLE_EVENTS = frozenset({"starting", "listening", "stopped", "exit"})


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``ts``, ``level``, ``event`` and the fields."""

    def __init__(self) -> None:
        """A formatter with a reusable encoder and a per-second timestamp cache."""
        super().__init__()
        # One encoder for every line: json.dumps with options builds a new one per call.
        self._encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record``; fields come from ``extra={"fields": {...}}``."""
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line = self._head(record.created, record.levelname, record.getMessage())
            line.update(fields)
        else:
            # A third-party line (uvicorn): keep its text, marked as such.
            line = self._head(record.created, record.levelname, "log")
            line["logger"] = record.name
            line["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: a traceback's locals and messages are not ours to vet.
            line["exception"] = record.exc_info[0].__name__
        return self._encode(line)

    def _head(self, created: float, levelname: str, event: str) -> dict[str, Any]:
        second = int(created)
        if second != self._second:
            # strftime once per second, not once per line (an audit line per proof).
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        millis = int((created - second) * 1000)
        return {"ts": f"{self._stamp}.{millis:03d}Z", "level": levelname.lower(), "event": event}


def configure_logging(level: str = "info") -> None:
    """Send this package's and uvicorn's logs to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("dpop_signer", "uvicorn", "uvicorn.error", "asyncio"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False
    _lifecycle.setLevel(logging.INFO)
    # Uvicorn's access log prints the query string, which may carry anything; we log our own.
    logging.getLogger("uvicorn.access").disabled = True


class LoopErrorLog:
    """An event-loop exception handler that writes one ``loop_error`` line per interval.

    Errors are grouped by the loop's message and the exception type ("socket.accept() out of
    system resource" + OSError); the first of a group is written at once, later ones within
    ``interval`` seconds are counted and reported as ``repeated`` on the next line written.
    """

    def __init__(self, interval: float = 10.0) -> None:
        """Write at most one line per kind of error every ``interval`` seconds."""
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._repeated: dict[tuple[str, str], int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Log ``context`` (as passed to `asyncio.AbstractEventLoop.call_exception_handler`)."""
        exception = context.get("exception")
        message = str(context.get("message") or "event loop error")
        kind = (message, type(exception).__name__ if exception is not None else "")
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._repeated[kind] = self._repeated.get(kind, 0) + 1
            return
        if len(self._last) > 100:  # bounded: messages may embed addresses
            self._last.clear()
            self._repeated.clear()
        self._last[kind] = now
        fields: dict[str, Any] = {"message": message[:300], "repeated": self._repeated.pop(kind, 0)}
        if exception is not None:
            fields["exception"] = type(exception).__name__
            if isinstance(exception, OSError) and exception.strerror:
                fields["detail"] = exception.strerror
        log_event("loop_error", logging.ERROR, **fields)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Write one structured line: ``event`` plus ``fields`` (all safe to log)."""
    target = _lifecycle if event in LIFECYCLE_EVENTS else logger
    if not target.isEnabledFor(level):
        return
    target.handle(_record(target, level, event, fields))


def _record(
    target: logging.Logger, level: int, event: str, fields: dict[str, Any]
) -> logging.LogRecord:
    # makeRecord rather than Logger.log: no findCaller stack walk (the line has no source).
    return target.makeRecord(target.name, level, "", 0, event, (), None, extra={"fields": fields})
