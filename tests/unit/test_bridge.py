"""The RQ bridge's pure parts: the RQ job id of a claim, the executor's checks, and when a work-horse
that stopped without an outcome timed out rather than crashed."""

from __future__ import annotations

import pytest
from rq.job import validate_job_id

from orchestrator.bridge import RQ
from orchestrator.bridge.executor import job_id
from orchestrator.bridge.watch import timed_out
from orchestrator.errors import DefinitionError


def test_a_claims_job_id_is_stable_per_claim_and_one_rq_accepts() -> None:
    key = "run:with/odd chars=+@:step"  # what a run id may hold; RQ takes only [A-Za-z0-9_-]
    first = job_id("orch", key, 1765000000000)
    validate_job_id(first)
    assert first == job_id("orch", key, 1765000000000)  # a resend of the same claim: the same job
    assert first != job_id("orch", key, 1765000000001)  # the next claim: a job of its own
    assert first != job_id("other", key, 1765000000000)  # two namespaces on one Redis


@pytest.mark.parametrize(
    ("alive_s", "stopped", "expected"),
    [
        (2.9, False, False),  # killed before its time, noticed after it: a crash
        (3.0, False, True),  # still beating at its timeout: RQ's backstop killed it
        (0.5, True, True),  # the watch stopped it for its time
    ],
)
def test_a_horse_stopped_without_an_outcome_timed_out_only_when_its_time_was_up(
    alive_s: float, stopped: bool, expected: bool
) -> None:
    assert timed_out(alive_s, stopped, timeout_s=3.0) is expected


def test_bad_executor_values_are_refused_naming_the_field_and_what_is_expected() -> None:
    with pytest.raises(DefinitionError, match=r"RQ queue='a b' is invalid: expected 1-100 characters"):
        RQ("a b")
    with pytest.raises(DefinitionError, match=r"RQ timeout_s=90000 is invalid: expected 1 to 86400 seconds"):
        RQ("tools", timeout_s=90000)
    with pytest.raises(DefinitionError, match=r"RQ result_ttl_s=0 is invalid: expected a whole number >= 1"):
        RQ("tools", result_ttl_s=0)
