"""What crosses Redis: JSON documents validated by pydantic models, size-checked, never pickled.

A stream entry, a stored step record and a history event each have a model here with
``extra="forbid"``, so a malformed or foreign document is rejected with the field that is
wrong instead of half-working.
"""

from __future__ import annotations

import json
import traceback
from typing import Any, Literal

import pydantic
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import PayloadTooLarge, ValidationError
from orchestrator.keys import RUN_ID_PATTERN

STEP_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"
WORKFLOW_NAME = r"^[A-Za-z0-9_.-]{1,100}$"
MAX_TRACEBACK_CHARS = 4000


class Wire(BaseModel):
    """Base of every document we write to Redis: strict about unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Dispatch(Wire):
    """A stream entry: "run step ``step`` (visit ``visit``) of run ``run``"."""

    run: str = Field(pattern=RUN_ID_PATTERN.pattern)
    wf: str = Field(pattern=WORKFLOW_NAME)
    step: str = Field(pattern=STEP_NAME)
    visit: int = Field(ge=1)


class ErrorInfo(Wire):
    """A step failure as recorded in history and on a failed run."""

    type: str
    message: str
    traceback: str = ""
    retryable: bool = True

    @classmethod
    def from_exception(cls, exc: BaseException, *, retryable: bool) -> ErrorInfo:
        text = "".join(traceback.format_exception(exc))
        return cls(
            type=type(exc).__qualname__,
            message=str(exc) or type(exc).__qualname__,
            traceback=text[-MAX_TRACEBACK_CHARS:],
            retryable=retryable,
        )


Outcome = Literal["ok", "error", "timeout", "crashed", "fenced", "released", "quarantined"]


class StepRecord(Wire):
    """The persisted result of one step visit, stored under its idempotency key."""

    step: str
    visit: int
    attempt: int
    fence: int
    worker: str
    start_ms: int
    end_ms: int
    update: dict[str, Any]
    next: str | None = None
    cost: dict[str, float] = Field(default_factory=dict)


class HistoryEvent(Wire):
    """One line of a run's history; ``at`` is the Redis server time it was written."""

    type: str
    at: int = 0
    step: str | None = None
    visit: int | None = None
    attempt: int | None = None
    fence: int | None = None
    worker: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    error: ErrorInfo | None = None
    detail: str | None = None


def dumps(obj: Any, *, what: str, limit: int | None = None) -> str:
    """Serialize ``obj`` to compact JSON, naming ``what`` in any error.

    Accepts what pydantic can serialize (models, dicts, lists, datetimes, UUIDs...). Raises
    :class:`ValidationError` for values that are not JSON-serializable and
    :class:`PayloadTooLarge` above ``limit`` bytes.
    """
    try:
        raw = pydantic_core.to_json(obj).decode()
    except pydantic_core.PydanticSerializationError as exc:
        raise ValidationError(f"{what} is not JSON-serializable: {exc}") from None
    if limit is not None:
        check_size(len(raw), what=what, limit=limit)
    return raw


def check_size(size: int, *, what: str, limit: int) -> None:
    """Raise :class:`PayloadTooLarge` when ``size`` bytes exceed ``limit``."""
    if size > limit:
        raise PayloadTooLarge(
            f"{what} is {size} bytes of JSON, over the limit of {limit} (max_payload_bytes); "
            "store large artifacts elsewhere and keep a reference in the state"
        )


def encode_fields(values: dict[str, Any], *, what: str, limit: int) -> dict[str, str]:
    """Each value as JSON (the form state fields are stored in), the total checked against ``limit``."""
    out = {name: dumps(value, what=f"{what} field {name!r}") for name, value in values.items()}
    check_size(sum(len(v) for v in out.values()), what=what, limit=limit)
    return out


def loads(raw: str, *, what: str) -> Any:
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"{what} is not valid JSON: {exc}") from None


def describe_validation_error(exc: pydantic.ValidationError, *, what: str) -> str:
    """One line per problem: ``field: message (got value)``, for errors people read."""
    lines = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = repr(err.get("input"))
        if len(got) > 80:
            got = got[:77] + "..."
        lines.append(f"{where}: {err['msg']} (got {got})")
    return f"{what} is invalid: " + "; ".join(lines)
