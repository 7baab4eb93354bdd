"""The agent-shaped capacity benchmark (``bench.agent``) end to end at smoke sizes: N runs of async
steps that await, through real workers and a supervisor. What is asserted is structure and
bookkeeping (every run completed, every step counted once, the figures present and positive,
nothing re-dispatched), never a timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.bench.test_smoke import run_bench

RUNS, STEPS, AWAIT_S = (20, 40), 3, 0.2


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: Path = tmp_path_factory.mktemp("agent") / "agent.json"
    sizes = ["--runs", ",".join(str(n) for n in RUNS), "--steps", str(STEPS), "--await-s", str(AWAIT_S)]
    return run_bench("agent", out, *sizes)


@pytest.mark.timeout(180)
def test_agent_completes_every_run_and_counts_every_step_once(agent: dict[str, Any]) -> None:
    levels = agent["levels"]
    assert [lv["runs"] for lv in levels] == list(RUNS)
    for lv in levels:
        n = lv["runs"]
        assert lv["steps"] == n * STEPS
        assert lv["counters"]["steps_ok"] == n * STEPS  # one commit per step, no more
        assert lv["calls"]["evalsha"] >= n * (STEPS + 1)  # a submit and a commit per step, at least
        assert lv["trouble"] == {}  # nothing re-dispatched, fenced or crashed
        assert lv["concurrency"] * 2 >= n  # every run had a slot
        assert lv["hop_ms"]["n"] == n * (STEPS - 1) and lv["first_step_extra_ms"]["n"] == n


@pytest.mark.timeout(180)
def test_agent_figures_are_positive_and_against_the_ideal(agent: dict[str, Any]) -> None:
    for lv in agent["levels"]:
        assert lv["ideal_steps_per_s"] == pytest.approx(lv["runs"] / AWAIT_S)
        assert lv["steady_steps_per_s"] > 0 and lv["overall_steps_per_s"] > 0
        assert lv["ratio"] == pytest.approx(lv["steady_steps_per_s"] / lv["ideal_steps_per_s"])
        assert lv["worker_cpu_us_per_step"] > 0 and lv["redis_cpu_us_per_step"] > 0
        assert lv["commands_per_step"] > 0 and lv["supervisor_cpu_us_per_step"] >= 0
        assert set(lv["hop_split_ms"]) == {"dispatch", "late_wake_up", "commit"}
        assert lv["our_cores"] > 0 and lv["machine_busy_cores"] is not None and lv["others_cores"] >= 0
    summary = agent["summary"]
    assert [lv["runs"] for lv in summary["levels"]] == list(RUNS)
    assert summary["target"]["met"] is None  # N = 1,000 was not measured: no verdict
    assert "not measured" in agent["markdown"]
