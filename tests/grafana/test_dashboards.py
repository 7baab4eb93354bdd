"""Lint of the Grafana dashboards and provisioning, without Grafana.

Structure and the rules of grafana/dashboard-linter (templated datasource used by every panel and
target, ``$__rate_interval`` in every rate), plus ours: units, unique ids, a grid without
overlaps, a question in every description, fleet metrics de-duplicated across supervisor
replicas before anything else, every metric and label a query names exists on the REAL
endpoints (a supervisor and two workers scraped after a workload that produces every metric),
every expression parses (``promtool check rules``), and the provisioning matches the compose
mounts.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.embedded import RedisServer
from tests.conftest import fast_settings
from tests.grafana import dashboards as d
from tests.grafana import workload

PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "table", "gauge", "barchart", "text"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
PARSE_VALUES = {"__rate_interval": "1m", "workflow": ".*", "queue": ".*", "step": ".*", "datasource": ""}
PROVISIONING = d.GRAFANA / "provisioning"
BOARDS = d.dashboards()
# what a supervisor measures itself (not read from Redis): differs between replicas, so summed
SUPERVISOR_OWN = {
    "orchestrator_detection_latency_seconds_bucket",
    "orchestrator_detection_latency_seconds_count",
    "orchestrator_detection_latency_seconds_sum",
    "orchestrator_detection_latency_seconds_created",
    "orchestrator_fleet_scrape_error",
}
DEDUP = "max without (instance, job, pod) ("


def each_board() -> list[Any]:
    return [pytest.param(board, id=uid) for uid, board in BOARDS.items()]


@pytest.fixture(scope="module")
def exposed(redis_server: RedisServer) -> dict[str, set[str]]:
    """Sample and label names on a real supervisor's and two real workers' /metrics after a
    workload with retried failures, a timeout, stashes, costs, crashes, fenced commits, a
    quarantine and a run in flight; plus the recording rules' names."""
    with workload.fleet(fast_settings(redis_server.url)) as fleet:
        fleet.run_chain(workload.warmup_runs())
        fleet.run_recovery("lint-recovery")
        fleet.park("lint-parked")
        texts = fleet.scrape()
        fleet.unpark("lint-parked")
    names: dict[str, set[str]] = {role: set() for role in texts}
    labels: set[str] = {"instance", "job"}  # added by Prometheus to every scraped series
    for role, role_texts in texts.items():
        for text in role_texts:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    names[role].add(sample.name)
                    labels.update(sample.labels)
    records, _ = d.rule_names_and_exprs()
    return {
        "names": set().union(*names.values()) | set(records),
        "labels": labels,
        "records": set(records),
        "fleet": names["supervisor"] - SUPERVISOR_OWN,
    }


def test_the_dashboards_are_there_and_parse() -> None:
    assert [p.name for p in d.DASHBOARD_FILES] == ["orchestrator-overview.json", "orchestrator-workflow.json"]
    assert sorted(BOARDS) == ["orchestrator-overview", "orchestrator-workflow"]
    for board in BOARDS.values():
        assert board["schemaVersion"] == 39
        assert board["id"] is None, "an exported id makes provisioning fight the database"
        assert board["title"].startswith("Orchestrator / ")
        assert "orchestrator" in board["tags"]


@pytest.mark.parametrize("board", each_board())
def test_structure(board: dict[str, Any]) -> None:
    """What Grafana needs to render every panel: a parser would accept less, so check it here."""
    for panel in d.all_panels(board):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        assert isinstance(panel.get("id"), int), where
        assert panel.get("type") in PANEL_TYPES, where
        assert isinstance(panel.get("title"), str) and panel["title"], where
        grid = panel.get("gridPos", {})
        assert {k: type(v) for k, v in grid.items()} == dict.fromkeys(("h", "w", "x", "y"), int), where
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, where
        assert grid["x"] + grid["w"] <= 24, f"{where} is wider than the dashboard"
        if panel["type"] == "row":
            assert grid["w"] == 24 and grid["h"] == 1 and grid["x"] == 0, where
            continue
        assert isinstance(panel.get("fieldConfig", {}).get("defaults"), dict), where
        assert isinstance(panel.get("fieldConfig", {}).get("overrides"), list), where
        assert isinstance(panel.get("options"), dict), where
        targets = panel.get("targets")
        assert isinstance(targets, list) and targets, f"{where} has no query"
        ref_ids = [t.get("refId") for t in targets]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), f"{where}: refIds {ref_ids}"
        for target in targets:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), where
        if panel["type"] in ("stat", "bargauge", "gauge"):
            assert panel["options"]["reduceOptions"]["calcs"], where
        if panel["type"] == "table" and len(targets) > 1:  # several queries: one row per workflow
            assert any(t["id"] == "merge" for t in panel.get("transformations", [])), where
    for variable in d.variables(board).values():
        assert variable.get("type") in ("datasource", "query"), variable
        assert re.fullmatch(r"[a-z_]+", variable.get("name", "")), variable


