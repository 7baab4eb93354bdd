"""Each Lua script against a real redis-server, including the replayed and duplicate cases."""

from __future__ import annotations

import time

import pytest

from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP
from orchestrator.settings import Settings
from orchestrator.store import Committed, Outcome
from tests.ops import Ops, partition_mates


def test_submit_creates_once_and_reports_the_existing_run(ops: Ops) -> None:
    created = ops.submit()
    assert created[0] == 1
    assert ops.submit() == created  # the same request resent after a lost reply: still "created"
    assert ops.submit(request_id="req2") == [0, "wf", "d1", "pending"]
    assert ops.submit(digest="other", request_id="req3") == [0, "wf", "d1", "pending"]
    assert ops.r.xlen(ops.stream) == 1
    assert ops.r.hgetall(ops.rk.state) == {"n": "0"}
    # waiting in the stream: in its queue's queued index, scored by the entry's time, not in active
    ms, seq = created[1].split("-")
    assert ops.r.zscore(ops.q.queued, "r1") == int(ms) * 2048 + int(seq)
    assert ops.r.zscore(ops.part.active, "r1") is None


def test_claim_issues_increasing_fences_and_returns_state(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    server_ms = ops.r.time()[0] * 1000
    c = ops.claim(eid, d)
    assert (c.code, c.attempt, c.state) == ("RUN", 1, {"n": "0"})
    assert c.fence >= server_ms  # the claim time on the Redis clock: survives a rollback of Redis
    again = ops.claim(eid, d)  # the same claim retried after a lost reply: same answer, nothing new
    assert (again.code, again.fence, again.attempt) == ("RUN", c.fence, 1)
    assert ops.claim(eid, d, worker="w2").code == "BUSY"  # a live claim (its worker beats) blocks another
    assert ops.run()["claim_worker"] == "w1"


def test_a_worker_whose_deadline_passed_cannot_claim(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.beat("w1", lease_ms=1)
    time.sleep(0.01)
    assert ops.x(ops.claim_call(eid, d))[0] == ["LAPSED"]  # its claims would be born dead
    assert ops.run()["claim"] == ""
    assert ops.beat("w1") == [0, "0-0"]  # the next beat says it had lapsed, and makes it live again
    assert ops.x(ops.claim_call(eid, d))[0][0] == "RUN"


def test_claim_after_its_worker_died_counts_a_crash_and_gets_a_higher_fence(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    first = ops.claim(eid, d).fence
    ops.kill("w1")
    c = ops.claim(eid, d, worker="w2")
    assert (c.code, c.attempt, c.crashes, c.crashed_now) == ("RUN", 2, 1, True) and c.fence > first
    assert "crashed" in ops.history_types()


def test_claim_quarantines_a_step_after_max_crashes(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    for i in range(2):
        assert ops.claim(eid, d, worker=f"w{i}", max_crashes=2).code == "RUN"
        ops.kill(f"w{i}")
    c = ops.claim(eid, d, worker="w9", max_crashes=2)
    assert c.code == "QUARANTINED"
    run = ops.run()
    assert run["status"] == "failed" and "Quarantined" in run["error"]
    assert ops.r.zscore(ops.part.dead, "r1") is not None and ops.r.zscore(ops.part.active, "r1") is None


def test_commit_persists_once_advances_and_enqueues_the_next_step(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    out = ops.commit(eid, d)
    assert out.code == "OK" and out.detail[0] == "b" and out.detail[1] == 1
    assert ops.r.hget(ops.rk.results, "r1:a") == '{"by":"w1"}'
    assert ops.r.hgetall(ops.rk.state) == {"n": "1"}
    # the step's own entry was acked with the commit; the next step's waits
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 0
    run = ops.run()
    assert (run["step"], run["visit"], run["seq"], run["claim"], run["work_ms"]) == ("b", "1", "1", "", "5")
    # the same commit again (lost reply): a replay, nothing changes
    assert ops.commit(eid, d).code == "REPLAY"
    # a duplicate delivery of the committed step: claim says DUP, never runs it
    assert ops.claim(eid, d, worker="w2").code == "DUP"
    # a stale commit from another claim never overwrites the persisted result, and is counted
    assert ops.commit(eid, d, worker="w2", state={"n": "99"}).code == "FENCED"
    assert ops.run()["fenced"] == "1"
    assert ops.r.hget(ops.rk.results, "r1:a") == '{"by":"w1"}' and ops.r.hget(ops.rk.state, "n") == "1"


def test_commit_of_a_replaced_claim_is_fenced_and_counted(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.kill("w1")
    live = ops.claim(eid, d, worker="w2").fence
    out = ops.commit(eid, d, worker="w1")
    assert out.code == "FENCED" and out.detail[0] == live
    assert ops.r.hexists(ops.rk.results, "r1:a") == 0
    assert ops.run()["fenced"] == "1" and "fenced" in ops.history_types()
    # a refused commit acks nothing: the entry is the live claim's
    assert [p["message_id"] for p in ops.r.xpending_range(ops.stream, GROUP, "-", "+", 10)] == [eid]
    assert ops.commit(eid, d, worker="w2").code == "OK"
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 0


def test_commit_of_the_last_step_completes_the_run(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert ops.commit(eid, d, next_step=None).code == "OK"
    assert ops.run()["status"] == "completed"
    assert ops.r.zscore(ops.part.done, "r1") is not None and ops.r.zscore(ops.part.active, "r1") is None


def test_a_chained_commit_claims_the_next_step_on_the_same_entry_left_pending(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read("w1")
    first = ops.claim(eid, d)
    out = ops.commit(eid, d, chain=True)
    committed = Committed.parse(out.detail)
    claimed = committed.chained
    assert out.code == "OK" and claimed is not None and committed.next_step == "b"
    assert (claimed.code, claimed.attempt, claimed.errors, claimed.crashes, claimed.crashed_now) == (
        "RUN",
        1,
        0,
        0,
        False,
    )
    assert claimed.fence > first.fence and claimed.steps_done == 1 and claimed.work_ms == 5
    # the state is not sent back: the worker has it (the one it was given, its update merged)
    assert claimed.state == {} and ops.r.hgetall(ops.rk.state) == {"n": "1"}
    # no new entry: the claim's entry is left pending for w1 (not acked), the anchor of the chain
    assert committed.entry_id == eid and ops.r.xlen(ops.stream) == 1
    (pending,) = ops.r.xpending_range(ops.stream, GROUP, "-", "+", 10)
    assert (pending["message_id"], pending["consumer"]) == (eid, "w1")
    assert ops.read("w2") == []
    run = ops.run()
    assert (run["step"], run["claim"], run["claim_worker"], run["dispatch"]) == ("b", "w1:chained", "w1", eid)
    b = Dispatch(run="r1", wf="wf", step="b", visit=1)
    assert ops.claim(eid, b, token="w1:chained").fence == claimed.fence  # the same claim, as if claimed again
    assert ops.claim(eid, b, worker="w2").code == "BUSY"
    # the chained claim chains again on the same entry; the commit that does not chain acks it
    again = ops.commit(eid, b, token="w1:chained", chain=True)
    assert again.code == "OK" and Committed.parse(again.detail).entry_id == eid
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 1
    b2 = Dispatch(run="r1", wf="wf", step="b", visit=2)
    assert ops.commit(eid, b2, token="w1:chained", next_step=None).code == "OK"
    assert ops.run()["status"] == "completed" and ops.r.xpending(ops.stream, GROUP)["pending"] == 0


def test_a_chained_commit_resent_after_a_lost_reply_hands_back_the_same_claim(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read("w1")
    ops.claim(eid, d)
    first = Committed.parse(ops.commit(eid, d, chain=True).detail)
    again = ops.commit(eid, d, chain=True)  # the reply of the first was lost: the same call again
    replayed = Committed.parse(again.detail)
    assert again.code == "REPLAY" and replayed.chained is not None and first.chained is not None
    assert (replayed.next_step, replayed.visit, replayed.entry_id) == (first.next_step, first.visit, eid)
    same = ("code", "fence", "attempt", "errors", "crashes", "steps_done", "state")  # not server_ms: the clock moved
    assert [getattr(replayed.chained, f) for f in same] == [getattr(first.chained, f) for f in same]
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 1  # the entry b is held on
    ops.kill("w1")  # w1's deadline passed meanwhile: the claim is the supervisor's now
    assert ops.commit(eid, d, chain=True).detail == ()


def test_a_commit_chains_even_past_entries_that_wait(ops: Ops) -> None:
    """A run goes on on its worker ahead of the runs waiting in the queue: the worker bounds
    how long (MAX_CHAINED_STEPS in a row, and not while an entry it read waits long)."""
    ops.submit()
    ((eid, d),) = ops.read("w1")
    ops.claim(eid, d)
    (r2,) = partition_mates(ops.keys, "r1", "r2-")
    other = Ops(ops.r, Settings(namespace=ops.keys.namespace), run_id=r2)
    other.submit()  # r2's first step waits undelivered in the same stream
    out = ops.commit(eid, d, chain=True)
    assert out.code == "OK" and Committed.parse(out.detail).chained is not None
    assert [x.run for _, x in ops.read("w2")] == [r2]  # r2 still waits for anyone, first in line


def test_a_chained_claim_whose_worker_dies_is_redispatched_and_counted_as_a_crash(ops: Ops) -> None:
    """The supervisor finds the entry the dead worker's chain is held on and re-enqueues the
    run's current step (b), not the entry's (a, committed)."""
    ops.submit()
    ((eid, d),) = ops.read("w1")
    ops.claim(eid, d)
    ops.commit(eid, d, chain=True)
    call = ops.store.redispatch(queue="q", entry_id=eid, consumer="w1", dispatch=d)
    assert Outcome.parse(ops.x(call)[0]).code == "ALIVE"  # w1 beats: its claim is live
    ops.kill("w1")  # w1 died before running b
    out = Outcome.parse(ops.x(call)[0])
    assert out.code == "REDISPATCHED"
    assert "step held on entry" in ops.r.lrange(ops.rk.history, -1, -1)[0]
    assert Outcome.parse(ops.x(call)[0]).code in ("GONE", "DROPPED")  # a second supervisor, or a resend
    ((eid2, d2),) = ops.read("w2")
    assert (d2.step, d2.visit) == ("b", 1)
    c = ops.claim(eid2, d2, worker="w2")
    assert (c.code, c.crashed_now, c.attempt) == ("RUN", True, 2)
    ops.beat("w1")  # w1 was only frozen: its late commit is refused
    assert ops.commit(eid, Dispatch(run="r1", wf="wf", step="b", visit=1), token="w1:chained").code == "FENCED"


def test_the_last_step_never_chains(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read("w1")
    ops.claim(eid, d)
    out = ops.commit(eid, d, next_step=None, chain=True)
    assert out.code == "OK" and out.detail[0] == "" and ops.run()["status"] == "completed"


def test_fail_schedules_a_retry_or_dead_letters_and_replays_safely(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    out = ops.fail(eid, d, delay_ms=0)
    assert out.code == "RETRY"
    assert ops.fail(eid, d, delay_ms=0).code == "REPLAY"
    assert ops.run()["status"] == "retrying" and ops.r.zcard(ops.q.delayed) == 1
    due = ops.x(ops.store.due(queue="q", partition=ops.partition, limit=10))[0]
    assert due == ["r1"]  # the delayed set's members are run ids: one backoff per run at a time
    new_id = ops.x(ops.store.promote(queue="q", run_id="r1"))[0]
    assert new_id and ops.x(ops.store.promote(queue="q", run_id="r1"))[0] == ""
    ops.r.xack(ops.stream, GROUP, eid)
    ((eid2, d2),) = ops.read()
    assert eid2 == new_id
    c = ops.claim(eid2, d2)
    assert (c.attempt, c.errors) == (2, 1)
    assert ops.fail(eid2, d2, delay_ms=None).code == "FAILED"
    run = ops.run()
    assert run["status"] == "failed" and ops.r.zscore(ops.part.dead, "r1") is not None


@pytest.mark.parametrize("chain", [False, True])
def test_a_commit_after_an_error_and_a_crash_starts_the_next_step_with_none(ops: Ops, chain: bool) -> None:
    """The commit writes a run's error, crash and stash counts back to 0 only when they are not
    0 already (a field written costs a scan of the run hash): when they are not, it must."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert ops.fail(eid, d, delay_ms=0).code == "RETRY"
    new_id = ops.x(ops.store.promote(queue="q", run_id="r1"))[0]
    ops.r.xack(ops.stream, GROUP, eid)
    ((eid2, d2),) = ops.read()
    assert eid2 == new_id
    ops.claim(eid2, d2)
    time.sleep(0.005)  # the stash keeps some step time, so the next claim's stash_base_ms is not 0
    ops.x(ops.store.stash(run_id="r1", token=f"w1:{eid2}", idem_key="r1:a", snapshot='{"k":1}'))
    ops.kill("w1")
    ops.beat("w2")
    crashed = ops.claim(eid2, d2, worker="w2")
    assert (crashed.errors, crashed.crashes, crashed.snapshot) == (1, 1, '{"k":1}')
    assert int(ops.run()["stash_base_ms"]) >= 5 and ops.run()["errors"] == "1"
    out = ops.commit(eid2, d2, worker="w2", chain=chain)
    assert out.code == "OK"
    run = ops.run()
    assert (run["errors"], run["crashes"], run["stash_base_ms"], run["status"]) == ("0", "0", "0", "running")
    if chain:  # the next step's claim was made by the commit
        assert run["claim"] == "w2:chained"
    else:
        ((eid3, d3),) = ops.read("w2")
        nxt = ops.claim(eid3, d3, worker="w2")
        assert (nxt.code, nxt.errors, nxt.crashes, nxt.snapshot) == ("RUN", 0, 0, None)


def test_retry_run_re_drives_a_failed_run_with_the_same_idempotency_key(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.fail(eid, d, delay_ms=None)
    retry = ops.store.retry(run_id="r1", queue="q", reason="x", request_id="q1")
    out = Outcome.parse(ops.x(retry)[0])
    assert out.code == "RETRIED" and out.detail[1:] == ("a", 1)
    assert Outcome.parse(ops.x(retry)[0]) == out  # resent after a lost reply: same answer, no second entry
    other = ops.store.retry(run_id="r1", queue="q", reason="x", request_id="q2")
    assert Outcome.parse(ops.x(other)[0]).code == "NOT_FAILED"
    ops.r.xack(ops.stream, GROUP, eid)
    ((eid2, d2),) = ops.read()
    assert (d2.step, d2.visit) == ("a", 1)
    assert ops.claim(eid2, d2).code == "RUN" and ops.r.zscore(ops.part.dead, "r1") is None


def test_cancel_ends_the_run_and_refuses_the_running_steps_commit(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    cancel = ops.store.cancel(run_id="r1", queue="q", reason="x", request_id="c1")
    assert Outcome.parse(ops.x(cancel)[0]).code == "CANCELLED"
    assert Outcome.parse(ops.x(cancel)[0]).code == "CANCELLED"  # resent: still reports success
    # the run id goes on the partition's cancels stream, which w1's next beat reads
    beat = ops.store.alive(partition=ops.partition, worker="w1", lease_ms=5000, cancels_seen="0-0")
    assert ops.x(beat)[0][2:] == ["r1"]  # once: the resent cancel changed nothing
    assert ops.commit(eid, d).code == "TERMINAL"
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 1  # not acked by the refused commit
    again = ops.store.cancel(run_id="r1", queue="q", reason="x", request_id="c2")
    assert Outcome.parse(ops.x(again)[0]).code == "TERMINAL"


def test_a_beat_keeps_every_claim_of_its_worker_live_in_one_call(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    was, seen = ops.beat("w1", lease_ms=60_000)
    assert was == 1 and seen == "0-0"
    assert int(ops.r.hget(ops.part.alive, "w1")) > ops.r.time()[0] * 1000 + 50_000
    assert ops.claim(eid, d, worker="w2").code == "BUSY"


def test_stash_only_works_for_the_live_claim(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert ops.x(ops.store.stash(run_id="r1", token=f"w1:{eid}", idem_key="r1:a", snapshot='{"k":1}'))[0] == 1
    assert ops.x(ops.store.stash(run_id="r1", token="other", idem_key="r1:a", snapshot='{"k":2}'))[0] == 0
    assert ops.r.hget(ops.rk.stash, "r1:a") == '{"k":1}'


def test_a_crashed_claim_gets_its_stash_back_and_commit_clears_it(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.x(ops.store.stash(run_id="r1", token=f"w1:{eid}", idem_key="r1:a", snapshot='{"k":1}'))
    ops.kill("w1")
    c = ops.claim(eid, d, worker="w2")
    assert c.snapshot == '{"k":1}'
    ops.commit(eid, d, worker="w2")
    assert ops.r.hexists(ops.rk.stash, "r1:a") == 0


def test_release_re_enqueues_without_counting_a_crash(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    out = Outcome.parse(ops.x(ops.store.release(run_id="r1", queue="q", token=f"w1:{eid}", event='{"step":"a"}'))[0])
    assert out.code == "RELEASED"
    again = ops.store.release(run_id="r1", queue="q", token=f"w1:{eid}", event='{"step":"a"}')
    assert Outcome.parse(ops.x(again)[0]).code == "REPLAY"  # resent after a lost reply: done already
    other = ops.store.release(run_id="r1", queue="q", token="w9:other", event='{"step":"a"}')
    assert Outcome.parse(ops.x(other)[0]).code == "NOT_OWNER"
    ops.r.xack(ops.stream, GROUP, eid)
    ((eid2, d2),) = ops.read()
    c = ops.claim(eid2, d2, worker="w2")
    assert (c.code, c.crashes) == ("RUN", 0)


def test_redispatch_moves_a_dead_claims_entry_and_only_one_supervisor_wins(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    call = ops.store.redispatch(queue="q", entry_id=eid, consumer="c1", dispatch=d)
    assert Outcome.parse(ops.x(call)[0]).code == "ALIVE"  # w1 beats: its claim is left alone
    ops.kill("w1")
    first, second = (Outcome.parse(x) for x in ops.x(call, call))
    assert first.code == "REDISPATCHED" and second.code == "GONE"
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 0
    ((eid2, d2),) = ops.read("c2")
    assert eid2 == first.detail[0] and ops.claim(eid2, d2, worker="w2").crashed_now


def test_redispatch_drops_entries_of_committed_steps(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    # the step committed, its entry still pending: a commit that was not handed the entry (a
    # superseded attempt), or a copy the supervisor re-dispatched before the old claim committed
    ops.commit(eid, d, ack=False)
    out = Outcome.parse(ops.x(ops.store.redispatch(queue="q", entry_id=eid, consumer="c1", dispatch=d))[0])
    assert out.code == "DROPPED" and out.detail[0] == "committed"
    assert ops.r.xlen(ops.stream) == 1  # only the next step's entry remains


def test_sweep_repairs_a_run_whose_entry_vanished_and_leaves_healthy_runs_alone(ops: Ops) -> None:
    ops.submit()
    sweep = ops.store.sweep(run_id="r1", queue="q")
    assert Outcome.parse(ops.x(sweep)[0]).code == "QUEUED"
    ops.r.xtrim(ops.stream, maxlen=0)  # a misconfigured trimmer deletes the undelivered entry
    out = Outcome.parse(ops.x(sweep)[0])
    assert out.code == "REPAIRED" and out.detail[1] == "no queued entry"
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert Outcome.parse(ops.x(sweep)[0]).code == "ALIVE"
    ops.kill("w1")
    assert Outcome.parse(ops.x(sweep)[0]).code == "QUEUED"  # pending: the reclaimer's job
    ops.r.xack(ops.stream, GROUP, eid)  # acked without progress (e.g. a lost write after failover)
    assert Outcome.parse(ops.x(sweep)[0]).detail[1] == "entry acked without progress"


def test_sweep_repairs_a_missing_scheduled_retry(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.fail(eid, d, delay_ms=60_000)
    sweep = ops.store.sweep(run_id="r1", queue="q")
    assert Outcome.parse(ops.x(sweep)[0]).code == "SCHEDULED"
    ops.r.delete(ops.q.delayed)
    assert Outcome.parse(ops.x(sweep)[0]).detail[1] == "scheduled retry missing"
    assert ops.run()["status"] == "running"


def test_purge_deletes_only_old_finished_runs(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.commit(eid, d, next_step=None)
    finished = int(ops.run()["finished_ms"])
    purge = ops.store.purge
    assert ops.x(purge(run_id="r1", index="done", cutoff_ms=finished - 1, statuses=["completed"]))[0] == 0
    assert ops.x(purge(run_id="r1", index="done", cutoff_ms=finished, statuses=["cancelled"]))[0] == 0
    assert ops.x(purge(run_id="r1", index="done", cutoff_ms=finished, statuses=["completed"]))[0] == 1
    assert not ops.r.exists(ops.rk.run, ops.rk.state, ops.rk.results, ops.rk.history)


def test_scripts_reload_after_the_script_cache_is_flushed(ops: Ops) -> None:
    ops.submit()
    ops.r.script_flush()
    assert ops.submit(request_id="another")[0] == 0


def test_stale_lists_members_older_than_an_age_by_the_server_clock(ops: Ops) -> None:
    now_ms = ops.r.time()[0] * 1000
    ops.r.zadd("t:z", {"old": now_ms - 60_000, "new": now_ms + 60_000})
    reply = ops.x(ops.store.stale(key="t:z", age_ms=30_000, limit=10))[0]
    assert abs(reply[0] - now_ms) < 2000 and reply[1] == "old" and len(reply) == 3


def test_heartbeat_and_leader_use_the_server_clock(ops: Ops) -> None:
    now = ops.x(ops.store.heartbeat(worker="w1", ttl_ms=1000, queues=["q", "q2"], info={"pid": "1"}))[0]
    assert ops.r.smembers(ops.keys.queues) == {"q", "q2"}
    assert abs(now - ops.r.time()[0] * 1000) < 2000
    assert ops.r.zscore(ops.keys.workers, "w1") == now
    assert ops.x(ops.store.leader(candidate="a", lease_ms=1000))[0] == 1
    assert ops.x(ops.store.leader(candidate="b", lease_ms=1000))[0] == 0
    assert ops.x(ops.store.leader(candidate="a", lease_ms=1000))[0] == 1


def test_a_retry_waiting_out_its_backoff_cannot_be_started_early(ops: Ops) -> None:
    """The worker failed the step (retry in 60 s) and died before acking its entry."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    assert ops.fail(eid, d, delay_ms=60_000).code == "RETRY"
    out = Outcome.parse(ops.x(ops.store.redispatch(queue="q", entry_id=eid, consumer="c1", dispatch=d))[0])
    assert out.code == "DROPPED" and out.detail[0] == "not the current dispatch"
    assert ops.claim(eid, d, worker="w2").code == "STALE"
    assert ops.r.xlen(ops.stream) == 0 and ops.r.zcard(ops.q.delayed) == 1


def test_a_worker_acks_only_entries_still_pending_for_it(ops: Ops) -> None:
    ops.submit()
    ((eid, _),) = ops.read("c1")
    assert ops.x(ops.store.ack_owned(ops.stream, "c2", [eid]))[0] == 0
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 1
    assert ops.x(ops.store.ack_owned(ops.stream, "c1", [eid]))[0] == 1
    assert ops.r.xlen(ops.stream) == 0 and ops.r.xpending(ops.stream, GROUP)["pending"] == 0


def test_a_consumer_is_reaped_only_with_nothing_pending(ops: Ops) -> None:
    """The script checks what is pending; that the worker left the fleet (a key of another slot)
    is its callers' check: the supervisor's ZMSCORE, a worker's own shutdown."""
    ops.submit()
    ops.read("w1")
    reap = ops.store.reap_consumer(stream=ops.stream, consumer="w1")
    assert ops.x(reap)[0] == 0  # it still holds an entry
    ops.r.xack(ops.stream, GROUP, *[e["message_id"] for e in ops.r.xpending_range(ops.stream, GROUP, "-", "+", 10)])
    assert ops.x(reap)[0] == 1
    assert [c["name"] for c in ops.r.xinfo_consumers(ops.stream, GROUP)] == []
    # a worker presumed dead that comes back loses nothing: its next read that gets an entry makes it again
    (mate,) = partition_mates(ops.keys, "r1", "r2-")
    Ops(ops.r, Settings(namespace=ops.keys.namespace), run_id=mate).submit()
    assert [d.run for _, d in ops.read("w1")] == [mate]
    assert [(c["name"], c["pending"]) for c in ops.r.xinfo_consumers(ops.stream, GROUP)] == [("w1", 1)]


def test_trim_drops_only_entries_that_were_delivered_and_acked(ops: Ops) -> None:
    """Commits only XACK; the supervisor's trim.lua drops finished entries. It must never drop
    an entry that is pending (a step running, or waiting for the supervisor) or undelivered
    (a step waiting in the queue), whatever order they are in."""
    trim = ops.store.trim(queue="q", partition=ops.partition)
    for mate in partition_mates(ops.keys, "r1", "t-", count=5):
        Ops(ops.r, Settings(namespace=ops.keys.namespace), run_id=mate).submit()
    ids = [eid for eid, _ in ops.r.xrange(ops.stream)]
    assert ops.x(trim)[0] == 0  # nothing delivered yet
    ops.r.xreadgroup(GROUP, "c1", {ops.stream: ">"}, count=3)  # three delivered, two wait
    ops.r.xack(ops.stream, GROUP, ids[1], ids[2])  # done; the first still runs (a long step)
    assert ops.x(trim)[0] == 0  # the first entry pins the head: nothing before it is done
    ops.r.xack(ops.stream, GROUP, ids[0])
    assert ops.x(trim)[0] == 3  # every delivered entry is done
    assert [eid for eid, _ in ops.r.xrange(ops.stream)] == ids[3:]  # the waiting ones stay
    ops.r.xreadgroup(GROUP, "c1", {ops.stream: ">"}, count=1)
    assert ops.x(trim)[0] == 0  # delivered, not acked: pending
    ops.r.xack(ops.stream, GROUP, ids[3])
    assert ops.x(trim)[0] == 1
    assert [d.run for _, d in ops.read("c2")] == [Dispatch.model_validate(f).run for _, f in ops.r.xrange(ops.stream)]
    ops.r.xgroup_destroy(ops.stream, GROUP)
    assert ops.x(trim)[0] == 0 and ops.r.xlen(ops.stream) == 1  # no group: nothing is known delivered
    ops.r.delete(ops.stream)
    assert ops.x(trim)[0] == 0  # no stream


def test_a_claim_committing_after_the_supervisor_redispatched_its_entry_applies_once(ops: Ops) -> None:
    """The race row "commit vs. the supervisor re-dispatching after the lease lapsed": the claim
    is still the live one, so its commit applies and acks its old entry (acked already by the
    re-dispatch: a no-op); the re-dispatched copy then answers DUP and is never run."""
    ops.submit()
    ((eid, d),) = ops.read("w1")
    ops.claim(eid, d)
    ops.kill("w1")
    out = Outcome.parse(ops.x(ops.store.redispatch(queue="q", entry_id=eid, consumer="w1", dispatch=d))[0])
    assert out.code == "REDISPATCHED"
    assert ops.commit(eid, d).code == "OK"  # the old claim was never replaced
    run = ops.run()
    assert (run["step"], run["seq"]) == ("b", "1")
    ((copy, d2),) = [(e, x) for e, x in ops.read("w2") if x.step == "a"]
    assert copy == out.detail[0] and ops.claim(copy, d2, worker="w2").code == "DUP"
    assert ops.r.hget(ops.rk.results, "r1:a") == '{"by":"w1"}'


def test_dead_pending_lists_only_the_entries_of_workers_whose_deadline_passed(ops: Ops) -> None:
    ops.submit()
    ((e1, d1),) = ops.read("w1")
    (r2,) = partition_mates(ops.keys, "r1", "r2-")
    other = Ops(ops.r, Settings(namespace=ops.keys.namespace), run_id=r2)
    other.submit()
    ((e2, d2),) = other.read("w2")
    ops.claim(e1, d1, worker="w1")
    other.claim(e2, d2, worker="w2")
    dead = ops.store.dead_pending(queue="q", partition=ops.partition, limit=100)
    assert ops.x(dead)[0] == []  # both beat: nothing to look at, however many steps they hold
    ops.kill("w2")
    assert ops.x(dead)[0] == [e2, "w2"]
    assert ops.x(ops.store.dead_pending(queue="q", partition=ops.partition, limit=0))[0] == []


def test_own_pending_lists_a_workers_entries_only_when_it_holds_more_than_it_knows(ops: Ops) -> None:
    ops.submit()
    ((eid, _),) = ops.read("w1")
    listing = ops.store.own_pending(stream=ops.stream, consumer="w1", known=1, idle_ms=0, limit=10)
    assert ops.x(listing)[0] == []  # the worker knows its one entry: one summary read, no listing
    unknown = ops.store.own_pending(stream=ops.stream, consumer="w1", known=0, idle_ms=0, limit=10)
    assert ops.x(unknown)[0] == [eid]
    young = ops.store.own_pending(stream=ops.stream, consumer="w1", known=0, idle_ms=60_000, limit=10)
    assert ops.x(young)[0] == []  # delivered just now: not in doubt yet
    assert ops.x(ops.store.own_pending(stream=ops.stream, consumer="w9", known=0, idle_ms=0, limit=10))[0] == []


@pytest.mark.parametrize("chained", [False, True])
def test_a_worker_gives_up_an_entry_it_lost_track_of_and_the_next_claim_counts_a_crash(ops: Ops, chained: bool) -> None:
    """The claim's reply was lost (or, chained, the reply of the commit that claimed b on a's
    entry, beyond every resend): w1 holds a live claim it does not know of. Its audit gives the
    entry up; the claimed step is re-enqueued and the next claim (anyone's) counts a crash."""
    ops.submit()
    ((eid, d),) = ops.read("w1")
    ops.claim(eid, d, token="w1:lost")
    lost, token = (d, "w1:lost")
    if chained:
        ops.commit(eid, d, token="w1:lost", chain=True)
        lost, token = Dispatch(run="r1", wf="wf", step="b", visit=1), "w1:chained"
    supervisor = ops.store.redispatch(queue="q", entry_id=eid, consumer="w1", dispatch=d)
    assert Outcome.parse(ops.x(supervisor)[0]).code == "ALIVE"  # w1 beats: not the supervisor's
    gave = ops.store.redispatch(queue="q", entry_id=eid, consumer="w1", dispatch=d, giver="w1")
    out = Outcome.parse(ops.x(gave)[0])
    assert out.code == "REDISPATCHED" and ops.run()["claim_worker"] == ""
    assert "given up by w1" in ops.r.lrange(ops.rk.history, -1, -1)[0]
    ((eid2, d2),) = ops.read("w1")
    c = ops.claim(eid2, d2, worker="w1")
    assert (c.code, c.crashed_now, c.attempt, d2.step) == ("RUN", True, 2, lost.step)
    assert ops.commit(eid, lost, token=token).code == "FENCED"  # the lost claim's late commit


def test_an_entry_a_chain_is_held_on_stays_pending_when_delivered_again(ops: Ops) -> None:
    """Redis lost writes (or the group was made again) and delivers the entry a run's chain is
    held on to another worker: that claim is BUSY and leaves it pending, not DUP and acked, so
    the entry still recovers the run if the holder dies."""
    ops.submit()
    ((eid, d),) = ops.read("w1")
    ops.claim(eid, d)
    ops.commit(eid, d, chain=True)
    ops.r.xgroup_setid(ops.stream, GROUP, "0")
    assert [e for e, _ in ops.read("w2")] == [eid]  # delivered again: pending for w2 now
    assert ops.claim(eid, d, worker="w2").code == "BUSY"
    (pending,) = ops.r.xpending_range(ops.stream, GROUP, "-", "+", 10)
    assert (pending["message_id"], pending["consumer"]) == (eid, "w2")
    ops.kill("w1")
    out = Outcome.parse(ops.x(ops.store.redispatch(queue="q", entry_id=eid, consumer="w2", dispatch=d, giver="w2"))[0])
    assert out.code == "REDISPATCHED"  # w2's audit gives it up: b is re-enqueued


def test_the_sweep_leaves_a_chained_run_to_its_entry_and_repairs_it_when_the_entry_is_gone(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read("w1")
    ops.claim(eid, d)
    ops.commit(eid, d, chain=True)
    assert Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0]).code == "ALIVE"
    ops.kill("w1")
    assert Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0]).code == "QUEUED"  # the reclaim's
    ops.r.xdel(ops.stream, eid)  # lost with Redis' data, or an operator's XDEL
    out = Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0])
    assert (out.code, out.detail[1]) == ("REPAIRED", "no queued entry")
    assert [(x.step, x.visit) for _, x in ops.read("w2")] == [("b", 1)]


def test_the_sweep_looks_at_a_live_claim_again_after_as_long_as_it_has_run(ops: Ops) -> None:
    """A step waiting on an LLM for an hour must not cost a look every sweep_after_s: the next
    look comes after as long as the claim has run so far, between sweep_after and the cap."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    now_ms = ops.r.time()[0] * 1000
    claim_ms = now_ms - 120_000  # claimed two minutes ago
    ops.r.hset(ops.rk.run, "claim_ms", claim_ms)
    sweep = ops.store.sweep(run_id="r1", queue="q", after_ms=10_000, live_claim_max_ms=300_000)
    assert Outcome.parse(ops.x(sweep)[0]).code == "ALIVE"
    # picked again once its score is sweep_after old: in about two minutes
    next_look = ops.r.zscore(ops.part.active, "r1") + 10_000
    assert now_ms + 110_000 <= next_look <= now_ms + 130_000
    ops.r.hset(ops.rk.run, "claim_ms", now_ms - 3_600_000)  # an hour: the cap
    ops.x(sweep)
    assert ops.r.zscore(ops.part.active, "r1") + 10_000 <= now_ms + 310_000
    ops.r.hset(ops.rk.run, "claim_ms", now_ms)  # just claimed: sweep_after
    ops.x(sweep)
    assert ops.r.zscore(ops.part.active, "r1") + 10_000 <= now_ms + 12_000
