"""``bench.ratelimit`` end to end at smoke sizes: the rate-limit script asked by threads, then a
limited step through workers. What is asserted is the promise and bookkeeping (no window of the
script's grants over the bound, the rate reached but not passed, every run completed with its
step run once, the limit really made steps wait, the ratios made of the figures they claim),
never a timing threshold beyond the README's own bound for the starts (a promote late)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bench.test_smoke import run_bench

RATE, CALLERS, DURATION_S, RUNS = 20.0, 8, 3.0, 40
SLACK = 0.05  # the achieved rate may read a little over the limit: whole-ms script clock


@pytest.fixture(scope="module")
def ratelimit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ratelimit") / "ratelimit.json"
    sizes = ["--rate", str(RATE), "--callers", str(CALLERS), "--duration-s", str(DURATION_S), "--runs", str(RUNS)]
    return run_bench("ratelimit", out, *sizes)


@pytest.mark.timeout(180)
def test_the_script_grants_at_the_limit_and_no_window_holds_more_than_the_bound(ratelimit: dict[str, Any]) -> None:
    script = ratelimit["summary"]["script"]
    assert script["grants"] > 0 and script["asks_per_grant"] >= 1
    assert [w["window_s"] for w in script["windows"]] == [1.0, 0.1]
    assert [w["bound"] for w in script["windows"]] == [int(1 + RATE), int(1 + RATE / 10)]
    for w in script["windows"]:
        assert 1 <= w["most"] <= w["bound"] and w["held"]
    assert script["held"]
    assert 0.5 * RATE < script["achieved_per_period"] <= RATE * (1 + SLACK)
    assert script["ratio_to_limit"] == pytest.approx(script["achieved_per_period"] / RATE)
    # a grant never comes before its reserved moment; at most the whole duration (and this rate) allows
    assert script["late_ms"]["p50"] >= 0 and script["grants"] <= 1 + DURATION_S * RATE + CALLERS


@pytest.mark.timeout(180)
def test_the_ceiling_is_measured_with_the_same_callers(ratelimit: dict[str, Any]) -> None:
    script, raw = ratelimit["summary"]["script"], ratelimit["script"]
    assert raw["ceiling"]["callers"] == raw["limited"]["callers"] == CALLERS
    assert script["ceiling_grants"] > 0 and script["ceiling_per_s"] > 0
    assert raw["ceiling"]["asks"] == raw["ceiling"]["grants"]  # nothing ever waits under 10^9 a second
    assert script["ratio_limit_to_ceiling"] == pytest.approx(RATE / script["ceiling_per_s"])
    assert script["redis_us_per_script_call"] > 0 and script["ceiling_redis_us_per_script_call"] > 0


@pytest.mark.timeout(180)
def test_every_run_completes_once_and_the_limit_really_deferred_starts(ratelimit: dict[str, Any]) -> None:
    e2e = ratelimit["summary"]["end_to_end"]
    assert e2e["runs"] == e2e["completed"] == e2e["ran_once"] == RUNS
    assert e2e["deferred_runs"] > 0 and e2e["deferrals"] >= e2e["deferred_runs"]
    assert e2e["counted_rate_limited"] == e2e["deferrals"]  # the fleet's counter agrees with the histories
    assert ratelimit["end_to_end"]["started_recorded"] == RUNS
    assert e2e["schedule_held"]  # the reserved moments themselves keep the limit
    assert e2e["starts_held"]  # the starts keep the README's bound: burst + (t + promote_interval_s) x rate
    # the last start cannot come before its reserved moment: the starts' rate never beats the limit
    assert 0.5 * RATE < e2e["achieved_per_period"] <= RATE * (1 + SLACK)
    assert e2e["ratio_to_limit"] == pytest.approx(e2e["achieved_per_period"] / RATE)


@pytest.mark.timeout(180)
def test_the_wall_time_is_measured_against_the_ideal(ratelimit: dict[str, Any]) -> None:
    e2e = ratelimit["summary"]["end_to_end"]
    ideal = (RUNS - 1) / RATE
    assert e2e["ideal_s"] == pytest.approx(ideal)
    assert e2e["ratio_to_ideal"] == pytest.approx(e2e["wall_s"] / ideal)
    # the schedule spaces the starts one unit apart: the last cannot run before (runs - burst) units
    assert e2e["wall_s"] >= ideal * (1 - SLACK)


@pytest.mark.timeout(180)
def test_the_markdown_has_the_tables(ratelimit: dict[str, Any]) -> None:
    text = ratelimit["markdown"]
    assert "| limit | callers | s | grants | asks / grant | achieved | achieved / limit |" in text
    assert "| what is timed | window s | most in any window | bound |" in text
    assert "| ms | n | p50 | p99 | max |" in text
    assert "| completed | ran once (attempt 1, no error) | runs deferred / deferrals |" in text
    assert "script: grants" in text and "VIOLATION" not in text.split("end to end: schedule")[0]


def test_the_window_count_is_of_closed_windows() -> None:
    from bench.ratelimit import most_in_window, steady_rate

    assert most_in_window([0, 10, 20, 30], 10) == 2  # a window of 10 holds both of its ends
    assert most_in_window([0, 10, 10, 20, 31], 10) == 3
    assert most_in_window([], 10) == 0
    assert steady_rate([0, 1_000_000, 2_000_000], 1, 1.0) == pytest.approx(1.0)  # burst 1: 2 after it in 2 s
    assert steady_rate([5], 1, 1.0) is None
