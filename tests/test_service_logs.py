"""The service's JSON log lines: their shape, and `logging`'s levels and filters honoured.

`log_event` builds its records without a caller lookup and the formatter caches its encoder and
timestamp; neither may change what a line says or whether `logging` lets it through.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from dpop_signer.service import logs

_NAMES = ("dpop_signer", "uvicorn", "uvicorn.error", "uvicorn.access", "dpop_signer.service")

FIELDS: dict[str, Any] = {
    "caller": "127.0.0.1:50000",
    "api_key": 1,
    "endpoint": "proof",
    "htm": "GET",
    "htu": "https://api.example/v1/th\u00efngs",
    "jti": "d2VsbC1rbm93bi1qdGk",
    "nothing": None,
    "flag": True,
    "ms": 0.25,
    "origins": ["https://a.example"],
}


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    saved = {
        name: (log.handlers[:], log.level, log.propagate, log.disabled, log.filters[:])
        for name in _NAMES
        for log in [logging.getLogger(name)]
    }
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        for name, (handlers, level, propagate, disabled, filters) in saved.items():
            log = logging.getLogger(name)
            log.handlers[:] = handlers
            log.setLevel(level)
            log.propagate = propagate
            log.disabled = disabled
            log.filters[:] = filters


def _configure(buffer: io.StringIO) -> None:
    # In the test body: pytest's log and output capture take over after fixtures are set up.
    real, sys.stderr = sys.stderr, buffer
    try:
        logs.configure_logging("info")
    finally:
        sys.stderr = real


def _lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_an_audit_line_carries_every_field_and_a_utc_timestamp(stderr: io.StringIO):
    _configure(stderr)
    logs.log_event("proof", **FIELDS)
    logs.log_event("proof", **FIELDS)
    first, second = _lines(stderr)
    for line in (first, second):
        ts = str(line.pop("ts"))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts)
        assert abs(datetime.fromisoformat(ts[:-1] + "+00:00").timestamp() - time.time()) < 60
        assert line == {"level": "info", "event": "proof", **FIELDS}


def test_filters_and_levels_set_after_configuring_are_honoured(stderr: io.StringIO):
    _configure(stderr)
    service = logging.getLogger("dpop_signer.service")
    logs.log_event("request", logging.DEBUG, status=200)  # below --log-level info
    service.addFilter(lambda record: record.getMessage() != "proof")
    logs.log_event("proof", **FIELDS)
    service.filters.clear()
    logging.getLogger("dpop_signer").handlers[0].setLevel(logging.ERROR)
    logs.log_event("proof", **FIELDS)
    logs.log_event("signer_fatal", logging.ERROR, error="gone")
    assert [line["event"] for line in _lines(stderr)] == ["signer_fatal"]


def test_lifecycle_lines_are_written_at_any_level(stderr: io.StringIO):
    _configure(stderr)
    logging.getLogger("dpop_signer").setLevel(logging.ERROR)
    logs.log_event("listening", address="127.0.0.1:8787")
    logs.log_event("proof", **FIELDS)
    assert [line["event"] for line in _lines(stderr)] == ["listening"]
