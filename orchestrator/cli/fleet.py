"""``orchestrator stats`` and ``orchestrator top``: the compound table and a live view of the fleet.

Both read the same numbers a supervisor serves to Prometheus (``FleetCollector``), so what an
operator sees in the terminal matches the dashboards.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, emit_json, output_option, pass_state
from orchestrator.client import Client
from orchestrator.figures import parse_detail, step_order
from orchestrator.metrics import FleetCollector

Samples = dict[str, list[tuple[dict[str, str], float]]]
# `top` reads the whole fleet state at every refresh: not more often than this
MIN_INTERVAL_S = 0.5


def read_fleet(client: Client) -> Samples:
    """Every sample the fleet collector would export right now, by sample name."""
    collector = FleetCollector(client.redis, client.keys, lease_ms=client.settings.lease_ms)
    out: Samples = defaultdict(list)
    for family in collector.collect():
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), sample.value))
    if single(out, "orchestrator_fleet_scrape_error"):
        client.redis.ping()  # raises the connection error the collector swallowed, for the CLI to report
    return out


def read_step_order(client: Client) -> dict[str, list[str]]:
    """Each workflow's steps in workflow order (as its workers announced it at start)."""
    raw: dict[str, str] = client.redis.hgetall(client.keys.stats_detail)  # type: ignore[assignment]
    return step_order(parse_detail(raw))  # the places live in the fleet's detail hash only


def by(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(lab.get(k, "") for k in labels): v for lab, v in samples.get(name, [])}


def single(samples: Samples, name: str) -> float:
    values = [v for _, v in samples.get(name, [])]
    return values[0] if values else 0.0


