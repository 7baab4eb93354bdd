"""The fleet's figures from the stats-detail hash, without I/O: its fields, the fields a worker
creates at start, each workflow's step order, and the compound figures of the article.

The detail hash (``keys.stats_detail``) holds numbers kept by the Lua scripts atomically with
what they count, one field per label set: ``runs|wf|outcome``, ``steps|wf|step|outcome``,
``saved_steps|wf``, ``saved_ms|wf``, ``saved_stash_ms|wf``, ``cost|wf|step|unit``,
``cost_saved|wf|unit``, and ``order|wf|step`` (a step's place in its workflow, written by
workers at start).

The compound figures: per step the success ratio ``p_i`` (of attempts: ok / ok + error +
timeout + crashed), per workflow the chain completion a run would have *without* durability
(the product of its steps' ``p_i``) and the completion it has *with* it (of the runs that ended,
by each run's final outcome, the share that completed).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

FAILED_OUTCOMES = ("error", "timeout", "crashed")
STEP_OUTCOMES = ("ok", "error", "timeout", "crashed", "fenced")
RUN_OUTCOMES = ("submitted", "completed", "failed", "cancelled", "retried")
RUN_STATUSES = ("pending", "running", "retrying", "sleeping")  # of an unfinished run

Detail = dict[str, dict[tuple[str, ...], float]]


def parse_detail(raw: dict[str, str]) -> Detail:
    """``runs|wf|outcome`` -> {"runs": {(wf, outcome): n}} and so on for every kind of field.

    Every outcome of a workflow or step seen at all is filled in (0 when it never happened):
    a counter series that appears at its first increment hides that increment from ``rate()``.
    """
    out: Detail = defaultdict(dict)
    for field, value in raw.items():
        kind, *labels = field.split("|")
        try:
            out[kind][tuple(labels)] = float(value)
        except ValueError:  # a field of a newer version that is not a number: not ours to read
            continue
    for wf, step, _ in list(out.get("steps", {})):
        for outcome in STEP_OUTCOMES:
            out["steps"].setdefault((wf, step, outcome), 0.0)
    for wf, _ in list(out.get("runs", {})):
        for outcome in RUN_OUTCOMES:
            out["runs"].setdefault((wf, outcome), 0.0)
    return out


def zero_fields(workflows: dict[str, list[str]]) -> list[str]:
    """The stats-detail fields of these workflows' runs and steps, for a worker to create at 0."""
    fields = [f"runs|{wf}|{outcome}" for wf in workflows for outcome in RUN_OUTCOMES]
    fields += [
        f"steps|{wf}|{step}|{outcome}" for wf, steps in workflows.items() for step in steps for outcome in STEP_OUTCOMES
    ]
    return fields


def step_positions(workflows: dict[str, list[str]]) -> dict[str, int]:
    """``order|wf|step`` -> the step's place in its workflow (1 = first), for a worker to HSET at
    start: ``orchestrator stats`` lists steps in this order (the last worker to start wins)."""
    return {f"order|{wf}|{step}": i for wf, steps in workflows.items() for i, step in enumerate(steps, 1)}


def step_order(detail: Detail) -> dict[str, list[str]]:
    """Each workflow's steps in workflow order: as workers announced it, then any step no worker
    announced (an older worker's, a removed step's) by name."""
    steps: dict[str, set[str]] = defaultdict(set)
    for wf, step, *_ in [*detail.get("steps", {}), *detail.get("order", {})]:
        steps[wf].add(step)
    positions = detail.get("order", {})
    return {
        wf: sorted(names, key=lambda step: (positions.get((wf, step), float("inf")), step))
        for wf, names in steps.items()
    }


def known_workflows(detail: Detail) -> dict[str, list[str]]:
    """Every workflow that has had a run or a step (or that a worker announced), with its steps."""
    order = step_order(detail)
    return {wf: order.get(wf, []) for wf in sorted({key[0] for key in detail.get("runs", {})} | set(order))}


def compound(detail: Detail) -> dict[str, Any]:
    """Per step p_i, per workflow the predicted (product of p_i) and observed chain completion.

    Observed completion counts each run by its final outcome: a failed run that an operator
    retried (``orchestrator retry``) is no longer failed; if it then completes, it counts as
    completed only. So the runs that ended failed are ``failed - retried`` (every retry re-drives
    one failed run)."""
    per_step: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (wf, step, outcome), n in detail.get("steps", {}).items():
        per_step[(wf, step)][outcome] += n
    ratios: dict[tuple[str, str], float] = {}
    for key, outcomes in per_step.items():
        tried = outcomes["ok"] + sum(outcomes[o] for o in FAILED_OUTCOMES)
        if tried:
            ratios[key] = outcomes["ok"] / tried
    predicted: dict[str, float] = {}
    for (wf, _), ratio in ratios.items():
        predicted[wf] = predicted.get(wf, 1.0) * ratio
    runs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (wf, outcome), n in detail.get("runs", {}).items():
        runs[wf][outcome] += n
    for counts in runs.values():
        counts["failed_final"] = max(0.0, counts["failed"] - counts["retried"])
    observed = {
        wf: r["completed"] / (r["completed"] + r["failed_final"])
        for wf, r in runs.items()
        if r["completed"] + r["failed_final"]
    }
    return {"step_success": ratios, "predicted": predicted, "observed": observed, "runs": runs}


def apportion(estimates: dict[tuple[str, ...], float], total: int) -> dict[tuple[str, ...], float]:
    """Round estimated counts to whole runs that add up to ``total`` (largest remainders first)."""
    if not estimates:
        return {}
    scale = total / sum(estimates.values())
    scaled = {key: value * scale for key, value in estimates.items()}
    out = {key: float(int(value)) for key, value in scaled.items()}
    by_remainder = sorted(scaled, key=lambda key: scaled[key] - out[key], reverse=True)
    for key in by_remainder[: total - int(sum(out.values()))]:
        out[key] += 1
    return out
