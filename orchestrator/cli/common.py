"""What every CLI command shares: the shared options, settings from flags and env, the embedded
server (started only by commands that need one), output."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from orchestrator.client import Client
from orchestrator.embedded import embedded_url, ensure_embedded
from orchestrator.errors import ConfigError
from orchestrator.logs import configure
from orchestrator.redact import Secrets
from orchestrator.settings import Settings
from orchestrator.workflow import Workflow

F = TypeVar("F", bound=Callable[..., Any])

NO_SERVER = (
    "no Redis to read from: ORCHESTRATOR_REDIS_URL / REDIS_URL is not set and no embedded server is running "
    "for {data_dir}/ (relative to this folder). Start one with `orchestrator redis start` (or run a worker or "
    "a submit, which start it), run this command from the folder where it runs, or set --redis-url."
)


class ConfigUsageError(click.UsageError):
    """An invalid setting: exit code 2, like any other usage error."""


@dataclass
class CliState:
    """The shared options (``--redis-url``, ``--namespace``...), resolved lazily into
    :class:`Settings` once a command knows its own flags, and the secrets to mask on output."""

    overrides: dict[str, Any] = field(default_factory=dict)
    secrets: Secrets = field(default_factory=Secrets)
    url: str = ""  # the URL the command connects to, once known (error messages show it redacted)

    def configure_logging(self) -> None:
        level, fmt = self.overrides.get("log_level", "INFO"), self.overrides.get("log_format", "text")
        configure(str(level).upper(), str(fmt), self.secrets)

    def configured(self, *, any_url: bool = True, **more: Any) -> Settings:
        """Settings from the flags and the environment (read by :class:`Settings` alone, so the
        CLI and the library agree on which variable wins); the URL may be unset. With
        ``any_url=False`` no URL is read at all (for commands about the embedded server)."""
        values = {k: v for k, v in {**self.overrides, **more}.items() if v is not None}
        if not any_url:
            values["redis_url"] = None  # an explicit None: the environment's URL is not read
        try:
            settings = Settings(**values)
        except ConfigError as exc:
            raise ConfigUsageError(exc.message) from None
        if settings.redis_url is not None:
            self.secrets.add_url(settings.plain_url())
        return settings

    def settings(self, *, start_embedded: bool = False, **more: Any) -> Settings:
        """Settings with a URL: the configured one, else the embedded server's.

        Only commands that need a server to do their job (``start_embedded``: submit, worker,
        supervisor) start one; the others use a running one or fail, saying how to start it.
        """
        settings = self.configured(**more)
        if settings.redis_url is None:
            settings = settings.with_url(self._embedded(settings.data_dir, start=start_embedded))
        self.url = settings.plain_url()
        return settings

    def _embedded(self, data_dir: Path, *, start: bool) -> str:
        if not start:
            url = embedded_url(data_dir)
            if url is None:
                raise click.ClickException(NO_SERVER.format(data_dir=data_dir))
            return url
        url, started = ensure_embedded(data_dir)
        if started:
            click.echo(
                f"note: no REDIS_URL set; started an embedded redis-server at {url} "
                f"(data in {data_dir}/, stop it with `orchestrator redis stop`)",
                err=True,
            )
        return url

    def client(self, *, start_embedded: bool = False, **more: Any) -> Client:
        return Client(self.settings(start_embedded=start_embedded, **more))

    def echo(self, text: str) -> None:
        """Print ``text`` with every URL password and known secret masked: a run's stored error
        or state may quote the URL a step used."""
        click.echo(self.secrets.mask(text))

    def emit_json(self, data: Any) -> None:
        self.echo(json.dumps(data, indent=2, default=str))


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Store a shared option's value. After a subcommand only a value given on its command line
    counts: there its env var would override the same option given before the subcommand."""
    if value is None or param.name is None:
        return
    if ctx.parent is not None and ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
        return
    state = ctx.ensure_object(CliState)
    state.overrides[param.name] = value
    if param.name == "redis_url":
        state.secrets.add_url(value)
    if param.name in ("log_level", "log_format") and ctx.parent is not None:
        state.configure_logging()


def shared_options(*, top: bool) -> list[click.Option]:
    """The options every command takes, before or after its name (``orchestrator --redis-url U
    worker`` and ``orchestrator worker --redis-url U``): defined once, added to each command by
    :class:`OrchestratorGroup`. ``top`` makes the group's copies, the ones that read env vars
    (the URL's only through :class:`Settings`)."""
    return [
        click.Option(
            ["--redis-url"],
            metavar="URL",
            callback=_remember,
            expose_value=False,
            help="redis://, rediss://, unix:// or redis+sentinel:// URL [env: ORCHESTRATOR_REDIS_URL, "
            "else REDIS_URL; neither = the embedded server]",
        ),
        click.Option(
            ["--namespace"],
            callback=_remember,
            expose_value=False,
            help="key prefix [orch; env: ORCHESTRATOR_NAMESPACE]",
        ),
        click.Option(
            ["--partitions"],
            type=int,
            callback=_remember,
            expose_value=False,
            help="runs are spread over this many partitions; fixed for a namespace [16; env: ORCHESTRATOR_PARTITIONS]",
        ),
        click.Option(
            ["--data-dir"],
            type=click.Path(path_type=Path),
            callback=_remember,
            expose_value=False,
            help="embedded server data folder [.orchestrator; env: ORCHESTRATOR_DATA_DIR]",
        ),
        click.Option(
            ["--log-level"],
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            envvar="ORCHESTRATOR_LOG_LEVEL" if top else None,
            callback=_remember,
            expose_value=False,
            help="[INFO; env: ORCHESTRATOR_LOG_LEVEL]",
        ),
        click.Option(
            ["--log-format"],
            type=click.Choice(["text", "json"]),
            envvar="ORCHESTRATOR_LOG_FORMAT" if top else None,
            callback=_remember,
            expose_value=False,
            help="[text; env: ORCHESTRATOR_LOG_FORMAT]",
        ),
    ]


class OrchestratorGroup(click.Group):
    """A group whose commands, and the commands of its subgroups, all take :func:`shared_options`."""

    group_class = type  # subgroups (runs, redis) are OrchestratorGroups too

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        taken = {opt for param in cmd.params for opt in getattr(param, "opts", [])}
        cmd.params += [opt for opt in shared_options(top=False) if not taken & set(opt.opts)]
        super().add_command(cmd, name)


pass_state = click.make_pass_decorator(CliState, ensure=True)


def output_option(func: F) -> F:
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="text for people, json for scripts",
    )(func)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def load_workflows(specs: tuple[str, ...]) -> list[Workflow[Any]]:
    """Import ``module:attribute`` specs; an attribute may be a Workflow or a list of them."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: apps in the current folder import
    found: list[Workflow[Any]] = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise click.BadParameter(f"{spec!r}: expected module:attribute, e.g. myapp.flows:research")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise click.BadParameter(f"{spec!r}: cannot import {module_name!r}: {exc}") from None
        if not hasattr(module, attr):
            raise click.BadParameter(f"{spec!r}: module {module_name!r} has no attribute {attr!r}")
        value = getattr(module, attr)
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if not isinstance(item, Workflow):
                raise click.BadParameter(f"{spec!r}: {type(item).__name__} is not a Workflow")
            found.append(item)
    return found


def config_error(exc: ConfigError) -> ConfigUsageError:
    return ConfigUsageError(exc.message)
