"""Reading the Grafana dashboards for the tests: panels, queries, variables, and what a query names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RATE_INTERVAL = "$__rate_interval"
# PromQL words that look like identifiers but are not metric names
KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
    | {"inf", "nan", "Inf", "NaN"}
)
VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class Query:
    """One target of one panel."""

    dashboard: str  # uid
    panel_id: int
    panel: str  # title
    panel_type: str
    ref_id: str
    expr: str
    legend: str
    instant: bool

    @property
    def name(self) -> str:
        return f"{self.dashboard} #{self.panel_id} {self.panel!r} {self.ref_id}"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard by uid."""
    return {board["uid"]: board for board in map(load, DASHBOARD_FILES)}


def all_panels(board: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows."""
    out = []
    for panel in board.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def data_panels(board: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(board) if p.get("type") != "row"]


def queries(board: Mapping[str, Any]) -> list[Query]:
    return [
        Query(
            board["uid"],
            panel["id"],
            panel.get("title", ""),
            panel["type"],
            target["refId"],
            target["expr"],
            target.get("legendFormat", ""),
            bool(target.get("instant")) and not target.get("range", False),
        )
        for panel in data_panels(board)
        for target in panel.get("targets", [])
    ]


def all_queries() -> list[Query]:
    return [q for board in dashboards().values() for q in queries(board)]


def variables(board: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board.get("templating", {}).get("list", [])}


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query")
    return str(query.get("query") if isinstance(query, dict) else query)


def label_values_query(text: str) -> tuple[str, str]:
    """``label_values(selector, label)`` -> (selector, label)."""
    match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", text)
    assert match, f"not a label_values(selector, label) query: {text!r}"
    return match.group(1).strip(), match.group(2)


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) for every key of every object in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from walk(item, f"{path}[{i}]")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables (``$x``, ``${x}``, ``${x:fmt}``); an unknown one is an error."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return VARIABLE.sub(repl, expr)


def variables_used(expr: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in VARIABLE.finditer(expr)}


def without_strings(expr: str) -> str:
    return STRING.sub('""', expr)


def calls(expr: str, functions: tuple[str, ...]) -> list[tuple[str, str]]:
    """(function, argument text) of every call of ``functions`` in ``expr``."""
    out = []
    for match in re.finditer(r"\b(" + "|".join(functions) + r")\s*\(", expr):
        start = i = match.end()
        depth = 1
        while depth and i < len(expr):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        out.append((match.group(1), expr[start : i - 1]))
    return out


def range_selectors(expr: str) -> list[str]:
    return re.findall(r"\[([^\]]*)\]", without_strings(expr))


def metric_names(expr: str) -> set[str]:
    """Metric and recording-rule names an expression selects (not functions, labels, keywords)."""
    text = without_strings(expr)
    text = GROUPING.sub(" ", text)
    text = MATCHERS.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        name = match.group(1)
        following = text[match.end() :].lstrip()
        if name in KEYWORDS or following.startswith("("):
            continue
        names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by (``without`` lists excluded: absent is fine there)."""
    text = without_strings(expr)
    labels = set()
    for keyword, inside in GROUPING.findall(text):
        if keyword != "without":
            labels.update(x.strip() for x in inside.split(",") if x.strip())
    for inside in MATCHERS.findall(text):
        labels.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", inside))
    return labels


def legend_labels(legend: str) -> set[str]:
    return set(LEGEND_LABEL.findall(legend))


def unit_kind(expr: str) -> str | None:
    """What the result of an expression measures, where a unit is required: time, ratio, bytes."""
    text = without_strings(expr)
    is_rate = bool(re.search(r"\b(rate|irate|increase)\s*\(|:rate\w*", text))
    if re.match(r"\s*count\b", text):
        return None  # how many series
    if "_bytes" in text:
        return "bytes"
    if "histogram_quantile" in text and "_seconds_bucket" in text:
        return "time"
    if "_seconds_sum" in text and "_seconds_count" in text:
        return "time"
    if re.search(r"_ratio\b|:ratio\w*", text):
        return "ratio"
    if re.search(r"_seconds(_total)?\b", text) and not is_rate:
        return "time"
    return None


UNITS = {
    "time": {"s", "ms", "dtdurations", "dtdurationms"},
    "ratio": {"percentunit"},
    "bytes": {"bytes", "decbytes", "Bps", "binBps", "decBps"},
}


def target_unit(panel: Mapping[str, Any], ref_id: str) -> str | None:
    """The unit Grafana shows a target's values in: an override for its frame or its (renamed)
    column, else the panel default."""
    config = panel.get("fieldConfig", {})
    names = {ref_id}
    for transformation in panel.get("transformations", []):
        if transformation.get("id") == "organize":
            renamed = transformation.get("options", {}).get("renameByName", {})
            for column in (f"Value #{ref_id}", "Value"):
                if column in renamed:
                    names.add(renamed[column])
    for override in config.get("overrides", []):
        matcher = override.get("matcher", {})
        if matcher.get("id") in ("byFrameRefID", "byName") and matcher.get("options") in names:
            for prop in override.get("properties", []):
                if prop.get("id") == "unit":
                    return str(prop.get("value"))
    unit = config.get("defaults", {}).get("unit")
    return str(unit) if unit else None


def rule_names_and_exprs(path: Path = RULES) -> tuple[dict[str, str], dict[str, str]]:
    """(recording rule name -> expr, alert name -> expr) of a Prometheus rules file."""
    records: dict[str, str] = {}
    alerts: dict[str, str] = {}
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                records[rule["record"]] = rule["expr"]
            else:
                alerts[rule["alert"]] = rule["expr"]
    return records, alerts
