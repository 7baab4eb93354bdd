"""The audit's holes end to end, with real workers and supervisors on a real Redis.

Each test sets up what the audit observed (a run that hung, a fleet that stalled, a repair
that came passes late, retention that fell behind) and states what must hold instead.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis

from orchestrator import Client, Goto, Settings, StepContext, Supervisor, Workflow, scripts
from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP
from tests.harness import supervisor_thread, worker_thread
from tests.helpers import wait_until
from tests.ledger import Ledger
from tests.ops import Ops, partition_mates
from workers.testflows import chain

nan_cost = Workflow("nan_cost")


@nan_cost.step
def report(ctx: StepContext, state: Any) -> None:
    ctx.cost["usd"] = math.nan  # past record_cost's checks: what commit.lua itself must refuse


def test_a_commit_redis_refuses_fails_the_step_instead_of_hanging_the_run(client: Client, settings: Settings) -> None:
    """Hole 2 as the audit saw it: the commit half-applied, the run stayed `running` and the
    sweep re-enqueued the step on every pass. Now the commit writes nothing and the step fails
    with the reason; the run ends, and no `repaired` events pile up."""
    with worker_thread([nan_cost], settings), supervisor_thread(settings):
        run = client.submit(nan_cost, {}, run_id="nan")
        wait_until(lambda: run.status() == "failed", timeout_s=20, what="the run failed")
        time.sleep(settings.sweep_after_s + 2 * settings.sweep_interval_s)  # sweeps that would have looped
    info = client.get("nan")
    assert info.error is not None and info.error.type == "CommitRefused"
    assert "cost usd = nan is not a finite number" in info.error.message
    assert client.results("nan") == {} and info.crashes == 0
    assert [e.type for e in client.events("nan")] == ["submitted", "error", "failed"]


loop_forever = Workflow("loop_forever")


@loop_forever.step
def spin(ctx: StepContext, state: Any) -> Goto:
    return Goto("spin")


def test_a_goto_loop_that_never_ends_fails_at_max_run_steps(client: Client, settings: Settings) -> None:
    capped = settings.model_copy(update={"max_run_steps": 25})
    with worker_thread([loop_forever], capped):
        run = client.submit(loop_forever, {}, run_id="spin")
        wait_until(lambda: run.status() == "failed", timeout_s=20, what="the runaway run failed")
    info = client.get("spin")
    assert info.error is not None and info.error.type == "RunawayRun" and "max_run_steps" in info.error.message
    assert info.steps_done == 25 and len(client.results("spin")) == 25
    assert client.stats()["runaway_runs"] == 1


def test_the_fleet_recovers_when_a_queue_stream_or_its_group_disappears(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    """Hole 3: a stream deleted under a running fleet (an operator's DEL, a restart without
    persistence) used to stall it: the worker looped on NOGROUP, every supervisor tick failed,
    and new runs stayed pending. Runs queued when it vanished must be repaired, new runs must
    flow, and the supervisor must keep doing its other work meanwhile."""
    streams = client.keys.streams("default")
    with worker_thread([chain], settings) as worker, supervisor_thread(settings) as supervisor:
        client.submit(chain, {}, run_id="before").wait(timeout_s=20)
        worker.shutdown()  # nobody reads while the stream vanishes with runs queued in it
        wait_until(lambda: client.redis.zscore(client.keys.workers, worker.id) is None, what="worker gone")
        stranded = [client.submit(chain, {}, run_id=f"stranded{i}") for i in range(3)]
        client.redis.delete(*streams)
        assert client.redis.exists(*streams) == 0
        with worker_thread([chain], settings):
            after = client.submit(chain, {}, run_id="after")
            assert after.wait(timeout_s=30).i == 10  # a run submitted after the loss goes through
            for run in stranded:
                assert run.wait(timeout_s=30).i == 10  # and the ones it took with it are repaired
            lost = client.keys.queue_of("default", "after-group").stream
            client.redis.xgroup_destroy(lost, GROUP)  # the group alone, this time
            assert client.submit(chain, {}, run_id="after-group").wait(timeout_s=30).i == 10
    repaired = [e.detail for r in stranded for e in client.events(r.run_id) if e.type == "repaired"]
    assert repaired == ["no queued entry"] * 3
    assert supervisor.totals.get("repaired", 0) >= 3


def test_recovery_and_retention_keep_up_with_a_backlog(client: Client, settings: Settings, r: redis.Redis) -> None:
    """Hole 5: the sweep looked at 500 idle runs per pass, oldest first, so behind 2,000 healthy
    queued runs a run whose entry was trimmed was repaired on the 5th pass; the purge removed
    500 runs a minute. Now a pass looks only at the runs that need a look (whatever waits
    behind them), and one purge pass deletes everything past retention."""
    n = 3_000
    ids = partition_mates(client.keys, "q00000", "q", n)  # one partition: one stream and its index
    ops = [Ops(r, settings, run_id=rid) for rid in ids]
    submits = [op.submit_call() for op in ops]
    for start in range(0, n, 500):
        scripts.execute(r, submits[start : start + 500])
    lane = ("q", client.keys.partition_of(ids[0]))
    stream = client.keys.queue(*lane).stream
    r.xtrim(stream, maxlen=n - 7, approximate=False)  # a trimmer drops the 7 oldest entries
    supervisor = Supervisor(settings)
    try:
        first = supervisor.sweep_queue(lane)
        assert first.get("repaired") == 7 and first.get("swept") == 7  # one pass, and only those 7
        assert supervisor.sweep_queue(lane).get("swept", 0) == 0  # the healthy backlog costs nothing
        # retention: finish 3,000 runs, then one purge pass deletes them all
        done = settings.model_copy(update={"retention_s": 0.001, "failed_retention_s": 0.001})
        purger = Supervisor(done)
        finish_all(r, ops)
        failed = Ops(r, settings, run_id="failed-run")
        failed.submit()
        ((eid, d),) = failed.read("c")
        failed.claim(eid, d)
        assert failed.fail(eid, d, delay_ms=None).code == "FAILED"
        time.sleep(0.01)
        assert purger.purge() == {"purged": n + 1, "unfinished": 0}
        assert sum(r.zcard(p.done) + r.zcard(p.dead) for p in client.keys.parts) == 0
        assert r.exists(client.keys.run(ids[0]).run, client.keys.run("failed-run").run) == 0
        purger.redis.close()
    finally:
        supervisor.redis.close()


def finish_all(r: redis.Redis, ops: list[Ops]) -> None:
    """Claim and complete every run of ``ops`` (one-step runs) through the scripts, 500 at a time."""
    by_run = {op.run_id: op for op in ops}
    ops[0].beat("c")  # one partition: "c" is alive there
    while reply := r.xreadgroup(GROUP, "c", {ops[0].stream: ">"}, count=500):
        entries = [(eid, Dispatch.model_validate(f)) for _, rows in reply for eid, f in rows]
        scripts.execute(r, [by_run[d.run].claim_call(eid, d, worker="c") for eid, d in entries])
        scripts.execute(r, [by_run[d.run].commit_call(eid, d, worker="c", next_step=None) for eid, d in entries])
