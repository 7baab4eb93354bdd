"""What crosses Redis: JSON documents validated by pydantic models, size-checked, never pickled.

A stream entry, a stored step record and a history event each have a model here with
``extra="forbid"``, so a malformed or foreign document is rejected with the field that is
wrong instead of half-working.

Values enter through three doors: submit (the input), commit (each step's update) and
``ctx.stash()``. Each is checked here against the limits of :mod:`orchestrator.limits` before
anything is written, and :func:`loads` turns a stored value that cannot be decoded into a
:class:`ValidationError` instead of an exception that would crash the worker.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from typing import Any, Literal

import pydantic
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import PayloadTooLarge, ValidationError
from orchestrator.keys import RUN_ID_PATTERN
from orchestrator.limits import (
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    is_long_int,
    json_problem,
    non_finite_problem,
    where,
)

STEP_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"
WORKFLOW_NAME = r"^[A-Za-z0-9_.-]{1,100}$"

MAX_MESSAGE_CHARS = 2000
MAX_TRACEBACK_CHARS = 4000  # kept from the end: the raise site is at the end of a traceback
MAX_TYPE_CHARS = 200


class Wire(BaseModel):
    """Base of every document we write to Redis: strict about unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Dispatch(Wire):
    """A stream entry: "run step ``step`` (visit ``visit``) of run ``run``"."""

    run: str = Field(pattern=RUN_ID_PATTERN.pattern)
    wf: str = Field(pattern=WORKFLOW_NAME)
    step: str = Field(pattern=STEP_NAME)
    visit: int = Field(ge=1)

    @classmethod
    def from_xrange(cls, rows: Any) -> Dispatch | None:
        """The dispatch in an ``XRANGE`` reply for one entry; None when the entry is gone
        (trimmed), unreadable, or the read failed (``rows`` is then the exception)."""
        if isinstance(rows, Exception) or not rows:
            return None
        try:
            return cls.model_validate(rows[0][1] or {})
        except pydantic.ValidationError:
            return None


class ErrorInfo(Wire):
    """A step failure as recorded in history and on a failed run.

    Bounded: an exception can carry megabytes of message, which would be copied into the run
    hash and into every attempt's history event. Cut strings carry a marker with the original
    length (no new fields, so records written before still parse).
    """

    type: str
    message: str
    traceback: str = ""
    retryable: bool = True

    @classmethod
    def from_exception(cls, exc: BaseException, *, retryable: bool) -> ErrorInfo:
        name = type(exc).__qualname__
        return cls(
            type=clip_head(name, MAX_TYPE_CHARS),
            message=clip_head(_safe_str(exc) or name, MAX_MESSAGE_CHARS),
            traceback=clip_tail(_format_traceback(exc), MAX_TRACEBACK_CHARS),
            retryable=retryable,
        )


def clip_head(text: str, limit: int) -> str:
    """The first ``limit`` chars of ``text``, and a marker with the original length if cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [truncated: {len(text):,} chars in all]"


def clip_tail(text: str, limit: int) -> str:
    """The last ``limit`` chars of ``text``, after a marker with the original length if cut."""
    if len(text) <= limit:
        return text
    return f"[truncated: {len(text):,} chars in all] …{text[-limit:]}"


def _safe_str(exc: BaseException) -> str:
    """``str(exc)``, which user code can make raise; a failing ``__str__`` must not lose the error."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__qualname__}: str() failed>"


def _format_traceback(exc: BaseException) -> str:
    """The traceback with each oversized message of the chain clipped in place, so that the
    tail kept afterwards shows frames, not the end of a huge message."""
    text = "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        message = _safe_str(link)
        if len(message) > MAX_MESSAGE_CHARS:
            text = text.replace(message, clip_head(message, MAX_MESSAGE_CHARS))
        link = link.__cause__ or link.__context__
    return text


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
    wake: str | None = None  # the step returned Sleep: when the run goes on to ``next`` (Sleep.wake)
    wait: dict[str, Any] | None = None  # the step returned WaitFor: the signal the run waits for before ``next``
    children: dict[str, Any] | None = None  # the step returned StartChildren: into, collect, each child's submit


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
    until_ms: int | None = None  # "sleeping": when the run wakes; "waiting": when its wait times out (Redis clock)
    signal: str | None = None  # "signal", "signalled", "waiting", "timed_out": the signal's name
    signal_id: str | None = None  # "signal", "signalled": the id the sender gave it
    executor: str | None = None  # "rq": an attempt run by an RQ work-horse (orchestrator.bridge)
    rq_job: str | None = None  # ... its RQ job id
    rq_worker: str | None = None  # ... the RQ worker whose work-horse ran it


# -- encoding -----------------------------------------------------------------------------


class JsonValues(dict[str, Any]):
    """JSON-ready values that carry their checked JSON text (what ``Workflow.json_fields``
    returns), so that :func:`encode_fields`, called next on submit and commit, does not
    serialize and check them a second time."""

    def __init__(self, values: Mapping[str, Any], encoded: Mapping[str, str]) -> None:
        super().__init__(values)
        self.encoded = dict(encoded)


