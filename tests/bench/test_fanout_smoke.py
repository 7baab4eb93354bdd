"""``bench.fanout`` end to end at smoke sizes: a map of no-op items against no-op chains on one
fleet, and a map of slow items under a parallelism limit. What is asserted is bookkeeping and
physics (every item committed once, the ratio made of the figures it claims, the limit held and
really used, no faster than the ideal), never a timing threshold."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.bench.test_smoke import run_bench

ITEMS, CHAINS, STEPS = 60, 10, 5
SLOW_ITEMS, ITEM_S, PARALLELISM = 12, 0.2, 4


@pytest.fixture(scope="module")
def fanout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fanout") / "fanout.json"
    sizes = ["--items", str(ITEMS), "--chains", str(CHAINS), "--steps", str(STEPS), "--slow-items", str(SLOW_ITEMS)]
    return run_bench("fanout", out, *sizes, "--item-s", str(ITEM_S), "--parallelism", str(PARALLELISM))


@pytest.mark.timeout(180)
def test_every_item_commits_once_and_every_chain_step_is_counted(fanout: dict[str, Any]) -> None:
    summary, phases = fanout["summary"], fanout["phases"]
    assert summary["items"] == ITEMS and summary["items_committed"] == [ITEMS] * summary["maps"]
    for m in phases["maps"]:
        assert m["items"] == m["committed"] == m["attempts"] == ITEMS  # one attempt each: no retry, no re-run
    assert len(phases["chains"]) == summary["maps"] + 1  # a baseline before and after every map
    assert all(c["steps"] == CHAINS * STEPS for c in phases["chains"])
    assert phases["slow"]["committed"] == SLOW_ITEMS
    assert fanout["counters"]["map_items"] >= ITEMS * summary["maps"] + SLOW_ITEMS


@pytest.mark.timeout(180)
def test_the_ratios_are_made_of_the_figures_reported(fanout: dict[str, Any]) -> None:
    summary = fanout["summary"]
    assert summary["items_per_s"] > 0 and summary["steps_per_s"] > 0
    assert summary["ratio_items_to_steps"] == pytest.approx(summary["items_per_s"] / summary["steps_per_s"])
    assert summary["ratio_commands"] == pytest.approx(summary["commands_per_item"] / summary["commands_per_step"])
    assert summary["commands_per_item"] > 0 and summary["redis_cpu_us_per_item"] > 0
    assert summary["submit_to_first_item_start_ms"] >= 0 and summary["fan_in_ms"] >= 0
    for m in fanout["phases"]["maps"]:
        assert m["items_per_s"] == pytest.approx(m["items"] / m["wall_s"])
        assert m["wall_s"] * 1000 >= m["submit_to_first_item_start_ms"] + m["fan_in_ms"]


@pytest.mark.timeout(180)
def test_parallelism_holds_is_really_used_and_physics_is_not_beaten(fanout: dict[str, Any]) -> None:
    slow = fanout["summary"]["slow"]
    assert 2 <= slow["most_running"] <= PARALLELISM  # it ran in parallel, never over the limit
    assert slow["most_started_uncommitted"] <= PARALLELISM and slow["parallelism_held"]
    ideal = math.ceil(SLOW_ITEMS / PARALLELISM) * ITEM_S
    assert slow["ideal_s"] == pytest.approx(ideal)
    assert slow["wall_s"] >= ideal and slow["ratio_to_ideal"] == pytest.approx(slow["wall_s"] / ideal)


@pytest.mark.timeout(180)
def test_the_markdown_has_the_tables(fanout: dict[str, Any]) -> None:
    text = fanout["markdown"]
    assert "| phase | size | wall s | per s |" in text and "median map item / median chain step" in text
    assert "| items | at once (by) | wall s | ideal s |" in text and "VIOLATION" not in text


def test_the_sweep_counts_overlaps_and_not_touching_intervals() -> None:
    from bench.fanout import most_at_once

    assert most_at_once([(0, 10), (10, 20), (20, 30)]) == 1  # one ends the ms the next starts
    assert most_at_once([(0, 10), (5, 15), (9, 12), (14, 20)]) == 3
    assert most_at_once([]) == 0


@pytest.mark.timeout(180)
def test_a_concurrency_limit_holds_the_same_map_started_all_at_once(fanout: dict[str, Any]) -> None:
    limited = fanout["summary"]["limited"]
    assert limited["committed"] == SLOW_ITEMS and limited["parallelism"] == PARALLELISM
    assert 2 <= limited["most_running"] <= PARALLELISM and limited["parallelism_held"]
    assert limited["permit_waits"] >= SLOW_ITEMS - PARALLELISM  # the others waited in line
    assert limited["wall_s"] < 30  # woken as permits were given back, not at their poll (permit_poll_s: 30 s)
    assert limited["wall_s"] >= limited["ideal_s"] == pytest.approx(math.ceil(SLOW_ITEMS / PARALLELISM) * ITEM_S)
    assert "concurrency limit" in fanout["markdown"]
