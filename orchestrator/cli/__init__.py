"""The ``orchestrator`` command: worker, supervisor, submit, status, history, runs, retry, cancel, demo.

Exit codes: 0 ok, 1 error (the message says what happened and what to do), 2 usage (a bad
flag, argument or setting). Connection: ``--redis-url`` (before or after the command's name),
else ``ORCHESTRATOR_REDIS_URL``, else ``REDIS_URL``: the order the library reads them in. With
none, commands that need a server (submit, worker, supervisor) start an embedded redis-server
(see ``orchestrator redis``); commands that only read or act on existing runs never do.

Nothing this command prints carries a password: every error message and log line has the
password of any URL in it masked, and so has an unexpected traceback.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import traceback

import click
import redis

from orchestrator.cli.common import CliState, OrchestratorGroup, shared_options
from orchestrator.connection import redis_failure
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.settings import unknown_variables


@click.group(
    cls=OrchestratorGroup,
    params=shared_options(top=True),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="orchestrator")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Durable multi-step workflows on Redis Streams."""
    state = ctx.ensure_object(CliState)
    for name in ("ORCHESTRATOR_REDIS_URL", "REDIS_URL"):
        state.secrets.add_url(os.environ.get(name))
    state.configure_logging()
    for line in unknown_variables(os.environ):
        logging.getLogger("orchestrator.cli").warning(line)


def main() -> None:
    """Entry point: run the CLI, turning our errors into a message and exit code 1 (2 for config)."""
    state = CliState()
    try:
        cli.main(standalone_mode=False, obj=state)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        shown = io.StringIO()
        exc.show(file=shown)
        click.echo(state.secrets.mask(shown.getvalue()), err=True, nl=False)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (OrchestratorError, redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        _fail(state, exc)
    except Exception as exc:  # a bug, ours or in an imported workflow module: show where, never a password
        click.echo(state.secrets.mask(traceback.format_exc()), err=True, nl=False)
        what = f"error: unexpected {type(exc).__name__} (traceback above); if it comes from orchestrator's code, "
        click.echo(state.secrets.mask(what + "please report it"), err=True)
        sys.exit(1)


def _fail(state: CliState, exc: OrchestratorError | redis.RedisError | redis.exceptions.RedisClusterException) -> None:
    error = exc if isinstance(exc, OrchestratorError) else redis_failure(exc, state.url)  # raw: e.g. `stats`
    click.echo(state.secrets.mask(f"error: {error.message}"), err=True)
    sys.exit(2 if isinstance(error, ConfigError) else 1)


from orchestrator.cli import chaos, demo, fleet, keda, limits, migrate, runs, serve, server  # noqa: E402, F401 - registers the commands
