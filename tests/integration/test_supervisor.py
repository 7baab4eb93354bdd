"""Supervisor scans: a dead worker's step is found even behind hundreds of live long steps."""

from __future__ import annotations

import time

import redis

from orchestrator import Client, Settings, Supervisor, scripts
from orchestrator.codec import Dispatch
from orchestrator.fleet_metrics import FleetCollector
from orchestrator.keys import GROUP
from orchestrator.store import Claimed, Outcome
from tests.ops import partition_mates
from workers.testflows import chain


def test_a_dead_claim_behind_600_live_ones_is_redispatched_within_a_few_ticks(
    client: Client, settings: Settings, r: redis.Redis
) -> None:
    ids = partition_mates(client.keys, "run000", "run", 601)  # one partition: one stream to scan
    for run_id in ids:
        client.submit(chain, {}, run_id=run_id)
    stream = client.keys.queue_of("default", ids[0]).stream
    r.xgroup_create(stream, GROUP, id="0")
    entries = [
        (eid, Dispatch.model_validate(f))
        for _, rows in r.xreadgroup(GROUP, "w", {stream: ">"}, count=1000)
        for eid, f in rows
    ]
    calls = [
        client.store.claim(
            dispatch=d,
            queue="default",
            entry_id=eid,
            token=f"w:{eid}",
            worker="w",
            lease_ms=1 if d.run == ids[-1] else 60_000,
            max_crashes=3,
            max_steps=0,
        )
        for eid, d in entries
    ]
    assert {Claimed.parse(x).code for x in scripts.execute(r, calls)} == {"RUN"}
    time.sleep(settings.lease_s + 0.1)  # every entry is now idle for longer than a lease
    supervisor = Supervisor(settings)
    found = 0
    for _ in range(3):
        found += supervisor.tick(sweep=False).get("redispatched", 0)
    assert found == 1
    assert r.hget(client.keys.run(ids[-1]).run, "dispatch") != entries[-1][0]
    # the live entries had their idle time reset, so the next scans do not wade through them
    assert r.xpending_range(stream, GROUP, "-", "+", 1000, idle=int(settings.lease_s * 1000)) == []
    assert r.xpending(stream, GROUP)["pending"] == 600
    supervisor.redis.close()


def test_each_tick_trims_the_acked_entries_and_the_queue_length_counts_only_live_ones(
    client: Client, settings: Settings, r: redis.Redis
) -> None:
    """Commits only XACK their entry; the supervisor's tick drops the acked ones (trim.lua), and
    until it does, orchestrator_queue_length counts waiting and running entries, not acked ones."""
    ids = partition_mates(client.keys, "trim000", "trim", 3)
    for run_id in ids:
        client.submit(chain, {}, run_id=run_id)
    stream = client.keys.queue_of("default", ids[0]).stream
    r.xgroup_create(stream, GROUP, id="0")
    for eid, d in [
        (e, Dispatch.model_validate(f)) for _, rows in r.xreadgroup(GROUP, "w", {stream: ">"}) for e, f in rows
    ]:
        token = f"w:{eid}"
        claim = client.store.claim(
            dispatch=d,
            queue="default",
            entry_id=eid,
            token=token,
            worker="w",
            lease_ms=60_000,
            max_crashes=3,
            max_steps=0,
        )
        commit = client.store.commit(
            dispatch=d,
            queue="default",
            token=token,
            record="{}",
            event='{"step":"c0"}',
            next_step="c1",
            duration_ms=1,
            cost={},
            state={},
            max_steps=0,
            entry_id=eid,
        )
        assert [Outcome.parse(x).code for x in scripts.execute(r, [claim, commit])] == ["RUN", "OK"]
    assert r.xlen(stream) == 6  # three acked entries, and the three next steps waiting
    lengths = {
        s.labels["queue"]: s.value
        for m in FleetCollector(r, client.keys, lease_ms=4000).collect()
        if m.name == "orchestrator_queue_length"
        for s in m.samples
    }
    if r.xinfo_groups(stream)[0].get("lag") is not None:  # Redis >= 7 reports the lag
        assert lengths["default"] == 3
    assert Supervisor(settings).tick(sweep=False).get("trimmed") == 3
    assert [Dispatch.model_validate(f).step for _, f in r.xrange(stream)] == ["c1"] * 3
