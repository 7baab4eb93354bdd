"""SIGTERM drains a worker: in-flight steps finish within the grace period or are handed back."""

from __future__ import annotations

import signal
import time

from orchestrator import Client
from tests.chaos.conftest import Fleet
from tests.chaos.invariants import check_completed_chain
from tests.helpers import wait_until
from tests.ledger import Ledger
from workers.testflows import chain


def test_sigterm_lets_the_running_step_finish_and_takes_no_new_one(
    fleet: Fleet, client: Client, ledger: Ledger
) -> None:
    fleet.supervisor()
    worker = fleet.worker("draining")
    run = client.submit(chain, {"sleep_s": 0.4}, run_id="d")
    wait_until(lambda: "d:s0" in ledger.execution_counts(), timeout_s=20, what="s0 running")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout_s=20) == 0
    info = client.get("d")
    assert (info.step, info.steps_done, info.worker) == ("s1", 1, None)  # s0 committed, s1 not started
    assert "draining" in worker.output() and "worker stopped" in worker.output()
    fleet.worker("next")
    run.wait(timeout_s=40)
    assert set(check_completed_chain(client, ledger, "d").values()) == {1}


def test_a_step_still_running_when_the_grace_ends_is_handed_back_not_crashed(
    fleet: Fleet, client: Client, ledger: Ledger
) -> None:
    fleet.supervisor()
    worker = fleet.worker("short-grace", args=("--drain-grace-s", "0.3"))
    client.submit(chain, {"sleep_s": 1.5}, run_id="g")
    wait_until(lambda: "g:s0" in ledger.execution_counts(), timeout_s=20, what="s0 running")
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout_s=20) == 0
    assert time.monotonic() - started < 5
    fleet.worker("next")
    wait_until(lambda: client.get("g").steps_done >= 1, timeout_s=30, what="s0 done by the next worker")
    client.cancel("g")
    assert ledger.execution_counts()["g:s0"] == 2
    (s0,) = [s for s in client.history("g").steps if s.step == "s0"]
    assert [a.outcome for a in s0.attempts] == ["released", "ok"]
    assert client.stats().get("crashes", 0) == 0


def test_a_second_signal_stops_at_once_and_the_supervisor_recovers_the_step(
    fleet: Fleet, client: Client, ledger: Ledger
) -> None:
    fleet.supervisor()
    worker = fleet.worker("impatient")
    client.submit(chain, {"sleep_s": 1.5}, run_id="i")
    wait_until(lambda: "i:s0" in ledger.execution_counts(), timeout_s=20, what="s0 running")
    worker.signal(signal.SIGTERM)
    time.sleep(0.2)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout_s=10) == 0
    assert "stopping now" in worker.output()
    fleet.worker("next")
    wait_until(lambda: client.get("i").steps_done >= 1, timeout_s=30, what="s0 recovered")
    (s0,) = [s for s in client.history("i").steps if s.step == "s0"]
    assert [a.outcome for a in s0.attempts] == ["crashed", "ok"]
    client.cancel("i")


def test_a_step_chained_to_a_worker_that_is_stopping_is_handed_back_not_run(
    fleet: Fleet, client: Client, ledger: Ledger
) -> None:
    """s0's commit claims s1 for its worker (nothing else waits); SIGTERM lands while that
    commit's reply is being handled (the worker pauses right after it): s1 is given back,
    not run and not counted as a crash, and the next worker runs it once."""
    fleet.supervisor()
    worker = fleet.worker("chaining", faults="after_persist_before_ack=sleep:2@s0")
    run = client.submit(chain, {}, run_id="c")
    wait_until(lambda: client.get("c").steps_done >= 1, timeout_s=20, what="s0 committed")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout_s=20) == 0
    assert "c:s1" not in ledger.execution_counts()
    fleet.worker("next")
    run.wait(timeout_s=40)
    assert set(check_completed_chain(client, ledger, "c").values()) == {1}
    (s1,) = [s for s in client.history("c").steps if s.step == "s1"]
    assert [a.outcome for a in s1.attempts] == ["released", "ok"]
    assert client.stats().get("crashes", 0) == 0
