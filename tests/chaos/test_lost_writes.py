"""Redis restarted from an older copy of its data: acknowledged writes lost, fencing must hold.

A machine crash under ``appendfsync everysec`` or a failover to a lagging replica brings Redis
back without its last writes while the workers that made them live on. ``RedisServer.snapshot``
and ``restore`` do that for real (BGSAVE, then ``kill -9`` and a start from the copy); the
ledger lives on a second server, so it keeps what the restored Redis forgot.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.chaos.checker import Checker
from orchestrator.chaos.ledger import Ledger
from orchestrator.chaos.runner import ChaosConfig, ChaosRun
from orchestrator.embedded import RedisServer
from orchestrator.keys import GROUP
from tests.chaos.conftest import Fleet
from tests.conftest import fast_settings
from tests.harness import installed_servers, start_worker
from tests.helpers import wait_until
from workers.testflows import held


@pytest.mark.parametrize("binary", installed_servers())
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_restore_brings_back_the_snapshot_and_later_writes_stay_durable(
    tmp_path: Path, binary: str, fsync: str
) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync=fsync, binary=binary).start()
    r = redis.Redis(port=server.port, decode_responses=True)
    try:
        r.set("before", "1")
        r.xadd("queue", {"step": "a"})
        r.xgroup_create("queue", "g", id="0")
        first = server.snapshot()
        r.set("after", "1")  # acknowledged, then lost with the restore
        r.xreadgroup("g", "w", {"queue": ">"})
        second = server.snapshot()
        assert first != second and first.exists() and second.exists()

        server.restore(first)
        r.connection_pool.disconnect()  # connections to the killed process
        assert r.get("before") == "1" and r.get("after") is None
        assert r.xpending("queue", "g")["pending"] == 0  # the delivery was forgotten too
        r.set("later", "1")
        server.restart(hard=True)  # kill -9: AOF is on again, nothing acknowledged is lost
        r.connection_pool.disconnect()
        assert (r.get("before"), r.get("after"), r.get("later")) == ("1", None, "1")

        server.restore(second)  # a second restore from the same server (the AOF it wrote is dropped)
        r.connection_pool.disconnect()
        assert (r.get("before"), r.get("after"), r.get("later")) == ("1", "1", None)
        assert r.xpending("queue", "g")["pending"] == 1
    finally:
        r.close()
        server.stop()


@contextmanager
def _servers(tmp_path: Path, fsync: str) -> Iterator[tuple[RedisServer, RedisServer]]:
    """The orchestrator's Redis (the one that loses writes) and the ledger's (which does not)."""
    server = RedisServer(tmp_path / "redis", appendfsync=fsync).start()
    ledger_server = RedisServer(tmp_path / "ledger", appendfsync="always").start()
    try:
        yield server, ledger_server
    finally:
        server.kill()
        ledger_server.kill()


def _just_after_a_heartbeat(client: Client, worker: str, timeout_s: float = 10.0) -> None:
    """Return right after ``worker``'s heartbeat thread has beaten (its score moved)."""
    first = client.redis.zscore(client.keys.workers, worker)
    wait_until(lambda: client.redis.zscore(client.keys.workers, worker) != first, timeout_s, 0.005, "a heartbeat")


