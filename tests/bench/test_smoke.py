"""The benchmarks run end to end at smoke sizes (ours and the raw loop only; the peers need the
bench extras), and what they measure about durability holds: every run completes, nothing is
lost, nothing re-executes without a fault. Timings are printed by the benchmarks, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def bench(name: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    summary: dict[str, Any] = run_bench(name, tmp_path / f"{name}.json", *args)["summary"]
    return summary


def run_bench(name: str, out: Path, *args: str) -> dict[str, Any]:
    """``python -m bench.<name> --quick --json OUT ARGS``: its JSON document, checked for the basics."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick", "--json", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["markdown"] in done.stdout and doc["environment"]["redis_server"]
    return doc


@pytest.mark.timeout(180)
def test_throughput_runs_every_chain_of_ours_and_the_raw_loop_to_completion(tmp_path: Path) -> None:
    summary = bench("throughput", tmp_path, "--peers", "", "--runs", "20", "--paced-runs", "5")
    rows = {row["config"]: row for row in summary["load"]}
    assert set(rows) == {"raw batched", "raw unbatched", "ours x1", "ours x2"}
    for row in rows.values():
        assert row["completed_runs"] == [20] and row["steps_per_s"] > 0
    assert {row["chains"] for row in summary["paced"]} == {5}
    assert len(summary["targets"]) == 4


@pytest.mark.timeout(180)
def test_growth_measures_both_shapes_and_every_update_size(tmp_path: Path) -> None:
    summary = bench("growth", tmp_path, "--length", "100", "--window", "10", "--sizes", "1024,10240")
    assert {row["shape"] for row in summary["overhead"]} == {"chain", "loop"}
    assert {(row["size"], row["shape"]) for row in summary["memory"]} == {
        (size, shape) for size in (1024, 10240) for shape in ("append", "replace")
    }
    appended = [row for row in summary["memory"] if row["shape"] == "append"]
    assert all(row["snapshot_over_ours"] > 1 for row in appended)  # snapshots of a growing state cost more


@pytest.mark.timeout(180)
def test_recovery_after_kill_9_loses_no_chain_and_reruns_every_step_cut_short(tmp_path: Path) -> None:
    summary = bench("recovery", tmp_path, "--peers", "", "--chains", "20")
    (ours,) = summary["rows"]
    assert ours["kills"] == 1 and ours["lost_chains"] == [0] and ours["never_rerun"] == 0


@pytest.mark.timeout(180)
def test_the_compound_table_completes_every_run_and_reexecutes_only_what_failed(tmp_path: Path) -> None:
    summary = bench("compound", tmp_path, "--runs", "10")
    for row in summary["rows"]:
        assert row["ours_completed"] == 1.0 and row["ours_failed"] == 0
        assert row["runs_reexecuted_more_than_faults"] == 0
    assert all(goal["met"] for goal in summary["targets"])
