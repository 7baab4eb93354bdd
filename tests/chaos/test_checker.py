"""The invariant checker must be able to fail: each kind of damage is reported as its invariant."""

from __future__ import annotations

import json

import pytest

from orchestrator import Client, Settings, scripts
from orchestrator.chaos import flows
from orchestrator.chaos.checker import Checker
from orchestrator.chaos.ledger import Ledger
from orchestrator.codec import HistoryEvent
from tests.harness import supervisor_thread, worker_thread


@pytest.fixture
def finished(client: Client, settings: Settings, ledger: Ledger) -> list[str]:
    """A few chaos runs, completed without faults: the checker finds nothing wrong with them."""
    runs = [client.submit(wf, {"work_s": 0.0, "fail_rate": 0.0}, run_id=f"{wf.name}-1") for wf in flows.ALL]
    approval = f"{flows.approvals.name}-1"  # sent before it waits: kept, then delivered
    client.signal(approval, "go", {"token": flows.signal_token(approval)}, signal_id="go-1", workflow=flows.approvals)
    with supervisor_thread(settings), worker_thread(flows.ALL, settings):  # the supervisor relays children's ends
        for run in runs:
            run.wait(timeout_s=20)
    return [run.run_id for run in runs]


def check(client: Client, ledger: Ledger, runs: list[str]) -> set[str]:
    report = Checker(client, ledger, max_crashes=3, recovery_bound_ms=10_000).check(runs, [])
    return {v.invariant for v in report.violations}


def test_a_clean_workload_passes(client: Client, ledger: Ledger, finished: list[str]) -> None:
    report = Checker(client, ledger, max_crashes=3, recovery_bound_ms=10_000).check(finished, [])
    assert report.ok, report.violations
    kids = int(client.redis.hget(client.keys.run(f"{flows.parents.name}-1").children, "n"))
    assert report.children == kids and report.to_dict()["child_violations"] == 0
    items = int(client.redis.hget(client.keys.run(f"{flows.mappers.name}-1").children, "n"))
    assert report.map_items == items and report.maps_settled == 1 and report.to_dict()["map_violations"] == 0
    assert report.runs["completed"] == 9 + kids + items
    assert report.committed_steps == 8 + 1 + 3 + 6 + 2 + 2 + 2 + 2 + 2 * kids + 2 + items
    assert report.sleeps == 1 and report.to_dict()["early_wake_ups"] == 0
    assert (report.signalled, report.wait_timeouts, report.to_dict()["signals_lost_or_doubled"]) == (1, 0, 0)
    assert report.effects_applied == 1
    assert report.fencing_checked == 1 and report.to_dict()["fencing_violations"] == 0