def test_fencing_does_not_invert_after_redis_loses_writes(tmp_path: Path) -> None:
    """Hole 1: the same worker reads the same entry again after Redis forgot its delivery.

    The run is queued when the snapshot is taken; the worker claims it (fence f1) and runs the
    step; Redis is restored from the snapshot, forgetting delivery, claim and stash; the worker,
    still running that first attempt, reads the entry again and claims it (fence f2 > f1). The
    first attempt's later writes must then be refused and the second attempt's commit must be
    the one that persists: a receiver that keeps the highest token (f2) must agree with Redis.
    """
    with _servers(tmp_path, "always") as (server, ledger_server):
        # beats every 1.5 s: the worker reads the entry again well before its next beat, as in
        # production (beats every 1 s, reads at once), so the re-read is what it meets first
        settings = fast_settings(server.url, heartbeat_interval_s=1.5, lease_s=5.0, sweep_after_s=5.0)
        client = Client(settings)
        ledger_redis = redis.Redis.from_url(ledger_server.url, decode_responses=True)
        ledger = Ledger(ledger_redis, settings.namespace)
        fleet = Fleet(settings, tmp_path)
        try:
            client.redis.xgroup_create(client.keys.queue_of("default", "held-1").stream, GROUP, id="0", mkstream=True)
            run = client.submit(held, {"seconds": 6.0}, run_id="held-1")
            key = "held-1:hold"
            snapshot = server.snapshot()  # the run is queued, and nobody has read it yet
            fleet.procs.append(
                start_worker(settings, tmp_path, name="w", args=("--worker-id", "w"), ledger_url=ledger_server.url)
            )
            f1 = wait_until(lambda: ledger.fences(key), 20, what="the first execution")[0]
            wait_until(lambda: ledger.items().get(f"held-1:stash@{f1}"), 10, what="its first stash")
            _just_after_a_heartbeat(client, "w")
            server.restore(snapshot)  # kill -9, then back from the older copy: claim and stash forgotten
            restored_ms = int(time.time() * 1000)
            fleet.supervisor()
            run.wait(timeout_s=40)

            fences = ledger.fences(key)
            record = client.results("held-1")[key]
            assert len(fences) >= 2 and record.fence == max(fences) > f1, (
                f"{key} executed with fences {fences} (f1 = {f1}); the persisted record has fence "
                f"{record.fence}: an attempt Redis forgot committed over the live one"
            )
            f2 = record.fence
            assert client.state("held-1")["applied_by"] == [f2]  # exactly one application, the live attempt's
            assert [ex.saw for ex in ledger.executions() if ex.step == "after_hold"] == [[f2]]
            assert ledger.fenced_tokens() == {key: f2}  # the fenced receiver agrees with the record
            assert ledger.effects() == {key: "effect of held-1"}  # the deduping receiver applied it once
            assert ledger.effect_requests() == {key: len(fences)}
            # the first attempt's writes after the restore were refused: its closing stash was not
            # accepted (the ledger counts accepted stashes per fence), and nothing it wrote persisted
            assert ledger.items()[f"held-1:stash@{f1}"] == 1
            events = client.history("held-1").events
            assert not [e for e in events if e.fence == f1 and e.type == "ok"], events
            report = Checker(client, ledger, max_crashes=3, recovery_bound_ms=30_000).check(
                ["held-1"], [], restores_ms=[restored_ms]
            )
            assert report.ok and report.fencing_checked == 1, report.violations
        except BaseException:
            print(fleet.logs())
            raise
        finally:
            fleet.stop()
            client.close()
            ledger_redis.close()


def test_chaos_run_with_lost_writes_resubmits_vanished_runs_and_checks_fencing(tmp_path: Path) -> None:
    """The ``--lost-writes`` fault end to end through the chaos runner: two restores from an
    older copy under load; the runs they forgot are resubmitted and finish; fencing is checked."""
    with _servers(tmp_path, "everysec") as (server, ledger_server):
        config = ChaosConfig(
            duration_s=20,
            workers=2,
            supervisors=1,
            kills_per_minute=12,
            redis_restarts=0,
            supervisor_kills=0,
            lost_writes=2,
            malformed_every_s=8,
            in_flight=40,  # more than the workers' slots: entries wait in the queue when a snapshot is taken
            drain_timeout_s=90,
            seed=5,
        )
        run = ChaosRun(
            Settings(redis_url=server.url),
            config,
            server=server,
            ledger_url=ledger_server.url,
            logs=tmp_path / "logs",
            echo=print,
        )
        try:
            report = run.run()
        finally:
            run.close()
    assert report.faults["restore from an older copy"] == 2
    assert report.vanished >= 1  # runs submitted in the lost seconds: resubmitted, then finished
    assert report.fencing_checked >= 1  # committed effects checked against the fenced receiver
    assert report.runs["completed"] >= 30
    assert report.ok, report.violations
