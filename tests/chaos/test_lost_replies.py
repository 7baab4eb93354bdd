"""Calls that get no answer for longer than redis-py's own retries: the worker resends, no crash is counted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import Client, Settings
from orchestrator.chaos.proxy import FaultProxy, Mode
from orchestrator.embedded import RedisServer
from tests.chaos.conftest import Fleet
from tests.conftest import fast_settings
from tests.helpers import wait_until
from tests.ledger import Ledger
from workers.testflows import slow

pytestmark = pytest.mark.single_server

OUTAGE_S = 9.0


@pytest.fixture
def patient(redis_server: RedisServer) -> Settings:
    """A lease that outlives the outage: only the lost replies are under test, not the lease."""
    return fast_settings(redis_server.url, heartbeat_interval_s=1.0, lease_s=30.0, sweep_after_s=30.0)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


def test_a_commit_that_gets_no_answer_beyond_the_clients_retries_costs_no_crash(
    patient: Settings, tmp_path: Path, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis is unreachable for longer than redis-py keeps resending a command. The worker used
    to give up on its commit and leave the claim to lapse: a crash counted and the step ran
    again (three such and a healthy step was quarantined). It now resends the same commit until
    an answer comes (REPLAY if an earlier send had applied it), while the lease holds."""
    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", patient.plain_url())
    monkeypatch.setenv("ORCHESTRATOR_NAMESPACE", patient.namespace)
    client = Client(patient)
    ledger = Ledger(client.redis, patient.namespace)
    fleet = Fleet(patient, tmp_path)
    try:
        fleet.supervisor()
        fleet.worker("unlucky", redis_url=proxy.url)
        run = client.submit(slow, {"seconds": 1.0, "beat": True}, run_id="lost")
        wait_until(lambda: ledger.fences("lost:crawl"), timeout_s=20, what="crawl started")
        time.sleep(0.5)  # the step is about to return: its commit meets the outage
        proxy.for_seconds(proxy.reset, OUTAGE_S)  # every connection refused, then healed
        wait_until(lambda: proxy.mode is Mode.PASS, timeout_s=OUTAGE_S + 5, what="the outage is over")
        run.wait(timeout_s=30)
        info = client.get("lost")
        assert ledger.execution_counts() == {"lost:crawl": 1}  # never run again
        assert info.crashes == 0 and client.stats().get("crashes", 0) == 0
        assert [e.type for e in client.events("lost")].count("ok") == 1
        assert "commit got no answer; sending it again" in fleet.logs()  # the outage did hit the commit
    finally:
        fleet.stop()
        client.close()