def test_each_kind_of_damage_is_caught(client: Client, ledger: Ledger, finished: list[str]) -> None:
    chain_run = "chaos_chain-1"
    assert check(client, ledger, [*finished, "never-existed"]) == {"I1"}
    # an execution with a higher fence after the commit: a persisted step ran again
    key = f"{chain_run}:c2"
    fence = client.results(chain_run)[key].fence
    doc = {"key": key, "run": chain_run, "step": "c2", "fence": fence + 1, "attempt": 9, "worker": "w", "saw": 2}
    client.redis.rpush(ledger.keys.executions, json.dumps(doc))
    assert check(client, ledger, finished) == {"I2"}
    client.redis.rpop(ledger.keys.executions)
    # a step that started before its predecessor's result was durable
    client.redis.rpush(ledger.keys.executions, json.dumps({**doc, "fence": fence - 1, "saw": 1}))
    assert check(client, ledger, finished) == {"I8"}
    client.redis.rpop(ledger.keys.executions)
    # a step after a sleep claimed before the wake-up it came after (its fence below it)
    nap_run = "chaos_nap-1"
    rise = {"key": f"{nap_run}:rise", "run": nap_run, "step": "rise", "attempt": 9, "worker": "w"}
    wake_at = client.state(nap_run)["wake_at_ms"]
    client.redis.rpush(ledger.keys.executions, json.dumps({**rise, "fence": wake_at - 5, "saw": wake_at}))
    assert check(client, ledger, finished) == {"I10"}
    client.redis.rpop(ledger.keys.executions)
    # a run that woke before its due time
    history = client.keys.run(nap_run).history
    at = next(i for i, e in enumerate(client.events(nap_run)) if e.type == "woke")
    woke = json.loads(client.redis.lindex(history, at))
    due = next(e.until_ms for e in client.events(nap_run) if e.type == "sleeping")
    client.redis.lset(history, at, json.dumps({**woke, "at": due - 1}))
    assert check(client, ledger, finished) == {"I10"}
    client.redis.lset(history, at, json.dumps(woke))
    # a run failed at its deadline before the deadline came
    run_key = client.keys.run(chain_run).run
    finished_ms = int(client.redis.hget(run_key, "finished_ms"))
    expired = {"type": "DeadlineExceeded", "message": "too late", "traceback": "", "retryable": False}
    client.redis.hset(run_key, mapping={"error": json.dumps(expired), "deadline_ms": finished_ms + 1000})
    assert check(client, ledger, finished) == {"I11"}
    client.redis.hset(run_key, "deadline_ms", finished_ms)  # expired at its deadline: fine
    assert check(client, ledger, finished) == set()
    client.redis.hdel(run_key, "error", "deadline_ms")
    # the step after a wait ran with another run's payload, or at a second visit (the signal applied twice)
    approval = f"{flows.approvals.name}-1"
    proceed = {"key": f"{approval}:proceed", "run": approval, "step": "proceed", "attempt": 9, "worker": "w"}
    fence = client.results(approval)[f"{approval}:proceed"].fence
    client.redis.rpush(ledger.keys.executions, json.dumps({**proceed, "fence": fence - 1, "saw": 12345}))
    assert check(client, ledger, finished) == {"I12"}
    client.redis.rpop(ledger.keys.executions)
    twice = {**proceed, "key": f"{approval}:proceed:2", "fence": fence - 1, "saw": flows.signal_token(approval)}
    client.redis.rpush(ledger.keys.executions, json.dumps(twice))
    assert check(client, ledger, finished) == {"I12"}
    client.redis.rpop(ledger.keys.executions)
    # a second child started for one parent step, and a parent settled before a child ended
    parent = f"{flows.parents.name}-1"
    extra = client.store.submit(
        run_id=f"{parent}:spawn/{flows.MAX_KIDS}",
        workflow=flows.kids.name,
        queue=flows.QUEUE,
        first_step="play",
        input_sha="x",
        event='{"detail":"x"}',
        request_id="x",
        state={},
    )
    scripts.execute(client.redis, [extra])
    assert check(client, ledger, finished) == {"I13"}
    client.redis.delete(*client.keys.run(f"{parent}:spawn/{flows.MAX_KIDS}").__dict__.values())
    history = client.keys.run(parent).history
    at = next(i for i, e in enumerate(client.events(parent)) if e.type == "children_done")
    settled = json.loads(client.redis.lindex(history, at))
    client.redis.lset(history, at, json.dumps({**settled, "at": 1}))
    assert check(client, ledger, finished) == {"I13"}
    client.redis.lset(history, at, json.dumps(settled))
    # a map: the step after it saw its values out of order; it fanned in twice; its items ran
    # more at once than its parallelism
    mapped = f"{flows.mappers.name}-1"
    total = {"key": f"{mapped}:total", "run": mapped, "step": "total", "attempt": 9, "worker": "w"}
    values = [int(v) for v in json.loads(client.redis.hget(client.keys.run(mapped).state, "found"))]
    fence = client.results(mapped)[f"{mapped}:total"].fence
    client.redis.rpush(ledger.keys.executions, json.dumps({**total, "fence": fence, "saw": [*values[::-1], 0]}))
    assert check(client, ledger, finished) == {"I14"}
    client.redis.rpop(ledger.keys.executions)
    history = client.keys.run(mapped).history
    client.redis.rpush(history, json.dumps({"type": "children_done", "at": 2**42, "step": "total"}))
    assert check(client, ledger, finished) == {"I14"}
    client.redis.rpop(history)
    items = int(client.redis.hget(client.keys.run(mapped).children, "n"))
    item_runs = [client.keys.run(f"{mapped}:scatter:{i}").run for i in range(items)]
    created = [client.redis.hget(key, "created_ms") for key in item_runs]
    window = client.redis.hget(client.keys.run(mapped).children, "window")
    client.redis.hset(client.keys.run(mapped).children, "window", 1)
    for key in item_runs:
        client.redis.hset(key, "created_ms", 1)  # all started at once
    assert check(client, ledger, finished) == {"I14"}
    client.redis.hset(client.keys.run(mapped).children, "window", window)
    for key, ms in zip(item_runs, created, strict=True):
        client.redis.hset(key, "created_ms", ms)
    assert check(client, ledger, finished) == set()
    # more permit holders alive at once than the limit; a permit still held at rest
    seen = ledger.most_holding().get(flows.PERMIT, 0)
    client.redis.zadd(ledger.keys.most_holding, {flows.PERMIT: flows.PERMITS + 1})
    assert check(client, ledger, finished) == {"I15"}
    client.redis.zadd(ledger.keys.most_holding, {flows.PERMIT: seen})
    holders = client.keys.permit(flows.PERMIT).holders
    client.redis.zadd(holders, {chain_run: 2**42})  # renewed by nobody, yet its lease never ends
    assert check(client, ledger, finished) == {"I15"}
    client.redis.zrem(holders, chain_run)
    # a run that got its signal and also timed out (I6 as well: no counter counted that timeout)
    history = client.keys.run(approval).history
    client.redis.rpush(history, json.dumps({"type": "timed_out", "at": 1, "step": "proceed", "signal": "go"}))
    assert check(client, ledger, finished) == {"I6", "I12"}
    client.redis.rpop(history)
    # an effect sent with a key that belongs to no step visit
    client.redis.hincrby(ledger.keys.requests, "chaos_effect-1:send:7", 1)
    assert check(client, ledger, finished) == {"I3"}
    client.redis.hdel(ledger.keys.requests, "chaos_effect-1:send:7")
    # a counter that disagrees with the histories: one kept in the counter hash, and steps_ok,
    # summed from the detail hash
    client.redis.hincrby(client.keys.stats, "fenced", 1)
    assert check(client, ledger, finished) == {"I6"}
    client.redis.hincrby(client.keys.stats, "fenced", -1)
    client.redis.hincrby(client.keys.stats_detail, "steps|chaos_chain|c1|ok", 1)
    assert check(client, ledger, finished) == {"I6"}
    client.redis.hincrby(client.keys.stats_detail, "steps|chaos_chain|c1|ok", -1)
    # a run left unfinished, and an entry left pending
    client.redis.hset(client.keys.run(chain_run).run, "status", "running")
    stream = client.keys.queue_of(flows.QUEUE, chain_run).stream
    client.redis.xadd(stream, {"run": chain_run, "wf": "chaos_chain", "step": "c0", "visit": "1"})
    client.redis.xreadgroup("workers", "someone", {stream: ">"}, count=1)
    assert check(client, ledger, finished) == {"I1", "I4"}
    assert check(client, ledger, finished) != set()


