"""Every dashboard query and every recording rule, evaluated by a real Prometheus on live data.

Two real supervisor replicas and two real workers (threads, each serving /metrics on a free
loopback port) run the workload of ``workload.py`` while Debian's Prometheus scrapes them every
second and evaluates deploy/prometheus/rules.yml every second. Both replicas serve the same fleet
metrics, as in production, so a query that forgets to de-duplicate them counts everything twice.
Then every expression of every panel is evaluated through /api/v1/query with the variables set
to real values, and the compound figures are compared with what was injected: 17 steps whose
attempts fail 5% of the time.

Timeline (the order matters for the 5 m recording rules: ``rate()`` only counts what a counter
gained after Prometheus' first sample of it, so every series the rules divide must exist before
the measured phase; in production they exist long before any 5 m window):

1. warm-up before Prometheus starts: 20 chain17 runs (each step fails exactly once: 1 failure in
   21 attempts) and one recovery run (error, timeout, stash, cost, 3 crashes, quarantine);
2. Prometheus starts and scrapes that state;
3. measured phase: 100 chain17 runs, each attempt failing with probability 5%, then the
   recovery scenario again, then one run left in flight;
4. once the rules have been evaluated on a scrape taken after the workload: the checks.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.embedded import RedisServer
from tests.conftest import fast_settings
from tests.grafana import dashboards as d
from tests.grafana import workload as wl
from tests.grafana.prometheus import PROMETHEUS, PROMTOOL, Prometheus, prometheus
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not PROMETHEUS.exists(), reason="needs /usr/bin/prometheus (Debian package prometheus)")

M = "max without (instance, job, pod)"
SCRAPE_S = 1.0
# $__rate_interval is at least 4 scrape intervals in Grafana; 1m also covers the whole workload
VALUES = {
    "__rate_interval": "1m",
    "workflow": f"({wl.CHAIN}|{wl.RECOVERY})",  # what Grafana sends for a multi-value selection
    "queue": f"(default|{wl.RECOVERY_QUEUE})",
    "step": ".*",  # "All"
    "datasource": "",
}
# drill-down panels with no data for chain17, which has no crash, stash or cost, and no run in
# flight at the end (they all have data for recovery): only the average stash size, 0/0. Every
# other series exists at 0 before its first event: the workers create the per-step series, the
# supervisors the per-workflow ones (work saved, cost, dead letter, runs in flight) of every
# workflow and step they know, so panels show 0 rather than "No data".
EMPTY_FOR_CHAIN = {"Average stash size, by step"}
Z = 4.0  # tolerance in binomial standard errors: a fair 95% step is outside it once in 16,000
P = 1 - wl.FAIL_P


def scrape_ports(fleet: wl.Fleet) -> dict[str, list[str]]:
    return {f"orchestrator-{role}": [f"127.0.0.1:{port}" for port in ports] for role, ports in fleet.ports.items()}


def detections(fleet: wl.Fleet) -> float:
    """Detection latencies observed so far, by all replicas (only the leader observes)."""
    total = 0.0
    for text in fleet.scrape()["supervisor"]:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "orchestrator_detection_latency_seconds_count":
                    total += sample.value
    return total


def run_recovery_until_detected(fleet: wl.Fleet, name: str) -> None:
    """The quarantine scenario; again if the supervisor did not observe a detection latency.

    It observes one only when the dead worker is still listed when its step is re-dispatched;
    a worker whose last heartbeat predates its claim is often dropped one reclaim tick earlier
    (see the report on orchestrator/supervisor.py), so one scenario (3 deaths) may observe none.
    """
    before = detections(fleet)
    for attempt in range(3):
        fleet.run_recovery(f"{name}-{attempt}")
        if detections(fleet) > before:
            return
    raise AssertionError("three quarantine scenarios (9 worker deaths) and no detection latency observed")


def first_samples_taken(prom: Prometheus) -> bool:
    """Every target up, and the warm-up state scraped at least three times."""
    up = prom.query('count(up{job=~"orchestrator-.*"} == 1)')
    if not up or float(up[0]["value"][1]) != 4:
        return False
    seen = prom.query(
        f'count_over_time(orchestrator_fleet_runs_total{{workflow="{wl.CHAIN}",outcome="completed"}}[1m])'
    )
    return bool(seen) and float(seen[0]["value"][1]) >= 3


def rules_evaluated_after(prom: Prometheus, moment: float) -> bool:
    observed = f'workflow:orchestrator_chain_completion_observed:ratio_rate5m{{workflow="{wl.CHAIN}"}}'
    result = prom.query(f"timestamp({observed})")
    return bool(result) and float(result[0]["value"][1]) > moment + 2 * SCRAPE_S


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Runs the workload under Prometheus; yields (prometheus, scraped texts, expected counts)."""
    warm, measured = wl.warmup_runs(), wl.measured_runs(100)
    with wl.fleet(fast_settings(redis_server.url), supervisors=2) as fleet:
        fleet.run_chain(warm)
        fleet.run_recovery("warm-recovery")
        workdir = tmp_path_factory.mktemp("prometheus")
        with prometheus(workdir, scrape_ports(fleet), [d.RULES], interval=f"{SCRAPE_S:g}s") as prom:
            wait_until(lambda: first_samples_taken(prom), timeout_s=20, what="prometheus scraped the warm-up state")
            fleet.run_chain(measured)
            run_recovery_until_detected(fleet, "recovery")
            fleet.park("parked")
            done = time.time()
            wait_until(lambda: rules_evaluated_after(prom, done), timeout_s=20, what="rules evaluated on final data")
            texts = fleet.scrape()
            yield {
                "prom": prom,
                "texts": texts,
                "stats": fleet.client.stats(),
                "lifetime": wl.expected_attempts({**warm, **measured}),
                "measured": wl.expected_attempts(measured),
                "runs": len(warm) + len(measured),
            }
            fleet.unpark("parked")


