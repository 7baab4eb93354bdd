"""``orchestrator migrate``: a namespace from the layout before partitions to the partitioned one."""

from __future__ import annotations

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, pass_state
from orchestrator.client import Client
from orchestrator.migrate import migrate


@cli.command("migrate")
@click.option("--dry-run", is_flag=True, help="count what would move; change nothing")
@click.option("--force", is_flag=True, help="migrate although workers or a supervisor look alive")
@pass_state
def migrate_command(state: CliState, dry_run: bool, force: bool) -> None:
    """Move the namespace's runs to the partitioned key layout (stop workers and supervisors first).

    Renames every run's keys into its partition, re-indexes it, and enqueues the current step
    of each unfinished run in its partition's stream (recorded in its history as repaired: "no
    queued entry"). Safe to run again: a migration cut short is finished by the next one.
    """
    settings = state.settings()
    with Client(settings) as client:

        def progress(done: int, total: int) -> None:
            click.echo(f"  {done:,} / {total:,} runs moved", err=True)

        result = migrate(client.redis, client.keys, dry_run=dry_run, force=force, on_page=progress)
    where = f"namespace {settings.namespace!r} ({settings.partitions} partitions)"
    if dry_run:
        click.echo(f"{where}: {result.runs:,} runs would move; nothing changed (dry run)")
        return
    click.echo(
        f"{where}: {result.runs:,} runs moved ({result.keys_renamed:,} keys renamed); "
        f"{result.enqueued:,} unfinished runs enqueued, {result.scheduled:,} retries kept waiting; "
        f"{result.old_keys_deleted:,} old streams and indexes deleted"
    )
