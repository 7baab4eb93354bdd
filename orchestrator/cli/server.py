"""``orchestrator redis``: the embedded redis-server used when no REDIS_URL is set."""

from __future__ import annotations

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, pass_state
from orchestrator.embedded import embedded_url, ensure_embedded, stop_embedded
from orchestrator.settings import Settings


def _data_dir(state: CliState) -> Settings:
    return Settings(**{k: v for k, v in state.overrides.items() if v is not None and k != "redis_url"})


@cli.group()
def redis() -> None:
    """Start, stop or locate the embedded redis-server (AOF on, data under --data-dir)."""


@redis.command()
@pass_state
def start(state: CliState) -> None:
    """Start the embedded server if it is not running; print its URL."""
    url, started = ensure_embedded(_data_dir(state).data_dir)
    click.echo(url if not started else f"{url} (started)")


@redis.command()
@pass_state
def stop(state: CliState) -> None:
    """Stop the embedded server (its data stays in the data folder)."""
    click.echo("stopped" if stop_embedded(_data_dir(state).data_dir) else "not running")


@redis.command()
@pass_state
def url(state: CliState) -> None:
    """Print the embedded server's URL, e.g. ``export REDIS_URL=$(orchestrator redis url)``."""
    found = embedded_url(_data_dir(state).data_dir)
    if not found:
        raise click.ClickException("the embedded server is not running; start it with `orchestrator redis start`")
    click.echo(found)
