"""A commit that takes its run's next step on the same worker (held, no trip through the queue)
must not starve the runs that wait in the queue: a worker takes at most MAX_CHAINED_STEPS steps
of one run in a row before the next goes through the queue, behind the runs waiting there."""

from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel

from orchestrator import Client, End, Goto, Settings, StepContext, Workflow
from orchestrator.worker.outcomes import MAX_CHAINED_STEPS
from tests.harness import worker_thread
from tests.helpers import wait_until


class Loop(BaseModel):
    n: int = 0


def test_a_run_waiting_behind_a_long_loop_starts_after_at_most_max_chained_steps_of_it(
    client: Client, settings: Settings
) -> None:
    """One slot, a run looping 8 x MAX_CHAINED_STEPS times, and a second run submitted while the
    first one loops: the second starts after at most MAX_CHAINED_STEPS + 1 more steps of the first
    (without the bound it would wait for all of them)."""
    flow: Workflow[Loop] = Workflow("long_loop", state=Loop)
    order: list[str] = []
    looping = threading.Event()
    laps = 8 * MAX_CHAINED_STEPS

    @flow.step
    def lap(ctx: StepContext, state: Loop) -> Any:
        order.append(ctx.run_id)
        looping.set()
        if ctx.run_id == "short" or state.n + 1 >= laps:
            return End({"n": state.n + 1})
        return Goto("lap", {"n": state.n + 1})

    with worker_thread([flow], settings.model_copy(update={"concurrency": 1})):
        long_run = client.submit(flow, {}, run_id="long")
        wait_until(looping.is_set, what="the long run looping")
        short = client.submit(flow, {}, run_id="short")
        submitted_at = len(order)
        short.wait(timeout_s=30)
        long_run.wait(timeout_s=30)
    ahead = order.index("short") - submitted_at  # steps of the long run after the short one was queued
    assert order.count("long") == laps and submitted_at + MAX_CHAINED_STEPS + 1 < laps, order
    assert 0 <= ahead <= MAX_CHAINED_STEPS + 1, order
