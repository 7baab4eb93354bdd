"""``orchestrator limits``: the fleet-wide rate limits, read and changed at run time."""

from __future__ import annotations

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, output_option, pass_state
from orchestrator.ratelimit import LimitState, clear_limit, read_limits, set_limit


@cli.group()
def limits() -> None:
    """Fleet-wide rate limits (declared in code with flow.rate_limit; changed here at run time)."""


def _line(limit: LimitState) -> str:
    setting = (
        f"{limit.rate:g} per {limit.per_s:g} s, burst {limit.burst:g} (set at run time)"
        if limit.rate is not None and limit.per_s is not None and limit.burst is not None
        else "as the workflows define it"
    )
    return f"{limit.name:<24} {setting:<48} booked {limit.booked_ahead_ms / 1000:6.1f} s ahead, {limit.waiting} waiting"


@limits.command("list")
@output_option
@pass_state
def list_limits(state: CliState, output: str) -> None:
    """Every rate limit the fleet knows: its setting, how far ahead it is booked, how many starts wait."""
    found = read_limits(state.client().redis, state.client().keys)
    if output == "json":
        state.emit_json([limit.model_dump() for limit in found])
        return
    state.echo("\n".join(_line(limit) for limit in found) or "no rate limits yet (workers announce theirs)")


@limits.command("set")
@click.argument("name")
@click.option("--rate", type=float, required=True, help="units let through per --per-s seconds")
@click.option("--per-s", type=float, default=60.0, show_default=True, help="the period --rate counts over")
@click.option("--burst", type=float, default=1.0, show_default=True, help="units let through at once")
@output_option
@pass_state
def set_command(state: CliState, name: str, rate: float, per_s: float, burst: float, output: str) -> None:
    """Let NAME through at --rate units per --per-s seconds, fleet-wide, from now on (over the code's)."""
    client = state.client()
    limit = set_limit(client.redis, client.keys, name, rate, per_s, burst)
    state.emit_json(limit.model_dump()) if output == "json" else state.echo(_line(limit))


@limits.command("clear")
@click.argument("name")
@pass_state
def clear_command(state: CliState, name: str) -> None:
    """Forget the run-time setting of NAME: the workflows' definitions apply again."""
    client = state.client()
    clear_limit(client.redis, client.keys, name)
    state.echo(f"{name}: as the workflows define it")
