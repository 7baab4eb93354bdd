"""``orchestrator limits``: the fleet-wide concurrency and rate limits, read and changed at run time."""

from __future__ import annotations

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, output_option, pass_state
from orchestrator.errors import ValidationError
from orchestrator.permits import PermitState, clear_concurrency, read_permits, set_concurrency
from orchestrator.ratelimit import LimitState, clear_limit, read_limits, set_limit


@cli.group()
def limits() -> None:
    """Fleet-wide concurrency and rate limits (declared in code with flow.concurrency_limit and
    flow.rate_limit; changed here at run time)."""


def _rate_line(limit: LimitState) -> str:
    setting = (
        f"{limit.rate:g} per {limit.per_s:g} s, burst {limit.burst:g} (set at run time)"
        if limit.rate is not None and limit.per_s is not None and limit.burst is not None
        else "as the workflows define it"
    )
    return (
        f"{limit.name:<24} rate         {setting:<48} "
        f"booked {limit.booked_ahead_ms / 1000:6.1f} s ahead, {limit.waiting} waiting"
    )


def _permit_line(limit: PermitState) -> str:
    setting = (
        f"{limit.limit} at once (set at run time)"
        if limit.limit is not None
        else f"{limit.code_limit} at once (as the workflows define it)"
    )
    return f"{limit.name:<24} concurrency  {setting:<48} {limit.in_use} in use, {limit.waiting} waiting"


@limits.command("list")
@output_option
@pass_state
def list_limits(state: CliState, output: str) -> None:
    """Every limit the fleet knows: its setting, and how many steps hold or wait for it."""
    client = state.client()
    permits = read_permits(client.redis, client.keys)
    rates = read_limits(client.redis, client.keys)
    if output == "json":
        state.emit_json(
            [{"kind": "concurrency", **p.model_dump()} for p in permits]
            + [{"kind": "rate", **r.model_dump()} for r in rates]
        )
        return
    lines = [_permit_line(p) for p in permits] + [_rate_line(r) for r in rates]
    state.echo("\n".join(lines) or "no limits yet (workers announce theirs)")


@limits.command("set")
@click.argument("name")
@click.argument("concurrency", type=int, required=False)
@click.option("--rate", type=float, default=None, help="units let through per --per-s seconds")
@click.option("--per-s", type=float, default=60.0, show_default=True, help="the period --rate counts over")
@click.option("--burst", type=float, default=1.0, show_default=True, help="units let through at once")
@output_option
@pass_state
def set_command(
    state: CliState, name: str, concurrency: int | None, rate: float | None, per_s: float, burst: float, output: str
) -> None:
    """Change limit NAME fleet-wide from now on (over the code's): at most CONCURRENCY steps
    holding it at once (`limits set openai 8`), and/or --rate units per --per-s seconds."""
    if concurrency is None and rate is None:
        raise ValidationError(f"limits set {name}: give a CONCURRENCY (e.g. 8), a --rate, or both")
    client = state.client()
    done: list[tuple[dict[str, object], str]] = []
    if concurrency is not None:
        permit = set_concurrency(client.redis, client.keys, name, concurrency)
        done.append(({"kind": "concurrency", **permit.model_dump()}, _permit_line(permit)))
    if rate is not None:
        limit = set_limit(client.redis, client.keys, name, rate, per_s, burst)
        done.append(({"kind": "rate", **limit.model_dump()}, _rate_line(limit)))
    if output == "json":
        state.emit_json([doc for doc, _ in done])
    else:
        state.echo("\n".join(line for _, line in done))


@limits.command("clear")
@click.argument("name")
@pass_state
def clear_command(state: CliState, name: str) -> None:
    """Forget the run-time settings of NAME: the workflows' definitions apply again."""
    client = state.client()
    clear_concurrency(client.redis, client.keys, name)
    clear_limit(client.redis, client.keys, name)
    state.echo(f"{name}: as the workflows define it")
