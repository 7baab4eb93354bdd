"""Redis itself misbehaving: trimmed streams and restarts that lose data."""

from __future__ import annotations

from pathlib import Path

from orchestrator import Client, Settings
from orchestrator.chaos.checker import Checker
from orchestrator.chaos.ledger import Ledger
from orchestrator.embedded import RedisServer
from tests.chaos.conftest import Fleet
from tests.chaos.invariants import check_completed_chain
from tests.conftest import fast_settings
from tests.helpers import wait_until
from workers.testflows import chain


def test_runs_whose_queued_entries_were_trimmed_away_are_repaired_by_the_sweep(
    fleet: Fleet, client: Client, ledger: Ledger
) -> None:
    runs = [client.submit(chain, {}, run_id=f"t{i}") for i in range(5)]
    trimmed = [client.redis.xtrim(stream, maxlen=0) for stream in client.keys.streams("default")]
    assert sum(trimmed) == 5  # a misconfigured trimmer: the work is gone
    fleet.supervisor()
    fleet.worker("w")
    for run in runs:
        run.wait(timeout_s=30)
    for i in range(5):
        check_completed_chain(client, ledger, f"t{i}")
        assert [e.detail for e in client.history(f"t{i}").events if e.type == "repaired"] == ["no queued entry"]
    wait_until(lambda: client.stats().get("repaired") == 5, timeout_s=5, what="repairs counted")


def test_a_restart_without_persistence_loses_runs_and_the_checker_says_so(tmp_path: Path) -> None:
    """Redis without AOF forgets everything on a crash; nothing can repair that, but it must not
    go unnoticed: the chaos checker reports every accepted run that vanished (I1)."""
    server = RedisServer(tmp_path / "redis", appendfsync=None).start()
    try:
        settings: Settings = fast_settings(server.url)
        client = Client(settings)
        submitted = [client.submit(chain, {}, run_id=f"v{i}").run_id for i in range(3)]
        server.restart(hard=True)
        report = Checker(
            client, Ledger(client.redis, settings.namespace), max_crashes=3, recovery_bound_ms=10_000
        ).check(submitted, [])
        assert not report.ok and report.count("I1") == 3
        assert {v.detail for v in report.violations} == {"accepted by submit, but its record is gone"}
        client.close()
    finally:
        server.stop()
