"""Structured logs for the service: one JSON object per line on stderr.

Every line has ``ts`` (UTC, ISO 8601), ``level`` and ``event``; the other keys depend on the
event. Callers pass only values that are safe to log (method, URL without query, ``jti``,
``jkt``, status codes, error messages from `dpop_signer.errors`, which never carry secrets).
Uvicorn's own loggers are routed through the same formatter, and its access log is off: the
service writes its own ``request`` line without the query string.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["LIFECYCLE_EVENTS", "JsonFormatter", "configure_logging", "log_event", "logger"]

logger = logging.getLogger("dpop_signer.service")
# Starting, listening and stopping are always logged, whatever --log-level says: supervisors
# and tests read the bound address from the "listening" line.
_lifecycle = logging.getLogger("dpop_signer.service.lifecycle")
LIFECYCLE_EVENTS = frozenset({"starting", "listening", "stopped", "exit"})


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``ts``, ``level``, ``event`` and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record``; fields come from ``extra={"fields": {...}}``."""
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line["event"] = record.getMessage()
            line.update(fields)
        else:
            # A third-party line (uvicorn): keep its text, marked as such.
            line["event"] = "log"
            line["logger"] = record.name
            line["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: a traceback's locals and messages are not ours to vet.
            line["exception"] = record.exc_info[0].__name__
        return json.dumps(line, separators=(",", ":"), default=str)


def configure_logging(level: str = "info") -> None:
    """Send this package's and uvicorn's logs to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("dpop_signer", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False
    _lifecycle.setLevel(logging.INFO)
    # Uvicorn's access log prints the query string, which may carry anything; we log our own.
    logging.getLogger("uvicorn.access").disabled = True


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Write one structured line: ``event`` plus ``fields`` (all safe to log)."""
    target = _lifecycle if event in LIFECYCLE_EVENTS else logger
    target.log(level, event, extra={"fields": fields})
