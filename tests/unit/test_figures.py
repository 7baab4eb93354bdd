"""The fleet's figures from the stats-detail fields, without Redis (orchestrator/figures.py)."""

from __future__ import annotations

import pytest

from orchestrator.figures import (
    apportion,
    compound,
    known_workflows,
    parse_detail,
    step_order,
    step_positions,
    zero_fields,
)


def test_observed_completion_counts_each_run_by_its_final_outcome() -> None:
    """Three runs completed, one of them after failing and being retried; one failed for good."""
    detail = parse_detail({"runs|wf|completed": "3", "runs|wf|failed": "2", "runs|wf|retried": "1"})
    figures = compound(detail)
    assert figures["observed"]["wf"] == 0.75  # 3 / (3 + (2 - 1)), not 3 / 5
    assert figures["runs"]["wf"]["failed_final"] == 1


def test_a_retried_run_still_in_flight_is_neither_completed_nor_failed() -> None:
    detail = parse_detail({"runs|wf|failed": "1", "runs|wf|retried": "1", "runs|wf|submitted": "1"})
    assert compound(detail)["observed"] == {}  # no run has ended: no figure rather than 0 or NaN
    detail = parse_detail({"runs|wf|failed": "2", "runs|wf|retried": "1"})
    assert compound(detail)["observed"] == {"wf": 0.0}


def test_steps_come_in_the_order_workers_announced_then_by_name() -> None:
    announced = step_positions({"wf": ["zeta", "alpha", "mid"]})
    assert announced == {"order|wf|zeta": 1, "order|wf|alpha": 2, "order|wf|mid": 3}
    raw = {field: "0" for field in zero_fields({"wf": ["zeta", "alpha", "mid"]})}
    raw |= {field: str(position) for field, position in announced.items()}
    raw["steps|wf|old|ok"] = "4"  # a step no worker announces any more
    raw["steps|other|b|ok"] = "1"  # a workflow whose workers predate announcing the order
    raw["steps|other|a|ok"] = "1"
    detail = parse_detail(raw)
    assert step_order(detail) == {"wf": ["zeta", "alpha", "mid", "old"], "other": ["a", "b"]}
    assert known_workflows(detail) == {"other": ["a", "b"], "wf": ["zeta", "alpha", "mid", "old"]}


def test_fields_that_are_not_numbers_are_skipped() -> None:
    assert parse_detail({"label|wf": "not a number", "runs|wf|completed": "1"})["runs"][("wf", "completed")] == 1


@pytest.mark.parametrize(
    ("estimates", "total", "expected"),
    [
        ({("a",): 1.0, ("b",): 2.0}, 3, {("a",): 1.0, ("b",): 2.0}),  # exact counts stay
        ({("a",): 1499.5, ("b",): 1500.5}, 3000, {("a",): 1500.0, ("b",): 1500.0}),
        ({("a",): 10 / 3, ("b",): 10 / 3, ("c",): 10 / 3}, 10, {("a",): 4.0, ("b",): 3.0, ("c",): 3.0}),
        ({}, 0, {}),
    ],
)
def test_estimates_round_to_whole_runs_that_add_up(
    estimates: dict[tuple[str, ...], float], total: int, expected: dict[tuple[str, ...], float]
) -> None:
    rounded = apportion(estimates, total)
    assert sum(rounded.values()) == total
    assert rounded == expected