@pytest.mark.parametrize("board", each_board())
def test_the_datasource_is_a_variable_that_every_panel_and_target_uses(board: dict[str, Any]) -> None:
    variable = d.variables(board).get("datasource")
    assert variable is not None, "no `datasource` variable: the dashboard would be tied to one datasource uid"
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    assert not variable.get("current"), "a saved current value hard-codes a datasource uid"
    for panel in d.data_panels(board):
        assert panel.get("datasource") == DATASOURCE_REF, f"panel {panel['id']} {panel['title']!r}"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE_REF, f"panel {panel['id']} {target['refId']}"
    for name, variable in d.variables(board).items():
        if variable["type"] == "query":
            assert variable.get("datasource") == DATASOURCE_REF, f"variable {name}"
    # no datasource anywhere else, by uid or by name
    for path, key, value in d.walk(board):
        if key == "datasource":
            assert value == DATASOURCE_REF, f"{path}.datasource = {value!r}"


@pytest.mark.parametrize("board", each_board())
def test_every_rate_and_increase_uses_rate_interval(board: dict[str, Any]) -> None:
    for query in d.queries(board):
        ranges = d.range_selectors(query.expr)
        assert all(r == d.RATE_INTERVAL for r in ranges), f"{query.name}: ranges {ranges} in {query.expr}"
        for function, argument in d.calls(query.expr, ("rate", "irate", "increase")):
            assert f"[{d.RATE_INTERVAL}]" in argument, f"{query.name}: {function}() without $__rate_interval"


@pytest.mark.parametrize("board", each_board())
def test_units_are_set_and_fit_what_is_shown(board: dict[str, Any]) -> None:
    for panel in d.data_panels(board):
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {panel['id']} {panel['title']!r}: no unit"
    for query in d.queries(board):
        kind = d.unit_kind(query.expr)
        if kind is None:
            continue
        panel = next(p for p in d.data_panels(board) if p["id"] == query.panel_id)
        unit = d.target_unit(panel, query.ref_id)
        assert unit in d.UNITS[kind], f"{query.name} shows a {kind} in unit {unit!r}: {query.expr}"


@pytest.mark.parametrize("board", each_board())
def test_panel_ids_are_unique_and_panels_do_not_overlap(board: dict[str, Any]) -> None:
    panels = d.all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), f"duplicate titles: {sorted(t for t in titles if titles.count(t) > 1)}"
    for a, b in itertools.combinations(panels, 2):
        ga, gb = a["gridPos"], b["gridPos"]
        apart = (
            ga["x"] + ga["w"] <= gb["x"]
            or gb["x"] + gb["w"] <= ga["x"]
            or ga["y"] + ga["h"] <= gb["y"]
            or gb["y"] + gb["h"] <= ga["y"]
        )
        assert apart, f"panels {a['id']} {a['title']!r} and {b['id']} {b['title']!r} overlap: {ga} {gb}"


@pytest.mark.parametrize("board", each_board())
def test_every_panel_says_what_question_it_answers(board: dict[str, Any]) -> None:
    for panel in d.data_panels(board):
        description = panel.get("description", "")
        assert description.startswith("Question: "), f"panel {panel['id']} {panel['title']!r}: {description!r}"
        assert "?" in description.split("\n")[0], f"panel {panel['id']} {panel['title']!r}: no question"
    assert board.get("description")


