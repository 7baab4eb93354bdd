"""``bench.rq_migration`` end to end at smoke sizes (4 chains of 3 steps of 300 ms, one kill per
system, giving up 20 s after it): the RQ ``depends_on`` chain and the workflow on the same kind
of RQ workers. What is asserted is the bookkeeping and what the workflow promises after a
``kill -9`` of an RQ worker and its work-horse (the step cut short runs again, no chain is lost);
never a timing, and nothing about RQ's chain, whose stall outlasts the smoke's give-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.bench.test_smoke import run_bench

CHAINS, STEPS = 4, 3


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: Path = tmp_path_factory.mktemp("rq_migration") / "rq_migration.json"
    return run_bench("rq_migration", out, "--systems", "rq,workflow")


@pytest.mark.timeout(180)
def test_every_setting_and_both_systems_are_recorded(doc: dict[str, Any]) -> None:
    settings = doc["settings"]
    assert settings["chains"] == CHAINS and settings["steps"] == STEPS and settings["repeat"] == 1
    assert settings["systems"] == ["rq", "workflow"] and settings["give_up_s"] == 20.0
    assert "-S rq.serializers.JSONSerializer" in settings["rq_worker"] and "depends_on" in settings["rq"]
    assert "executor=RQ('chain', timeout_s=60)" in settings["workflow"]
    assert doc["environment"]["rq"] and doc["environment"]["redis_appendfsync"] == "everysec"
    rows = {row["system"]: row for row in doc["summary"]["rows"]}
    assert set(rows) == {"rq", "workflow"}
    for row in rows.values():
        assert row["kills"] == 1 and row["in_flight"] >= 1  # the kill landed mid-step, by construction
        for field in ("rerun_s", "never_rerun", "finished_twice", "reexecutions", "lost_chains", "all_done_s"):
            assert field in row
        assert row["hop_ms"]["n"] == 3 * (STEPS - 1) and row["steps_per_s_before_kill"][0] > 0
    assert [t["system"] for t in doc["trials"]] == ["rq", "workflow"]


@pytest.mark.timeout(180)
def test_the_workflow_reruns_the_step_cut_short_and_loses_no_chain(doc: dict[str, Any]) -> None:
    row = next(row for row in doc["summary"]["rows"] if row["system"] == "workflow")
    assert row["lost_chains"] == [0] and row["never_rerun"] == 0 and row["all_done_s"][0] is not None
    assert row["rerun_s"]["n"] == row["in_flight"] and row["finished_twice"] == [0]
    (trial,) = [t for t in doc["trials"] if t["system"] == "workflow"]
    crashed = [e for e in trial["extra"]["events_after_kill"] if e["type"] == "crashed"]
    assert len(crashed) >= row["in_flight"]  # each step cut short came back as a crash of that step
    assert all(0 < e["after_kill_s"] <= row["rerun_s"]["max"] for e in crashed)


@pytest.mark.timeout(180)
def test_the_markdown_has_both_tables(doc: dict[str, Any]) -> None:
    text = doc["markdown"]
    assert "| system | kills | steps cut short | kill → re-run p50 / max s |" in text
    assert "| system | hop p50 / max ms (one chain alone) | steps/s before the kill | / ideal |" in text
    assert "| rq x2 |" in text and "| workflow x2 |" in text and "`crashed` events after the kills" in text
