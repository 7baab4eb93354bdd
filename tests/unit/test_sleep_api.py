"""``Sleep``: what a step may return to sleep, and the clear errors for what it may not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import Sleep, StepContext, Workflow
from orchestrator.errors import DefinitionError, StepResultError


class S(BaseModel):
    n: int = 0


flow: Workflow[S] = Workflow("sleepy", state=S)


@flow.step
def first(ctx: StepContext, state: S) -> Any:
    return None


@flow.step
def last(ctx: StepContext, state: S) -> Any:
    return None


def test_a_sleep_goes_on_at_the_next_step_or_the_named_one_with_its_update() -> None:
    out = flow.interpret(flow.get_step("first"), Sleep(seconds=1.5, update={"n": 1}))
    assert (out.next_step, out.wake, out.update) == ("last", "+1500", {"n": 1})
    out = flow.interpret(flow.get_step("last"), Sleep(seconds=0.0001, step="first"))
    assert (out.next_step, out.wake) == ("first", "+1")  # rounded up: never before the time asked
    at = datetime(2030, 1, 1, tzinfo=UTC)
    assert flow.interpret(flow.get_step("first"), Sleep(until=at)).wake == f"@{int(at.timestamp() * 1000)}"
    local = datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert Sleep(until=local).wake() == f"@{int(local.timestamp() * 1000)}"


@pytest.mark.parametrize(
    ("sleep", "message"),
    [
        (Sleep(), "exactly one of seconds= or until="),
        (Sleep(seconds=1, until=datetime.now(UTC)), "exactly one of seconds= or until="),
        (Sleep(seconds=-1), r"Sleep\(seconds=-1\) is invalid: expected 0 to"),
        (Sleep(seconds=float("nan")), "expected a finite number of seconds"),
        (Sleep(seconds=True), "expected a finite number of seconds"),
        (Sleep(seconds="5"), "expected a finite number of seconds"),  # type: ignore[arg-type]
        (Sleep(seconds=400 * 86400), "one year"),
        (Sleep(until=datetime(2030, 1, 1)), "expected a timezone-aware datetime"),
    ],
)
def test_a_bad_sleep_fails_the_step_with_a_message_naming_the_value(sleep: Sleep, message: str) -> None:
    with pytest.raises(StepResultError, match=message):
        flow.interpret(flow.get_step("first"), sleep)


def test_a_sleep_from_the_last_step_must_name_where_to_go_on() -> None:
    with pytest.raises(StepResultError, match="is the last step: name the step to continue at"):
        flow.interpret(flow.get_step("last"), Sleep(seconds=1))
    with pytest.raises(DefinitionError, match="nowhere"):
        flow.interpret(flow.get_step("first"), Sleep(seconds=1, step="nowhere"))