@pytest.mark.parametrize("board", each_board())
def test_variables_are_defined_used_and_query_our_metrics(board: dict[str, Any]) -> None:
    variables = d.variables(board)
    assert "workflow" in variables
    defined = set(variables) | {"__rate_interval"}
    used: set[str] = set()
    for query in d.queries(board):
        unknown = d.variables_used(query.expr) - defined
        assert not unknown, f"{query.name} uses undefined variables {unknown}"
        used |= d.variables_used(query.expr)
    for name, variable in variables.items():
        if variable["type"] != "query":
            continue
        selector, label = d.label_values_query(d.variable_query(variable))
        assert variable["definition"] == d.variable_query(variable)
        assert label == name, f"variable {name} lists values of label {label}"
        used |= d.variables_used(selector)
        if variable.get("includeAll"):
            assert variable.get("allValue") == ".*", f"variable {name}: All must match every value"
    assert defined - used <= {"datasource"}, f"variables defined but not used: {defined - used - {'datasource'}}"


def test_links_point_at_the_dashboards_we_ship() -> None:
    for uid, board in BOARDS.items():
        urls = []  # the dashboard's links and the panels' data links
        for _, key, value in d.walk(board):
            if key == "links" and isinstance(value, list):
                urls += [link["url"] for link in value if "url" in link]
        assert urls, f"{uid} links nowhere"
        for url in urls:
            match = re.match(r"/d/([\w-]+)/", url)
            assert match and match.group(1) in BOARDS, f"{uid}: link {url} to an unknown dashboard"


def test_every_metric_a_query_names_exists_on_the_real_endpoints(exposed: dict[str, set[str]]) -> None:
    missing = {}
    for query in d.all_queries():
        names = d.metric_names(query.expr)
        assert names, f"{query.name} selects no metric: {query.expr}"
        if names - exposed["names"]:
            missing[query.name] = sorted(names - exposed["names"])
    for uid, board in BOARDS.items():
        for name, variable in d.variables(board).items():
            if variable["type"] == "query":
                selector, _ = d.label_values_query(d.variable_query(variable))
                if d.metric_names(selector) - exposed["names"]:
                    missing[f"{uid} variable {name}"] = sorted(d.metric_names(selector) - exposed["names"])
    records, alerts = d.rule_names_and_exprs()
    for name, expr in {**records, **alerts}.items():  # what the rules read exists too
        if d.metric_names(expr) - exposed["names"]:
            missing[f"rules.yml {name}"] = sorted(d.metric_names(expr) - exposed["names"])
    assert not missing, f"queries name metrics that no endpoint exposes: {missing}"


def test_fleet_metrics_are_deduplicated_across_supervisor_replicas(exposed: dict[str, set[str]]) -> None:
    """Every supervisor replica serves the same fleet numbers: a query must take ``max without
    (instance, job, pod)`` of them (of their rate, for counters) before it sums anything."""
    assert "orchestrator_fleet_runs_total" in exposed["fleet"]
    wrong = []
    for query in d.all_queries():
        for name in d.metric_names(query.expr) & exposed["fleet"]:
            for match in re.finditer(rf"(?<![\w:]){name}(?![\w:])", query.expr):
                before = query.expr[: match.start()].removesuffix("rate(")
                if not before.endswith(DEDUP):
                    wrong.append(f"{query.name}: {name}")
    assert not wrong, f"fleet metrics summed or shown per replica: {wrong}"


def test_every_label_a_query_uses_exists(exposed: dict[str, set[str]]) -> None:
    unknown = {}
    for query in d.all_queries():
        labels = d.label_names(query.expr) | d.legend_labels(query.legend)
        if labels - exposed["labels"]:
            unknown[query.name] = sorted(labels - exposed["labels"])
    assert not unknown, f"queries use labels that no series has: {unknown}"


def parse_rules() -> dict[str, Any]:
    """Every dashboard expression (variables substituted) as a recording rule, for promtool."""
    rules = []
    for uid, board in BOARDS.items():
        prefix = "dashboard:" + uid.replace("-", "_")
        for query in d.queries(board):
            expr = d.substitute(query.expr, PARSE_VALUES)
            rules.append({"record": f"{prefix}:panel{query.panel_id}_{query.ref_id}", "expr": expr})
        for name, variable in d.variables(board).items():
            if variable["type"] == "query":
                selector, _ = d.label_values_query(d.variable_query(variable))
                rules.append({"record": f"{prefix}:variable_{name}", "expr": d.substitute(selector, PARSE_VALUES)})
    return {"groups": [{"name": "dashboards", "rules": rules}]}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian package prometheus)")
