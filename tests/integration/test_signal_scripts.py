"""Signals in the scripts: a step that returns ``WaitFor`` commits, and its run waits with no
entry, no claim and no lease until ``signal.lua`` delivers the signal (its payload into the
state and the next step queued, in one atomic step) or ``promote.lua`` ends the wait at its
timeout. Each actor that can meet a waiting run is raced against it here: a resent signal or
commit (lost replies), a second sender under the same id, a promote that listed the timeout
before the signal came, a redelivered entry, the sweep (also after Redis lost the timeout), a
cancel, a deadline, and the claim that finishes a half-done commit."""

from __future__ import annotations

import json

from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP
from orchestrator.store import Outcome
from tests.ops import Ops

HOUR_MS = 3_600_000
APPROVED = '{"approved":true,"by":"ann"}'


def wait_json(timeout_ms: int = 0, on_timeout: str = "") -> str:
    return json.dumps({"signal": "approval", "into": "approval", "timeout_ms": timeout_ms, "on_timeout": on_timeout})


def waiting(ops: Ops, timeout_ms: int = 0, on_timeout: str = "") -> tuple[str, Dispatch, Outcome]:
    """Run r1's first step and commit it with a WaitFor (then step b); entry, dispatch, reply."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    return eid, d, ops.commit(eid, d, wait=wait_json(timeout_ms, on_timeout))


def signal(ops: Ops, signal_id: str = "s1", payload: str = APPROVED, digest: str = "", limit: int = 100) -> Outcome:
    call = ops.store.signal(
        run_id="r1",
        queue="q",
        signal_id=signal_id,
        name="approval",
        payload=payload,
        digest=digest or f"sha-{payload}",
        max_signals=limit,
    )
    return Outcome.parse(ops.x(call)[0])


def promote(ops: Ops) -> str:
    return str(ops.x(ops.store.promote(queue="q", run_id="r1"))[0])


def due_now(ops: Ops) -> None:
    ops.r.zadd(ops.q.delayed, {"r1": ops.server_ms() - 1}, xx=True)


def state(ops: Ops) -> dict[str, str]:
    return ops.r.hgetall(ops.rk.state)


def test_a_waiting_run_holds_no_entry_no_claim_and_no_lease(ops: Ops) -> None:
    _, _, out = waiting(ops)
    assert out.code == "OK" and out.detail == ("b", 1, "waiting", 0)
    run = ops.run()
    assert (run["status"], run["step"], run["dispatch"], run["claim"], run["wait_signal"]) == (
        "waiting",
        "b",
        "signal",
        "",
        "approval",
    )
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 0 and ops.read() == []
    assert ops.r.zcard(ops.q.delayed) == 0  # no timeout: nothing scheduled
    assert ops.r.zscore(ops.q.queued, "r1") is None
    assert ops.r.zscore(ops.part.active, "r1") > ops.server_ms() + 3_600_000  # the sweep looks in a day
    assert ops.history_types()[-2:] == ["ok", "waiting"]


def test_a_signal_delivers_its_payload_and_queues_the_next_step_exactly_once(ops: Ops) -> None:
    waiting(ops)
    out = signal(ops)
    assert (out.code, out.detail) == ("DELIVERED", ("b", 1))
    assert state(ops)["approval"] == APPROVED
    ((eid, d),) = ops.read()
    assert (d.step, d.visit) == ("b", 1) and ops.run()["dispatch"] == eid and ops.run()["status"] == "running"
    # the same signal resent (its reply was lost): nothing changes, the reply says where it went
    again = signal(ops)
    assert (again.code, again.detail) == ("DUP", ("b:1",))
    assert ops.read() == [] and ops.history_types().count("signalled") == 1
    # another sender reusing the id for something else is refused, not merged
    conflict = signal(ops, payload='{"approved":false,"by":"bob"}')
    assert conflict.code == "CONFLICT" and state(ops)["approval"] == APPROVED
    assert ops.claim(eid, d).code == "RUN"


def test_a_signal_sent_before_the_wait_is_kept_and_delivered_when_the_run_waits(ops: Ops) -> None:
    ops.submit()
    assert signal(ops, "s1").code == "BUFFERED"
    assert signal(ops, "s2", payload='{"approved":false,"by":"bob"}').code == "BUFFERED"
    assert signal(ops, "s1").code == "DUP"  # kept once
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    out = ops.commit(eid, d, wait=wait_json())
    assert out.code == "OK" and out.detail[:2] == ("b", 1) and out.detail[2] != "waiting"  # an entry id
    assert state(ops)["approval"] == APPROVED  # the oldest first
    assert ops.run()["status"] == "running" and ops.history_types()[-1] == "signalled"
    assert ops.r.hget(ops.rk.signals, "q:approval") == "s2"  # the other stays kept
    ((_, nd),) = ops.read()
    assert (nd.step, nd.visit) == ("b", 1)


def test_a_wait_times_out_once_at_its_timeout_and_a_late_signal_is_kept(ops: Ops) -> None:
    before = ops.server_ms()
    waiting(ops, timeout_ms=HOUR_MS, on_timeout="c")
    due = int(ops.run()["due_ms"])
    assert due >= before + HOUR_MS and ops.r.zscore(ops.q.delayed, "r1") == due
    assert promote(ops) == ""  # not due: left waiting
    due_now(ops)
    entry = promote(ops)
    assert entry and promote(ops) == ""
    ((eid, d),) = ops.read()
    assert (eid, d.step, d.visit) == (entry, "c", 1)
    run = ops.run()
    assert (run["status"], run["step"], run["visit"], run["v:b"]) == ("running", "c", "1", "0")
    assert state(ops)["approval"] == "null" and ops.history_types()[-1] == "timed_out"
    assert signal(ops).code == "BUFFERED"  # too late for that wait: kept for a later one
    assert state(ops)["approval"] == "null"


def test_a_promote_that_listed_the_timeout_before_the_signal_came_does_nothing(ops: Ops) -> None:
    waiting(ops, timeout_ms=HOUR_MS, on_timeout="c")
    due_now(ops)
    assert ops.x(ops.store.due(queue="q", partition=ops.partition, limit=10))[0] == ["r1"]
    assert signal(ops).code == "DELIVERED"  # the signal lands between the listing and the promote
    assert ops.r.zcard(ops.q.delayed) == 0
    assert promote(ops) == ""
    ((_, d),) = ops.read()
    assert d.step == "b" and state(ops)["approval"] == APPROVED
    assert "timed_out" not in ops.history_types()


def test_a_wait_commit_resent_after_a_lost_reply_does_not_wait_again(ops: Ops) -> None:
    """The commit applied and parked the run, its reply was lost, the signal came, and then the
    worker sends the commit again: REPLAY, and the run stays on its way to step b."""
    eid, d, _ = waiting(ops)
    assert signal(ops).code == "DELIVERED"
    assert ops.commit(eid, d, wait=wait_json()).code == "REPLAY"
    run = ops.run()
    assert run["status"] == "running" and run["seq"] == "1"
    assert ops.history_types().count("waiting") == 1


def test_entries_that_reach_a_waiting_run_cannot_start_a_step(ops: Ops) -> None:
    eid, d, _ = waiting(ops)
    assert ops.claim(eid, d, worker="w2").code == "DUP"
    forged = ops.r.xadd(ops.stream, {"run": "r1", "wf": "wf", "step": "b", "visit": "1"})
    ((fid, fd),) = ops.read()
    assert fid == forged and ops.claim(fid, fd, worker="w2").code == "STALE"
    assert ops.run()["status"] == "waiting" and ops.run()["claim"] == ""


def test_the_sweep_leaves_a_waiting_run_and_reschedules_a_lost_timeout_never_early(ops: Ops) -> None:
    waiting(ops, timeout_ms=HOUR_MS)
    due = int(ops.run()["due_ms"])
    sweep = ops.store.sweep(run_id="r1", queue="q", after_ms=1)
    assert Outcome.parse(ops.x(sweep)[0]).code == "SCHEDULED"
    ops.r.delete(ops.q.delayed)  # Redis lost the timeout (a restart from an older copy)
    repaired = Outcome.parse(ops.x(sweep)[0])
    assert (repaired.code, repaired.detail) == ("REPAIRED", ("", "scheduled wait timeout missing"))
    assert ops.r.zscore(ops.q.delayed, "r1") == due and ops.read() == []
    assert ops.run()["status"] == "waiting"


def test_the_sweep_leaves_a_wait_without_timeout_alone(ops: Ops) -> None:
    waiting(ops)
    sweep = ops.store.sweep(run_id="r1", queue="q", after_ms=1)
    assert Outcome.parse(ops.x(sweep)[0]).code == "WAITING"
    assert ops.read() == [] and ops.run()["status"] == "waiting" and ops.r.zcard(ops.q.delayed) == 0


def test_cancel_and_deadline_reach_a_waiting_run_at_once_and_a_signal_then_is_refused(ops: Ops) -> None:
    waiting(ops, timeout_ms=HOUR_MS)
    out = Outcome.parse(ops.x(ops.store.cancel(run_id="r1", queue="q", reason="no", request_id="c1"))[0])
    assert out.code == "CANCELLED" and ops.r.zcard(ops.q.delayed) == 0
    assert (signal(ops).code, signal(ops).detail) == ("TERMINAL", ("cancelled",))
    assert "approval" not in state(ops) and ops.read() == []


def test_a_claim_that_finishes_a_half_done_wait_commit_parks_the_run(ops: Ops) -> None:
    """A commit stopped after writing its result: the claim that finds it finishes the commit
    from the record, WaitFor included; a signal sent meanwhile is delivered by it."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    record = {"step": "a", "visit": 1, "next": "b", "update": {}, "wait": json.loads(wait_json())}
    ops.r.hset(ops.rk.results, "r1:a", json.dumps(record))
    assert signal(ops).code == "BUFFERED"  # the run is still at step a
    ops.kill("w1")
    ops.r.xack(ops.stream, GROUP, eid)
    ops.x(ops.store.sweep(run_id="r1", queue="q"))
    ((eid2, d2),) = ops.read("w2")
    claimed = ops.claim(eid2, d2, worker="w2")
    assert (claimed.code, claimed.detail) == ("DUP", "advanced")
    assert ops.run()["status"] == "running" and ops.run()["step"] == "b"
    assert state(ops)["approval"] == APPROVED and ops.history_types().count("signalled") == 1