def compound_rows(samples: Samples, order: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """One row per workflow: steps, p_i (in workflow order), predicted vs observed completion,
    runs completed and failed (by final outcome: a failed run retried is not failed any more),
    recoveries, work saved (committed steps and stashed progress that resumed runs did not redo)."""
    order = order or {}
    p_i = by(samples, "orchestrator_step_success_ratio", "workflow", "step")
    predicted = by(samples, "orchestrator_chain_completion_predicted_ratio", "workflow")
    observed = by(samples, "orchestrator_chain_completion_observed_ratio", "workflow")
    runs = by(samples, "orchestrator_fleet_runs_total", "workflow", "outcome")
    attempts = by(samples, "orchestrator_fleet_step_attempts_total", "workflow", "step", "outcome")
    saved_steps = by(samples, "orchestrator_fleet_work_saved_steps_total", "workflow")
    saved_s = by(samples, "orchestrator_fleet_work_saved_seconds_total", "workflow")
    stashed_s = by(samples, "orchestrator_fleet_work_saved_stash_seconds_total", "workflow")
    rows = []
    for workflow in sorted({wf for wf, _ in runs} | {wf for wf, _ in p_i}):
        ratios = {step: r for (wf, step), r in p_i.items() if wf == workflow}
        position = {step: i for i, step in enumerate(order.get(workflow, []))}
        failed = runs.get((workflow, "failed"), 0.0) - runs.get((workflow, "retried"), 0.0)
        rows.append(
            {
                "workflow": workflow,
                "steps": len(ratios),
                "p_i": dict(sorted(ratios.items(), key=lambda item: (position.get(item[0], len(position)), item[0]))),
                "predicted": predicted.get((workflow,)),
                "observed": observed.get((workflow,)),
                "completed": runs.get((workflow, "completed"), 0.0),
                "failed": max(0.0, failed),
                "retried": runs.get((workflow, "retried"), 0.0),
                "recoveries": sum(n for (wf, _, o), n in attempts.items() if wf == workflow and o == "crashed"),
                "saved_steps": saved_steps.get((workflow,), 0.0),
                "saved_seconds": saved_s.get((workflow,), 0.0),
                "saved_stash_seconds": stashed_s.get((workflow,), 0.0),
            }
        )
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def compound_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs yet"
    header = (
        f"{'WORKFLOW':<20} {'STEPS':>5} {'LOWEST p_i':>10} {'WITHOUT DURABILITY':>19} {'WITH IT':>8} "
        f"{'DONE':>6} {'FAILED':>6} {'RECOVERIES':>10}  WORK SAVED"
    )
    lines = [header]
    for r in rows:
        lowest = min(r["p_i"].values()) if r["p_i"] else None
        lines.append(
            f"{r['workflow']:<20} {r['steps']:>5} {_pct(lowest):>10} {_pct(r['predicted']):>19} "
            f"{_pct(r['observed']):>8} {r['completed']:>6.0f} {r['failed']:>6.0f} {r['recoveries']:>10.0f}"
            f"  {_work_saved(r)}"
        )
    return "\n".join(lines)


def _work_saved(row: dict[str, Any]) -> str:
    """What resuming did not redo: the committed steps (their step time), plus the progress the
    crashed steps' last ``ctx.stash()`` kept."""
    stashed_s, total_s = row["saved_stash_seconds"], row["saved_seconds"]
    if not row["saved_steps"] and not total_s:
        return "-"
    committed = f"{row['saved_steps']:.0f} steps, {total_s - stashed_s:.1f} s"
    return f"{committed} + {stashed_s:.1f} s stashed = {total_s:.1f} s" if stashed_s else committed


def steps_text(samples: Samples, workflow: str, order: list[str] | None = None) -> str:
    """The attempts of each step of ``workflow``, in workflow order (``order``, then any other by name)."""
    attempts = by(samples, "orchestrator_fleet_step_attempts_total", "workflow", "step", "outcome")
    p_i = by(samples, "orchestrator_step_success_ratio", "workflow", "step")
    seen = {s for wf, s, _ in attempts if wf == workflow}
    steps = [s for s in order or [] if s in seen] + sorted(seen - set(order or []))
    lines = [
        f"steps of {workflow}:",
        f"  {'STEP':<24} {'OK':>6} {'ERROR':>6} {'TIMEOUT':>7} {'CRASHED':>7} {'FENCED':>6} {'p_i':>7}",
    ]
    for step in steps:
        n = {o: attempts.get((workflow, step, o), 0.0) for o in ("ok", "error", "timeout", "crashed", "fenced")}
        lines.append(
            f"  {step:<24} {n['ok']:>6.0f} {n['error']:>6.0f} {n['timeout']:>7.0f} {n['crashed']:>7.0f} "
            f"{n['fenced']:>6.0f} {_pct(p_i.get((workflow, step))):>7}"
        )
    return "\n".join(lines)


def fleet_text(samples: Samples) -> str:
    queues = sorted({q for (q,) in by(samples, "orchestrator_queue_length", "queue")})
    leading = single(samples, "orchestrator_fleet_leading_supervisors")
    lines = [
        f"workers live {single(samples, 'orchestrator_fleet_live_workers'):.0f}, "
        f"dead letter {sum(v for _, v in samples.get('orchestrator_fleet_dead_letter_runs', [])):.0f} runs, "
        + ("a supervisor leads" if leading else "no supervisor leads (nothing re-dispatches, sweeps or retries)")
    ]
    for q in queues:
        length = by(samples, "orchestrator_queue_length", "queue")[(q,)]
        pending = by(samples, "orchestrator_queue_pending_entries", "queue")[(q,)]
        lag = by(samples, "orchestrator_queue_lag_entries", "queue")[(q,)]
        oldest = by(samples, "orchestrator_queue_oldest_pending_age_seconds", "queue")[(q,)]
        delayed = by(samples, "orchestrator_queue_delayed_entries", "queue")[(q,)]
        lines.append(
            f"queue {q}: {length:.0f} entries, {lag:.0f} waiting, {pending:.0f} running "
            f"(oldest {oldest:.1f} s), {delayed:.0f} retries scheduled"
        )
    events = [
        ("crashes", "orchestrator_fleet_crashes_total"),
        ("re-dispatched", "orchestrator_fleet_redispatched_steps_total"),
        ("fenced", "orchestrator_fleet_fenced_commits_total"),
        ("repaired", "orchestrator_fleet_repaired_runs_total"),
        ("quarantined", "orchestrator_fleet_quarantined_steps_total"),
        ("dead workers", "orchestrator_fleet_dead_workers_total"),
    ]
    lines.append("recovery: " + ", ".join(f"{label} {single(samples, name):.0f}" for label, name in events))
    return "\n".join(lines)


def stats_text(client: Client, workflow: str | None = None) -> str:
    """What ``orchestrator stats`` prints: the compound table, the steps of ``workflow`` (in
    workflow order) if given, and the fleet's queues and recoveries."""
    samples = read_fleet(client)
    order = read_step_order(client)
    parts = [compound_text(compound_rows(samples, order))]
    if workflow:
        parts.append(steps_text(samples, workflow, order.get(workflow)))
    parts.append(fleet_text(samples))
    return "\n\n".join(parts)


@cli.command()
@click.option("--workflow", default=None, help="also show each step of this workflow")
@output_option
@pass_state
def stats(state: CliState, workflow: str | None, output: str) -> None:
    """The compound table: per workflow, each step's success ratio p_i, the completion a run would
    have without durability (their product) next to the completion it has with it, and the work
    resuming saved. Lifetime figures of this namespace.

    Runs count by their final outcome (a failed run that was retried and completed is completed);
    work saved is the committed steps resumed runs did not redo, plus what their crashed steps'
    stashes kept. --workflow lists its steps in workflow order."""
    client = state.client()
    if output == "json":
        emit_json({"workflows": compound_rows(read_fleet(client), read_step_order(client)), "counters": client.stats()})
        return
    click.echo(stats_text(client, workflow))


@cli.command()
@click.option(
    "--interval",
    "-n",
    type=click.FloatRange(min=MIN_INTERVAL_S),
    default=2.0,
    show_default=True,
    help=f"seconds between refreshes (at least {MIN_INTERVAL_S:g}: each one reads the fleet's state from Redis)",
)
@click.option(
    "--iterations", type=click.IntRange(min=0), default=0, help="stop after this many refreshes [0 = until Ctrl-C]"
)
@pass_state
def top(state: CliState, interval: float, iterations: int) -> None:
    """A live view of the fleet: throughput, queues, recoveries and the compound table."""
    client = state.client()
    last: tuple[float, float, float] | None = None
    shown = 0
    try:
        while True:
            samples = read_fleet(client)
            runs = by(samples, "orchestrator_fleet_runs_total", "workflow", "outcome")
            steps = by(samples, "orchestrator_fleet_step_attempts_total", "workflow", "step", "outcome")
            done = sum(n for (_, o), n in runs.items() if o == "completed")
            ok = sum(n for (_, _, o), n in steps.items() if o == "ok")
            now = time.monotonic()
            rate = ""
            if last is not None and now > last[0]:
                rate = (
                    f"  {(done - last[1]) / (now - last[0]):.1f} runs/s completed, "
                    f"{(ok - last[2]) / (now - last[0]):.1f} steps/s"
                )
            last = (now, done, ok)
            click.clear()
            click.echo(f"orchestrator top  {time.strftime('%H:%M:%S')}  namespace {client.settings.namespace}{rate}\n")
            rows = compound_rows(samples, read_step_order(client))
            click.echo(fleet_text(samples) + "\n\n" + compound_text(rows))
            shown += 1
            if iterations and shown >= iterations:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
