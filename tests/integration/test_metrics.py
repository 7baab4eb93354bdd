"""Metrics scraped from real worker and supervisor endpoints, and checked with promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import Client, Retry, Settings, StepContext, Workflow
from orchestrator.figures import compound, parse_detail
from orchestrator.keys import GROUP
from tests.harness import supervisor_thread, worker_thread
from tests.helpers import wait_until


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), float("nan"))


def flaky_flow() -> Workflow[Any]:
    wf: Workflow[Any] = Workflow("metered")
    seen: dict[str, int] = {}

    @wf.step(retry=Retry(max_attempts=5, backoff_s=0.01))
    def first(ctx: StepContext, state: Any) -> None:
        seen[ctx.run_id] = seen.get(ctx.run_id, 0) + 1
        if seen[ctx.run_id] == 1:  # every run's first step fails once
            raise ConnectionError("flaky")
        ctx.stash({"half": "done"})
        ctx.record_cost(tokens=100, usd=0.01)

    @wf.step
    def second(ctx: StepContext, state: Any) -> None:
        return None

    return wf


def serve_and_scrape(client: Client, settings: Settings, runs: int) -> tuple[str, str]:
    """Run ``runs`` runs of the flaky flow on a real worker and supervisor; scrape both endpoints."""
    wf = flaky_flow()
    metered = settings.model_copy(update={"metrics_port": 0})
    with supervisor_thread(metered) as sup, worker_thread([wf], metered) as worker:
        for i in range(runs):
            client.submit(wf, {}, run_id=f"m{i}").wait(timeout_s=10)
        # acks ride with the worker's next batch (or go alone within 5 ms): at rest, nothing is pending
        streams = client.keys.streams("default")
        wait_until(
            lambda: sum(client.redis.xpending(s, GROUP)["pending"] for s in streams) == 0, what="the last acks sent"
        )
        wait_until(lambda: sup.metrics_port, what="supervisor metrics up")
        return scrape(worker.metrics_port or 0), scrape(sup.metrics_port or 0)


def test_worker_and_fleet_metrics_tell_the_same_story(client: Client, settings: Settings) -> None:
    w, f = serve_and_scrape(client, settings, runs=4)
    attempts = {"workflow": "metered", "step": "first", "executor": "worker"}
    assert value(w, "orchestrator_step_attempts_total", **attempts, outcome="ok") == 4
    assert value(w, "orchestrator_step_attempts_total", **attempts, outcome="error") == 4
    assert value(w, "orchestrator_step_retries_total", workflow="metered", step="first") == 4
    assert value(w, "orchestrator_stash_writes_total", workflow="metered", step="first") == 4
    assert value(w, "orchestrator_step_cost_total", workflow="metered", step="first", unit="tokens") == 400
    assert value(w, "orchestrator_step_duration_seconds_count", workflow="metered", step="second") == 4
    assert value(w, "orchestrator_step_queue_wait_seconds_count", workflow="metered", queue="default") >= 12
    assert value(f, "orchestrator_fleet_step_attempts_total", workflow="metered", step="first", outcome="ok") == 4
    assert value(f, "orchestrator_fleet_step_attempts_total", workflow="metered", step="first", outcome="error") == 4
    assert value(f, "orchestrator_fleet_runs_total", workflow="metered", outcome="completed") == 4
    assert value(f, "orchestrator_step_success_ratio", workflow="metered", step="first") == 0.5
    assert value(f, "orchestrator_step_success_ratio", workflow="metered", step="second") == 1.0
    assert value(f, "orchestrator_chain_completion_predicted_ratio", workflow="metered") == 0.5
    assert value(f, "orchestrator_chain_completion_observed_ratio", workflow="metered") == 1.0
    assert value(f, "orchestrator_fleet_step_cost_total", workflow="metered", step="first", unit="usd") == 0.04
    assert value(f, "orchestrator_fleet_scrape_error") == 0
    assert value(f, "orchestrator_queue_pending_entries", queue="default") == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian package prometheus)")
def test_promtool_accepts_our_exposition(client: Client, settings: Settings) -> None:
    texts = serve_and_scrape(client, settings, runs=1)
    for text in texts:
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_compound_math_is_the_product_of_step_success_ratios() -> None:
    detail = parse_detail(
        {
            "steps|wf|a|ok": "95",
            "steps|wf|a|error": "5",
            "steps|wf|b|ok": "90",
            "steps|wf|b|crashed": "10",
            "steps|wf|b|fenced": "3",
            "runs|wf|completed": "99",
            "runs|wf|failed": "1",
            "runs|wf|submitted": "100",
        }
    )
    figures = compound(detail)
    assert figures["step_success"] == {("wf", "a"): 0.95, ("wf", "b"): 0.9}
    assert figures["predicted"]["wf"] == pytest.approx(0.855)
    assert figures["observed"]["wf"] == 0.99


def test_the_metrics_reference_documents_every_metric_we_serve(client: Client, settings: Settings) -> None:
    import re
    from pathlib import Path

    texts = serve_and_scrape(client, settings, runs=1)
    served = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            served.add(family.name + suffix)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(orchestrator_[a-z_]+)`", doc, re.M))
    served = {name for name in served if name.startswith("orchestrator_")}
    assert served == documented, {"undocumented": served - documented, "not served": documented - served}