def test_a_fenced_receiver_that_disagrees_with_the_persisted_record_is_caught(
    client: Client, ledger: Ledger, finished: list[str]
) -> None:
    """I9: the receiver keeps the highest token it saw; it must end on the committed attempt's."""
    key = "chaos_effect-1:send"
    fence = client.results("chaos_effect-1")[key].fence
    assert ledger.fenced_tokens() == {key: fence}
    # a later attempt's write reached the receiver, but an earlier attempt's commit persisted
    client.redis.zadd(ledger.fenced, {key: fence + 5})
    report = Checker(client, ledger, max_crashes=3, recovery_bound_ms=10_000).check(finished, [])
    assert [v.invariant for v in report.violations] == ["I9"], report.violations
    assert "fencing inverted" in report.violations[0].detail and report.to_dict()["fencing_violations"] == 1
    # and that later attempt's commit was refused: the receiver ended on a fenced attempt
    keys = client.keys.run("chaos_effect-1")
    fenced = HistoryEvent(type="fenced", at=1, step="send", visit=1, attempt=2, fence=fence + 5, worker="w9")
    client.redis.rpush(keys.history, fenced.model_dump_json())
    client.redis.hincrby(client.keys.stats, "fenced", 1)  # the counter agrees (I6 stays quiet)
    report = Checker(client, ledger, max_crashes=3, recovery_bound_ms=10_000).check(finished, [])
    assert [v.invariant for v in report.violations] == ["I9", "I9"], report.violations
    assert "refused (fenced by worker w9)" in report.violations[1].detail
    # the committed attempt's write never reached the receiver
    client.redis.zadd(ledger.fenced, {key: fence - 5})
    report = Checker(client, ledger, max_crashes=3, recovery_bound_ms=10_000).check(finished, [])
    assert [v.detail.split(": ", 2)[-1] for v in report.violations] == [
        "the committed attempt's write never reached the receiver"
    ]


def test_the_fenced_receiver_keeps_the_highest_token_and_refuses_lower_ones(ledger: Ledger) -> None:
    assert ledger.send_fenced("r:send", 1_796_000_000_100)
    assert ledger.send_fenced("r:send", 1_796_000_000_200)
    assert not ledger.send_fenced("r:send", 1_796_000_000_150)  # a replaced attempt, late
    assert ledger.send_fenced("r:send", 1_796_000_000_200)  # the live attempt, resent
    assert ledger.fenced_tokens() == {"r:send": 1_796_000_000_200}
