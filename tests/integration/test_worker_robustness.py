"""User code that misbehaves must fail its own attempt, never the worker or its other steps."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import pytest

from orchestrator import Client, Retry, RunFailed, Settings, StepContext, Workflow
from tests.harness import worker_thread


def one_step(name: str, fn: Any, **options: Any) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow(name, queue=options.pop("queue", "default"))
    wf.step(fn, name="only", **options)
    return wf


def raise_stop_iteration(ctx: StepContext, state: Any) -> None:
    next(iter([]))


def raise_system_exit(ctx: StepContext, state: Any) -> None:
    sys.exit(3)


async def raise_keyboard_interrupt(ctx: StepContext, state: Any) -> None:
    raise KeyboardInterrupt


async def raise_cancelled(ctx: StepContext, state: Any) -> None:
    raise asyncio.CancelledError


@pytest.mark.parametrize(
    "fn, shown",
    [
        (raise_stop_iteration, "StopIteration"),
        (raise_system_exit, "SystemExit: 3"),
        (raise_keyboard_interrupt, "KeyboardInterrupt"),
        (raise_cancelled, "CancelledError"),
    ],
)
def test_a_step_raising_a_base_exception_fails_its_attempts_and_the_worker_goes_on(
    client: Client, settings: Settings, fn: Any, shown: str
) -> None:
    bad = one_step("bad", fn, retry=Retry(max_attempts=2, backoff_s=0.01))
    good = one_step("good", lambda ctx, state: {"ok": True})
    with worker_thread([bad, good], settings):
        with pytest.raises(RunFailed, match=f"StepInterrupted: step raised {shown}"):
            client.submit(bad, {}, run_id="bad").wait(timeout_s=10)
        assert client.submit(good, {}, run_id="good").wait(timeout_s=10) == {"ok": True}
    (step,) = client.history("bad").steps
    assert [a.outcome for a in step.attempts] == ["error", "error"]  # errors, not crashes
    assert client.get("bad").crashes == 0


def test_a_timed_out_sync_step_is_told_to_stop_and_keeps_its_slot_until_it_returns(
    client: Client, settings: Settings
) -> None:
    events: list[tuple[str, float, bool]] = []

    def hang(ctx: StepContext, state: Any) -> None:
        time.sleep(1.0)
        events.append(("straggler returned", time.monotonic(), ctx.cancelled))

    def quick(ctx: StepContext, state: Any) -> None:
        events.append(("next step started", time.monotonic(), ctx.cancelled))

    slow = one_step("hang", hang, timeout_s=0.2, retry=Retry(max_attempts=1))
    fast = one_step("quick", quick)
    with worker_thread([slow, fast], settings.model_copy(update={"concurrency": 1})):
        with pytest.raises(RunFailed, match="StepTimeout"):
            client.submit(slow, {}, run_id="h").wait(timeout_s=10)
        client.submit(fast, {}, run_id="q").wait(timeout_s=10)
    assert [e[0] for e in events] == ["straggler returned", "next step started"]
    assert events[0][2] is True  # the abandoned attempt saw ctx.cancelled


def test_concurrency_holds_across_several_queues(client: Client, settings: Settings) -> None:
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def busy(ctx: StepContext, state: Any) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1

    flows = [one_step(f"q{i}", busy, queue=f"queue{i}") for i in range(3)]
    with worker_thread(flows, settings.model_copy(update={"concurrency": 2})):
        runs = [client.submit(wf, {}, run_id=f"{wf.name}-{n}") for wf in flows for n in range(3)]
        for run in runs:
            run.wait(timeout_s=30)
    assert peak[0] == 2


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_a_worker_runs_its_steps_on_the_event_loop_the_setting_asks_for(
    client: Client, settings: Settings, choice: str
) -> None:
    """``event_loop = auto`` runs the worker on uvloop (installed with the package here),
    ``asyncio`` on asyncio's own loop; an async step sees which."""
    import uvloop

    flow = Workflow(f"which_loop_{choice}")

    @flow.step
    async def which(ctx: StepContext, state: Any) -> dict[str, Any]:
        return {"uvloop": isinstance(asyncio.get_running_loop(), uvloop.Loop)}

    with worker_thread([flow], settings.model_copy(update={"event_loop": choice})):
        state = client.submit(flow, {}, run_id=f"loop-{choice}").wait(timeout_s=20)
    assert state["uvloop"] is (choice == "auto")
