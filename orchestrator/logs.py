"""Structured logs: an event message plus key=value fields (or one JSON object per line).

Call sites log a short event name and put facts in ``extra`` (``run_id``, ``step``,
``attempt``, ``fence``, ``worker``...). Any URL-looking field is passed through
``redact_url`` so a Redis password never reaches a log line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from orchestrator.connection import redact_url

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        out[key] = redact_url(value) if isinstance(value, str) and "://" in value else value
    return out


class TextFormatter(logging.Formatter):
    """``2026-11-27T09:00:00.123Z INFO orchestrator.worker step committed run_id=r1 step=a``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname} {record.name} {redact_url(record.getMessage())}"
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "event": redact_url(record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send the ``orchestrator`` loggers to stderr in the chosen format (CLI entry points only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("orchestrator")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
