"""Commands on runs: submit, status, history, runs list / why / purge, retry, cancel, signal, stats."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, load_workflows, output_option, pass_state
from orchestrator.cli.render import history_text, live_line, runs_table, status_text
from orchestrator.output import OutputEvent
from orchestrator.priority import PRIORITIES, Priority
from orchestrator.retention import Purged
from orchestrator.runs import STATUSES

F = TypeVar("F", bound=Callable[..., Any])


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


def json_file_option(what: str) -> Callable[[F], F]:
    """``--file/-f``: read the command's JSON ``what`` from a file (``read_input``)."""
    return click.option(
        "--file",
        "-f",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help=f"read the JSON {what} from a file",
    )


@cli.command()
@click.argument("workflow")
@click.argument("input", required=False)
@json_file_option("input")
@click.option("--run-id", default=None, help="idempotency key of the run [random]; same id, same run")
@click.option("--wait", "wait_s", type=float, default=None, metavar="SECONDS", help="wait for the result")
@click.option(
    "--deadline-s",
    type=float,
    default=None,
    metavar="SECONDS",
    help="fail the run (DeadlineExceeded) if it has not finished this long after the submit",
)
@click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    default="normal",
    show_default=True,
    help="workers start higher levels first, each level its share (4:2:1)",
)
@click.option(
    "--on-finish",
    default=None,
    metavar="QUEUE:MODULE.FUNC",
    help="when the run finishes, enqueue an RQ job FUNC(run_id, status, error) on the RQ queue QUEUE",
)
@output_option
@pass_state
def submit(
    state: CliState,
    workflow: str,
    input: str | None,
    file: Path | None,
    run_id: str | None,
    wait_s: float | None,
    deadline_s: float | None,
    priority: Priority,
    on_finish: str | None,
    output: str,
) -> None:
    """Start a run of WORKFLOW (module:attribute) with INPUT (JSON; '-' reads stdin)."""
    (flow,) = load_workflows((workflow,))
    callback = None
    if on_finish is not None:
        queue, colon, func = on_finish.rpartition(":")  # a queue name may hold ':', a function path not
        if not colon:
            raise click.BadParameter(f"{on_finish!r}: expected QUEUE:module.function", param_hint="--on-finish")
        callback = {"queue": queue, "func": func}
    client = state.client(start_embedded=True)
    run = client.submit(
        flow, read_input(input, file), run_id=run_id, deadline_s=deadline_s, priority=priority, on_finish=callback
    )
    result: dict[str, Any] = {"run_id": run.run_id, "created": run.created}
    if output == "text":
        state.echo(f"{'submitted' if run.created else 'already exists'}: {run.run_id}")
    if wait_s is not None:
        if output == "text":  # show progress while waiting: a long run is not a silent one
            t0 = 0
            for ev in run.follow(timeout_s=wait_s):
                t0 = t0 or ev.at
                state.echo(live_line(ev, t0))
        final = run.wait(timeout_s=max(1.0, wait_s))
        result["state"] = final.model_dump(mode="json") if hasattr(final, "model_dump") else final
    if output == "json":
        state.emit_json(result)
    elif "state" in result:
        state.echo(json.dumps(result["state"], indent=2))


@cli.command()
@click.argument("run_id")
@output_option
@pass_state
def status(state: CliState, run_id: str, output: str) -> None:
    """Show where a run is: status, current step, attempt, fencing token, error."""
    info = state.client().get(run_id)
    state.emit_json(info.model_dump(mode="json")) if output == "json" else state.echo(status_text(info))


@cli.command()
@click.argument("run_id")
@click.option(
    "--follow", "-f", is_flag=True, help="print events and live step output as they happen until the run finishes"
)
@click.option("--after", default="0-0", show_default=True, help="with --follow: live output after this entry id")
@click.option("--timeout-s", type=float, default=3600.0, show_default=True, help="how long --follow waits")
@output_option
@pass_state
def history(state: CliState, run_id: str, follow: bool, after: str, timeout_s: float, output: str) -> None:
    """Show a run's timeline: every attempt of every step, its outcome, worker and duration.

    With --follow, print each event and what steps emit (ctx.emit; JSON lines with -o json,
    output as {"type": "output", "id": ...}) as it happens until the run ends; --after ID
    resumes the output after an entry id seen before.
    """
    client = state.client()
    if follow:
        t0 = 0
        for ev in client.run(run_id).follow(timeout_s=timeout_s, output=True, after=after):
            t0 = t0 or ev.at
            if output == "json":
                extra = {"type": "output"} if isinstance(ev, OutputEvent) else {}
                state.echo(json.dumps(extra | ev.model_dump(mode="json", exclude_none=True)))
            else:
                state.echo(live_line(ev, t0))
        return
    hist = client.history(run_id)
    state.emit_json(hist.model_dump(mode="json")) if output == "json" else state.echo(history_text(hist))


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
        state.emit_json([r.model_dump(mode="json") for r in found])
    else:
        state.echo(runs_table(found))


DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhdw]?)$")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    match = DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration: expected a number with s, m, h, d or w, e.g. 7d")
    return float(match["n"]) * UNIT_S[match["unit"]]


@runs.command("why")
@click.argument("run_id")
@output_option
@pass_state
def runs_why(state: CliState, run_id: str, output: str) -> None:
    """Say what a run is waiting for right now (queue, worker, recovery, sleep, backoff), or how it ended."""
    why = state.client().why(run_id)
    state.emit_json(why.model_dump(mode="json")) if output == "json" else state.echo(why.text)


@runs.command("purge")
@click.option(
    "--status",
    "statuses",
    type=click.Choice(["completed", "cancelled", "failed"]),
    multiple=True,
    help="only runs with this status (repeat for several) [completed, cancelled and failed]",
)
@click.option("--older-than", required=True, help="finished at least this long ago: 30m, 12h, 7d, 2w (or seconds)")
@click.option("--dry-run", is_flag=True, help="count what would be deleted; delete nothing")
@output_option
@pass_state
def runs_purge(state: CliState, statuses: tuple[str, ...], older_than: str, dry_run: bool, output: str) -> None:
    """Delete finished runs (record, state, results, history) that finished long enough ago.

    The supervisor does this on its own after --retention-s (completed, cancelled) and
    --failed-retention-s (failed); this is for doing it now, e.g. failed runs after an incident.
    """
    age_s = parse_duration(older_than)
    chosen = statuses or ("completed", "cancelled", "failed")

    last = [time.monotonic()]

    def progress(done: Purged) -> None:
        """Long purges say how far they are, every few seconds (on stderr)."""
        if output == "text" and time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            click.echo(f"  ... {done.purged} {'would be ' if dry_run else ''}purged so far", err=True)

    done = state.client().purge(chosen, older_than_s=age_s, dry_run=dry_run, on_page=progress)
    if output == "json":
        state.emit_json({"purged": done.purged, "kept": done.kept, "dry_run": dry_run, "statuses": list(chosen)})
        return
    verb = "would purge" if dry_run else "purged"
    state.echo(f"{verb} {done.purged} runs ({', '.join(chosen)}) finished more than {older_than} ago")


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
        state.emit_json(info.model_dump(mode="json"))
    else:
        state.echo(f"retrying {run_id} from step {info.step} (key {info.idempotency_key})")


@cli.command()
@click.argument("run_id")
@click.option("--reason", default="cancelled from the CLI", show_default=True)
@output_option
@pass_state
def cancel(state: CliState, run_id: str, reason: str, output: str) -> None:
    """Cancel an unfinished run; a running step is told at its next heartbeat."""
    info = state.client().cancel(run_id, reason)
    state.emit_json(info.model_dump(mode="json")) if output == "json" else state.echo(f"cancelled {run_id}")


@cli.command()
@click.argument("run_id")
@click.argument("name")
@click.argument("payload", required=False)
@json_file_option("payload")
@click.option(
    "--workflow",
    "-w",
    "workflow",
    required=True,
    metavar="MODULE:ATTR",
    help="the run's workflow, whose model for NAME checks the payload before it is sent",
)
@click.option("--signal-id", default=None, help="idempotency key of the signal [random]; same id, sent once")
@click.option("--max-signals-per-run", type=int, default=None, help="signals one run may be sent [1000]")
@output_option
@pass_state
def signal(
    state: CliState,
    run_id: str,
    name: str,
    payload: str | None,
    file: Path | None,
    workflow: str,
    signal_id: str | None,
    max_signals_per_run: int | None,
    output: str,
) -> None:
    """Send signal NAME with PAYLOAD (JSON; '-' reads stdin) to a run.

    A run waiting for NAME goes on at once; otherwise the signal is kept until a step waits for it.
    """
    (flow,) = load_workflows((workflow,))
    client = state.client(max_signals_per_run=max_signals_per_run)
    sent = client.signal(run_id, name, read_input(payload, file), signal_id=signal_id, workflow=flow)
    if output == "json":
        state.emit_json(sent.model_dump(mode="json"))
        return
    state.echo(
        {
            "delivered": f"delivered {name} ({sent.signal_id}) to {run_id}: it goes on at step {sent.step}",
            "buffered": f"kept {name} ({sent.signal_id}) for {run_id}: delivered when a step waits for it",
            "duplicate": f"already sent: {name} ({sent.signal_id}) to {run_id}; nothing changed",
        }[sent.outcome]
    )
