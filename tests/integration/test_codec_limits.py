"""Issue 9, hole 6: inputs that break the codec are refused where they enter, not after.

A 5,000-digit integer, JSON nested 200 deep, NaN or Infinity: each was accepted, written, and
then failed every attempt that had to decode it (or was silently turned into null). Now the
client refuses them before anything is written, a step's update or stash with one fails that
attempt with a clear error (never a crash, never a quarantine), a stored value that cannot be
decoded fails its run cleanly, and error messages are stored bounded.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import Client, Retry, RunFailed, Settings, StepContext, ValidationError, Workflow
from tests.harness import supervisor_thread, worker_thread

HUGE_MESSAGE_CHARS = 8 << 20
STORED_LIMIT_BYTES = 64 * 1024


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


# case -> (state field, value, what the refusal says about it)
CASES: dict[str, tuple[str, Any, str]] = {
    "integer-of-5000-digits": (
        "data",
        10**4999 + 7,
        r"holds an integer of 5,000 digits \(1000000000…0000000007\)",
    ),
    "nested-200-deep": ("data", nested(200), r"is nested 200 levels deep; at most 100"),
    "nan": ("data", {"x": math.nan}, r"holds NaN; JSON has no NaN or Infinity"),
    "infinity-in-a-float-field": ("score", math.inf, r"holds Infinity; JSON has no NaN or Infinity"),
}


class Doc(BaseModel):
    case: str = ""
    data: Any = None
    score: float = 0.0
    caught: str | None = None
    seen: bool = False


flow = Workflow("codec_limits", state=Doc)


@flow.step(retry=Retry(max_attempts=2, backoff_s=0.05))
def produce(ctx: StepContext, state: Doc) -> dict[str, Any]:
    kind, _, case = state.case.partition(":")
    if kind == "update":
        field, value, _ = CASES[case]
        return {field: value}
    if kind == "stash":
        try:
            ctx.stash(CASES[case][1])
        except ValidationError as exc:
            return {"caught": f"{type(exc).__name__}: {exc}"}
        return {"caught": "nothing raised"}
    if kind == "cost":
        ctx.record_cost(usd=float(case))
    if kind == "huge-error":
        raise RuntimeError("m" * HUGE_MESSAGE_CHARS)
    return {"data": state.data}


@flow.step
def consume(ctx: StepContext, state: Doc) -> dict[str, Any]:
    return {"seen": True}


async_flow = Workflow("codec_limits_async", state=Doc)


@async_flow.step
async def astash(ctx: StepContext, state: Doc) -> dict[str, Any]:
    try:
        await ctx.astash(CASES[state.case][1])
    except ValidationError as exc:
        return {"caught": f"{type(exc).__name__}: {exc}"}
    await asyncio.sleep(0)
    return {"caught": "nothing raised"}


def assert_failed_as_an_error_not_a_crash(client: Client, run_id: str, error_type: str) -> None:
    """Failed through fail.lua: an `error` event, no crash counted, not quarantined, nothing committed."""
    info = client.get(run_id)
    assert info.status == "failed"
    assert info.error is not None and info.error.type == error_type
    assert info.crashes == 0
    types = [event.type for event in client.events(run_id)]
    assert "error" in types and "crashed" not in types and "quarantined" not in types, types
    assert client.results(run_id) == {}


@pytest.mark.parametrize("case", CASES)
def test_inputs_that_break_the_codec_are_refused_where_they_enter(client: Client, case: str) -> None:
    field, value, problem = CASES[case]
    with pytest.raises(ValidationError, match=rf"^input of workflow 'codec_limits' field '{field}' {problem}"):
        client.submit(flow, {field: value}, run_id="in")
    keys = client.keys.run("in")
    assert client.redis.exists(keys.run, keys.state, keys.history) == 0
    assert client.redis.exists(*client.keys.streams(flow.queue)) == 0


def test_values_within_the_limits_go_through_every_door_unchanged(client: Client, settings: Settings) -> None:
    # the field holds 100 levels: this dict and 99 inside it
    data = {"digits": "9" * 5000, "words": "NaN and Infinity", "n": 10**4299 + 1, "deep": nested(99)}
    with worker_thread([flow], settings):
        final = client.submit(flow, {"case": "echo", "data": data, "score": 1e308}, run_id="fine").wait(timeout_s=30)
    assert final.data == data and final.score == 1e308 and final.seen


@pytest.mark.parametrize("case", CASES)
def test_an_update_that_breaks_the_codec_fails_its_attempt_with_a_clear_error(
    client: Client, settings: Settings, case: str
) -> None:
    field, _, problem = CASES[case]
    expected = rf"StepResultError: update from step 'produce' of workflow 'codec_limits' field '{field}' {problem}"
    with supervisor_thread(settings), worker_thread([flow], settings):  # a crash would be reclaimed and counted
        with pytest.raises(RunFailed, match=expected):
            client.submit(flow, {"case": f"update:{case}"}, run_id="up").wait(timeout_s=30)
        assert client.submit(flow, {"case": "echo"}, run_id="next").wait(timeout_s=30).seen  # the worker goes on
    assert_failed_as_an_error_not_a_crash(client, "up", "StepResultError")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("door", ["stash", "astash"])
def test_a_stash_that_breaks_the_codec_raises_validation_error_inside_the_step(
    client: Client, settings: Settings, door: str, case: str
) -> None:
    _, _, problem = CASES[case]
    workflow, step, case_input = (flow, "produce", f"stash:{case}") if door == "stash" else (async_flow, "astash", case)
    with worker_thread([workflow], settings):
        final = client.submit(workflow, {"case": case_input}, run_id="st").wait(timeout_s=30)
    assert final.caught is not None
    assert re.match(rf"ValidationError: stash of step '{step}' \(run 'st'\) {problem}", final.caught), final.caught
    assert client.get("st").status == "completed"


@pytest.mark.parametrize(
    "stored, reason",
    [
        ("9" * 5000, r"Exceeds the limit \(4300 digits\)"),
        ("[" * 100_000 + "]" * 100_000, r"it is nested too deeply"),
    ],
    ids=["integer-of-5000-digits", "nested-100000-deep"],
)
def test_a_stored_state_field_that_cannot_be_decoded_fails_the_run_without_a_crash(
    client: Client, settings: Settings, stored: str, reason: str
) -> None:
    run = client.submit(flow, {"case": "echo"}, run_id="corrupt")
    client.redis.hset(client.keys.run("corrupt").state, "data", stored)  # written around the orchestrator
    expected = rf"ValidationError: state field 'data' cannot be decoded: {reason}"
    with supervisor_thread(settings), worker_thread([flow], settings), pytest.raises(RunFailed, match=expected):
        run.wait(timeout_s=30)
    assert_failed_as_an_error_not_a_crash(client, "corrupt", "ValidationError")
    with pytest.raises(ValidationError, match=rf"state field 'data' of run 'corrupt' cannot be decoded: {reason}"):
        client.state("corrupt")


def test_an_8_mib_error_message_is_stored_truncated_and_says_how_long_it_was(
    client: Client, settings: Settings
) -> None:
    marker = f"… [truncated: {HUGE_MESSAGE_CHARS:,} chars in all]"
    with worker_thread([flow], settings), pytest.raises(RunFailed, match=re.escape(marker)):
        client.submit(flow, {"case": "huge-error"}, run_id="boom").wait(timeout_s=30)
    keys = client.keys.run("boom")
    for key in (keys.run, keys.history):
        assert (client.redis.memory_usage(key, samples=0) or 0) < STORED_LIMIT_BYTES, key
    assert sum(len(item) for item in client.redis.lrange(keys.history, 0, -1)) < STORED_LIMIT_BYTES
    info = client.get("boom")
    assert info.error is not None and info.error.message == "m" * 2000 + marker
    assert "in produce" in info.error.traceback and marker in info.error.traceback  # raise site kept
    assert [event.type for event in client.events("boom")].count("error") == 2  # both attempts, both bounded
    assert info.crashes == 0


@pytest.mark.parametrize("amount", ["nan", "inf", "-1"])
def test_record_cost_with_a_non_finite_or_negative_amount_fails_the_attempt(
    client: Client, settings: Settings, amount: str
) -> None:
    expected = rf"ValidationError: record_cost\(\) in step 'produce' \(run 'cost'\): usd={amount}(\.0)? is refused"
    with supervisor_thread(settings), worker_thread([flow], settings), pytest.raises(RunFailed, match=expected):
        client.submit(flow, {"case": f"cost:{amount}"}, run_id="cost").wait(timeout_s=30)
    assert_failed_as_an_error_not_a_crash(client, "cost", "ValidationError")
