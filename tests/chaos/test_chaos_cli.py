"""`orchestrator chaos` end to end: real processes, real kill -9, real Redis restarts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import Settings
from orchestrator.chaos.checker import Report, Violation
from orchestrator.cli.chaos import render
from tests.harness import REPO, process_env


def chaos(settings: Settings, tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = process_env(settings)
    del env["ORCHESTRATOR_REDIS_URL"]  # the chaos run starts (and restarts) its own Redis
    del env["ORCHESTRATOR_NAMESPACE"]
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "chaos", "--chaos-dir", str(tmp_path / "chaos"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_chaos_smoke_loses_nothing_and_does_nothing_twice(settings: Settings, tmp_path: Path, fsync: str) -> None:
    result = chaos(
        settings,
        tmp_path,
        "--duration",
        "12",
        "--workers",
        "2",
        "--kills-per-minute",
        "40",
        "--redis-restarts",
        "1",
        "--fsync",
        fsync,
        "--seed",
        "7",
        "--rq-workers",
        "3",
        "-o",
        "json",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"] and report["lost"] == 0 and report["overwritten_or_rerun_after_commit"] == 0
    assert report["duplicate_effects"] == 0 and report["violations"] == []
    faults = report["faults"]
    kills = (
        faults.get("worker kill -9", 0)
        + faults.get("rq worker + work-horse kill -9", 0)
        + faults.get("rq work-horse kill -9", 0)
    )
    assert kills >= 4 and faults["redis kill -9 + restart"] == 1  # a kill takes one of ours or an RQ worker
    # an RQ worker or its work-horse got kill -9 (3 of the 5 candidates at each of ~8 kills)
    assert kills > faults.get("worker kill -9", 0)
    assert report["runs"]["completed"] >= 50 and report["recovery_ms"]["n"] >= 1


def test_lost_writes_are_refused_on_a_redis_the_chaos_run_did_not_start(settings: Settings, tmp_path: Path) -> None:
    """A restore from an older copy destroys every write since: never on the user's Redis."""
    (tmp_path / "chaos").mkdir()
    (tmp_path / "chaos" / "earlier.log").write_text("kept")
    env = process_env(settings)
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "chaos", "--chaos-dir", str(tmp_path / "chaos"), "--lost-writes", "1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "--lost-writes" in result.stderr and "Unset ORCHESTRATOR_REDIS_URL and REDIS_URL" in result.stderr
    assert (tmp_path / "chaos" / "earlier.log").exists()  # refused before anything was touched


def test_the_report_shows_fencing_vanished_runs_and_restores() -> None:
    report = Report(vanished=3, fencing_checked=12, committed_steps=10, re_executions=4)
    report.runs.update(completed=20)
    report.faults.update({"restore from an older copy": 2})
    report.violations.append(Violation("I9", "r1", "r1:send: the fenced receiver kept token 7, but ..."))
    text = render(report, "chaos run")
    assert "lost 0, vanished (resubmitted) 3" in text
    assert (
        "fencing     effects checked against the persisted fence 12, receiver disagrees with the persisted record 1"
        in text
    )
    assert "restore from an older copy 2" in text and "or forgotten by a restore" in text
    assert "  I9  BROKEN x1 a receiver keeping the highest fencing token agrees with the persisted record" in text
    assert "  I10 ok     no sleeping run woke, and no step after a sleep started, before its due time" in text
    assert "sleeps      0, woke or started early 0" in text
    assert "  I11 ok     no run expired before its deadline" in text
    assert "  I12 ok     no signal lost or applied twice, no wait timed out early" in text
    assert "  I13 ok     children: none started twice, all done before their parent, none left by a cancelled" in text
    assert "  I14 ok     map items: each once, fanned in once in item order, parallelism kept" in text
    assert "  I15 ok     concurrency limit: never more holders alive than it allows" in text
    assert "permits     most held at once 0 (limit 3), starts that waited in line 0, violations 0" in text
    assert "children    started 0, parents cancelled while they ran 0, violations 0" in text
    assert "signals     sent 0 (resends included), delivered 0, waits timed out 0, lost or applied twice 0" in text
    data = report.to_dict()
    assert (data["fencing_violations"], data["fencing_checked"], data["vanished"]) == (1, 12, 3)
