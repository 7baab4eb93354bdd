"""Run deadlines: a run submitted with ``deadline_s`` fails with ``DeadlineExceeded`` once that
time has passed on the Redis clock, wherever it is (queued, running, sleeping, backing off);
``expire.lua`` against each state and each actor that can meet it, then end to end with a
supervisor and a worker."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from orchestrator import Client, Settings, ValidationError
from orchestrator.chaos.ledger import Ledger
from orchestrator.store import Outcome
from tests.harness import process_env, run_cli, supervisor_thread, worker_thread
from tests.helpers import wait_until
from tests.ops import Ops
from workers.testflows import Nap, Slow, napping, slow


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)


def submit(ops: Ops, deadline_ms: int) -> None:
    """Submit ``ops``' run with a deadline, as ``Client.submit(deadline_s=...)`` does."""
    call = ops.store.submit(
        run_id=ops.run_id,
        workflow="wf",
        queue="q",
        first_step="a",
        input_sha="d1",
        event='{"detail":"x"}',
        request_id=f"req-{ops.run_id}",
        state={"n": "0"},
        deadline_ms=deadline_ms,
    )
    assert ops.x(call)[0][0] == 1


def expire(ops: Ops) -> Outcome:
    return Outcome.parse(ops.x(ops.store.expire(run_id="r1", queue="q"))[0])


def past_deadline(ops: Ops) -> None:
    """Time passes: the run's deadline is behind the server's clock."""
    seconds, micros = ops.r.time()
    ops.r.zadd(ops.part.deadlines, {"r1": int(seconds) * 1000 + int(micros) // 1000 - 1}, xx=True)


def test_a_run_before_its_deadline_is_left_alone_and_after_it_fails_with_the_reason(ops: Ops) -> None:
    submit(ops, 60_000)
    assert ops.x(ops.store.expired(partition=ops.partition, limit=10))[0] == []
    assert expire(ops).code == "NOT_DUE" and ops.run()["status"] == "pending"  # listed early: not yet
    past_deadline(ops)
    assert ops.x(ops.store.expired(partition=ops.partition, limit=10))[0] == ["r1"]
    assert expire(ops).code == "EXPIRED"
    run = ops.run()
    error = json.loads(run["error"])
    assert run["status"] == "failed" and error["type"] == "DeadlineExceeded" and not error["retryable"]
    assert "did not finish within its deadline (60000 ms" in error["message"] and "at step a" in error["message"]
    assert ops.r.zscore(ops.part.dead, "r1") is not None and ops.r.zcard(ops.part.deadlines) == 0
    assert ops.r.zscore(ops.q.queued, "r1") is None and ops.r.zscore(ops.part.active, "r1") is None
    assert expire(ops).code == "TERMINAL"  # resent, or a second supervisor: nothing more
    ((eid, d),) = ops.read()
    assert ops.claim(eid, d).code == "TERMINAL"  # its queued entry cannot start the step


def test_a_running_step_is_told_through_the_cancels_stream_and_its_commit_is_refused(ops: Ops) -> None:
    submit(ops, 60_000)
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    past_deadline(ops)
    assert expire(ops).code == "EXPIRED"
    assert [f["run"] for _, f in ops.r.xrange(ops.part.cancels)] == ["r1"]
    assert ops.commit(eid, d).code == "TERMINAL"
    assert ops.run()["status"] == "failed" and not ops.r.hexists(ops.rk.results, "r1:a")


def test_a_sleeping_run_fails_at_its_deadline_and_no_wake_up_is_left(ops: Ops) -> None:
    submit(ops, 60_000)
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.commit(eid, d, wake="+3600000")
    past_deadline(ops)
    assert expire(ops).code == "EXPIRED" and ops.r.zcard(ops.q.delayed) == 0
    ops.r.zadd(ops.q.delayed, {"r1": 0})  # a wake-up that survived anyway (a rolled-back copy)
    assert ops.x(ops.store.promote(queue="q", run_id="r1"))[0] == ""
    assert ops.run()["status"] == "failed" and ops.read() == []


def test_a_run_backing_off_fails_at_its_deadline_and_its_retry_is_dropped(ops: Ops) -> None:
    submit(ops, 60_000)
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert ops.fail(eid, d, delay_ms=3_600_000).code == "RETRY"
    past_deadline(ops)
    assert expire(ops).code == "EXPIRED" and ops.r.zcard(ops.q.delayed) == 0
    assert ops.run()["status"] == "failed"


def test_a_run_that_finished_or_was_retried_has_no_deadline_left(ops: Ops, settings: Settings) -> None:
    submit(ops, 60_000)
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    past_deadline(ops)
    expire(ops)
    retried = Outcome.parse(ops.x(ops.store.retry(run_id="r1", queue="q", reason="more time", request_id="t1"))[0])
    assert retried.code == "RETRIED"
    assert expire(ops).code == "NOT_DUE" and ops.run()["status"] == "running"  # an operator's retry: no deadline

    done = Ops(ops.r, settings, "r2")
    submit(done, 60_000)
    ((eid, d),) = done.read()
    done.claim(eid, d)
    assert done.commit(eid, d, next_step=None).code == "OK"
    done.r.zadd(done.part.deadlines, {"r2": 1}, xx=True)
    out = Outcome.parse(done.x(done.store.expire(run_id="r2", queue="q"))[0])
    assert (out.code, out.detail) == ("TERMINAL", ("completed",)) and done.r.zscore(done.part.deadlines, "r2") is None


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "5", 11 * 366 * 86400])
def test_a_bad_deadline_is_refused_naming_the_field(client: Client, bad: Any) -> None:
    with pytest.raises(ValidationError, match=r"deadline_s .* is invalid: expected a number of seconds above 0"):
        client.submit(napping, Nap(), deadline_s=bad)


