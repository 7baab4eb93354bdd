"""``orchestrator stats`` and ``orchestrator top`` on a real fleet: what the figures mean.

- steps are listed in workflow order (as the workers announce it), not by name;
- a run that failed, was retried and then completed counts as completed ("with it");
- "work saved" counts what the crashed step's stash kept, not only the committed steps;
- ``top`` refuses an interval that would read Redis in a busy loop, and sleeps between refreshes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from click.testing import CliRunner, Result

from orchestrator import Client, Retry, Settings, StepContext, Workflow
from orchestrator.cli import cli
from orchestrator.cli import fleet as fleet_cli
from tests.harness import supervisor_thread, worker_thread
from tests.helpers import wait_until


def run_cli(settings: Settings, *args: str) -> Result:
    url = getattr(settings.redis_url, "get_secret_value", lambda: settings.redis_url)()
    return CliRunner().invoke(cli, ["--redis-url", str(url), "--namespace", settings.namespace, *args])


def stats_json(settings: Settings) -> dict[str, Any]:
    result = run_cli(settings, "stats", "-o", "json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["workflows"]
    return dict(row)


def test_steps_are_listed_in_workflow_order(client: Client, settings: Settings) -> None:
    wf: Workflow[Any] = Workflow("ordered")
    for name in ("zeta", "alpha", "mid"):  # declared out of alphabetical order
        wf.step(lambda ctx, state: None, name=name)
    with worker_thread([wf], settings):
        client.submit(wf, {}, run_id="o1").wait(timeout_s=10)
    table = run_cli(settings, "stats", "--workflow", "ordered")
    assert table.exit_code == 0, table.output
    rows = [line.split()[0] for line in table.output.split("steps of ordered:")[1].splitlines()[2:5]]
    assert rows == ["zeta", "alpha", "mid"], table.output
    assert list(stats_json(settings)["p_i"]) == ["zeta", "alpha", "mid"]


def test_a_failed_run_that_was_retried_and_completed_counts_as_completed(client: Client, settings: Settings) -> None:
    wf: Workflow[Any] = Workflow("flaky_once")
    calls: list[str] = []

    @wf.step(retry=Retry(max_attempts=1))
    def only(ctx: StepContext, state: Any) -> None:
        calls.append(ctx.run_id)
        if len(calls) == 1:
            raise RuntimeError("down for a moment")

    with supervisor_thread(settings), worker_thread([wf], settings):
        client.submit(wf, {}, run_id="f1")
        wait_until(lambda: client.get("f1").status == "failed", what="f1 failed")
        assert stats_json(settings)["observed"] == 0.0  # ended failed, for now
        client.retry("f1").wait(timeout_s=10)
        client.submit(wf, {}, run_id="f2").wait(timeout_s=10)
    row = stats_json(settings)
    assert (row["completed"], row["failed"], row["retried"]) == (2, 0, 1)
    assert row["observed"] == 1.0, "f1 ended completed: its failure was taken back by the retry"
    text = run_cli(settings, "stats").output
    assert "100.0%" in text.splitlines()[1], text


def stashing_flow() -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("stashes")

    @wf.step
    def first(ctx: StepContext, state: Any) -> None:
        time.sleep(0.1)

    @wf.step
    def study(ctx: StepContext, state: Any) -> dict[str, Any]:
        found = dict(ctx.snapshot or {})
        for item in ("a", "b", "c"):
            if item not in found:
                time.sleep(0.2)  # a model call, kept by the stash below
                found[item] = item.upper()
                ctx.stash(found)
        return {}

    return wf


def test_work_saved_counts_what_the_stash_kept(client: Client, settings: Settings) -> None:
    """The worker running `study` freezes after its three stashes (0.6 s of work), longer than
    its lease: another worker resumes the step from the stash. Work saved is then the committed
    step (`first`, 0.1 s) plus the 0.6 s that the stash kept, not 0.1 s."""
    wf = stashing_flow()
    frozen = settings.model_copy(update={"faults": "before_commit=freeze:3@study"})
    with supervisor_thread(settings), worker_thread([wf], frozen):
        client.submit(wf, {}, run_id="s1")
        stash = client.keys.run("s1").stash

        def stashed_three() -> bool:
            value = client.redis.hget(stash, "s1:study")
            return bool(value) and len(json.loads(value)) == 3  # type: ignore[arg-type]

        wait_until(stashed_three, what="study stashed its three findings")
        with worker_thread([wf], settings):  # takes the step over once the frozen one's lease lapses
            client.run("s1").wait(timeout_s=20)
    row = stats_json(settings)
    assert row["recoveries"] == 1 and row["saved_steps"] == 1
    assert 0.6 <= row["saved_stash_seconds"] < 2.0, row
    committed = row["saved_seconds"] - row["saved_stash_seconds"]
    assert 0.099 <= committed < 0.5, row  # the step ran 0.1 s (ms on the worker clock)
    line = run_cli(settings, "stats").output.splitlines()[1]
    assert f"+ {row['saved_stash_seconds']:.1f} s stashed = {row['saved_seconds']:.1f} s" in line, line


def test_top_refuses_an_interval_that_would_busy_loop(settings: Settings) -> None:
    result = run_cli(settings, "top", "-n", "0")
    assert result.exit_code == 2 and "0.0 is not in the range x>=0.5" in result.output, result.output


def test_top_sleeps_the_interval_between_refreshes(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(fleet_cli.time, "sleep", slept.append)
    result = run_cli(settings, "top", "-n", "0.5", "--iterations", "3")
    assert result.exit_code == 0, result.output
    assert result.output.count("orchestrator top") == 3
    assert slept == [0.5, 0.5], "one sleep between two refreshes, none after the last"