def finite(result: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(r["value"][1]) for r in result) if math.isfinite(v)]


# -- (a) every expression has data -----------------------------------------------------------------


def test_every_overview_query_has_data(live: dict[str, Any]) -> None:
    prom: Prometheus = live["prom"]
    empty = {}
    for query in d.queries(d.dashboards()["orchestrator-overview"]):
        result = prom.query(d.substitute(query.expr, VALUES))
        if not finite(result):
            empty[query.name] = result
    assert not empty, f"queries without a finite value: {empty}"


def test_every_drilldown_query_has_data_for_the_workflow_that_exercises_it(live: dict[str, Any]) -> None:
    """The drill-down shows one workflow. ``recovery`` exercises every panel (errors, a timeout,
    stashes, costs, crashes, fenced commits, a quarantine, a run in flight); ``chain17`` only
    failing attempts and retries, so its crash, stash and cost panels are legitimately empty, but
    its queries must still evaluate, and its compound and attempt panels must have data."""
    prom: Prometheus = live["prom"]
    board = d.dashboards()["orchestrator-workflow"]
    empty = {}
    for query in d.queries(board):
        result = prom.query(d.substitute(query.expr, {**VALUES, "workflow": wl.RECOVERY}))
        if not finite(result):
            empty[query.name] = result
    assert not empty, f"{wl.RECOVERY}: queries without a finite value: {empty}"
    empty = {}
    for query in d.queries(board):
        if not finite(prom.query(d.substitute(query.expr, {**VALUES, "workflow": wl.CHAIN}))):
            empty[query.panel] = query.name
    assert set(empty) == EMPTY_FOR_CHAIN, f"{wl.CHAIN}: panels without data: {sorted(empty)}"


def test_the_variables_list_the_real_workflows_queues_and_steps(live: dict[str, Any]) -> None:
    prom: Prometheus = live["prom"]
    expected = {
        "workflow": {wl.CHAIN, wl.RECOVERY},
        "queue": {"default", wl.RECOVERY_QUEUE},
        "step": set(wl.CHAIN_STEPS),
    }
    for uid, board in d.dashboards().items():
        for name, variable in d.variables(board).items():
            if variable["type"] != "query":
                continue
            selector, label = d.label_values_query(d.variable_query(variable))
            selector = d.substitute(selector, {**VALUES, "workflow": wl.CHAIN})
            found = set(prom.get(f"/api/v1/label/{label}/values", **{"match[]": selector}))
            assert found == expected[name], f"{uid} variable {name}: {found}"


