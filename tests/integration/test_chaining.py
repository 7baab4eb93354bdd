"""A commit that takes its run's next step on the same worker (held, no trip through the queue)
must not starve the runs that wait in the queue: a worker takes at most MAX_CHAINED_STEPS steps
of one run in a row before the next goes through the queue, behind the runs waiting there."""

from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import BaseModel

from orchestrator import Client, End, Goto, Settings, StepContext, Workflow
from orchestrator.keys import Keys
from orchestrator.worker import runner
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


def test_a_run_read_ahead_waits_at_most_chain_yield_s_before_the_chaining_run_gives_up_its_slot(
    client: Client, settings: Settings, monkeypatch: Any
) -> None:
    """One slot, two looping runs in different partitions, both read by the worker's first read
    (one entry per stream): one runs, the other waits in the worker's read-ahead. Once the waiting
    entry is CHAIN_YIELD_S old the running run stops chaining, so the waiting one starts after
    about CHAIN_YIELD_S of laps: fewer than the MAX_CHAINED_STEPS bound would allow."""
    monkeypatch.setattr(runner, "CHAIN_YIELD_S", 0.2)
    lap_s, laps = 0.05, 3 * MAX_CHAINED_STEPS
    flow: Workflow[Loop] = Workflow("yielding_loop", state=Loop)
    order: list[str] = []

    @flow.step
    def lap(ctx: StepContext, state: Loop) -> Any:
        order.append(ctx.run_id)
        time.sleep(lap_s)
        return End({"n": state.n + 1}) if state.n + 1 >= laps else Goto("lap", {"n": state.n + 1})

    keys = Keys(settings.namespace, settings.partitions)
    first = "yield-a"
    second = next(f"yield-{i}" for i in range(100) if keys.partition_of(f"yield-{i}") != keys.partition_of(first))
    runs = [client.submit(flow, {}, run_id=run_id) for run_id in (first, second)]
    # a lease longer than the test: read-ahead entries are handed back after one, which would blur the rule
    with worker_thread([flow], settings.model_copy(update={"concurrency": 1, "lease_s": 10.0})):
        for run in runs:
            run.wait(timeout_s=60)
    started, other = order[0], next(r for r in order if r != order[0])
    ahead = order.index(other)  # laps of the run that got the slot before the other one started
    assert order.count(first) == order.count(second) == laps, order
    # 0.2 s of 0.05 s laps is ~4 laps; well under the bound even on a slow machine
    assert 1 <= ahead < MAX_CHAINED_STEPS - 4, (started, ahead, order)
