"""Workers whose wall clocks are an hour off: leases live on the Redis clock, so nothing changes.

The skew is made inside the worker process (``time.time`` shifted, monotonic clocks left alone,
as an NTP step would): libfaketime hangs Python 3.11's ``threading.Event.wait``.
"""

from __future__ import annotations

import signal
import sys

from orchestrator import Client
from tests.chaos.conftest import Fleet
from tests.chaos.invariants import check_completed_chain
from tests.helpers import wait_until
from tests.ledger import Ledger
from workers.testflows import chain, slow

SKEWED = """
import runpy, sys, time
offset = float(sys.argv[1])
real = time.time
time.time = lambda: real() + offset
time.time_ns = lambda: int((real() + offset) * 1e9)
sys.argv = ["orchestrator", *sys.argv[2:]]
runpy.run_module("orchestrator", run_name="__main__")
"""


def skewed(offset_s: float) -> tuple[str, ...]:
    return (sys.executable, "-c", SKEWED, str(offset_s))


def test_skewed_workers_neither_steal_long_steps_nor_strand_a_dead_ones(
    fleet: Fleet, client: Client, ledger: Ledger
) -> None:
    fleet.supervisor()
    ahead = fleet.worker("ahead", launcher=skewed(3600))
    behind = fleet.worker("behind", launcher=skewed(-3600))
    long_runs = [client.submit(slow, {"seconds": 2.0, "beat": True}, run_id=f"long{i}") for i in range(2)]
    chains = [client.submit(chain, {}, run_id=f"c{i}") for i in range(4)]
    for run in [*long_runs, *chains]:
        run.wait(timeout_s=30)
    assert [ledger.execution_counts()[f"long{i}:crawl"] for i in range(2)] == [1, 1]  # never stolen
    assert client.stats().get("redispatched", 0) == 0
    for i in range(4):
        check_completed_chain(client, ledger, f"c{i}")
    workers = {a.worker for i in range(4) for step in client.history(f"c{i}").steps for a in step.attempts}
    assert workers <= {"ahead", "behind"}
    for proc in (ahead, behind):
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    doomed = fleet.worker("doomed-ahead", faults="mid_step=kill@s1", launcher=skewed(3600))
    run = client.submit(chain, {}, run_id="killed")
    wait_until(lambda: doomed.popen.poll() is not None, timeout_s=30, what="the skewed worker killed itself")
    assert doomed.popen.returncode == -signal.SIGKILL
    fleet.worker("rescuer-behind", launcher=skewed(-3600))
    run.wait(timeout_s=30)
    assert check_completed_chain(client, ledger, "killed")["killed:s1"] == 2
