"""Liveness per worker: what it costs does not grow with the steps a worker holds, and what the
supervisor no longer watches (a live worker's entries) the worker recovers itself."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from orchestrator import Client, Settings, StepContext, Workflow, scripts
from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP
from tests.harness import worker_thread
from tests.helpers import heartbeat_until_lost, wait_until


async def wait_long(ctx: StepContext, state: Any) -> None:
    """An agent step waiting on an LLM: holds its claim, does nothing."""
    await asyncio.sleep(30)


def quick(ctx: StepContext, state: Any) -> None:
    return None


def one_step(name: str, fn: Any) -> Workflow[Any]:
    wf: Workflow[Any] = Workflow(name)
    wf.step(fn, name="only")
    return wf


def script_calls_per_s(r: redis.Redis, window_s: float) -> float:
    r.config_resetstat()
    time.sleep(window_s)
    stats = r.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("calls", 0)) / window_s


def test_what_a_worker_sends_to_stay_live_does_not_grow_with_the_steps_it_holds(
    client: Client, settings: Settings, r: redis.Redis
) -> None:
    """The same worker holding 10 and then 200 waiting steps sends about as many script calls a
    second: one beat per partition (and its audit), none per claim. Per-claim lease renewals
    would have added 190 calls a second per beat interval of 0.1 s: 1,900/s."""
    flow = one_step("waits", wait_long)
    held = settings.model_copy(update={"concurrency": 256})
    with worker_thread([flow], held):
        rates = []
        submitted = 0
        for n in (10, 200):
            for i in range(submitted, n):
                client.submit(flow, {}, run_id=f"held-{i}")
            submitted = n
            wait_until(lambda n=n: len(client.list_runs(status="running", limit=500)) == n, what=f"{n} steps held")
            rates.append(script_calls_per_s(r, 2.0))
        few, many = rates
        beats_per_s = 1 / settings.heartbeat_interval_s
        assert few >= beats_per_s * settings.partitions * 0.5, rates  # the beats are there
        assert many < few * 1.5 + 20, rates  # and 20x the claims changed about nothing
        for run in client.list_runs(status="running", limit=500):
            client.cancel(run.run_id, reason="test over")


def test_an_entry_a_live_worker_lost_track_of_is_given_back_by_its_own_audit(
    client: Client, settings: Settings, r: redis.Redis
) -> None:
    """An entry delivered to a worker's consumer that the worker never saw (an XREADGROUP reply
    lost with its connection): the supervisor leaves a live worker's entries alone, so the
    worker's audit must find it and give it back; the run then completes."""
    flow = one_step("orphaned", quick)
    run = client.submit(flow, {}, run_id="orphan")
    stream = client.keys.queue_of("default", "orphan").stream
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    assert r.xreadgroup(GROUP, "w-orphan", {stream: ">"})  # delivered to the worker's consumer, unseen
    with worker_thread([flow], settings, worker_id="w-orphan"):  # no supervisor: only the audit can
        run.wait(timeout_s=20)
    history = [e for e in client.events("orphan") if e.type == "redispatched"]
    assert len(history) == 1 and "given up by w-orphan" in (history[0].detail or "")
    assert client.get("orphan").crashes == 0  # never claimed: nothing crashed


def test_a_worker_whose_deadline_passed_stops_and_gives_back_the_steps_it_held_there(
    client: Client, settings: Settings, r: redis.Redis
) -> None:
    """The supervisor reaped the worker (its deadline is gone) while a step ran: the claim may
    already be someone else's, so the worker's next beat stops the step and gives it back
    (``released``, not a crash) instead of letting it commit as if nothing happened."""
    flow: Workflow[Any] = Workflow("reaped")
    attempts: list[str] = []

    @flow.step
    def long(ctx: StepContext, state: Any) -> None:
        if ctx.attempt > 1 or any(e.type == "released" for e in client.events(ctx.run_id)):
            return
        heartbeat_until_lost(ctx, attempts)

    with worker_thread([flow], settings) as worker:
        run = client.submit(flow, {}, run_id="reaped-1")
        wait_until(lambda: run.status() == "running", what="step started")
        r.hdel(client.keys.part_of("reaped-1").alive, worker.id)
        wait_until(lambda: attempts, timeout_s=5, what="the step told its claims lapsed")
        run.wait(timeout_s=10)
    kinds = [e.type for e in client.events("reaped-1")]
    assert "released" in kinds and "crashed" not in kinds, kinds


def test_a_chained_step_a_live_worker_does_not_know_of_is_given_back_by_its_own_audit(
    client: Client, settings: Settings, r: redis.Redis
) -> None:
    """A chained commit whose reply never reached the worker (resending failed): the run's next
    step is claimed for the worker, on the entry of the step before (left pending), and nothing
    runs it. The supervisor leaves a live worker's entries alone, so the worker's audit must give
    the entry back, and the step it is held on is re-enqueued; the run completes, the lost claim
    counted as a crash."""
    flow = Workflow("held_orphan")

    @flow.step
    def first(ctx: StepContext, state: Any) -> None:
        return None

    @flow.step
    def second(ctx: StepContext, state: Any) -> None:
        return None

    run = client.submit(flow, {}, run_id="held-orphan")
    stream = client.keys.queue_of("default", "held-orphan").stream
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ((_, entries),) = r.xreadgroup(GROUP, "w-held", {stream: ">"})
    ((eid, fields),) = entries
    d = Dispatch.model_validate(fields)
    beat = client.store.alive(
        partition=client.keys.partition_of(d.run), worker="w-held", lease_ms=60_000, cancels_seen=""
    )
    claim = client.store.claim(
        dispatch=d, queue="default", entry_id=eid, token="w-held:1", worker="w-held", max_crashes=3, max_steps=0
    )
    commit = client.store.commit(
        dispatch=d,
        queue="default",
        token="w-held:1",
        record="{}",
        event='{"step":"first"}',
        next_step="second",
        duration_ms=1,
        cost={},
        state={},
        max_steps=0,
        chain_to="w-held",
        chain_token="w-held:2",
        entry_id=eid,
    )
    scripts.execute(r, [beat, claim, commit])  # the commit's reply "lost": nobody runs `second`
    assert r.hget(client.keys.run("held-orphan").run, "step") == "second"  # claimed, on the first's entry
    with worker_thread([flow], settings, worker_id="w-held"):  # no supervisor: only the audit can
        run.wait(timeout_s=20)
    history = [e for e in client.events("held-orphan") if e.type == "redispatched"]
    assert len(history) == 1 and "given up by w-held" in (history[0].detail or "")
    assert [e.step for e in client.events("held-orphan") if e.type == "crashed"] == ["second"]