def test_every_expression_parses(tmp_path: Path) -> None:
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump(parse_rules(), sort_keys=False))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = sum(len(g["rules"]) for g in parse_rules()["groups"])
    assert f"SUCCESS: {expected} rules found" in result.stdout, result.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian package prometheus)")
def test_a_broken_expression_is_caught(tmp_path: Path) -> None:
    """The parse check above can fail: promtool rejects an unclosed parenthesis."""
    path = tmp_path / "broken.rules.yml"
    rules = {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(orchestrator_x_total[1m])"}]}]}
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "parse error" in result.stdout + result.stderr


def test_the_lint_helpers_find_what_they_look_for() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (step, le) (rate(orchestrator_step_duration_seconds_bucket{workflow=~"a|b"}'
        '[$__rate_interval]))) / on (step) group_left orchestrator:x:rate5m{queue="q"} offset 5m'
    )
    assert d.metric_names(expr) == {"orchestrator_step_duration_seconds_bucket", "orchestrator:x:rate5m"}
    assert d.label_names(expr) == {"step", "le", "workflow", "queue"}
    assert d.unit_kind(expr) == "time"
    assert d.range_selectors("rate(x[5m]) + increase(y[$__rate_interval])") == ["5m", "$__rate_interval"]
    assert d.calls("max(rate(x[1m])) + rate(y[2m])", ("rate",)) == [("rate", "x[1m]"), ("rate", "y[2m]")]
    assert d.substitute('x{a=~"$workflow", b="${queue:regex}"}[$__rate_interval]', PARSE_VALUES) == (
        'x{a=~".*", b=".*"}[1m]'
    )
    with pytest.raises(KeyError):
        d.substitute("x{a=~'$workfow'}", PARSE_VALUES)


# -- provisioning ---------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_the_datasource_provisioning_points_at_the_compose_prometheus() -> None:
    config = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["access"] == "proxy"
    assert source["isDefault"] is True  # what the dashboards' datasource variable picks by default
    assert re.fullmatch(r"\d+[smh]", source["jsonData"]["timeInterval"])


def test_the_dashboard_provisioning_reads_the_mounted_folder() -> None:
    config = load_yaml(PROVISIONING / "dashboards" / "orchestrator.yaml")
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert provider["folder"]
    # nothing else in the provisioning folders that Grafana would try to load
    assert sorted(p.relative_to(PROVISIONING).as_posix() for p in PROVISIONING.rglob("*") if p.is_file()) == [
        "dashboards/orchestrator.yaml",
        "datasources/prometheus.yaml",
    ]


COMPOSE = d.REPO / "deploy" / "compose.yaml"
PROMETHEUS_CONFIG = d.REPO / "deploy" / "prometheus" / "prometheus.yml"


@pytest.mark.skipif(not COMPOSE.exists(), reason="deploy/compose.yaml is not there (yet)")
def test_compose_mounts_provisioning_and_dashboards_where_the_files_expect_them() -> None:
    compose = load_yaml(COMPOSE)
    grafana = compose["services"]["grafana"]
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in grafana["volumes"]]
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in volumes}
    assert mounts["/etc/grafana/provisioning"] == PROVISIONING
    assert mounts["/var/lib/grafana/dashboards"] == d.DASHBOARD_DIR
    assert "prometheus" in compose["services"], "the datasource URL names a `prometheus` service"


@pytest.mark.skipif(not PROMETHEUS_CONFIG.exists(), reason="deploy/prometheus/prometheus.yml is not there (yet)")
def test_the_datasource_scrape_interval_is_prometheus_scrape_interval() -> None:
    """Grafana computes $__rate_interval from it; a smaller value than the real one gives rates
    over windows with fewer than four scrapes (gaps)."""
    scrape_interval = load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    (source,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    assert source["jsonData"]["timeInterval"] == scrape_interval
