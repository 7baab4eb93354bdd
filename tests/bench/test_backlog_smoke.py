"""The backlog benchmark end to end at smoke sizes, and what it shows about complexity and
durability: a lost run is repaired in one pass, a pass looks only at the runs that need a
look, purge empties the finished-run indexes, reclaim re-dispatches exactly the lapsed claims.
Timings are printed by the benchmark, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SIZES = (200, 400)
LOST = 5
LAPSED = 3


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("backlog") / "backlog.json"
    sizes = ",".join(str(n) for n in SIZES)
    sizing = ["--sizes", sizes, "--lost", str(LOST), "--lapsed", str(LAPSED), "--max-passes", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.backlog", "--quick", *sizing, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["markdown"] in done.stdout and result["environment"]["redis_server"]
    return result


def redis_7(doc: dict[str, Any]) -> bool:
    return int(doc["environment"]["redis_server"].split(".")[0]) >= 7


def sweeps(doc: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    rows = [row for row in doc["summary"]["sweep"] if row["scenario"] == scenario]
    assert [row["n"] for row in rows] == list(SIZES)
    return rows


@pytest.mark.timeout(120)
def test_runs_trimmed_from_the_front_are_repaired_in_one_pass_that_looks_only_at_them(doc: dict[str, Any]) -> None:
    for row in sweeps(doc, "trim"):
        assert row["lost"] == row["needed"] == LOST
        assert row["passes"] == 1 and row["looked_at"] == LOST and row["repaired"] == LOST and row["left"] == 0
        assert row["idle_looked_at"] == 0  # the healthy backlog costs no look at all
        assert row["old_pass"]["codes"] == {"QUEUED": min(row["n"], 500)}  # the proxy touched only healthy runs


@pytest.mark.timeout(120)
def test_an_entry_deleted_ahead_of_the_group_is_repaired_in_one_pass_on_redis_7(doc: dict[str, Any]) -> None:
    for row in sweeps(doc, "xdel"):
        assert row["lost"] == LOST and row["idle_looked_at"] == 0
        if redis_7(doc):  # the stream's max-deleted-entry-id: the runs before it are scanned in Redis,
            # and only those whose entry is gone are looked at
            assert row["needed"] == LOST == row["looked_at"]
            assert row["passes"] == 1 and row["repaired"] == LOST and row["left"] == 0
        else:  # 6.2 does not say what was deleted: noticed once the group passes the entry
            assert row["needed"] == row["looked_at"] == row["repaired"] == 0 and row["passes"] is None


@pytest.mark.timeout(120)
def test_a_deleted_stream_has_every_run_repaired(doc: dict[str, Any]) -> None:
    for row in sweeps(doc, "drop"):
        assert row["lost"] == row["needed"] == row["looked_at"] == row["repaired"] == row["n"]
        assert row["passes"] == 1 and row["left"] == 0 and row["idle_looked_at"] == 0


@pytest.mark.timeout(120)
def test_reclaim_redispatches_exactly_the_lapsed_claims(doc: dict[str, Any]) -> None:
    rows = doc["summary"]["reclaim"]
    assert [row["n"] for row in rows] == list(SIZES)
    for row in rows:
        assert row["lapsed"] == row["live"] == LAPSED
        assert row["redispatched"] == row["verified"] == LAPSED and row["live_untouched"] == LAPSED
        assert all(not counts.get("redispatched") for counts in row["idle_counts"])


@pytest.mark.timeout(120)
def test_purge_empties_both_finished_run_indexes_and_deletes_every_run(doc: dict[str, Any]) -> None:
    rows = doc["summary"]["purge"]
    assert [row["n"] for row in rows] == list(SIZES)
    for row in rows:
        assert row["done"]["runs"] == row["n"] and row["done"]["left"] == 0
        assert row["dead"]["runs"] == row["failed"] == row["n"] // 10 and row["dead"]["left"] == 0
        assert row["run_keys_left"] == 0
        assert row["raw"]["runs"] == row["n"]  # the baseline deleted as many
