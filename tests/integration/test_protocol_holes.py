"""The protocol holes an outside audit proved, each replayed against the scripts on a real Redis.

Every test sets up the interleaving the audit found and states what must hold instead. The
process-level versions (real workers, Redis restarted from an older copy) are in
tests/chaos/test_lost_writes.py and tests/integration/test_recovery_holes.py.
"""

from __future__ import annotations

import json
import time

import redis

from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP
from orchestrator.settings import Settings
from orchestrator.store import Committed, Outcome
from tests.ops import Ops, partition_mates


def _raw(ops: Ops) -> redis.Redis:
    """A client without reply decoding (DUMP payloads are bytes), of the same kind as ``ops.r``."""
    if isinstance(ops.r, redis.RedisCluster):
        node = ops.r.get_default_node()
        return redis.RedisCluster(host=node.host, port=node.port)  # type: ignore[return-value]
    kwargs = ops.r.connection_pool.connection_kwargs
    return redis.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs.get("db", 0))


def _forget(ops: Ops, keys: list[str]) -> dict[str, bytes | None]:
    """What ``keys`` hold now, to put back later: Redis 'losing' every write in between."""
    with _raw(ops) as raw:
        return {key: raw.dump(key) for key in keys}  # type: ignore[misc]


def _restore(ops: Ops, saved: dict[str, bytes | None]) -> None:
    with _raw(ops) as raw:
        for key, dumped in saved.items():
            raw.delete(key)
            if dumped is not None:
                raw.restore(key, 0, dumped)


# -- hole 1: fencing inverts after Redis loses writes ---------------------------------------


def test_fencing_does_not_invert_when_the_same_worker_claims_an_entry_redis_forgot(ops: Ops) -> None:
    """Redis forgets a claim (and the delivery before it); the same worker reads the same entry
    again and claims it. Every write of the forgotten attempt must be refused, the live one's
    accepted, and the persisted record must carry the live attempt's (higher) fence."""
    ops.submit()
    q = ops.q
    snapshot = _forget(ops, [ops.rk.run, ops.stream, q.queued, ops.part.active])
    ((eid, d),) = ops.read("w1")
    first = ops.claim(eid, d, token="w1:nonce-1")
    time.sleep(0.002)  # the fence is the Redis clock in ms: the second claim comes later
    _restore(ops, snapshot)  # the claim and the delivery were in Redis' lost second
    ((again, d2),) = ops.read("w1")
    assert again == eid  # the group's last-delivered id went back: same worker, same entry
    second = ops.claim(eid, d2, token="w1:nonce-2")
    assert second.code == "RUN" and second.fence > first.fence

    stale, live = "w1:nonce-1", "w1:nonce-2"
    assert ops.x(ops.store.stash(run_id="r1", token=stale, idem_key="r1:a", snapshot='{"old":1}'))[0] == 0
    assert ops.x(ops.store.stash(run_id="r1", token=live, idem_key="r1:a", snapshot='{"new":1}'))[0] == 1
    release = ops.store.release(run_id="r1", queue="q", token=stale, event='{"step":"a"}')
    assert Outcome.parse(ops.x(release)[0]).code == "NOT_OWNER"
    assert ops.fail(eid, d, delay_ms=0, token=stale).code == "FENCED"
    assert ops.commit(eid, d, token=stale, record='{"fence":"first"}').code == "FENCED"
    assert ops.commit(eid, d, token=live, record='{"fence":"second"}').code == "OK"
    assert ops.r.hget(ops.rk.results, "r1:a") == '{"fence":"second"}'
    assert ops.r.hget(ops.rk.stash, "r1:a") is None  # the live commit cleared the live stash
    assert ops.run()["fenced"] == "2"  # the stale fail and commit, both refused and counted