def test_every_recording_rule_has_data_and_every_alert_evaluates(live: dict[str, Any]) -> None:
    prom: Prometheus = live["prom"]
    records, alerts = d.rule_names_and_exprs()
    for name, expr in records.items():
        result = prom.query(name)
        assert finite(result), f"recording rule {name} recorded nothing"
        assert finite(prom.query(expr)), f"recording rule {name}: its expression has no data"
        # level:metric:operations, the level naming the labels the result keeps
        kept = {label for r in result for label in r["metric"]} - {"__name__"}
        assert kept == set(name.split(":")[0].split("_")), f"{name} keeps the labels {sorted(kept)}"
    for group in prom.get("/api/v1/rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
    firing = {name: bool(prom.query(expr)) for name, expr in alerts.items()}
    # the recovery workflow's runs all fail (quarantined), with fenced commits along the way;
    # workers are alive and nothing is pending for 10 minutes
    assert firing == {
        "OrchestratorRunsFailing": True,
        "OrchestratorNoLiveWorkers": False,
        "OrchestratorOldestPendingTooOld": False,
        "OrchestratorStepQuarantined": True,
        "OrchestratorStaleCommits": True,
        "OrchestratorFleetScrapeError": False,  # both replicas read Redis...
        "OrchestratorNoLeadingSupervisor": False,  # ...one of them leads...
        "OrchestratorSupervisorsDown": False,  # ...and Prometheus scrapes them
    }
    failing = prom.query(alerts["OrchestratorRunsFailing"])
    assert [r["metric"]["workflow"] for r in failing] == [wl.RECOVERY]
    for name in ("OrchestratorStepQuarantined", "OrchestratorStaleCommits"):  # one alert, not one per replica
        assert len(prom.query(alerts[name])) == 1, name


def test_series_of_known_workflows_exist_at_zero_before_their_first_event(live: dict[str, Any]) -> None:
    """chain17 never crashed, spent, dead-lettered or has a run in flight at the end: its series
    are there all the same, at 0, so that its panels show 0 and not "No data" (and a first event
    shows in rate())."""
    prom: Prometheus = live["prom"]
    chain = f'workflow="{wl.CHAIN}"'
    zero = {
        f"orchestrator_fleet_dead_letter_runs{{{chain}}}": 1,
        f"orchestrator_fleet_runs_in_flight{{{chain}}}": 4,  # pending, running, retrying, sleeping
        f"orchestrator_fleet_work_saved_seconds_total{{{chain}}}": 1,
        f"orchestrator_fleet_work_saved_steps_total{{{chain}}}": 1,
        f"orchestrator_fleet_work_saved_stash_seconds_total{{{chain}}}": 1,
        # per step of the chain, for each unit any step of the fleet reported (recovery's tokens and usd)
        f"orchestrator_fleet_step_cost_total{{{chain}}}": 2 * len(wl.CHAIN_STEPS),
        f"orchestrator_fleet_cost_saved_total{{{chain}}}": 2,
    }
    for selector, count in zero.items():
        values = finite(prom.query(f"{M} ({selector})"))
        assert values == [0.0] * count, f"{selector}: {values}"


def panel_query(uid: str, title: str, ref_id: str = "A") -> str:
    board = d.dashboards()[uid]
    (query,) = [q for q in d.queries(board) if q.panel == title and q.ref_id == ref_id]
    return query.expr


def test_panels_count_fleet_metrics_once_with_two_supervisor_replicas(live: dict[str, Any]) -> None:
    prom: Prometheus = live["prom"]
    chain = {**VALUES, "workflow": wl.CHAIN}
    title = "Chain completion per workflow: predicted without durability vs observed with it"
    finished = prom.value(d.substitute(panel_query("orchestrator-overview", title, "F"), chain))
    assert finished == live["runs"]
    totals = {
        "Crashed attempts (total)": "crashes",
        "Fenced commits (total)": "fenced",
        "Steps quarantined (total)": "quarantined",
        "Dead workers detected (total)": "dead_workers",
    }
    for title, stat in totals.items():
        assert prom.value(panel_query("orchestrator-overview", title)) == live["stats"][stat], title
    assert prom.value(panel_query("orchestrator-overview", "Live workers")) == 2


# -- (b) the compound figures agree with what was injected -----------------------------------------


def ratios(counts: dict[str, Any]) -> dict[str, float]:
    return {step: c["ok"] / (c["ok"] + c["error"]) for step, c in counts.items()}


def check_step_ratios(measured: dict[str, float], exact: dict[str, float], counts: dict[str, Any], tol: float) -> None:
    assert set(measured) == set(wl.CHAIN_STEPS)
    for step, p in measured.items():
        n = counts[step]["ok"] + counts[step]["error"]
        standard_error = math.sqrt(P * (1 - P) / n)
        assert p == pytest.approx(exact[step], abs=tol), f"{step}: {p} measured, {exact[step]} injected"
        assert abs(p - P) <= Z * standard_error, f"{step}: p_i {p:.3f} over {n} attempts is not {P} ± {Z} SE"


def check_predicted(predicted: float, step_ratios: dict[str, float], counts: dict[str, Any]) -> None:
    """The product of the p_i, and in a band around 0.95^17 = 0.42 (delta method on ln p_i)."""
    assert predicted == pytest.approx(math.prod(step_ratios.values()), rel=1e-6)
    variance = sum((1 - P) / (P * (c["ok"] + c["error"])) for c in counts.values())
    expected = math.log(P) * len(wl.CHAIN_STEPS)
    assert abs(math.log(predicted) - expected) <= Z * math.sqrt(variance), (
        f"predicted {predicted:.3f}, expected {math.exp(expected):.3f} within {Z} SE"
    )
    assert 0.25 < predicted < 0.65


def test_lifetime_gauges_match_the_injected_failures(live: dict[str, Any]) -> None:
    prom: Prometheus = live["prom"]
    lifetime = live["lifetime"]
    chain = f'workflow="{wl.CHAIN}"'
    errors = prom.values(
        f'sum by (step) ({M} (orchestrator_fleet_step_attempts_total{{{chain}, outcome="error"}}))', "step"
    )
    assert errors == {step: c["error"] for step, c in lifetime.items()}, "the fleet counted other failures"
    assert prom.value(f'{M} (orchestrator_fleet_runs_total{{{chain}, outcome="completed"}})') == live["runs"]
    step_ratios = prom.values(f"{M} (orchestrator_step_success_ratio{{{chain}}})", "step")
    check_step_ratios(step_ratios, ratios(lifetime), lifetime, tol=1e-9)
    predicted = prom.value(f"{M} (orchestrator_chain_completion_predicted_ratio{{{chain}}})")
    check_predicted(predicted, step_ratios, lifetime)
    assert prom.value(f"{M} (orchestrator_chain_completion_observed_ratio{{{chain}}})") == 1.0


def test_five_minute_rules_match_the_injected_failures(live: dict[str, Any]) -> None:
    """The rules see the measured phase only (the warm-up is in Prometheus' first samples)."""
    prom: Prometheus = live["prom"]
    measured = live["measured"]
    chain = f'workflow="{wl.CHAIN}"'
    step_ratios = prom.values(f"workflow_step:orchestrator_step_success:ratio_rate5m{{{chain}}}", "step")
    # rate() extrapolates an increase to the window's start by up to half a scrape interval,
    # by less for a series whose first value is small next to its increase: within 1% here
    check_step_ratios(step_ratios, ratios(measured), measured, tol=0.01)
    predicted = prom.value(f"workflow:orchestrator_chain_completion_predicted:ratio_rate5m{{{chain}}}")
    check_predicted(predicted, step_ratios, measured)
    assert predicted == pytest.approx(math.prod(ratios(measured).values()), rel=0.05)
    assert prom.value(f"workflow:orchestrator_chain_completion_observed:ratio_rate5m{{{chain}}}") == 1.0


def test_a_step_that_never_succeeds_makes_the_chain_zero_not_missing(live: dict[str, Any]) -> None:
    """recovery's `poisoned` crashes every time and its runs are quarantined: p_i = 0 and both
    completions 0, from the gauges and from the rules (which must not drop the step or the
    workflow for lack of an `ok` or `completed` series)."""
    prom: Prometheus = live["prom"]
    rec = f'workflow="{wl.RECOVERY}"'
    assert prom.values(f"workflow_step:orchestrator_step_success:ratio_rate5m{{{rec}}}", "step") == {
        "gather": 0.5,  # one error, one ok per scenario
        "summarize": 0.5,  # one timeout, one ok
        "poisoned": 0.0,  # three crashes
    }
    assert prom.value(f"workflow:orchestrator_chain_completion_predicted:ratio_rate5m{{{rec}}}") == 0.0
    assert prom.value(f"workflow:orchestrator_chain_completion_observed:ratio_rate5m{{{rec}}}") == 0.0
    assert prom.value(f"{M} (orchestrator_chain_completion_predicted_ratio{{{rec}}})") == 0.0
    assert prom.value(f"{M} (orchestrator_chain_completion_observed_ratio{{{rec}}})") == 0.0
    assert prom.value(f"sum({M} (orchestrator_fleet_work_saved_steps_total{{{rec}}}))") >= 6  # 2 steps x 3 crashes
    assert prom.value(f"{M} (orchestrator_fleet_quarantined_steps_total)") >= 2


# -- (c) the exposition itself ---------------------------------------------------------------------


def test_promtool_accepts_every_scraped_endpoint(live: dict[str, Any]) -> None:
    texts = [text for role in live["texts"].values() for text in role]
    assert len(texts) == 4
    for text in texts:
        result = subprocess.run(
            [str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_is_stopped_with_no_leftovers(tmp_path: Path) -> None:
    with prometheus(tmp_path, {"nothing": ["127.0.0.1:1"]}) as prom:
        pid = prom.popen.pid
        assert prom.query("vector(1)")[0]["value"][1] == "1"
    assert prom.popen.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
