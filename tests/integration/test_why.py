"""``runs why`` / ``Client.why``: one paragraph per state a run can wait in, each built from what
Redis holds (the states set up with the scripts, as a worker would), and a running step seen on
a real worker."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import redis

from orchestrator import Client, RunNotFound, Settings, StepContext, Workflow
from orchestrator.store import Outcome
from tests.harness import process_env, run_cli, worker_thread
from tests.helpers import wait_until
from tests.ops import Ops, partition_mates


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)


def test_a_run_queued_behind_others_says_how_many_entries_are_ahead(ops: Ops, client: Client) -> None:
    ahead = partition_mates(ops.keys, "r1", "ahead", count=3)
    for run_id in ahead:
        Ops(ops.r, client.settings, run_id).submit()
    ops.submit()
    why = client.why("r1")
    assert (why.waiting_for, why.details["ahead"]) == ("queue", 3)
    assert "queued in queue q" in why.text and "behind 3 entries" in why.text
    ops.read("c1")  # a worker reads them all (3 ahead and r1's): nothing ahead, delivered, unclaimed
    why = client.why("r1")
    assert why.waiting_for == "claim" and why.details["worker"] == "c1" and "delivered to worker c1" in why.text


def test_a_claimed_step_names_its_worker_and_a_lapsed_claim_says_when_recovery_comes(ops: Ops, client: Client) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d, worker="w1")
    why = client.why("r1")
    assert why.waiting_for == "worker" and "running step a (attempt 1) on worker w1 (alive" in why.text
    ops.kill("w1")
    why = client.why("r1")
    assert why.waiting_for == "recovery" and "lapsed" in why.text and "re-dispatches the step" in why.text
    assert why.details["expected_ms"] >= why.server_ms


def test_sleeping_backing_off_and_finished_runs_say_until_when_and_why(ops: Ops, client: Client) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    error = {"type": "RateLimited", "message": "429 from the provider", "traceback": "", "retryable": True}
    failed = ops.store.fail(
        dispatch=d,
        queue="q",
        token=f"w1:{eid}",
        event=json.dumps({"step": "a", "attempt": 1, "error": error}),  # as a worker writes it
        kind="error",
        retry_delay_ms=60_000,
        error=json.dumps(error),
    )
    assert Outcome.parse(ops.x(failed)[0]).code == "RETRY"
    why = client.why("r1")
    assert why.waiting_for == "backoff" and "backing off until" in why.text
    assert "after RateLimited: 429 from the provider" in why.text and "will be attempt 2" in why.text
    ops.x(ops.store.cancel(run_id="r1", queue="q", reason="user changed their mind", request_id="c1"))
    why = client.why("r1")
    assert why.waiting_for == "nothing" and why.text.startswith("finished: cancelled at")
    assert "user changed their mind" in why.text

    sleeper = Ops(ops.r, client.settings, "r2")
    sleeper.submit()
    ((eid, d),) = sleeper.read()
    sleeper.claim(eid, d)
    sleeper.commit(eid, d, wake="+3600000")
    why = client.why("r2")
    assert why.waiting_for == "sleep" and "sleeping until" in why.text and "then step b" in why.text


def test_an_unfinished_run_with_a_deadline_says_when_it_is(client: Client) -> None:
    flow: Workflow[Any] = Workflow("why_deadline")

    @flow.step
    def only(ctx: StepContext, state: Any) -> None:
        return None

    client.submit(flow, {}, run_id="timed", deadline_s=600)
    why = client.why("timed")
    assert why.waiting_for == "queue" and "Its deadline is" in why.text and "(in 10 min)" in why.text
    assert why.details["deadline_ms"] == client.get("timed").deadline_ms


def test_a_run_whose_entry_is_gone_says_the_sweep_repairs_it(ops: Ops, client: Client) -> None:
    ops.submit()
    ops.r.delete(ops.stream)
    why = client.why("r1")
    assert why.waiting_for == "repair" and "sweep" in why.text


def test_a_step_running_on_a_real_worker_and_the_cli(client: Client, settings: Settings) -> None:
    flow: Workflow[Any] = Workflow("why_flow")
    go = threading.Event()

    @flow.step
    def waits(ctx: StepContext, state: Any) -> None:
        go.wait(20)

    with worker_thread([flow], settings) as worker:
        client.submit(flow, {}, run_id="busy")
        why = wait_until(lambda: (w := client.why("busy")).waiting_for == "worker" and w, what="the step running")
        assert f"on worker {worker.id} (alive, last heartbeat" in why.text
        out = run_cli("runs", "why", "busy", "--output", "json", env=process_env(settings))
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["waiting_for"] == "worker" and doc["details"]["worker"] == worker.id
        go.set()
        wait_until(lambda: client.get("busy").status == "completed", what="the run completed")
    text = run_cli("runs", "why", "busy", env=process_env(settings))
    assert text.returncode == 0 and text.stdout.startswith("finished: completed at"), text.stdout


def test_an_unknown_run_is_a_clear_error(client: Client, settings: Settings) -> None:
    with pytest.raises(RunNotFound, match="no run 'nope'"):
        client.why("nope")
    out = run_cli("runs", "why", "nope", env=process_env(settings))
    assert out.returncode != 0 and "no run 'nope'" in out.stderr and "Traceback" not in out.stderr


def test_a_failed_and_a_quarantined_run_say_why_they_ended(ops: Ops, client: Client) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.fail(eid, d, delay_ms=None)
    why = client.why("r1")
    assert why.waiting_for == "nothing" and why.text.startswith("finished: failed at") and "at step a: E: m" in why.text

    crashy = Ops(ops.r, client.settings, "r2")
    crashy.submit()
    ((eid, d),) = crashy.read()
    codes = []
    for worker in ("w1", "w2", "w3", "w4"):  # each claim's worker dies: crashes count up to the limit
        codes.append(crashy.claim(eid, d, worker=worker, max_crashes=2).code)
        crashy.kill(worker)
    assert "QUARANTINED" in codes, codes
    why = client.why("r2")
    assert "quarantined because" in why.text, why.text
