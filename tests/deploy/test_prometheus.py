"""deploy/prometheus: promtool's checks, the rules' unit tests, and the scrape config against compose."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import PROMETHEUS_CONFIG, REPO, RULES, compose, duration_s, load_yaml, service_env

RULES_TESTS = Path(__file__).parent / "rules_test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if not binary:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_scrape_config_and_the_rule_files_it_names() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_compute_the_compound_figures_and_alert_once(tmp_path: Path) -> None:
    """tests/deploy/rules_test.yml: 0.95^17, observed completion, de-duplication of supervisors."""
    result = promtool("test", "rules", str(RULES_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # the unit tests can fail: the same tests against rules that sum the supervisors instead
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("max without (instance, job, pod)", "sum without (instance, job, pod)"))
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULES_TESTS.read_text().replace("../../deploy/prometheus/rules.yml", "rules.yml"))
    assert promtool("test", "rules", str(tests)).returncode != 0


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_recording_rules_are_named_level_metric_operations() -> None:
    """Prometheus' convention: `level:metric:operations`, the level naming the labels kept, the
    metric the orchestrator metric it derives from (no `_total`), the operations ending in the
    window (https://prometheus.io/docs/practices/rules/)."""
    records = [rule["record"] for rule in rules() if "record" in rule]
    assert records
    for name in records:
        level, metric, operations = name.split(":")
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", level), name
        assert metric.startswith("orchestrator_") and not metric.endswith("_total"), name
        assert re.fullmatch(r"([a-z]+_)*rate5m", operations), name
    # that the level lists the labels each result keeps is checked on live data, in
    # tests/grafana/test_prometheus_live.py


def test_every_alert_links_its_runbook_section() -> None:
    runbook = (REPO / "docs" / "runbook.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    alerts = [rule for rule in rules() if "alert" in rule]
    assert {"OrchestratorFleetScrapeError", "OrchestratorNoLeadingSupervisor", "OrchestratorSupervisorsDown"} <= {
        a["alert"] for a in alerts
    }
    for alert in alerts:
        url = alert["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md" and (REPO / path).exists(), f"{alert['alert']}: {url!r}"
        assert anchor == alert["alert"].lower() and anchor in anchors, f"{alert['alert']}: no section #{anchor}"
        section = runbook.split(f"## {alert['alert']}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**What it means.**", "**How to check.**", "**What to do.**"):
            assert part in section, f"runbook section {alert['alert']} lacks {part}"


def test_every_worker_and_supervisor_replica_is_scraped_on_its_metrics_port() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    services = compose()["services"]
    for service, job_name in (("worker", "orchestrator-worker"), ("supervisor", "orchestrator-supervisor")):
        (sd,) = jobs[job_name]["dns_sd_configs"]
        # a compose service name resolves to the addresses of all its replicas (A records)
        assert sd["names"] == [service] and sd["type"] == "A"
        assert sd["port"] == int(service_env(services[service])["ORCHESTRATOR_METRICS_PORT"])
        assert duration_s(sd.get("refresh_interval", "30s")) <= 30


def test_rate_windows_hold_at_least_four_scrapes() -> None:
    interval_s = duration_s(load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"])
    assert interval_s <= 15
    windows = re.findall(r"\[(\d+[smh])\]", RULES.read_text())
    assert windows
    for window in windows:
        assert duration_s(window) >= 4 * interval_s, f"[{window}] is too short for a {interval_s} s scrape interval"
