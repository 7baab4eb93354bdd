"""Child runs in the scripts: a commit that returns ``StartChildren`` parks its run (no entry,
no claim, no lease) and lists the children; each child's outcome comes back once through
``child_done.lua`` and the last one moves the parent on, results in order, in the same atomic
step that queues its next step. Races covered: a notice relayed twice (two supervisors, a
supervisor that died before its ack), a notice of a child from an older wait, the commit resent
after a lost reply, the claim that finishes a half-done commit, the sweep, a retry of a parent
that failed on a child, and every way a linked run finishes announcing it."""

from __future__ import annotations

import json

import pytest
import redis

from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP
from orchestrator.settings import Settings
from orchestrator.store import Outcome
from tests.ops import Ops

KIDS = ["r1:a/0", "r1:a/1"]


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)


def children(collect: bool = False) -> str:
    return json.dumps({"into": "kids", "collect": collect, "runs": KIDS})


def parked(ops: Ops, collect: bool = False) -> tuple[str, Dispatch, Outcome]:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    return eid, d, ops.commit(eid, d, children=children(collect))


def done(ops: Ops, index: int, status: str = "completed", child: str | None = None) -> Outcome:
    child = child or KIDS[index]
    result = json.dumps({"run_id": child, "workflow": "kid", "status": status, "state": {"i": index}})
    call = ops.store.child_done(parent="r1", queue="q", index=index, child=child, status=status, result=result)
    return Outcome.parse(ops.x(call)[0])


def hash_of(ops: Ops) -> dict[str, str]:
    return ops.r.hgetall(ops.rk.children)


def test_a_parent_waits_with_no_entry_no_claim_and_lists_its_children(ops: Ops) -> None:
    _, _, out = parked(ops)
    assert out.code == "OK" and out.detail == ("b", 1, "children", 2)
    run = ops.run()
    assert (run["status"], run["dispatch"], run["claim"], run["step"], run["notify"]) == (
        "waiting",
        "children",
        "",
        "b",
        "1",
    )
    assert ops.r.xpending(ops.stream, GROUP)["pending"] == 0 and ops.read() == []
    kids = hash_of(ops)
    assert (kids["n"], kids["c:0"], kids["c:1"], kids["into"], kids["from"]) == ("2", *KIDS, "kids", "r1:a")
    assert ops.history_types()[-2:] == ["ok", "children"]
    sweep = Outcome.parse(ops.x(ops.store.sweep(run_id="r1", queue="q", after_ms=1))[0])
    assert sweep.code == "CHILDREN" and ops.read() == []


def test_each_child_counts_once_and_the_last_moves_the_parent_on_with_results_in_order(ops: Ops) -> None:
    parked(ops)
    assert done(ops, 1).code == "RECORDED"
    assert done(ops, 1).code == "DUP"  # relayed twice: counted once
    assert done(ops, 0, child="r1:old/0").code == "STALE"  # a child of another wait
    assert ops.read() == [] and ops.run()["status"] == "waiting"
    out = done(ops, 0)
    assert (out.code, out.detail) == ("DONE", ("b", 1))
    results = json.loads(ops.r.hget(ops.rk.state, "kids"))
    assert [r["run_id"] for r in results] == KIDS and [r["state"]["i"] for r in results] == [0, 1]
    ((_, d),) = ops.read()
    assert (d.step, d.visit) == ("b", 1) and ops.run()["status"] == "running"
    assert done(ops, 0).code == "DUP" and ops.read() == []  # a late repeat moves nothing
    assert ops.history_types().count("children_done") == 1


def test_a_failed_child_fails_the_parent_and_a_retry_re_drives_only_it(ops: Ops) -> None:
    parked(ops)
    done(ops, 0)
    out = done(ops, 1, status="failed")
    assert (out.code, out.detail) == ("FAILED", (KIDS[1],))
    run = ops.run()
    error = json.loads(run["error"])
    assert run["status"] == "failed" and error["type"] == "ChildFailed" and KIDS[1] in error["message"]
    assert "kids" not in ops.r.hgetall(ops.rk.state)
    retried = Outcome.parse(ops.x(ops.store.retry(run_id="r1", queue="q", reason="fixed", request_id="t"))[0])
    assert retried.code == "RETRIED" and retried.detail == ("children", "b", 1, KIDS[1])
    assert ops.run()["status"] == "waiting" and hash_of(ops)["done"] == "1" and "r:1" not in hash_of(ops)
    assert ops.read() == []
    assert done(ops, 1).code == "DONE"  # the re-driven child completed


def test_with_collect_failures_the_parent_goes_on_with_every_outcome(ops: Ops) -> None:
    parked(ops, collect=True)
    done(ops, 0, status="cancelled")
    assert done(ops, 1, status="failed").code == "DONE"
    assert [r["status"] for r in json.loads(ops.r.hget(ops.rk.state, "kids"))] == ["cancelled", "failed"]


def test_the_commit_resent_after_a_lost_reply_does_not_park_again(ops: Ops) -> None:
    eid, d, _ = parked(ops)
    done(ops, 0)
    assert ops.commit(eid, d, children=children()).code == "REPLAY"
    assert hash_of(ops)["done"] == "1" and ops.history_types().count("children") == 1


def test_a_claim_that_finishes_a_half_done_commit_parks_the_parent(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    specs = [{"run": k} for k in KIDS]
    record = {"step": "a", "visit": 1, "next": "b", "update": {}, "children": {"into": "kids", "specs": specs}}
    ops.r.hset(ops.rk.results, "r1:a", json.dumps(record))
    ops.kill("w1")
    ops.r.xack(ops.stream, GROUP, eid)
    ops.x(ops.store.sweep(run_id="r1", queue="q"))
    ((eid2, d2),) = ops.read("w2")
    claimed = ops.claim(eid2, d2, worker="w2")
    assert (claimed.code, claimed.detail) == ("DUP", "advanced")
    assert ops.run()["status"] == "waiting" and hash_of(ops)["c:1"] == KIDS[1]


def test_a_child_run_announces_how_it_finished_once(ops: Ops) -> None:
    """Linked runs (notify set) say when they finish, by whichever script finishes them."""
    kid = Ops(ops.r, Settings(redis_url="redis://x", namespace=ops.keys.namespace), run_id="r1:a/0")
    call = kid.store.submit(
        run_id="r1:a/0",
        workflow="wf",
        queue="q",
        first_step="a",
        input_sha="d",
        event='{"detail":"x"}',
        request_id="k",
        state={},
        parent=("r1", "q", 0),
    )
    kid.x(call)
    assert kid.run()["parent"] == "r1" and kid.run()["parent_index"] == "0"
    ((eid, d),) = kid.read()
    kid.claim(eid, d)
    assert kid.commit(eid, d, next_step=None).code == "OK"
    finished = kid.part.finished
    assert [f["run"] for _, f in ops.r.xrange(finished)] == ["r1:a/0"]
    cancelled = Outcome.parse(kid.x(kid.store.cancel(run_id="r1:a/0", queue="q", reason="x", request_id="c"))[0])
    assert cancelled.code == "TERMINAL" and len(ops.r.xrange(finished)) == 1  # nothing new: it had finished
    plain = Ops(ops.r, Settings(redis_url="redis://x", namespace=ops.keys.namespace), run_id="plain")
    plain.submit()
    ((eid, d),) = plain.read()
    plain.claim(eid, d)
    plain.commit(eid, d, next_step=None)
    assert all(f["run"] != "plain" for _, f in ops.r.xrange(plain.part.finished))  # not linked: no notice
