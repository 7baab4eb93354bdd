"""Partitions, lost replies and resets between our processes and Redis, through a fault proxy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from orchestrator import Client, Settings
from orchestrator.chaos.proxy import FaultProxy
from orchestrator.embedded import RedisServer
from tests.chaos.conftest import Fleet
from tests.chaos.invariants import check_completed_chain
from tests.helpers import wait_until
from tests.ledger import Ledger
from workers.testflows import chain, slow

pytestmark = pytest.mark.single_server


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


def outcomes(client: Client, run_id: str, step: str) -> list[tuple[str, str | None]]:
    (entry,) = [s for s in client.history(run_id).steps if s.step == step]
    return [(a.outcome, a.worker) for a in entry.attempts]


def test_a_partition_shorter_than_the_lease_costs_nothing(
    fleet: Fleet, client: Client, ledger: Ledger, proxy: FaultProxy, settings: Settings
) -> None:
    fleet.supervisor()
    fleet.worker("behind-proxy", redis_url=proxy.url)
    run = client.submit(slow, {"seconds": 1.5, "beat": True}, run_id="short")
    wait_until(lambda: len(ledger.fences("short:crawl")) == 1, timeout_s=20, what="crawl started")
    proxy.blackhole()
    time.sleep(settings.lease_s * 0.4)
    proxy.heal()
    run.wait(timeout_s=20)
    assert ledger.execution_counts()["short:crawl"] == 1
    assert [o for o, _ in outcomes(client, "short", "crawl")] == ["ok"]
    assert client.stats().get("redispatched", 0) == 0


def test_a_partition_longer_than_the_lease_hands_the_step_over_and_refuses_the_late_commit(
    fleet: Fleet, client: Client, ledger: Ledger, proxy: FaultProxy
) -> None:
    fleet.supervisor()
    fleet.worker("partitioned", redis_url=proxy.url)
    run = client.submit(slow, {"seconds": 1.2, "beat": True}, run_id="long")
    wait_until(lambda: len(ledger.fences("long:crawl")) == 1, timeout_s=20, what="crawl started")
    proxy.blackhole()
    fleet.worker("healthy")
    wait_until(lambda: len(ledger.fences("long:crawl")) == 2, timeout_s=20, what="taken over")
    time.sleep(1.5)  # the partitioned attempt finishes its work and tries to commit into the void
    proxy.heal()
    run.wait(timeout_s=30)
    first, second = ledger.fences("long:crawl")
    assert client.results("long")["long:crawl"].fence == second > first
    assert [worker for outcome, worker in outcomes(client, "long", "crawl") if outcome == "ok"] == ["healthy"]

    def refused() -> bool:  # the late attempt's commit was fenced, or it learned first and handed back
        return client.get("long").fenced >= 1 or "released" in [o for o, _ in outcomes(client, "long", "crawl")]

    wait_until(refused, timeout_s=10, what="the stale attempt refused or handed back")


def test_a_partitioned_supervisor_causes_no_reclaim_storm_after_it_heals(
    fleet: Fleet, client: Client, ledger: Ledger, proxy: FaultProxy, settings: Settings
) -> None:
    fleet.supervisor("sup-behind-proxy", redis_url=proxy.url)
    fleet.worker("w1")
    runs = [client.submit(slow, {"seconds": 2.0, "beat": True}, run_id=f"s{i}") for i in range(3)]
    wait_until(lambda: all(ledger.fences(f"s{i}:crawl") for i in range(3)), timeout_s=20, what="all started")
    proxy.blackhole()
    time.sleep(settings.lease_s * 2)
    proxy.heal()
    for run in runs:
        run.wait(timeout_s=20)
    assert {k: v for k, v in ledger.execution_counts().items()} == {f"s{i}:crawl": 1 for i in range(3)}
    assert client.stats().get("redispatched", 0) == 0


def test_a_submit_whose_reply_is_lost_still_creates_exactly_one_run(settings: Settings, proxy: FaultProxy) -> None:
    client = Client(settings.with_url(proxy.url))
    client.redis.ping()  # the connection exists, so the cut hits the submit itself
    proxy.cut_after_forward(1)
    run = client.submit(chain, {}, run_id="lost-reply")
    assert run.created  # the resent submit recognised its own request
    assert proxy.stats()["connections_cut"] == 1
    assert client.redis.xlen(client.keys.queue_of("default", "lost-reply").stream) == 1
    client.close()


def test_replies_lost_at_random_never_break_a_run(
    fleet: Fleet, client: Client, ledger: Ledger, proxy: FaultProxy
) -> None:
    """The worker's commands keep executing while their replies are lost: every one is resent."""
    fleet.supervisor()
    fleet.worker("unlucky", redis_url=proxy.url)
    runs = [client.submit(chain, {"sleep_s": 0.05}, run_id=f"c{i}") for i in range(8)]
    stop = threading.Event()

    def cut_now_and_then() -> None:
        while not stop.wait(0.15):
            proxy.cut_after_forward(1)

    cutter = threading.Thread(target=cut_now_and_then, daemon=True)
    cutter.start()
    try:
        for run in runs:
            run.wait(timeout_s=60)
    finally:
        stop.set()
        cutter.join()
    assert proxy.stats()["connections_cut"] >= 3
    for i in range(8):
        check_completed_chain(client, ledger, f"c{i}")
