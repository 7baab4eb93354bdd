"""Supervisor scans: a dead worker's step is found even behind hundreds of live long steps."""

from __future__ import annotations

import redis

from orchestrator import Client, Settings, Supervisor, scripts
from orchestrator.codec import Dispatch
from orchestrator.fleet_metrics import FleetCollector
from orchestrator.keys import GROUP
from orchestrator.store import Claimed, Outcome
from tests.ops import partition_mates
from workers.testflows import chain


def test_a_dead_workers_claim_is_redispatched_at_the_first_tick_whatever_the_live_ones(
    client: Client, settings: Settings, r: redis.Redis
) -> None:
    """600 steps held by a live worker, one by a dead one: the supervisor reads only the dead
    worker's entries (liveness is per worker), so it re-dispatches that one at its first tick
    and never touches the live ones."""
    ids = partition_mates(client.keys, "run000", "run", 601)  # one partition: one stream
    for run_id in ids:
        client.submit(chain, {}, run_id=run_id)
    stream = client.keys.queue_of("default", ids[0]).stream
    partition = client.keys.partition_of(ids[0])
    r.xgroup_create(stream, GROUP, id="0")

    def read(consumer: str, count: int) -> list[tuple[str, Dispatch]]:
        rows = r.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
        return [(eid, Dispatch.model_validate(f)) for _, entries in rows for eid, f in entries]

    held = {"live": read("live", 600), "dead": read("dead", 1)}
    beats = [client.store.alive(partition=partition, worker=w, lease_ms=60_000, cancels_seen="") for w in held]
    scripts.execute(r, beats)
    calls = [
        client.store.claim(
            dispatch=d, queue="default", entry_id=eid, token=f"{w}:{eid}", worker=w, max_crashes=3, max_steps=0
        )
        for w, entries in held.items()
        for eid, d in entries
    ]
    assert {Claimed.parse(x).code for x in scripts.execute(r, calls)} == {"RUN"}
    r.hdel(client.keys.part(partition).alive, "dead")  # its deadline passed
    supervisor = Supervisor(settings)
    assert supervisor.tick(sweep=False).get("redispatched", 0) == 1
    ((dead_eid, dead),) = held["dead"]
    assert r.hget(client.keys.run(dead.run).run, "dispatch") != dead_eid
    live = r.xpending_range(stream, GROUP, "-", "+", 1000, consumername="live")
    assert len(live) == 600 and {p["times_delivered"] for p in live} == {1}
    assert supervisor.tick(sweep=False).get("redispatched", 0) == 0
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
    beat = client.store.alive(partition=client.keys.partition_of(ids[0]), worker="w", lease_ms=60_000, cancels_seen="")
    scripts.execute(r, [beat])
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
