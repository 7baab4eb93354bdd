"""Fleet-wide concurrency limits: ``permit.lua`` keeps at most ``limit`` holders of a key, each
under its claim's token and a lease its worker renews, and a FIFO line of the steps waiting;
``defer.lua`` gives a waiting step back to its queue holding no worker slot, and ``promote.lua``
with the limit's name wakes it when a permit is free for it. End to end the holders never
exceed the limit (counted by the steps themselves), a kill -9'd holder's permit returns within
its lease, and ``orchestrator limits`` changes the limit at run time."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import Client, Settings, scripts
from orchestrator.chaos.ledger import Ledger
from orchestrator.cli.fleet import by, read_fleet
from orchestrator.cli.render import status_text
from orchestrator.connection import connect
from orchestrator.embedded import RedisServer
from orchestrator.errors import DefinitionError
from orchestrator.permits import ConcurrencyLimit, read_permits
from orchestrator.store import Outcome
from orchestrator.workflow import Workflow
from tests.conftest import fast_settings
from tests.harness import process_env, run_cli, start_worker, supervisor_thread, worker_thread
from tests.helpers import readme_example, wait_until
from tests.ops import Ops
from workers.testflows import Gated, gated

STALE_MS = 60_000


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)


def _permit(ops: Ops, mode: str, *args: Any, limit: int = 2, name: str = "k") -> Any:
    return scripts.execute(ops.r, [ops.store.permit(name, limit, mode, *args)])[0]


def _acquire(ops: Ops, run: str, token: str = "", fence: int = 1, lease_ms: int = 5000, **kw: Any) -> Outcome:
    return Outcome.parse(_permit(ops, "acquire", run, token or f"t-{run}", fence, lease_ms, "q", STALE_MS, **kw))


def test_permits_up_to_the_limit_then_a_fifo_line_that_nobody_jumps(ops: Ops) -> None:
    assert [_acquire(ops, run).code for run in ("a", "b")] == ["OK", "OK"]
    waits = [_acquire(ops, run) for run in ("c", "d")]
    assert [(w.code, w.detail[:3]) for w in waits] == [("WAIT", (0, 2, 2)), ("WAIT", (1, 2, 2))]
    assert _acquire(ops, "c").detail[0] == 0  # asks again: the same place in line
    released = _permit(ops, "release", "a", "t-a")
    assert released == [1, "q", "c"]  # the first waiter fits now: to wake
    assert _acquire(ops, "e").code == "WAIT"  # a newcomer does not take c's permit
    assert _acquire(ops, "d").code == "WAIT"  # nor does the second in line
    granted = _acquire(ops, "c")
    assert granted.code == "OK" and granted.detail[1] == 2
    keys = ops.keys.permit("k")
    assert ops.r.zrange(keys.holders, 0, -1) == ["b", "c"] and ops.r.zrange(keys.waiting, 0, -1) == ["d", "e"]


def test_a_resent_acquire_holds_one_permit_and_a_replaced_claim_is_fenced(ops: Ops) -> None:
    assert _acquire(ops, "a", "t1", fence=10).code == "OK"
    assert _acquire(ops, "a", "t1", fence=10).code == "OK"  # its reply was lost: sent again
    assert ops.r.zcard(ops.keys.permit("k").holders) == 1
    assert _acquire(ops, "a", "t2", fence=20).code == "OK"  # the run's next claim (its worker died)
    assert _acquire(ops, "a", "t1", fence=10).code == "FENCED"  # the old attempt's late call
    assert _permit(ops, "release", "a", "t1") == [0]  # refused: the new claim holds it
    assert _permit(ops, "renew", 5000, "a", "t1") == ["a"]  # not the old claim's: it must stop
    assert _permit(ops, "renew", 5000, "a", "t2") == []
    assert _permit(ops, "release", "a", "t2") == [1]
    assert ops.r.zcard(ops.keys.permit("k").holders) == 0


def test_a_lapsed_lease_frees_the_permit_and_a_stale_waiter_leaves_the_line(ops: Ops) -> None:
    assert _acquire(ops, "a", lease_ms=50).code == "OK"
    assert _acquire(ops, "b", lease_ms=50).code == "OK"
    assert _acquire(ops, "c").code == "WAIT"
    time.sleep(0.1)  # a and b's workers died: nobody renewed
    swept = _permit(ops, "sweep", STALE_MS)
    assert swept == [2, "q", "c"]
    assert _permit(ops, "renew", 5000, "a", "t-a") == ["a"]  # its worker comes back: too late
    assert _acquire(ops, "c").code == "OK"
    _permit(ops, "release", "c", "t-c")
    assert _acquire(ops, "x", limit=1).code == "OK"
    assert _acquire(ops, "y", limit=1).code == "WAIT"
    time.sleep(0.05)
    assert _permit(ops, "sweep", 10, limit=1) == [0]  # y stopped asking 10 ms ago: gone
    assert ops.r.zcard(ops.keys.permit("k").waiting) == 0
    assert _acquire(ops, "z", limit=1).code == "WAIT" and _permit(ops, "forget", "z", limit=1) == 1


def test_the_run_time_limit_wins_and_a_bad_one_is_refused_naming_it(ops: Ops) -> None:
    ops.r.hset(ops.keys.permit("k").info, "limit", 3)  # `orchestrator limits set k 3`
    assert [_acquire(ops, run).code for run in "abcd"] == ["OK", "OK", "OK", "WAIT"]
    ops.r.hset(ops.keys.permit("k").info, "limit", "zero")
    bad = _acquire(ops, "e")
    assert bad.code == "INVALID" and "expected a whole number of permits >= 1" in bad.detail[0]
    ops.r.hdel(ops.keys.permit("k").info, "limit")
    ops.r.hset(ops.keys.permit("k2").info, "code_limit", 1)  # what workers announce; the supervisor passes ''
    sweep = [_permit(ops, "acquire", run, "t", 1, 5000, "q", STALE_MS, limit="", name="k2")[0] for run in "fg"]  # type: ignore[arg-type]
    assert sweep == ["OK", "WAIT"]
    for bad_limit in (0, -1, 1.5, True):
        with pytest.raises(DefinitionError, match="concurrency limit 'x'"):
            ConcurrencyLimit("x", bad_limit)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="concurrency='nope' is not declared"):
        Workflow("undeclared", state=Gated).step(concurrency="nope")(lambda ctx, state: None)


def test_a_permit_wake_moves_only_a_run_that_waits_for_that_permit(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    token = f"w1:{eid}"
    deferred = ops.store.defer(
        run_id="r1", queue="q", token=token, wait_ms=60_000, limit="k", kind="permit", detail="no permit"
    )
    assert Outcome.parse(ops.x(deferred)[0]).code == "DEFERRED"
    assert ops.run()["wait_permit"] == "k" and ops.history_types()[-1] == "permit_wait"
    assert ops.x(ops.store.promote(queue="q", run_id="r1"))[0] == ""  # not due for a minute
    assert ops.x(ops.store.promote(queue="q", run_id="r1", permit="other"))[0] == ""  # waits for k, not other
    assert ops.x(ops.store.promote(queue="q", run_id="r1", permit="k"))[0] != ""  # woken now
    assert "wait_permit" not in ops.run() and ops.run()["status"] == "running"
    assert ops.x(ops.store.promote(queue="q", run_id="r1", permit="k"))[0] == ""  # woken once
    assert ops.x(ops.store.promote(queue="q", run_id="gone", permit="k"))[0] == "GONE"


def test_a_sleeping_or_backing_off_run_is_never_woken_by_a_permit(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    ops.claim(eid, d)
    deferred = ops.store.defer(run_id="r1", queue="q", token=f"w1:{eid}", wait_ms=60_000, limit="k")  # a rate limit
    assert Outcome.parse(ops.x(deferred)[0]).code == "DEFERRED"
    assert ops.x(ops.store.promote(queue="q", run_id="r1", permit="k"))[0] == ""
    assert ops.r.zscore(ops.q.delayed, "r1") is not None


def _most(ledger: Ledger) -> int:
    return ledger.most_holding().get("test_gate", 0)


def test_holders_never_exceed_the_limit_and_waiting_steps_hold_no_slot(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    runs = [client.submit(gated, Gated(hold_s=0.3), run_id=f"g{i}") for i in range(8)]
    four = settings.model_copy(update={"concurrency": 4})
    with worker_thread([gated], four), worker_thread([gated], four):
        wait_until(lambda: any(client.get(r.run_id).permit for r in runs), what="a step in line")
        waiting = [r.run_id for r in runs if client.get(r.run_id).permit]
        assert all(client.get(rid).worker is None for rid in waiting)  # no claim: no slot, no lease
        why = client.why(waiting[0])
        assert why.waiting_for == "permit" and "concurrency limit test_gate" in why.text
        assert "no worker slot" in why.text and "permit    waiting in line" in status_text(client.get(waiting[0]))
        (state,) = read_permits(client.redis, client.keys, ["test_gate"])
        assert state.code_limit == 2 and state.in_use <= 2
        for run in runs:
            run.wait(timeout_s=30)
    assert _most(ledger) == 2  # the limit, used and never exceeded
    waited = [e for r in runs for e in client.events(r.run_id) if e.type == "permit_wait"]
    assert waited and all("concurrency limit test_gate" in (e.detail or "") for e in waited)
    assert {ex.attempt for ex in ledger.executions() if ex.step == "gate"} == {1}  # a wait is no attempt
    assert client.stats()["permit_waits"] == len(waited)
    (state,) = read_permits(client.redis, client.keys, ["test_gate"])
    assert (state.in_use, state.waiting) == (0, 0)  # every permit given back


def test_waiting_steps_get_permits_in_the_order_they_first_asked(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with worker_thread([gated], settings.model_copy(update={"concurrency": 8})):
        runs = []
        for i in range(6):
            runs.append(client.submit(gated, Gated(hold_s=0.4), run_id=f"o{i}"))
            time.sleep(0.05)  # asks in submit order
        for run in runs:
            run.wait(timeout_s=30)
    first_ask = {r.run_id: min(e.at for e in client.events(r.run_id) if e.type == "permit_wait") for r in runs[2:]}
    started = {ex.run: ex.saw for ex in ledger.executions() if ex.step == "gate"}
    in_line = sorted(first_ask, key=lambda run_id: first_ask[run_id])
    assert sorted(in_line, key=lambda run_id: started[run_id]) == in_line


def test_a_map_under_a_concurrency_limit_runs_at_most_the_limit_of_its_items(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with worker_thread([gated], settings.model_copy(update={"concurrency": 8})):
        final = client.submit(gated, Gated(hold_s=0.01, items=list(range(6))), run_id="m").wait(timeout_s=30)
    assert final.done == list(range(6))
    assert _most(ledger) == 2  # parallelism 10, limit 2: the limit held across the map's items


def test_a_killed_holders_permit_returns_within_its_lease(fresh_server: RedisServer, tmp_path: Path) -> None:
    settings = fast_settings(fresh_server.url)
    client = Client(settings)
    ledger = Ledger(connect(settings.plain_url()), settings.namespace)
    holder = start_worker(settings, tmp_path, name="w1", args=["-c", "4"])
    try:
        for i in range(2):
            client.submit(gated, Gated(hold_s=30), run_id=f"h{i}")
        wait_until(lambda: _most(ledger) == 2, timeout_s=20, what="both permits held")
        holder.kill()
        killed = time.monotonic()
        for i in range(2):  # they do not come back to take their permits over: they must return
            client.cancel(f"h{i}")
        holder = start_worker(settings, tmp_path, name="w2", args=["-c", "4"])
        with supervisor_thread(settings):
            fresh = client.submit(gated, Gated(hold_s=0.05), run_id="after")
            wait_until(lambda: any(ex.run == "after" for ex in ledger.executions()), timeout_s=20, what="a permit")
            took = time.monotonic() - killed
            fresh.wait(timeout_s=20)
    finally:
        holder.kill()
    # lease_s 0.8 here, plus a sweep and a promote: the permit came back within its lease, give or take
    assert took < settings.lease_s + 2.0, took
    client.close()


def test_limits_set_changes_a_concurrency_limit_fleet_wide(settings: Settings, client: Client, ledger: Ledger) -> None:
    env = process_env(settings)
    done = run_cli("limits", "set", "test_gate", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert "1 at once (set at run time)" in done.stdout
    with worker_thread([gated], settings.model_copy(update={"concurrency": 4})):
        runs = [client.submit(gated, Gated(hold_s=0.2), run_id=f"s{i}") for i in range(3)]
        for run in runs:
            run.wait(timeout_s=30)
    assert _most(ledger) == 1
    listed = json.loads(run_cli("limits", "list", "-o", "json", env=env).stdout)
    gate = next(item for item in listed if item["name"] == "test_gate")
    assert (gate["kind"], gate["limit"], gate["code_limit"], gate["in_use"]) == ("concurrency", 1, 2, 0)
    samples = read_fleet(client)
    assert by(samples, "orchestrator_fleet_permits_limit", "limit") == {("test_gate",): 1.0}
    assert by(samples, "orchestrator_fleet_permits_in_use", "limit") == {("test_gate",): 0.0}
    assert "as the workflows define it" in run_cli("limits", "clear", "test_gate", env=env).stdout
    assert "2 at once (as the workflows define it)" in run_cli("limits", "list", env=env).stdout
    neither = run_cli("limits", "set", "test_gate", env=env)
    assert neither.returncode != 0 and "give a CONCURRENCY" in neither.stderr
    bad = run_cli("limits", "set", "test_gate", "0", env=env)
    assert bad.returncode != 0 and "limit=0 must be a whole number of permits >= 1" in bad.stderr


def test_a_holder_whose_permit_was_taken_over_is_stopped_at_the_next_beat(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    info = client.keys.permit("test_gate").info
    with worker_thread([gated], settings):
        run = client.submit(gated, Gated(hold_s=3), run_id="t")
        wait_until(lambda: client.redis.hget(info, "o:t"), what="the permit held")
        client.redis.hset(info, "o:t", "another-claim")  # what a newer claim of the run does
        final = run.wait(timeout_s=30)  # the stopped attempt is given back; the next one finishes
    assert final.hold_s == 3
    released = [e for e in client.events("t") if e.type == "released"]
    assert released and "permit lost" in (released[0].detail or "")
    assert len([ex for ex in ledger.executions() if ex.step == "gate"]) == 2
    assert not [e for e in client.events("t") if e.type in ("error", "crashed")]  # given back: no error


def test_a_waiting_step_asks_again_every_permit_poll_s_when_no_wake_comes(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    keys = client.keys.permit("test_gate")
    client.redis.hset(keys.info, "limit", 1)
    client.redis.zadd(keys.holders, {"someone": 2**42})  # a holder that gives back without waking
    with worker_thread([gated], settings.model_copy(update={"permit_poll_s": 0.5})) as worker:
        run = client.submit(gated, Gated(hold_s=0.01), run_id="p")  # no supervisor: no sweep
        wait_until(lambda: client.get("p").permit, what="the step in line")
        client.redis.zrem(keys.holders, "someone")
        run.wait(timeout_s=10)
        waits = worker.metrics.permit_wait.labels("test_gate")._sum.get()  # type: ignore[attr-defined]
    assert waits > 0  # the wait time histogram saw the wait


def test_stop_unsure_holders_stops_only_permit_holders_once_the_beats_stopped_reaching_redis() -> None:
    from orchestrator.worker.heartbeat import Heartbeat, InFlight

    stopped: list[str] = []

    def item(run_id: str, permit: ConcurrencyLimit | None) -> InFlight:
        ctx: Any = type("Ctx", (), {"cancelled": False})()
        return InFlight("t-" + run_id, "q", "1-0", run_id, 1, ctx, None, permit=permit, on_lost=stopped.append)

    beat = Heartbeat.__new__(Heartbeat)
    beat._live_until = time.monotonic() + 60  # the last beat reached every partition
    items = [item("a", ConcurrencyLimit("k", 1)), item("b", None)]
    beat._stop_unsure_holders(items)
    assert stopped == []
    beat._live_until = 0.0  # most of a lease without a beat that reached Redis
    beat._stop_unsure_holders(items)
    assert stopped == ["permit lease may have ended"]  # a's only: b holds no permit


def test_the_readme_concurrency_example_runs_as_written(client: Client, settings: Settings) -> None:
    module = readme_example("### Concurrency limits")
    with worker_thread([module.study], settings.model_copy(update={"concurrency": 16})):
        final = client.submit(module.study, {"rivals": [f"r{i}" for i in range(12)]}, run_id="s").wait(timeout_s=30)
    assert final.notes[-1] == "12 rivals read" and final.notes[0] == "notes on r0"
    (state,) = read_permits(client.redis, client.keys, ["llm"])
    assert (state.code_limit, state.in_use) == (8, 0)
