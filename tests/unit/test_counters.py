"""Counters kept per partition are read as one: ``counters.add_up``."""

from __future__ import annotations

from orchestrator.counters import add_up, with_derived


def test_integers_add_up_as_integers_and_fractions_as_floats() -> None:
    total = add_up([{"steps_ok": "3", "cost|wf|s|usd": "0.25"}, {"steps_ok": "4", "cost|wf|s|usd": "1"}, {}])
    assert total == {"steps_ok": "7", "cost|wf|s|usd": "1.25"}


def test_a_field_in_one_hash_only_is_kept_and_negative_counts_add() -> None:
    assert add_up([{"order|wf|s1": "0"}, {"fenced": "-1"}, {"fenced": "2"}]) == {"order|wf|s1": "0", "fenced": "1"}


def test_a_value_that_is_not_a_number_keeps_its_first_value() -> None:
    assert add_up([{"note": "a"}, {"note": "b"}]) == {"note": "a"}


def test_derived_counters_are_the_sums_of_their_detail_fields() -> None:
    """steps_ok, runs_submitted and runs_completed are summed from the detail hash; a stale value
    written by an older version under the same name is replaced, never added to."""
    detail = {
        "steps|wf|a|ok": "3",
        "steps|wf|b|ok": "4",
        "steps|wf|a|fenced": "9",
        "runs|wf|submitted": "2",
        "runs|other|submitted": "1",
        "runs|wf|failed": "5",
        "order|wf|a": "0",
    }
    out = with_derived({"steps_ok": "100", "fenced": "9"}, detail)
    assert out == {"steps_ok": "7", "fenced": "9", "runs_submitted": "3"}
    assert with_derived({}, {}) == {}
