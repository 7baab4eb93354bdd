"""Structured logs: an event message plus key=value fields (or one JSON object per line).

Call sites log a short event name and put facts in ``extra`` (``run_id``, ``step``,
``attempt``, ``fence``, ``worker``...). Everything a formatter emits, the message, the
fields and a traceback (``exc_info``, ``stack_info``), goes through
:func:`orchestrator.redact.mask`: the password of any URL in it is masked by parsing the URL,
and so is every secret the formatter was told about (:meth:`~orchestrator.redact.Secrets.add_url`),
wherever it appears, so a Redis password never reaches a log line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from orchestrator.redact import Secrets

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class _MaskingFormatter(logging.Formatter):
    def __init__(self, secrets: Secrets | None = None) -> None:
        super().__init__()
        self.secrets = secrets or Secrets()

    def _tail(self, record: logging.LogRecord) -> str:
        """The traceback and stack of ``record``, if any, as text."""
        parts = []
        if record.exc_info:
            parts.append(self.formatException(record.exc_info))
        elif record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)


class TextFormatter(_MaskingFormatter):
    """``2026-11-27T09:00:00.123Z INFO orchestrator.worker step committed run_id=r1 step=a``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname} {record.name} {record.getMessage()}"
        if fields:
            line += " " + fields
        tail = self._tail(record)
        if tail:
            line += "\n" + tail
        return self.secrets.mask(line)


class JsonFormatter(_MaskingFormatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        tail = self._tail(record)
        if tail:
            doc["exc"] = tail
        return json.dumps({k: self._masked(v) for k, v in doc.items()})

    def _masked(self, value: Any) -> Any:
        """``value`` with every string in it masked; containers keep their JSON shape."""
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {self.secrets.mask(str(k)): self._masked(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._masked(v) for v in value]
        return self.secrets.mask(value if isinstance(value, str) else str(value))


def configure(level: str = "INFO", fmt: str = "text", secrets: Secrets | None = None) -> None:
    """Send the ``orchestrator`` loggers to stderr in the chosen format (CLI entry points only).

    ``secrets`` holds the secrets to mask beyond URL passwords (the CLI adds its URL's).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    root = logging.getLogger("orchestrator")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
