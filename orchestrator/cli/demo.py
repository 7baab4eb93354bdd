"""``orchestrator demo``: the article's agent, a worker killed mid-run, and the recovery."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, pass_state


@cli.command()
@click.option("--kill/--no-kill", default=True, show_default=True, help="kill -9 a worker in the middle of a step")
@click.option("--competitors", type=click.IntRange(3, 7), default=4, show_default=True)
@click.option(
    "--demo-dir",
    type=click.Path(path_type=Path),
    default=Path(".orchestrator-demo"),
    show_default=True,
    help="where the demo keeps its Redis data, logs and simulated outside world (wiped at start)",
)
@click.option(
    "--approve",
    type=click.Choice(["auto", "manually"]),
    default="auto",
    show_default=True,
    help="who approves the meeting: the demo after 2 s, or you, with the `orchestrator signal` command it prints",
)
@pass_state
def demo(state: CliState, kill: bool, competitors: int, demo_dir: Path, approve: str) -> None:
    """Run the article's research agent on real processes, kill -9 a worker mid-step, show the recovery.

    Before booking the meeting the run waits for a person's approval (a signal) while every
    worker is killed; the approval still resumes it.

    Uses REDIS_URL when set (in a fresh namespace), else a private redis-server of its own.
    """
    from orchestrator.demo.runner import run_demo

    configured = state.configured()
    code = run_demo(
        redis_url=configured.plain_url() if configured.redis_url else None,
        data_dir=demo_dir,
        kill=kill,
        competitors=competitors,
        echo=click.echo,
        approve=approve,
    )
    sys.exit(code)
