"""The ``orchestrator`` command: worker, supervisor, submit, status, history, runs, retry, cancel, demo.

Exit codes: 0 ok, 1 error (the message says what happened and what to do), 2 usage (a bad
flag, argument or setting). Connection: ``--redis-url`` or ``REDIS_URL``; with neither, an
embedded redis-server is started (see ``orchestrator redis``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
import redis

from orchestrator.cli.common import CliState
from orchestrator.connection import redact_url
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.logs import configure
from orchestrator.settings import unknown_variables


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--redis-url",
    envvar=["REDIS_URL", "ORCHESTRATOR_REDIS_URL"],
    default=None,
    show_envvar=True,
    help="redis://, rediss://, unix:// or redis+sentinel:// URL; unset = embedded server",
)
@click.option("--namespace", envvar="ORCHESTRATOR_NAMESPACE", default=None, help="key prefix [orch]")
@click.option(
    "--data-dir",
    envvar="ORCHESTRATOR_DATA_DIR",
    type=click.Path(path_type=Path),
    default=None,
    help="embedded server data folder [.orchestrator]",
)
@click.option(
    "--log-level",
    envvar="ORCHESTRATOR_LOG_LEVEL",
    default="INFO",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option("--log-format", envvar="ORCHESTRATOR_LOG_FORMAT", default="text", type=click.Choice(["text", "json"]))
@click.version_option(package_name="orchestrator")
@click.pass_context
def cli(
    ctx: click.Context,
    redis_url: str | None,
    namespace: str | None,
    data_dir: Path | None,
    log_level: str,
    log_format: str,
) -> None:
    """Durable multi-step workflows on Redis Streams."""
    configure(log_level.upper(), log_format)
    for line in unknown_variables(os.environ):
        logging.getLogger("orchestrator.cli").warning(line)
    ctx.obj = CliState(
        {
            "redis_url": redis_url,
            "namespace": namespace,
            "data_dir": data_dir,
            "log_level": log_level.upper(),
            "log_format": log_format,
        }
    )


def main() -> None:
    """Entry point: run the CLI, turning our errors into a message and exit code 1 (2 for config)."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    except OrchestratorError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    except redis.AuthenticationError as exc:
        click.echo(f"error: Redis refused the credentials in the URL: {redact_url(str(exc))}", err=True)
        sys.exit(1)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        click.echo(f"error: cannot reach Redis: {redact_url(str(exc))}; check --redis-url / REDIS_URL", err=True)
        sys.exit(1)
    except redis.RedisError as exc:
        click.echo(f"error: Redis answered with an error: {redact_url(str(exc))}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


from orchestrator.cli import chaos, demo, fleet, runs, serve, server  # noqa: E402, F401 - registers the commands