def test_bad_waits_and_signals_are_refused_before_any_write(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    for bad, next_step in (("{", "b"), ('{"signal":"a b","into":"x"}', "b"), (wait_json(), None)):
        refused = ops.commit(eid, d, next_step=next_step, wait=bad)
        assert refused.code == "INVALID" and "WaitFor" in refused.detail[0], bad
    assert ops.run()["status"] == "running" and ops.run()["claim"] == f"w1:{eid}"
    assert signal(ops, "has space").code == "INVALID"
    assert signal(ops, "s1", limit=1).code == "BUFFERED"
    full = signal(ops, "s2", limit=1)
    assert (full.code, full.detail) == ("FULL", (1,))
    missing = ops.store.signal(
        run_id="nope", queue="q", signal_id="s", name="approval", payload="{}", digest="d", max_signals=5
    )
    assert Outcome.parse(ops.x(missing)[0]).code == "MISSING"


def test_a_run_retried_after_its_deadline_passed_while_it_waited_waits_again(ops: Ops) -> None:
    """The step after a wait must not run without the signal: a retry re-parks the run, its
    timeout as long as before, from the retry's time."""
    waiting(ops, timeout_ms=HOUR_MS, on_timeout="c")
    ops.r.hset(ops.rk.run, "deadline_ms", 1)  # the run's deadline passed
    ops.r.zadd(ops.part.deadlines, {"r1": 1})
    expired = Outcome.parse(ops.x(ops.store.expire(run_id="r1", queue="q"))[0])
    assert expired.code == "EXPIRED" and ops.r.zcard(ops.q.delayed) == 0
    before = ops.server_ms()
    retried = Outcome.parse(ops.x(ops.store.retry(run_id="r1", queue="q", reason="again", request_id="x"))[0])
    assert retried.code == "RETRIED" and retried.detail[:2] == ("signal", "b")
    run = ops.run()
    assert (run["status"], run["dispatch"], run["wait_signal"]) == ("waiting", "signal", "approval")
    assert int(run["due_ms"]) >= before + HOUR_MS and ops.r.zscore(ops.q.delayed, "r1") == int(run["due_ms"])
    assert ops.read() == []
    assert signal(ops).code == "DELIVERED" and state(ops)["approval"] == APPROVED
    ((_, d),) = ops.read()
    assert (d.step, d.visit) == ("b", 1)
