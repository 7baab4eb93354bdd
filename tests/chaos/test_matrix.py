"""The full chaos matrix (pytest -m slow): every crash point, many times, and long chaos runs.

Not part of the default run (about 10 minutes on 2 cores); `orchestrator chaos --duration N`
runs the same checks against any deployment.
"""

from __future__ import annotations

import json
import random

import pytest

from orchestrator import Client, Settings
from tests.chaos.conftest import Fleet
from tests.chaos.invariants import check_completed_chain
from tests.chaos.test_chaos_cli import chaos
from tests.helpers import wait_until
from tests.ledger import Ledger
from workers.testflows import chain

pytestmark = pytest.mark.slow
POINTS = ["after_claim", "mid_step", "before_commit", "after_persist_before_ack"]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("round_", range(5))
def test_every_crash_point_at_random_hits(
    fleet: Fleet, client: Client, ledger: Ledger, point: str, round_: int
) -> None:
    rng = random.Random(f"{point}:{round_}")
    fleet.supervisor()
    doomed = fleet.worker("doomed", faults=f"{point}=kill#{rng.randint(1, 25)}")
    fleet.worker("survivor")
    runs = [client.submit(chain, {"sleep_s": 0.01}, run_id=f"m{i}") for i in range(6)]
    wait_until(
        lambda: doomed.popen.poll() is not None or all(r.status() == "completed" for r in runs),
        timeout_s=60,
        what="the crash point fired or the runs finished",
    )
    for run in runs:
        run.wait(timeout_s=60)
    for i in range(6):
        check_completed_chain(client, ledger, f"m{i}")


@pytest.mark.timeout(900)  # two minutes of chaos, then the checks: past the default 120 s
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_two_minutes_of_chaos(settings: Settings, tmp_path, fsync: str) -> None:  # type: ignore[no-untyped-def]
    result = chaos(settings, tmp_path, "--duration", "120", "--fsync", fsync, "-o", "json", timeout=900)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], report["violations"]
    assert report["faults"]["worker kill -9"] >= 40 and report["faults"]["redis kill -9 + restart"] == 2