def test_a_claim_resent_after_a_lost_reply_gets_the_same_claim_back(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    first = ops.claim(eid, d, token="w1:n")
    again = ops.claim(eid, d, token="w1:n")  # the reply was lost; nobody claimed since
    assert (again.code, again.fence, again.attempt, again.crashed_now) == ("RUN", first.fence, 1, False)
    assert ops.run()["claim"] == "w1:n"
    assert ops.claim(eid, d, token="w2:m", worker="w2").code == "BUSY"


# -- hole 2: a failing write half-applies a commit ------------------------------------------


def test_a_failing_write_never_half_applies_a_commit(ops: Ops) -> None:
    """A cost that HINCRBYFLOAT refuses (NaN, inf, a total that overflows) used to fail
    commit.lua after it wrote the result and the state: now nothing is written."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    before = (ops.run(), ops.r.hgetall(ops.rk.state), ops.r.lrange(ops.rk.history, 0, -1))
    for cost in ({"usd": float("nan")}, {"usd": float("inf")}, {"usd": 1e308, "tokens": -float("inf")}):
        out = ops.commit(eid, d, cost=cost)
        assert out.code == "INVALID" and "not a finite number" in out.detail[0], out
        assert (ops.run(), ops.r.hgetall(ops.rk.state), ops.r.lrange(ops.rk.history, 0, -1)) == before
        assert ops.r.hexists(ops.rk.results, "r1:a") == 0
    ops.r.hset(ops.rk.run, "cost:usd", "1e308")  # a total that one more 1e308 would overflow
    out = ops.commit(eid, d, cost={"usd": 1e308})
    assert out.code == "INVALID" and "would total" in out.detail[0]
    assert ops.r.hexists(ops.rk.results, "r1:a") == 0 and ops.run()["claim"] == f"w1:{eid}"
    assert ops.commit(eid, d, cost={"usd": 0.5}).code == "OK"  # the same claim can still commit


def test_a_run_whose_step_has_a_result_but_did_not_advance_is_advanced_not_looped(ops: Ops) -> None:
    """A commit stopped after writing the result (what hole 2 left behind): the sweep used to
    re-enqueue the step every pass and every claim answered DUP, forever. The claim that finds
    the result now finishes the commit from the record: the run moves on, once."""
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    record = json.dumps({"step": "a", "visit": 1, "next": "b", "update": {}})
    ops.r.hset(ops.rk.results, "r1:a", record)  # the result is there, the cursor is still at a
    ops.kill("w1")
    out = Outcome.parse(ops.x(ops.store.redispatch(queue="q", entry_id=eid, consumer="c1", dispatch=d))[0])
    assert out.code == "DROPPED" and out.detail[0] == "committed"  # the reclaimer drops the old entry
    sweep = Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0])
    assert sweep.code == "REPAIRED"
    ((eid2, d2),) = ops.read("w2")
    claimed = ops.claim(eid2, d2, worker="w2")
    assert (claimed.code, claimed.detail) == ("DUP", "advanced")
    run = ops.run()
    assert (run["status"], run["step"], run["visit"], run["claim"]) == ("running", "b", "1", "")
    assert run["seq"] == "1"  # the stopped commit's step, counted once
    ((eid3, d3),) = ops.read("w2")
    assert (d3.step, d3.visit, eid3) == ("b", 1, run["dispatch"])
    assert ops.claim(eid2, d2, worker="w3").code == "DUP"  # the old entry again: nothing more happens
    assert ops.history_types().count("repaired") == 2  # the sweep's, then the claim's; no loop


def test_a_half_committed_last_step_completes_its_run(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    ops.r.hset(ops.rk.results, "r1:a", json.dumps({"step": "a", "visit": 1, "next": None, "update": {}}))
    ops.kill("w1")
    ops.r.hset(ops.rk.run, "claim", "")
    sweep = Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0])
    assert sweep.code == "QUEUED"  # its entry is pending: the reclaimer's
    ops.r.xack(ops.stream, GROUP, eid)
    assert Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0]).code == "REPAIRED"
    ((eid2, d2),) = ops.read()
    assert ops.claim(eid2, d2).detail == "advanced"
    assert ops.run()["status"] == "completed" and ops.r.zscore(ops.part.done, "r1") is not None


def test_a_run_that_loops_forever_fails_at_max_run_steps(ops: Ops) -> None:
    ops.submit()
    eid, d = ops.read()[0]
    for i in range(3):
        ops.claim(eid, d)
        out = ops.commit(eid, d, next_step="a", max_steps=3)
        if i < 2:
            committed = Committed.parse(out.detail)
            ((eid, d),) = ops.read()
            assert (d.step, d.visit, committed.next_step) == ("a", i + 2, "a")
    assert out.code == "OK" and out.detail[-1] == "RUNAWAY"
    run = ops.run()
    assert run["status"] == "failed" and "max_run_steps" in json.loads(run["error"])["message"]
    assert (run["step"], run["visit"]) == ("a", "4")  # a retry resumes at the next visit
    assert ops.r.zscore(ops.part.dead, "r1") is not None
    assert ops.r.xlen(ops.stream) == 3  # the three visits' entries (acked by their commits); the runaway one added none
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 0


# -- hole 3: a vanished stream or group ------------------------------------------------------


def test_scripts_keep_working_when_a_queue_stream_or_its_group_disappears(ops: Ops) -> None:
    ops.submit()
    ((eid, _),) = ops.read("c1")
    ops.r.delete(ops.stream)  # an operator's DEL, or a Redis restarted without its data
    assert ops.x(ops.store.ack_owned("q", "c1", [eid]))[0] == 0  # nothing to ack, no error
    assert ops.x(ops.store.reap_consumer(stream=ops.stream, consumer="c1"))[0] == 0
    horizon, _deleted, _cursor, *runs = ops.x(
        ops.store.passed(queue="q", partition=ops.partition, cursor="-inf", limit=10)
    )[0]
    assert (horizon, runs) == ("+inf", ["r1"])  # the stream is gone: the run needs a look
    out = Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0])
    assert out.code == "REPAIRED" and out.detail[1] == "no queued entry"
    assert Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0]).code == "QUEUED"  # no group yet


def test_a_commit_applies_when_the_group_of_the_entry_it_acks_is_gone(ops: Ops) -> None:
    """The commit acks its own entry; with the group gone (a Redis restarted without its data,
    an operator's DEL) there is nothing to ack, and the commit must still apply whole."""
    ops.submit()
    ((eid, d),) = ops.read("c1")
    ops.claim(eid, d)
    ops.r.xgroup_destroy(ops.stream, GROUP)
    assert ops.commit(eid, d, chain=True).code == "OK"  # chaining needs no group either
    run = ops.run()
    assert (run["step"], run["seq"], run["claim"], run["dispatch"]) == ("b", "1", "w1:chained", eid)
    assert ops.r.hexists(ops.rk.results, "r1:a") == 1


# -- hole 4: a late claim breaks the recovery bound ------------------------------------------


def test_a_late_claim_of_a_replaced_entry_is_stale(ops: Ops) -> None:
    """w1 reads E1 and stalls past the lease before claiming; the supervisor re-dispatches E1 as
    E2. The late claim of E1 used to succeed and take the step away from E2 (whose reader got
    BUSY and acked it), leaving nothing pending if w1 then died."""
    ops.submit()
    ((e1, d),) = ops.read("w1")
    out = Outcome.parse(ops.x(ops.store.redispatch(queue="q", entry_id=e1, consumer="w1", dispatch=d))[0])
    assert out.code == "REDISPATCHED"
    late = ops.claim(e1, d, worker="w1")
    assert late.code == "STALE"
    ((e2, d2),) = ops.read("w2")
    assert e2 == out.detail[0] and ops.claim(e2, d2, worker="w2").code == "RUN"
    assert ops.run()["dispatch"] == e2


def test_a_queued_index_written_with_fractional_scores_heals_at_the_first_sweep(ops: Ops) -> None:
    """The queued index once scored an entry by ms + seq / 2048; it is ms * 2048 + seq now (a
    whole number Redis keeps as an integer). A run indexed the old way scores below every new
    bound, so it is handed to the sweep once, which finds it queued and scores it anew."""
    ops.submit()
    (eid,) = [e for e, _ in ops.r.xrange(ops.stream)]
    ms, seq = eid.split("-")
    ops.r.zadd(ops.q.queued, {"r1": f"{int(ms) + int(seq) / 2048:.17g}"})  # as an older version wrote it
    ops.r.xreadgroup(GROUP, "other", {ops.stream: ">"}, count=1)  # the group passes it: a new bound
    ops.r.xack(ops.stream, GROUP, eid)  # and it was acked without progress (what the sweep finds)

    def passed() -> list[str]:
        return ops.x(ops.store.passed(queue="q", partition=ops.partition, cursor="-inf", limit=10))[0][3:]

    assert passed() == ["r1"]
    out = Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q"))[0])
    assert out.code == "REPAIRED"
    new_id = out.detail[0]
    new_ms, new_seq = new_id.split("-")
    assert ops.r.zscore(ops.q.queued, "r1") == int(new_ms) * 2048 + int(new_seq)
    assert passed() == []  # the new entry waits ahead of the group: nothing to look at


# -- hole 5: the sweep's cost follows the work, not the backlog ------------------------------


def test_the_sweep_looks_only_at_runs_the_group_has_passed_or_that_lost_their_entry(ops: Ops) -> None:
    settings = Settings(namespace=ops.keys.namespace)
    ids = partition_mates(ops.keys, "r1", "b", 300)  # runs whose dispatches share r1's stream
    backlog = [Ops(ops.r, settings, run_id=rid) for rid in ids]
    for run in backlog:
        run.submit()

    def passed() -> list[str]:
        return ops.x(ops.store.passed(queue="q", partition=ops.partition, cursor="-inf", limit=1000))[0][3:]

    assert passed() == []  # 300 healthy queued runs: nothing to look at
    ops.r.xtrim(ops.stream, maxlen=290, approximate=False)  # a trimmer drops the 10 oldest entries
    assert passed() == ids[:10]
    delivered = ops.r.xreadgroup(GROUP, "w1", {ops.stream: ">"}, count=5)[0][1]
    assert len(passed()) == 15  # 5 delivered: their runs need a look until they are claimed
    for eid, fields in delivered:
        ops.claim(eid, Dispatch.model_validate(fields))
    assert passed() == ids[:10]
    victim = ops.r.xrange(ops.stream, "-", "+")[-1]  # the newest entry, far ahead of the group
    ops.r.xdel(ops.stream, victim[0])
    _horizon, deleted, _cursor, *runs = ops.x(
        ops.store.passed(queue="q", partition=ops.partition, cursor="-inf", limit=1000)
    )[0]
    if deleted:  # Redis >= 7.0 reports the highest deleted id: the runs before it are scanned once,
        # and of those ahead of the group, only the one whose entry is gone is handed out
        assert runs == [*ids[:10], victim[1]["run"]]
        again = ops.x(
            ops.store.passed(queue="q", partition=ops.partition, cursor="-inf", limit=1000, deleted_seen=deleted)
        )[0][3:]
        assert again == ids[:10]
    # a scan pages through the index: a small page gives a cursor to go on from
    first = ops.x(ops.store.passed(queue="q", partition=ops.partition, cursor="-inf", limit=4, deleted_seen=deleted))[0]
    rest = ops.x(
        ops.store.passed(queue="q", partition=ops.partition, cursor=first[2], limit=1000, deleted_seen=deleted)
    )[0]
    assert first[2] != "" and rest[2] == "" and first[3:] + rest[3:] == ids[:10]
