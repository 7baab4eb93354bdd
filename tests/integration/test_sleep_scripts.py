"""Durable sleep in the scripts: a step that returns ``Sleep`` commits, and its run waits in its
queue's delayed set with no entry, no claim and no lease until its due time on the Redis clock;
each actor that can meet a sleeping run (a resent commit, a late promote, a redelivered entry,
the sweep, a cancel, the claim that finishes a half-done commit) leaves it asleep, or wakes it
once and never early."""

from __future__ import annotations

import json

from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP
from orchestrator.store import Committed, Outcome
from tests.ops import Ops

HOUR_MS = 3_600_000


def asleep(ops: Ops, wake: str = f"+{HOUR_MS}") -> tuple[str, Dispatch, Outcome]:
    """Run r1's first step and commit it with a Sleep; the stream entry, its dispatch, the reply."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    return eid, d, ops.commit(eid, d, wake=wake)


def due_now(ops: Ops) -> None:
    """Time passes: the sleeping run's wake-up is due."""
    ops.r.zadd(ops.q.delayed, {"r1": ops.server_ms() - 1}, xx=True)


def promote(ops: Ops) -> str:
    return str(ops.x(ops.store.promote(queue="q", run_id="r1"))[0])


def test_a_sleeping_run_holds_no_entry_no_claim_and_no_lease(ops: Ops) -> None:
    before = ops.server_ms()
    _, _, out = asleep(ops)
    assert out.code == "OK" and out.detail[:3] == ("b", 1, "delayed")
    due = int(out.detail[3])
    assert before + HOUR_MS <= due <= ops.server_ms() + HOUR_MS
    assert Committed.parse(out.detail).chained is None
    run = ops.run()
    assert (run["status"], run["step"], run["dispatch"], run["claim"], run["due_ms"]) == (
        "sleeping",
        "b",
        "delayed",
        "",
        str(due),
    )
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 0  # its own entry acked by the commit
    assert ops.r.xlen(ops.stream) == 1 and ops.read() == []  # and no entry for the next step
    assert ops.r.zscore(ops.q.delayed, "r1") == due
    assert ops.r.zscore(ops.part.active, "r1") == due  # the sweep looks once it is overdue
    assert ops.r.zscore(ops.q.queued, "r1") is None
    assert ops.history_types()[-2:] == ["ok", "sleeping"]
    assert json.loads(ops.r.lindex(ops.rk.history, -1))["until_ms"] == due


def test_a_sleeping_run_wakes_once_and_only_when_due(ops: Ops) -> None:
    asleep(ops)
    assert ops.x(ops.store.due(queue="q", partition=ops.partition, limit=10))[0] == []
    assert promote(ops) == ""  # a caller that promotes it anyway: not due, left asleep
    assert ops.run()["status"] == "sleeping" and ops.r.zcard(ops.q.delayed) == 1
    due_now(ops)
    assert ops.x(ops.store.due(queue="q", partition=ops.partition, limit=10))[0] == ["r1"]
    entry = promote(ops)
    assert entry and promote(ops) == ""  # a second promoter finds nothing
    ((eid, d),) = ops.read()
    assert (eid, d.step, d.visit) == (entry, "b", 1)
    assert ops.run()["status"] == "running" and ops.history_types()[-1] == "woke"
    assert ops.claim(eid, d).code == "RUN"


def test_a_promote_listed_before_the_run_went_back_to_sleep_cannot_wake_it_early(ops: Ops) -> None:
    """A worker lists r1 as due; before its promote lands another worker wakes r1, runs its
    step and puts it to sleep again for an hour: the late promote must leave it asleep."""
    asleep(ops)
    due_now(ops)
    assert ops.x(ops.store.due(queue="q", partition=ops.partition, limit=10))[0] == ["r1"]
    promote(ops)  # the other worker's
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert ops.commit(eid, d, next_step="c", wake=f"+{HOUR_MS}").code == "OK"
    assert promote(ops) == ""  # the first worker's, late
    assert ops.run()["status"] == "sleeping" and ops.read() == []


