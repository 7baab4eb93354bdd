"""Map items in the scripts: a commit that returns a ``Map`` parks its run with the window's items
listed and the later items' submits kept; ``child_done.lua`` records each item once, starts each
later item once (whoever reports: the worker that finished an item, the supervisor's relay, the
sweep, each of them twice), settles with the values in item order, and fails the run at the first
failed item. Races covered: a report repeated, items finishing out of order, the cancel cascade's
late notices after the run failed, a retry of the run while items still finish, a claim that
finishes a half-done commit, the commit resent after a lost reply."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from orchestrator.children import check_parent
from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP
from orchestrator.settings import Settings
from orchestrator.store import Outcome
from tests.ops import Ops

ITEMS = [f"r1:a:{i}" for i in range(4)]


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)


def specs() -> list[dict[str, Any]]:
    return [
        {"run": run, "wf": "wf..it", "queue": "q", "first": "it", "sd": {}, "sha": f"s{i}"}
        | {"state": {"item": json.dumps(f"x{i}"), "index": str(i)}}
        for i, run in enumerate(ITEMS)
    ]


def mapped(window: int = 2, collect: bool = False) -> dict[str, Any]:
    return {"into": "found", "collect": collect, "map": True, "window": window, "specs": specs()}


def parked(ops: Ops, **options: Any) -> tuple[str, Dispatch, Outcome]:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    return eid, d, ops.commit(eid, d, children=json.dumps(mapped(**options)))


def done(ops: Ops, index: int, status: str = "completed") -> Outcome:
    value = json.dumps({"v": index}) if status == "completed" else ""
    result = json.dumps({"index": index, "status": status, "error": None, "value": json.loads(value or "null")})
    call = ops.store.child_done(
        parent="r1", queue="q", index=index, child=ITEMS[index], status=status, result=result, value=value
    )
    return Outcome.parse(ops.x(call)[0])


def hash_of(ops: Ops) -> dict[str, str]:
    return ops.r.hgetall(ops.rk.children)


def test_a_map_parks_its_run_with_the_window_listed_and_the_later_items_kept(ops: Ops) -> None:
    _, _, out = parked(ops)
    assert out.code == "OK" and out.detail == ("b", 1, "children", 4)
    kept = hash_of(ops)
    assert (kept["n"], kept["window"], kept["started"], kept["map"]) == ("4", "2", "2", "1")
    assert [kept[f"c:{i}"] for i in range(4)] == ITEMS
    assert "p:0" not in kept and "p:1" not in kept  # the worker submits those after the commit
    assert [json.loads(kept[f"p:{i}"])["run"] for i in (2, 3)] == ITEMS[2:]
    assert json.loads(kept["p:3"])["state"] == {"item": '"x3"', "index": "3"}  # as the worker would send it
    assert ops.run()["status"] == "waiting" and ops.read() == []
    assert ops.r.hget(ops.keys.part_of("r1").stats, "map_items") == "4"


def test_each_item_counts_once_each_later_item_starts_once_and_values_come_back_in_order(ops: Ops) -> None:
    parked(ops)
    first = done(ops, 1)
    assert (first.code, first.detail) == ("RECORDED", (1, 4, 2))  # one ran out: the third item starts
    assert done(ops, 1).detail == (1, 4)  # reported again (the relay after the worker): nothing starts
    assert done(ops, 0).detail == (2, 4, 3)
    assert done(ops, 0).code == "DUP" and hash_of(ops)["started"] == "4"
    assert done(ops, 3).detail == (3, 4)  # the window never passes the list's end
    assert ops.read() == [] and ops.run()["status"] == "waiting"
    assert done(ops, 2).code == "DONE"
    assert json.loads(ops.r.hget(ops.rk.state, "found")) == [{"v": 0}, {"v": 1}, {"v": 2}, {"v": 3}]
    ((_, d),) = ops.read()
    assert (d.step, d.visit) == ("b", 1)
    assert done(ops, 2).code == "DUP" and ops.read() == []  # a late repeat moves nothing
    assert ops.history_types().count("children_done") == 1


def test_the_first_failed_item_fails_the_run_and_late_notices_do_not_undo_a_retry(ops: Ops) -> None:
    parked(ops)
    out = done(ops, 1, status="failed")
    assert (out.code, out.detail) == ("FAILED", (ITEMS[1],))  # at once: item 0 still runs
    run = ops.run()
    assert run["status"] == "failed" and "map item r1:a:1 failed" in json.loads(run["error"])["message"]
    assert done(ops, 0, status="cancelled").code == "IGNORED"  # the cascade's cancel: not recorded
    assert "r:0" not in hash_of(ops) and hash_of(ops)["done"] == "1"
    retried = Outcome.parse(ops.x(ops.store.retry(run_id="r1", queue="q", reason="fixed", request_id="t"))[0])
    assert retried.detail == ("children", "b", 1, ITEMS[1])  # the caller also re-drives item 0 (cancelled)
    assert ops.run()["status"] == "waiting" and hash_of(ops)["done"] == "0"
    assert done(ops, 0).detail == (1, 4, 2)  # re-driven items report; the window moves on from where it was
    assert done(ops, 1).detail == (2, 4, 3)
    done(ops, 2)
    assert done(ops, 3).code == "DONE"


def test_an_item_completed_after_the_run_failed_is_kept_for_the_retry(ops: Ops) -> None:
    parked(ops)
    done(ops, 1, status="failed")
    assert done(ops, 0).code == "RECORDED" and hash_of(ops)["started"] == "2"  # kept; nothing starts
    retried = Outcome.parse(ops.x(ops.store.retry(run_id="r1", queue="q", reason="fixed", request_id="t"))[0])
    assert retried.detail == ("children", "b", 1, ITEMS[1])  # item 0 completed: not re-driven


def test_with_collect_failures_every_item_runs_and_the_next_step_gets_item_results(ops: Ops) -> None:
    parked(ops, window=4, collect=True)
    assert done(ops, 0, status="failed").code == "RECORDED"
    done(ops, 1, status="cancelled")
    done(ops, 2)
    assert done(ops, 3).code == "DONE"
    found = json.loads(ops.r.hget(ops.rk.state, "found"))
    assert [f["status"] for f in found] == ["failed", "cancelled", "completed", "completed"]
    assert found[2] == {"index": 2, "status": "completed", "error": None, "value": {"v": 2}}


def test_the_commit_resent_after_a_lost_reply_does_not_park_again(ops: Ops) -> None:
    eid, d, _ = parked(ops)
    done(ops, 0)
    assert ops.commit(eid, d, children=json.dumps(mapped())).code == "REPLAY"
    assert hash_of(ops)["started"] == "3" and ops.history_types().count("children") == 1


def test_a_claim_that_finishes_a_half_done_commit_parks_the_run_with_its_window(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    record = {"step": "a", "visit": 1, "next": "b", "update": {}, "children": mapped(window=3)}
    ops.r.hset(ops.rk.results, "r1:a", json.dumps(record))
    ops.kill("w1")
    ops.r.xack(ops.stream, GROUP, eid)
    ops.x(ops.store.sweep(run_id="r1", queue="q"))
    ((eid2, d2),) = ops.read("w2")
    claimed = ops.claim(eid2, d2, worker="w2")
    assert (claimed.code, claimed.detail) == ("DUP", "advanced")
    kept = hash_of(ops)
    assert (kept["window"], kept["started"], json.loads(kept["p:3"])["run"]) == ("3", "3", ITEMS[3])
    assert ops.run()["status"] == "waiting"


def test_a_malformed_map_is_refused_before_anything_is_written(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    for bad in (mapped() | {"window": 0}, mapped() | {"specs": [], "runs": ITEMS}, mapped() | {"window": 1.5}):
        out = ops.commit(eid, d, children=json.dumps(bad))
        assert out.code == "INVALID" and "StartChildren" in out.detail[0]
    assert ops.run()["status"] == "running" and not ops.r.exists(ops.rk.children)


def test_a_map_retried_with_every_result_in_is_settled_by_the_sweeps_look(ops: Ops) -> None:
    """Items that completed after their map had failed (its deadline, say) are kept; a retry
    then parks the map with nothing left to run, and the sweep's look settles it."""
    parked(ops, window=4)
    ops.r.hset(ops.rk.run, "status", "failed")  # as expire.lua leaves it
    for i in range(4):
        assert done(ops, i).code == "RECORDED"
    for i, item in enumerate(ITEMS):  # the items' runs, as they would be: completed
        ops.r.hset(ops.keys.run(item).run, mapping={"status": "completed", "wf": "wf..it", "parent": "r1"})
        ops.r.hset(ops.keys.run(item).run, mapping={"parent_queue": "q", "parent_index": i})
        ops.r.hset(ops.keys.run(item).state, mapping={"result": json.dumps({"v": i}), "index": i})
    retried = Outcome.parse(ops.x(ops.store.retry(run_id="r1", queue="q", reason="again", request_id="t"))[0])
    assert retried.detail == ("children", "b", 1) and ops.run()["status"] == "waiting"
    check_parent(ops.r, ops.store, "r1")
    assert ops.run()["status"] == "running" and [d.step for _, d in ops.read()] == ["b"]
    assert json.loads(ops.r.hget(ops.rk.state, "found")) == [{"v": i} for i in range(4)]