def test_the_supervisor_fails_a_sleeping_and_a_running_run_at_their_deadlines(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    asleep = client.submit(napping, Nap(nap_s=60), run_id="asleep", deadline_s=1.0)
    busy = client.submit(slow, Slow(seconds=60), run_id="busy", deadline_s=1.5)
    started = time.time()
    with worker_thread([napping, slow], settings), supervisor_thread(settings):
        for run_id in ("asleep", "busy"):
            wait_until(lambda rid=run_id: client.get(rid).status == "failed", timeout_s=20, what=f"{run_id} failed")
        elapsed = time.time() - started
        wait_until(lambda: not client.get("busy").worker, what="the running step stopped")
    for run in (asleep, busy):
        info = client.get(run.run_id)
        assert info.error is not None and info.error.type == "DeadlineExceeded", info
        assert info.finished_ms is not None and info.finished_ms >= info.created_ms + 1000
    assert elapsed < 15  # far less than the 60 s the steps would have taken
    assert "DeadlineExceeded" in client.why("busy").text
    assert not any(e.type == "ok" and e.step == "crawl" for e in client.events("busy"))


def test_the_cli_takes_a_deadline(settings: Settings, client: Client) -> None:
    out = run_cli(
        "submit",
        "workers.testflows:napping",
        '{"nap_s": 60}',
        "--run-id",
        "cli",
        "--deadline-s",
        "30",
        env=process_env(settings),
    )
    assert out.returncode == 0, out.stderr
    info = client.get("cli")
    assert info.deadline_ms is not None and 29_000 <= info.deadline_ms - info.created_ms <= 30_000
    shown = run_cli("status", "cli", env=process_env(settings))
    assert "deadline" in shown.stdout
    refused = run_cli("submit", "workers.testflows:napping", "--deadline-s", "0", env=process_env(settings))
    assert (
        refused.returncode != 0 and "deadline_s 0.0 is invalid" in refused.stderr and "Traceback" not in refused.stderr
    )
