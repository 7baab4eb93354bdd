"""Step deadlines (``@flow.step(deadline_s=...)``): a step visit must commit within its deadline
from when it was queued, queue wait, attempts and backoffs included, or the run fails with
``StepDeadlineExceeded``. The deadline moves with the run's step in the same script that moves
it (a commit, a wake-up, a signal, an operator's retry), never counts a sleep or a wait, and a
retry that would start after it is not scheduled."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from orchestrator import Client, Settings, Sleep, StepContext, Workflow
from orchestrator.chaos.ledger import Ledger
from orchestrator.cli.render import status_text
from orchestrator.errors import DefinitionError
from orchestrator.store import Outcome
from tests.harness import supervisor_thread, worker_thread
from tests.helpers import wait_until
from tests.ops import Ops
from workers.testflows import Slow, record_execution

HOUR_MS = 3_600_000


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)


def submit(ops: Ops, step_deadlines: dict[str, int], deadline_ms: int | None = None) -> None:
    call = ops.store.submit(
        run_id="r1",
        workflow="wf",
        queue="q",
        first_step="a",
        input_sha="d1",
        event='{"detail":"x"}',
        request_id="req-r1",
        state={"n": "0"},
        deadline_ms=deadline_ms,
        step_deadlines=step_deadlines,
    )
    assert ops.x(call)[0][0] == 1


def expire(ops: Ops) -> Outcome:
    return Outcome.parse(ops.x(ops.store.expire(run_id="r1", queue="q"))[0])


def queued_long_ago(ops: Ops, step_ms: int) -> None:
    """Time passes: the current step was queued ``step_ms`` + 1 ms ago (the run's record and its
    deadlines member, as the scripts keep them)."""
    queued = ops.server_ms() - step_ms - 1
    ops.r.hset(ops.rk.run, "queued_ms", queued)
    ops.r.zadd(ops.part.deadlines, {"r1": queued + step_ms})


def member(ops: Ops) -> float | None:
    return ops.r.zscore(ops.part.deadlines, "r1")


def test_a_step_left_in_the_queue_past_its_deadline_fails_the_run(ops: Ops) -> None:
    before = ops.server_ms()
    submit(ops, {"a": 1000})
    run = ops.run()
    assert run["sd:a"] == "1000" and before <= int(run["queued_ms"]) <= ops.server_ms()
    assert member(ops) == int(run["queued_ms"]) + 1000
    assert expire(ops).code == "NOT_DUE"  # listed early: not yet
    queued_long_ago(ops, 1000)
    out = expire(ops)
    assert out.code == "EXPIRED" and member(ops) is None
    error = json.loads(ops.run()["error"])
    assert error["type"] == "StepDeadlineExceeded" and not error["retryable"]
    assert "step a did not commit within its deadline_s (1000 ms from when it was queued" in error["message"]
    ((eid, d),) = ops.read()
    assert ops.claim(eid, d).code == "TERMINAL"


def test_the_deadline_moves_with_the_step_and_is_the_earlier_of_the_runs_and_the_steps(ops: Ops) -> None:
    submit(ops, {"a": HOUR_MS, "b": 2 * HOUR_MS}, deadline_ms=10 * HOUR_MS)
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.commit(eid, d, next_step="b")
    queued_b = int(ops.run()["queued_ms"])
    assert member(ops) == queued_b + 2 * HOUR_MS
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.commit(eid, d, next_step="c")  # c has no deadline: the run's own is left
    assert member(ops) == int(ops.run()["deadline_ms"])
    # a listing made while step b was due cannot expire the run once it moved on
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert expire(ops).code == "NOT_DUE" and ops.run()["status"] == "running"


def test_a_retry_that_would_start_after_the_deadline_is_not_scheduled(ops: Ops) -> None:
    submit(ops, {"a": 60_000})
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert ops.fail(eid, d, delay_ms=10).code == "RETRY"  # time left: retried
    ops.x(ops.store.promote(queue="q", run_id="r1"))
    time.sleep(0.02)
    ops.x(ops.store.promote(queue="q", run_id="r1"))
    ((eid, d),) = ops.read()
    assert int(ops.run()["queued_ms"]) <= ops.server_ms() - 10  # a retry keeps its step's deadline
    ops.claim(eid, d)
    assert ops.fail(eid, d, delay_ms=120_000).code == "FAILED"  # its backoff ends past the deadline
    error = json.loads(ops.run()["error"])
    assert error["type"] == "StepDeadlineExceeded" and "failed (E)" in error["message"]
    assert ops.r.zcard(ops.q.delayed) == 0


def test_a_sleep_or_a_wait_does_not_count_toward_the_next_steps_deadline(ops: Ops) -> None:
    submit(ops, {"b": 1000})
    assert member(ops) is None  # step a has no deadline, the run none either
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.commit(eid, d, next_step="b", wake=f"+{HOUR_MS}")
    assert ops.run()["queued_ms"] == "0" and member(ops) is None  # asleep: step b not queued yet
    ops.r.zadd(ops.q.delayed, {"r1": 0})  # its wake-up is due
    before = ops.server_ms()
    assert ops.x(ops.store.promote(queue="q", run_id="r1"))[0]
    queued = int(ops.run()["queued_ms"])
    assert queued >= before and member(ops) == queued + 1000  # from the wake-up on
    # the same for a wait: step b is queued when its signal comes
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    wait = json.dumps({"signal": "go", "into": "go", "timeout_ms": 0, "on_timeout": ""})
    ops.commit(eid, d, next_step="b", wait=wait)
    assert ops.run()["queued_ms"] == "0" and member(ops) is None
    before = ops.server_ms()
    call = ops.store.signal(run_id="r1", queue="q", signal_id="s", name="go", payload="{}", digest="d", max_signals=9)
    assert Outcome.parse(ops.x(call)[0]).code == "DELIVERED"
    queued = int(ops.run()["queued_ms"])
    assert queued >= before and member(ops) == queued + 1000


def test_an_operators_retry_gives_the_step_its_deadline_again_and_drops_the_runs_own(ops: Ops) -> None:
    submit(ops, {"a": 1000}, deadline_ms=HOUR_MS)
    queued_long_ago(ops, 1000)
    assert expire(ops).code == "EXPIRED"
    before = ops.server_ms()
    out = Outcome.parse(ops.x(ops.store.retry(run_id="r1", queue="q", reason="again", request_id="t"))[0])
    assert out.code == "RETRIED"
    run = ops.run()
    assert "deadline_ms" not in run and int(run["queued_ms"]) >= before
    assert member(ops) == int(run["queued_ms"]) + 1000


def test_a_deadline_must_be_positive_and_at_most_a_year() -> None:
    flow = Workflow("bad_step_deadlines")
    for bad in (0, -1, 400 * 24 * 3600):
        with pytest.raises(DefinitionError, match="deadline_s"):
            flow.step(lambda ctx, state: None, name=f"s{abs(int(bad))}", deadline_s=bad)


def test_a_step_with_no_worker_fails_at_its_deadline_and_status_shows_it_before(
    client: Client, settings: Settings
) -> None:
    flow: Workflow[Any] = Workflow("unserved_deadline")
    flow.step(lambda ctx, state: None, name="only", deadline_s=1.0)
    client.submit(flow, {}, run_id="u")
    info = client.get("u")
    assert info.step_deadline_ms is not None and info.step_deadline_ms - info.created_ms in range(1000, 1100)
    assert "step due" in status_text(info) and "must commit by" in client.why("u").text
    with supervisor_thread(settings):  # no worker serves the queue
        wait_until(lambda: client.get("u").status == "failed", timeout_s=20, what="the step deadline")
    error = client.get("u").error
    assert error is not None and error.type == "StepDeadlineExceeded"
    assert client.stats()["steps_expired"] == 1


def test_a_running_step_past_its_deadline_is_stopped_and_its_commit_refused(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    flow: Workflow[Slow] = Workflow("slow_deadline", state=Slow)

    @flow.step(deadline_s=1.0)
    def crawl(ctx: StepContext, state: Slow) -> Sleep | None:
        record_execution(ctx)
        for _ in range(int(state.seconds / 0.05)):
            time.sleep(0.05)
            ctx.heartbeat()  # raises once the worker learns the run ended
        return None

    with supervisor_thread(settings), worker_thread([flow], settings):
        client.submit(flow, Slow(seconds=10), run_id="s")
        wait_until(lambda: client.get("s").status == "failed", timeout_s=20, what="the step deadline")
        time.sleep(1.0)  # the worker's next beat: the attempt stops, anything it sends is refused
    info = client.get("s")
    assert info.error is not None and info.error.type == "StepDeadlineExceeded" and info.steps_done == 0
    assert ledger.execution_counts() == {"s:crawl": 1}
    assert not client.results("s")
