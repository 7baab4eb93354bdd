"""``orchestrator redis``: the embedded redis-server used when no REDIS_URL is set.

``orchestrator redis start`` prints only the URL on stdout (notes go to stderr), so that
``export REDIS_URL=$(orchestrator redis start)`` works.
"""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, pass_state
from orchestrator.embedded import embedded_url, ensure_embedded, stop_embedded


def _data_dir(state: CliState) -> Path:
    return state.configured(any_url=False).data_dir


@cli.group()
def redis() -> None:
    """Start, stop or locate the embedded redis-server (AOF on, data under --data-dir)."""


@redis.command()
@pass_state
def start(state: CliState) -> None:
    """Start the embedded server if it is not running; print its URL."""
    data_dir = _data_dir(state)
    url, started = ensure_embedded(data_dir)
    click.echo(url)
    note = "started" if started else "already running"
    click.echo(f"note: embedded redis-server {note} at {url} (data in {data_dir}/)", err=True)


@redis.command()
@pass_state
def stop(state: CliState) -> None:
    """Stop the embedded server (its data stays in the data folder)."""
    click.echo("stopped" if stop_embedded(_data_dir(state)) else "not running")


@redis.command()
@pass_state
def url(state: CliState) -> None:
    """Print the embedded server's URL, e.g. ``export REDIS_URL=$(orchestrator redis url)``."""
    found = embedded_url(_data_dir(state))
    if not found:
        raise click.ClickException("the embedded server is not running; start it with `orchestrator redis start`")
    click.echo(found)
