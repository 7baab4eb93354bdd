"""What every CLI command shares: settings from flags and env, the embedded server, output."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click
import pydantic

from orchestrator.client import Client
from orchestrator.codec import describe_validation_error
from orchestrator.embedded import ensure_embedded
from orchestrator.errors import ConfigError
from orchestrator.settings import Settings
from orchestrator.workflow import Workflow

F = TypeVar("F", bound=Callable[..., Any])


class ConfigUsageError(click.UsageError):
    """An invalid setting: exit code 2, like any other usage error."""


@dataclass
class CliState:
    """Global flags, resolved lazily into :class:`Settings` once a command knows its own flags."""

    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self, **more: Any) -> Settings:
        values = {k: v for k, v in {**self.overrides, **more}.items() if v is not None}
        try:
            settings = Settings(**values)
        except pydantic.ValidationError as exc:
            raise ConfigUsageError(describe_validation_error(exc, what="configuration")) from None
        if not settings.redis_url:
            url, started = ensure_embedded(settings.data_dir)
            if started:
                click.echo(
                    f"note: no REDIS_URL set; started an embedded redis-server at {url} "
                    f"(data in {settings.data_dir}/, stop it with `orchestrator redis stop`)",
                    err=True,
                )
            settings = settings.model_copy(update={"redis_url": url})
        return settings

    def client(self, **more: Any) -> Client:
        return Client(self.settings(**more))


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
