"""`orchestrator chaos` end to end: real processes, real kill -9, real Redis restarts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import Settings
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
        "-o",
        "json",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"] and report["lost"] == 0 and report["overwritten_or_rerun_after_commit"] == 0
    assert report["duplicate_effects"] == 0 and report["violations"] == []
    faults = report["faults"]
    assert faults["worker kill -9"] >= 4 and faults["redis kill -9 + restart"] == 1
    assert report["runs"]["completed"] >= 50 and report["recovery_ms"]["n"] >= 1