def test_a_sleep_commit_resent_after_a_lost_reply_replays_and_sleeps_once(ops: Ops) -> None:
    eid, d, _ = asleep(ops)
    assert ops.commit(eid, d, wake=f"+{HOUR_MS}").code == "REPLAY"
    assert ops.history_types().count("sleeping") == 1 and ops.r.zcard(ops.q.delayed) == 1
    assert ops.run()["seq"] == "1"


def test_entries_that_reach_a_sleeping_run_cannot_start_a_step(ops: Ops) -> None:
    """Its old entry delivered again (Redis lost writes) is a duplicate; an entry of the step it
    sleeps before (a forged or lost-write dispatch) is stale: the step waits for its due time."""
    eid, d, _ = asleep(ops)
    assert ops.claim(eid, d, worker="w2").code == "DUP"
    forged = ops.r.xadd(ops.stream, {"run": "r1", "wf": "wf", "step": "b", "visit": "1"})
    ((fid, fd),) = ops.read()
    assert fid == forged and ops.claim(fid, fd, worker="w2").code == "STALE"
    assert ops.run()["status"] == "sleeping" and ops.run()["claim"] == ""


def test_cancel_reaches_a_sleeping_run_at_once(ops: Ops) -> None:
    asleep(ops)
    out = Outcome.parse(ops.x(ops.store.cancel(run_id="r1", queue="q", reason="no longer needed", request_id="c1"))[0])
    assert out.code == "CANCELLED" and ops.r.zcard(ops.q.delayed) == 0
    due_now(ops)
    assert promote(ops) == "" and ops.run()["status"] == "cancelled" and ops.read() == []


def test_the_sweep_leaves_a_sleeping_run_asleep_and_reschedules_a_lost_wake_up_never_early(ops: Ops) -> None:
    _, _, out = asleep(ops)
    due = int(out.detail[3])
    sweep = ops.store.sweep(run_id="r1", queue="q", after_ms=1)
    assert Outcome.parse(ops.x(sweep)[0]).code == "SCHEDULED"
    assert ops.r.zscore(ops.part.active, "r1") == due and ops.read() == []
    ops.r.delete(ops.q.delayed)  # Redis lost the wake-up (a restart from an older copy)
    repaired = Outcome.parse(ops.x(sweep)[0])
    assert (repaired.code, repaired.detail) == ("REPAIRED", ("", "scheduled wake-up missing"))
    assert ops.r.zscore(ops.q.delayed, "r1") == due and ops.read() == []
    assert ops.run()["status"] == "sleeping"


def test_a_claim_that_finishes_a_half_done_sleep_commit_puts_the_run_to_sleep(ops: Ops) -> None:
    """A commit stopped after writing its result: the claim that finds the result finishes the
    commit from the record, Sleep included, from its own clock (later than meant, never early)."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    record = {"step": "a", "visit": 1, "next": "b", "update": {}, "wake": f"+{HOUR_MS}"}
    ops.r.hset(ops.rk.results, "r1:a", json.dumps(record))
    ops.kill("w1")
    ops.r.xack(ops.stream, GROUP, eid)
    ops.x(ops.store.sweep(run_id="r1", queue="q"))  # re-enqueues step a: its entry was acked
    ((eid2, d2),) = ops.read("w2")
    before = ops.server_ms()
    claimed = ops.claim(eid2, d2, worker="w2")
    assert (claimed.code, claimed.detail) == ("DUP", "advanced")
    run = ops.run()
    assert (run["status"], run["step"], run["dispatch"]) == ("sleeping", "b", "delayed")
    assert int(run["due_ms"]) >= before + HOUR_MS and ops.r.zscore(ops.q.delayed, "r1") == int(run["due_ms"])


def test_a_wake_up_at_a_time_already_past_is_due_at_once_and_bad_ones_are_refused(ops: Ops) -> None:
    _, _, out = asleep(ops, wake="@1000")
    assert int(out.detail[3]) >= ops.server_ms() - 1000  # never before the commit
    assert promote(ops)
    (eid, d), *_ = ops.read()
    ops.claim(eid, d)
    for bad, next_step in (("soon", "c"), ("+-5", "c"), ("+1000", None)):
        refused = ops.commit(eid, d, next_step=next_step, wake=bad)
        assert refused.code == "INVALID" and "wake-up" in refused.detail[0], bad
    assert ops.run()["status"] == "running" and ops.run()["claim"] == f"w1:{eid}"
