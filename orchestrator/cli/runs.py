"""Commands on runs: submit, status, history, runs list, retry, cancel, stats."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, emit_json, load_workflows, output_option, pass_state
from orchestrator.cli.render import history_text, live_line, runs_table, status_text
from orchestrator.runs import STATUSES


def read_input(text: str | None, file: Path | None) -> Any:
    """JSON input from the argument, a file, or stdin (``-``)."""
    if text is not None and file is not None:
        raise click.UsageError("give the input either as an argument or with --file, not both")
    if file is not None:
        raw, source = file.read_text(), str(file)
    elif text == "-":
        raw, source = sys.stdin.read(), "stdin"
    elif text is not None:
        raw, source = text, "the INPUT argument"
    else:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{source} is not valid JSON: {exc}") from None


@cli.command()
@click.argument("workflow")
@click.argument("input", required=False)
@click.option(
    "--file",
    "-f",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="read the JSON input from a file",
)
@click.option("--run-id", default=None, help="idempotency key of the run [random]; same id, same run")
@click.option("--wait", "wait_s", type=float, default=None, metavar="SECONDS", help="wait for the result")
@output_option
@pass_state
def submit(
    state: CliState,
    workflow: str,
    input: str | None,
    file: Path | None,
    run_id: str | None,
    wait_s: float | None,
    output: str,
) -> None:
    """Start a run of WORKFLOW (module:attribute) with INPUT (JSON; '-' reads stdin)."""
    (flow,) = load_workflows((workflow,))
    client = state.client()
    run = client.submit(flow, read_input(input, file), run_id=run_id)
    result: dict[str, Any] = {"run_id": run.run_id, "created": run.created}
    if output == "text":
        click.echo(f"{'submitted' if run.created else 'already exists'}: {run.run_id}")
    if wait_s is not None:
        if output == "text":  # show progress while waiting: a long run is not a silent one
            t0 = 0
            for ev in run.follow(timeout_s=wait_s):
                t0 = t0 or ev.at
                click.echo(live_line(ev, t0))
        final = run.wait(timeout_s=max(1.0, wait_s))
        result["state"] = final.model_dump(mode="json") if hasattr(final, "model_dump") else final
    if output == "json":
        emit_json(result)
    elif "state" in result:
        click.echo(json.dumps(result["state"], indent=2))


@cli.command()
@click.argument("run_id")
@output_option
@pass_state
def status(state: CliState, run_id: str, output: str) -> None:
    """Show where a run is: status, current step, attempt, fencing token, error."""
    info = state.client().get(run_id)
    emit_json(info.model_dump(mode="json")) if output == "json" else click.echo(status_text(info))


@cli.command()
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="print events as they happen until the run finishes")
@click.option("--timeout-s", type=float, default=3600.0, show_default=True, help="how long --follow waits")
@output_option
@pass_state
def history(state: CliState, run_id: str, follow: bool, timeout_s: float, output: str) -> None:
    """Show a run's timeline: every attempt of every step, its outcome, worker and duration.

    With --follow, print each event as it happens (JSON lines with -o json) until the run ends.
    """
    client = state.client()
    if follow:
        t0 = 0
        for ev in client.run(run_id).follow(timeout_s=timeout_s):
            t0 = t0 or ev.at
            click.echo(ev.model_dump_json(exclude_none=True) if output == "json" else live_line(ev, t0))
        return
    hist = client.history(run_id)
    emit_json(hist.model_dump(mode="json")) if output == "json" else click.echo(history_text(hist))


@cli.group()
def runs() -> None:
    """List runs."""


@runs.command("list")
@click.option("--status", "status_filter", type=click.Choice(STATUSES), default=None)
@click.option("--limit", type=int, default=50, show_default=True)
@output_option
@pass_state
def runs_list(state: CliState, status_filter: str | None, limit: int, output: str) -> None:
    """Runs by most recent activity, optionally only those with one status."""
    found = state.client().list_runs(status=status_filter, limit=limit)
    if output == "json":
        emit_json([r.model_dump(mode="json") for r in found])
    else:
        click.echo(runs_table(found))


@cli.command()
@click.argument("run_id")
@output_option
@pass_state
def retry(state: CliState, run_id: str, output: str) -> None:
    """Re-drive a failed (dead-lettered or quarantined) run from its failed step."""
    client = state.client()
    client.retry(run_id)
    info = client.get(run_id)
    if output == "json":
        emit_json(info.model_dump(mode="json"))
    else:
        click.echo(f"retrying {run_id} from step {info.step} (key {info.idempotency_key})")


@cli.command()
@click.argument("run_id")
@click.option("--reason", default="cancelled from the CLI", show_default=True)
@output_option
@pass_state
def cancel(state: CliState, run_id: str, reason: str, output: str) -> None:
    """Cancel an unfinished run; a running step is told at its next heartbeat."""
    info = state.client().cancel(run_id, reason)
    emit_json(info.model_dump(mode="json")) if output == "json" else click.echo(f"cancelled {run_id}")
