"""``orchestrator demo``: the article's agent, a worker killed mid-run, and the recovery."""

from __future__ import annotations

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, pass_state


@cli.command()
@pass_state
def demo(state: CliState) -> None:
    """Run the article's research agent, kill -9 a worker mid-run, and show the recovery."""
    raise click.ClickException("the demo is not built yet")