def dumps(obj: Any, *, what: str, limit: int | None = None) -> str:
    """Serialize ``obj`` to compact JSON, naming ``what`` in any error.

    Accepts what pydantic can serialize (models, dicts, lists, datetimes, UUIDs...). Raises
    :class:`PayloadTooLarge` above ``limit`` bytes and :class:`ValidationError` for values that
    are not JSON-serializable or break a codec limit (see :func:`check_encoded`).
    """
    raw = to_json(obj, what=what)
    text = raw.decode()
    if limit is not None:
        check_size(len(text), what=what, limit=limit)
    check_encoded(raw, obj, what=what)
    return text


def to_json(obj: Any, *, what: str, refuse: type[ValidationError] = ValidationError) -> bytes:
    """``obj`` as compact JSON, not yet checked; ``refuse`` is raised if pydantic cannot serialize it."""
    try:
        return pydantic_core.to_json(obj)
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
        raise refuse(f"{what} is not JSON-serializable: {describe_serialization_error(exc)}") from None


def describe_serialization_error(exc: Exception) -> str:
    """pydantic's reason, with its message for a too-deep value put in terms of our limit."""
    if "depth exceeded" in str(exc):
        return (
            f"it is nested too deeply or contains itself ({exc}); at most {MAX_JSON_DEPTH} levels of "
            "lists and objects are allowed (MAX_JSON_DEPTH)"
        )
    return str(exc)


def check_encoded(raw: bytes, original: Any, *, what: str, refuse: type[ValidationError] = ValidationError) -> None:
    """Refuse ``raw``, the JSON of ``original``, if a reader could not decode it or a NaN was lost.

    The limits are in :mod:`orchestrator.limits`: integers of at most ``MAX_INT_DIGITS``
    digits, at most ``MAX_JSON_DEPTH`` levels, no NaN or Infinity. pydantic writes a bare NaN
    as a ``NaN`` token but one inside a model as null, so ``original`` is searched too
    whenever ``raw`` holds a null. The message names ``what``, the value and where it is.
    """
    problem = json_problem(raw)
    if problem is None and b"null" in raw:
        problem = non_finite_problem(original)
    if problem is not None:
        raise refuse(f"{what} {problem}{where(original, problem)}")


def check_size(size: int, *, what: str, limit: int) -> None:
    """Raise :class:`PayloadTooLarge` when ``size`` bytes exceed ``limit``."""
    if size > limit:
        raise PayloadTooLarge(
            f"{what} is {size} bytes of JSON, over the limit of {limit} (max_payload_bytes); "
            "store large artifacts elsewhere and keep a reference in the state"
        )


def encode_fields(values: dict[str, Any], *, what: str, limit: int) -> dict[str, str]:
    """Each value as checked JSON (the form state fields are stored in), the total checked against ``limit``.

    Values from :meth:`Workflow.json_fields` (a :class:`JsonValues`) come encoded and checked.
    """
    done = values.encoded if isinstance(values, JsonValues) else {}
    raws = {name: to_json(value, what=f"{what} field {name!r}") for name, value in values.items() if name not in done}
    out = {name: done[name] if name in done else raws[name].decode() for name in values}
    check_size(sum(len(v) for v in out.values()), what=what, limit=limit)
    for name, raw in raws.items():
        check_encoded(raw, values[name], what=f"{what} field {name!r}")
    return out


def loads(raw: str, *, what: str) -> Any:
    """Decode stored JSON; anything that cannot be decoded is a :class:`ValidationError` naming ``what``.

    Lenient on purpose (NaN written by older versions still loads): the limits are enforced
    where values enter. A stored value that breaks them was written around the orchestrator,
    and the step that needs it fails with this error instead of crashing its worker.
    """
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{what} is not valid JSON: {exc}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else clip_head(str(exc), 300)
        raise ValidationError(
            f"{what} cannot be decoded: {reason}. Values written through the orchestrator have integers of at "
            f"most {MAX_INT_DIGITS:,} digits and at most {MAX_JSON_DEPTH} levels of nesting, so this one was "
            "written some other way: correct or delete it in Redis"
        ) from None


def describe_validation_error(exc: pydantic.ValidationError, *, what: str) -> str:
    """One line per problem: ``field: message (got value)``, for errors people read."""
    lines = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"{loc}: {err['msg']} (got {abbreviate(err.get('input'))})")
    return f"{what} is invalid: " + "; ".join(lines)


def abbreviate(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` chars; an integer too long to print is described instead."""
    if is_long_int(value):
        return f"an integer of more than {MAX_INT_DIGITS:,} digits"
    try:
        text = repr(value)
    except Exception:  # a user type's __repr__, or a container holding a huge int
        text = f"<{type(value).__qualname__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
