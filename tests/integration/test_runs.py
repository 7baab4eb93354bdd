"""Behaviour of runs with in-process workers: order, branches, retries, failures, stash, cancel."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from orchestrator import (
    Client,
    End,
    InvalidTransition,
    NonRetryableError,
    Retry,
    RunCancelled,
    RunFailed,
    Settings,
    StepContext,
    WaitTimeout,
    Workflow,
)
from tests.harness import supervisor_thread, worker_thread
from tests.helpers import heartbeat_until_lost, wait_until
from tests.ledger import Ledger
from workers.testflows import Counter, agent_loop, chain, effects, stashing


def test_a_chain_runs_its_steps_in_order_once_each(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([chain], settings):
        final = client.submit(chain, {"i": 0}, run_id="c1").wait(timeout_s=20)
    assert final == Counter(i=10, steps=[f"s{n}" for n in range(10)])
    assert ledger.execution_counts() == {f"c1:s{n}": 1 for n in range(10)}
    results = client.results("c1")
    assert sorted(results) == sorted(f"c1:s{n}" for n in range(10))
    assert [results[f"c1:s{n}"].update["i"] for n in range(10)] == list(range(1, 11))
    assert [results[f"c1:s{n}"].next for n in range(10)] == [*(f"s{n}" for n in range(1, 10)), None]
    info = client.get("c1")
    assert (info.status, info.steps_done) == ("completed", 10)
    fences = [results[f"c1:s{n}"].fence for n in range(10)]
    assert fences == sorted(set(fences))  # one claim per step, tokens strictly increasing


def test_goto_loops_with_a_new_idempotency_key_per_visit(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([agent_loop], settings):
        final = client.submit(agent_loop, {"rounds": 3}, run_id="loop").wait(timeout_s=20)
    assert final.seen == ["loop:think", "loop:think:2", "loop:think:3"]
    assert ledger.execution_counts() == {
        "loop:think": 1,
        "loop:think:2": 1,
        "loop:think:3": 1,
        "loop:act": 1,
        "loop:act:2": 1,
        "loop:act:3": 1,
    }
    steps = [(s.step, s.visit) for s in client.history("loop").steps]
    assert steps == [("think", 1), ("act", 1), ("think", 2), ("act", 2), ("think", 3), ("act", 3), ("finish", 1)]


def test_end_finishes_a_run_early(client: Client, settings: Settings) -> None:
    wf = Workflow("early")

    @wf.step
    def first(ctx: StepContext, state: Any) -> End:
        return End({"stopped": True})

    @wf.step
    def never(ctx: StepContext, state: Any) -> None:
        raise AssertionError("must not run")

    with worker_thread([wf], settings):
        final = client.submit(wf, {}, run_id="e1").wait(timeout_s=10)
    assert final == {"stopped": True}
    assert [s.step for s in client.history("e1").steps] == ["first"]


def flaky_workflow(name: str, failures: int, retry: Retry) -> tuple[Workflow[Any], list[float]]:
    """A one-step workflow that raises ``failures`` times, then succeeds; records attempt times."""
    wf: Workflow[Any] = Workflow(name)
    starts: list[float] = []

    @wf.step(retry=retry)
    def flaky(ctx: StepContext, state: Any) -> dict[str, int]:
        starts.append(time.monotonic())
        if len(starts) <= failures:
            raise ConnectionError(f"transient failure {len(starts)}")
        return {"attempt": ctx.attempt}

    return wf, starts


def test_retries_back_off_exponentially_then_succeed(client: Client, settings: Settings) -> None:
    wf, starts = flaky_workflow("flaky", failures=2, retry=Retry(max_attempts=3, backoff_s=0.3, jitter=0))
    with worker_thread([wf], settings):
        final = client.submit(wf, {}, run_id="f1").wait(timeout_s=20)
    assert final == {"attempt": 3}
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert 0.3 <= gaps[0] < 3 and 0.6 <= gaps[1] < 4, gaps
    (step,) = client.history("f1").steps
    assert [a.outcome for a in step.attempts] == ["error", "error", "ok"]
    assert step.attempts[0].error is not None and "transient failure 1" in step.attempts[0].error.message
    fences = [a.fence for a in step.attempts]
    assert fences == sorted(set(fences))  # every attempt had its own, larger fencing token


def test_exhausted_retries_fail_and_dead_letter_the_run_then_retry_resumes_it(
    client: Client, settings: Settings
) -> None:
    wf, _starts = flaky_workflow("doomed", failures=3, retry=Retry(max_attempts=2, backoff_s=0.01))
    with worker_thread([wf], settings):
        run = client.submit(wf, {}, run_id="d1")
        with pytest.raises(RunFailed, match=r"failed at step 'flaky': ConnectionError: transient failure 2") as info:
            run.wait(timeout_s=10)
        assert info.value.error["type"] == "ConnectionError"
        assert [r.run_id for r in client.list_runs(status="failed")] == ["d1"]
        fences_before = [a.fence for s in client.history("d1").steps for a in s.attempts]
        client.retry("d1")
        assert run.wait(timeout_s=10) == {"attempt": 4}
    steps = client.history("d1").steps
    assert [s.idempotency_key for s in steps] == ["d1:flaky"]  # the same key across the retry
    assert [a.outcome for a in steps[0].attempts] == ["error", "error", "error", "ok"]
    assert len(fences_before) == 2 and client.list_runs(status="failed") == []
    with pytest.raises(InvalidTransition, match="not failed"):
        client.retry("d1")


def test_non_retryable_errors_fail_at_once(client: Client, settings: Settings) -> None:
    wf = Workflow("strict")

    @wf.step(retry=Retry(max_attempts=5, non_retryable=(KeyError,)))
    def lookup(ctx: StepContext, state: Any) -> None:
        raise KeyError("missing")

    @wf.step(retry=Retry(max_attempts=5))
    def later(ctx: StepContext, state: Any) -> None:
        raise NonRetryableError("bad request")

    with worker_thread([wf], settings), pytest.raises(RunFailed, match="KeyError"):
        client.submit(wf, {}, run_id="n1").wait(timeout_s=10)
    (step,) = client.history("n1").steps
    assert len(step.attempts) == 1 and step.attempts[0].error is not None
    assert step.attempts[0].error.retryable is False


@pytest.mark.parametrize("is_async", [True, False])
def test_a_step_that_runs_past_its_timeout_is_retried_then_failed(
    client: Client, settings: Settings, is_async: bool
) -> None:
    wf = Workflow(f"slowpoke{int(is_async)}")

    if is_async:

        @wf.step(timeout_s=0.2, retry=Retry(max_attempts=2, backoff_s=0.01))
        async def hang(ctx: StepContext, state: Any) -> None:
            await asyncio.sleep(30)
    else:

        @wf.step(timeout_s=0.2, retry=Retry(max_attempts=2, backoff_s=0.01))
        def hang(ctx: StepContext, state: Any) -> None:
            time.sleep(1.0)

    with worker_thread([wf], settings), pytest.raises(RunFailed, match="StepTimeout"):
        client.submit(wf, {}, run_id="t1").wait(timeout_s=10)
    (step,) = client.history("t1").steps
    assert [a.outcome for a in step.attempts] == ["timeout", "timeout"]


def test_a_retry_resumes_from_the_last_stash(client: Client, settings: Settings) -> None:
    wf = Workflow("resume")
    seen: list[Any] = []

    @wf.step(retry=Retry(max_attempts=3, backoff_s=0.01))
    def work(ctx: StepContext, state: Any) -> dict[str, list[int]]:
        seen.append(ctx.snapshot)
        done = list(ctx.snapshot or [])
        for item in range(5):
            if item in done:
                continue
            if item == 3 and ctx.attempt == 1:
                raise RuntimeError("rate limited")
            done.append(item)
            ctx.stash(done)
        return {"done": done}

    with worker_thread([wf], settings):
        final = client.submit(wf, {}, run_id="s1").wait(timeout_s=10)
    assert final == {"done": [0, 1, 2, 3, 4]}
    assert seen == [None, [0, 1, 2]]
    assert not client.redis.hgetall(client.keys.run("s1").stash)  # deleted at commit


def test_stash_across_items_with_the_shipped_flow(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([stashing], settings):
        final = client.submit(stashing, {"items": ["a", "b"]}, run_id="st").wait(timeout_s=10)
    assert final.done == {"a": "A", "b": "B"} and ledger.items() == {"st:a": 1, "st:b": 1}


def test_cancel_stops_a_running_step_and_refuses_its_result(client: Client, settings: Settings) -> None:
    wf = Workflow("long")
    stopped: list[str] = []

    @wf.step
    def forever(ctx: StepContext, state: Any) -> None:
        heartbeat_until_lost(ctx, stopped)

    with worker_thread([wf], settings):
        run = client.submit(wf, {}, run_id="x1")
        wait_until(lambda: run.status() == "running", what="step started")
        run.cancel("operator")
        with pytest.raises(RunCancelled):
            run.wait(timeout_s=5)
        wait_until(lambda: stopped, timeout_s=5, what="step told to stop")
    assert client.results("x1") == {}
    assert client.history("x1").events[-1].type in ("cancelled", "released")


def test_wait_times_out_without_touching_the_run(client: Client, settings: Settings) -> None:
    run = client.submit(chain, {}, run_id="w1")  # no worker: stays pending
    with pytest.raises(WaitTimeout, match="still pending"):
        run.wait(timeout_s=0.2)
    assert run.status() == "pending"


def test_an_effect_is_applied_once_and_its_key_is_stable(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([effects], settings):
        client.submit(effects, {"to": "ceo@example.com"}, run_id="m1").wait(timeout_s=10)
    assert ledger.effects() == {"m1:send": "mail to ceo@example.com"}


def test_a_supervisor_picks_up_runs_submitted_before_any_worker_started(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    runs = [client.submit(chain, {}, run_id=f"early{i}") for i in range(5)]
    with supervisor_thread(settings), worker_thread([chain], settings):
        for run in runs:
            assert run.wait(timeout_s=20).i == 10


def test_many_runs_on_one_worker_all_complete(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([chain], settings.model_copy(update={"concurrency": 32})):
        runs = [client.submit(chain, {}, run_id=f"m{i}") for i in range(60)]
        for run in runs:
            assert run.wait(timeout_s=30).i == 10
    assert len(client.list_runs(status="completed", limit=100)) == 60


def test_a_step_that_stops_heartbeating_is_given_up_and_its_late_result_ignored(
    client: Client, settings: Settings
) -> None:
    wf = Workflow("stalls")
    returned: list[int] = []

    @wf.step(heartbeat_timeout_s=0.3, retry=Retry(max_attempts=3, backoff_s=0.01))
    def hang_then_work(ctx: StepContext, state: Any) -> dict[str, int]:
        if ctx.attempt == 1:
            time.sleep(1.0)  # no ctx.heartbeat(): stalled
        else:
            ctx.heartbeat()
        returned.append(ctx.attempt)
        return {"attempt": ctx.attempt}

    with worker_thread([wf], settings):
        assert client.submit(wf, {}, run_id="st1").wait(timeout_s=10) == {"attempt": 2}
        wait_until(lambda: 1 in returned, timeout_s=5, what="the stalled attempt to return late")
    (step,) = client.history("st1").steps
    assert [a.outcome for a in step.attempts] == ["timeout", "ok"]
    assert step.attempts[0].error is not None and "heartbeat_timeout_s" in step.attempts[0].error.message
    assert client.results("st1")["st1:hang_then_work"].attempt == 2  # the late first attempt never committed
