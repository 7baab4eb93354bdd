"""Fleet-wide rate limits: ``rate.lua`` (GCRA on the Redis clock, with reservations) admits a step
start now or tells it when; ``defer.lua`` parks a step that must wait in its queue's delayed set,
holding no worker slot, with no error counted and its attempt given back. End to end the starts
under a limit never come closer than the limit allows, waiting starts go in the order they asked,
``ctx.spend`` pushes later starts back, and ``orchestrator limits`` changes a limit at run time."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
import redis

from orchestrator import Client, Settings, scripts
from orchestrator.chaos.ledger import Ledger
from orchestrator.errors import DefinitionError
from orchestrator.keys import Keys
from orchestrator.ratelimit import RateLimit, read_limits
from orchestrator.store import Outcome, Store
from orchestrator.workflow import Workflow
from tests.harness import process_env, run_cli, worker_thread
from tests.helpers import readme_example, wait_until
from tests.ops import Ops
from workers.testflows import Paced, paced

SLOW = RateLimit("slow", 2, per_s=1.0)  # one unit every 500 ms, one at a time


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)


def _x(
    r: redis.Redis, store: Store, limit: RateLimit, run_id: str, mode: str = "admit", cost: float | None = None
) -> Any:
    """One ``rate.lua`` call, its raw reply."""
    call = store.rate(limit=limit, mode=mode, run_id=run_id, cost=limit.cost if cost is None else cost)
    return scripts.execute(r, [call])[0]


def test_starts_within_the_burst_go_and_later_ones_reserve_their_moments_in_order(ops: Ops) -> None:
    first = Outcome.parse(_x(ops.r, ops.store, SLOW, "a"))
    assert first.code == "OK"
    waits = [Outcome.parse(_x(ops.r, ops.store, SLOW, run)) for run in ("b", "c", "d")]
    assert [w.code for w in waits] == ["WAIT"] * 3
    ms = [int(w.detail[0]) for w in waits]
    assert 400 <= ms[0] <= 500 and all(400 <= later - earlier <= 510 for earlier, later in itertools.pairwise(ms))
    again = Outcome.parse(_x(ops.r, ops.store, SLOW, "c"))  # asks again early: the same moment, nothing new booked
    assert again.code == "WAIT" and 0 <= ms[1] - int(again.detail[0]) <= 100  # only the time that passed
    _, reserved = ops.keys.rate_limit("slow")
    assert ops.r.zrange(reserved, 0, -1) == ["b", "c", "d"]  # in the order they asked


def test_a_reservation_is_the_grant_when_its_moment_has_come(ops: Ops) -> None:
    _x(ops.r, ops.store, SLOW, "a")
    wait = int(Outcome.parse(_x(ops.r, ops.store, SLOW, "b")).detail[0])
    time.sleep(wait / 1000 + 0.02)
    _, reserved = ops.keys.rate_limit("slow")
    assert Outcome.parse(_x(ops.r, ops.store, SLOW, "b")).code == "OK" and ops.r.zcard(reserved) == 0


def test_spend_pushes_later_starts_back_and_run_time_settings_win(ops: Ops) -> None:
    tokens = RateLimit("tok", 100, per_s=1.0, burst=100, cost=0)
    assert Outcome.parse(_x(ops.r, ops.store, tokens, "a")).code == "OK"  # no debt: admitted
    spent = Outcome.parse(_x(ops.r, ops.store, tokens, "a", mode="spend", cost=300))
    assert spent.code == "SPENT" and 2800 <= int(spent.detail[0]) <= 3000  # 300 tokens at 100/s
    wait = Outcome.parse(_x(ops.r, ops.store, tokens, "b"))
    assert wait.code == "WAIT" and 1800 <= int(wait.detail[0]) <= 2000  # until the debt is one burst
    state, _ = ops.keys.rate_limit("slow")
    ops.r.hset(state, mapping={"rate": "10", "per_ms": "1000", "burst": "5"})  # `orchestrator limits set`
    assert [Outcome.parse(_x(ops.r, ops.store, SLOW, f"x{i}")).code for i in range(6)] == ["OK"] * 5 + ["WAIT"]


def test_a_bad_setting_or_cost_is_refused_naming_it(ops: Ops) -> None:
    state, _ = ops.keys.rate_limit("slow")
    ops.r.hset(state, "rate", "0")
    out = Outcome.parse(_x(ops.r, ops.store, SLOW, "a"))
    assert out.code == "INVALID" and "expected a rate and a period above 0" in out.detail[0]
    for bad in ({"rate": 0}, {"per_s": -1}, {"burst": 0.5}, {"cost": -1}):
        with pytest.raises(DefinitionError, match="rate limit 'x'"):
            RateLimit("x", **({"rate": 1.0} | bad))  # type: ignore[arg-type]
    flow = Workflow("undeclared", state=Paced)
    with pytest.raises(DefinitionError, match="rate_limit='nope' is not declared"):
        flow.step(rate_limit="nope")(lambda ctx, state: None)


def test_defer_parks_the_claimed_step_without_an_error_and_gives_its_attempt_back(ops: Ops) -> None:
    ops.submit()
    ((eid, d),) = ops.read()
    claimed = ops.claim(eid, d)
    assert claimed.attempt == 1
    token = f"w1:{eid}"
    call = ops.store.defer(run_id="r1", queue="q", token=token, wait_ms=5000, limit="slow")
    out = Outcome.parse(ops.x(call)[0])
    assert out.code == "DEFERRED"
    run = ops.run()
    assert (run["status"], run["claim"], run["attempt"], run.get("errors", "0")) == ("retrying", "", "0", "0")
    assert ops.r.zscore(ops.q.delayed, "r1") == int(out.detail[0])
    assert ops.history_types()[-1] == "rate_limited"
    assert Outcome.parse(ops.x(call)[0]).code == "REPLAY"  # resent after a lost reply
    stale = ops.store.defer(run_id="r1", queue="q", token="w9:other", wait_ms=5, limit="slow")
    assert Outcome.parse(ops.x(stale)[0]).code == "FENCED"


def test_starts_never_come_closer_than_the_limit_and_waiting_steps_hold_no_slot(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    runs = [client.submit(paced, Paced(), run_id=f"p{i}") for i in range(10)]
    with worker_thread([paced], settings.model_copy(update={"concurrency": 2})):
        wait_until(
            lambda: any(e.type == "rate_limited" for r in runs for e in client.events(r.run_id)), what="a deferral"
        )
        parked = [r.run_id for r in runs if client.get(r.run_id).status == "retrying"]
        assert parked and all(client.get(rid).worker is None for rid in parked)  # no claim: no slot, no lease
        for run in runs:
            run.wait(timeout_s=30)
    starts = sorted(ex.saw for ex in ledger.executions() if ex.step == "call_api")
    assert len(starts) == 10
    # 5 a second, one at a time: the reserved moments allow 1 + 5 in any second; a start back late
    # (promote_interval_s 0.05 here, plus scheduling) can meet the next one: at most one more
    assert max(sum(1 for s in starts if t <= s < t + 990) for t in starts) <= 7
    assert starts[-1] - starts[0] >= 9 * 200 - 50
    deferred = [e for r in runs for e in client.events(r.run_id) if e.type == "rate_limited"]
    assert deferred and all("rate limit test_api" in (e.detail or "") for e in deferred)
    assert {ex.attempt for ex in ledger.executions() if ex.step == "call_api"} == {1}  # a deferral is no attempt
    assert client.stats()["rate_limited"] == len(deferred)


def test_why_says_a_run_waits_for_its_rate_limit(client: Client, settings: Settings, ledger: Ledger) -> None:
    state, _ = Keys(settings.namespace, settings.partitions).rate_limit("test_api")
    client.redis.hset(state, "tat", 2**42)  # booked far ahead: the next start waits
    with worker_thread([paced], settings):
        client.submit(paced, Paced(), run_id="w")
        wait_until(lambda: client.get("w").status == "retrying", what="the start deferred")
    why = client.why("w")
    assert why.waiting_for == "rate_limit" and "rate limit test_api" in why.text and "no worker slot" in why.text
    (limit,) = read_limits(client.redis, client.keys, ["test_api"])  # what `orchestrator limits list` shows
    assert limit.waiting == 1 and limit.booked_ahead_ms > 0


def test_spend_pushes_later_starts_back(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([paced], settings):
        client.submit(paced, Paced(tokens=400), run_id="t").wait(timeout_s=30)
    (limit,) = read_limits(client.redis, client.keys, ["test_tokens"])
    assert 2500 <= limit.booked_ahead_ms <= 4000  # 400 tokens at 100 a second, spent a moment ago


def test_limits_set_changes_a_limit_fleet_wide_and_clear_gives_it_back(settings: Settings, ledger: Ledger) -> None:
    env = process_env(settings)
    done = run_cli("limits", "set", "test_api", "--rate", "100", "--per-s", "1", "--burst", "10", env=env)
    assert done.returncode == 0, done.stderr
    assert "100 per 1 s, burst 10 (set at run time)" in done.stdout
    listed = json.loads(run_cli("limits", "list", "-o", "json", env=env).stdout)
    assert listed[0]["name"] == "test_api" and listed[0]["rate"] == 100
    bad = run_cli("limits", "set", "test_api", "--rate", "0", env=env)
    assert bad.returncode != 0 and "rate=0.0 must be a number above 0" in bad.stderr
    assert "as the workflows define it" in run_cli("limits", "clear", "test_api", env=env).stdout


def test_the_readme_rate_limit_example_runs_as_written(client: Client, settings: Settings) -> None:
    module = readme_example("### Rate limits")
    with worker_thread([module.ask], settings):
        final = client.submit(module.ask, {"text": "hi"}, run_id="a").wait(timeout_s=30)
    assert final.answer == "ECHO: HI"
    (tokens,) = read_limits(client.redis, client.keys, ["llm_tokens"])
    assert tokens.booked_ahead_ms > 0  # the 1,200 tokens spent push the next start back


def test_a_start_back_late_goes_at_once_and_new_ones_book_after_every_reservation(ops: Ops) -> None:
    """The reserved moments keep the bound; a start that comes back after its moment (a promote
    pass later) goes at once, as documented, and a new request books after every reservation:
    nothing overtakes a waiting start."""
    limit = RateLimit("five", 5, per_s=1.0)  # a start every 200 ms, one at a time
    assert Outcome.parse(_x(ops.r, ops.store, limit, "a")).code == "OK"
    assert [Outcome.parse(_x(ops.r, ops.store, limit, run)).code for run in ("b", "c")] == ["WAIT", "WAIT"]
    time.sleep(0.5)  # both moments (+200 and +400 ms) passed: they come back late, together
    assert [Outcome.parse(_x(ops.r, ops.store, limit, run)).code for run in ("b", "c")] == ["OK", "OK"]
    fresh = Outcome.parse(_x(ops.r, ops.store, limit, "d"))  # tat is at +600 ms: d books there
    assert fresh.code == "WAIT" and 0 < int(fresh.detail[0]) <= 100
