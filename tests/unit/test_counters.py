"""Counters kept per partition are read as one: ``counters.add_up``."""

from __future__ import annotations

from orchestrator.counters import add_up


def test_integers_add_up_as_integers_and_fractions_as_floats() -> None:
    total = add_up([{"steps_ok": "3", "cost|wf|s|usd": "0.25"}, {"steps_ok": "4", "cost|wf|s|usd": "1"}, {}])
    assert total == {"steps_ok": "7", "cost|wf|s|usd": "1.25"}


def test_a_field_in_one_hash_only_is_kept_and_negative_counts_add() -> None:
    assert add_up([{"order|wf|s1": "0"}, {"fenced": "-1"}, {"fenced": "2"}]) == {"order|wf|s1": "0", "fenced": "1"}


def test_a_value_that_is_not_a_number_keeps_its_first_value() -> None:
    assert add_up([{"note": "a"}, {"note": "b"}]) == {"note": "a"}
