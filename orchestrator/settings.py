"""Configuration: one pydantic settings model read from ``ORCHESTRATOR_*`` env vars.

Every CLI flag mirrors a field here (``--lease-s`` is ``ORCHESTRATOR_LEASE_S``); the Redis URL
comes from ``ORCHESTRATOR_REDIS_URL``, else plain ``REDIS_URL`` (the CLI reads it the same way,
through this model). Timing relations are checked at start-up so a fleet never runs with a
lease that its own heartbeats cannot keep alive.

The URL is a secret (``SecretStr``): ``redacted_url`` is how to show it, ``plain_url()`` is
for connecting only. An invalid setting raises :class:`~orchestrator.errors.ConfigError`
whose message names each bad field and never repeats the value of a secret one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pydantic
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.connection import check_url, redact_url
from orchestrator.errors import ConfigError
from orchestrator.keys import DEFAULT_PARTITIONS, MAX_PARTITIONS
from orchestrator.redact import Secrets

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# ORCHESTRATOR_* variables that are not settings: read by the embedded server, the demo, the ledger
OTHER_VARIABLES = frozenset({"ORCHESTRATOR_REDIS_SERVER", "ORCHESTRATOR_DEMO_DB", "ORCHESTRATOR_LEDGER_URL"})


class Settings(BaseSettings):
    """All tunables of clients, workers and supervisors, with production defaults.

    Defaults are chosen so that a step of a ``kill -9``'d worker runs again within about
    ``lease_s + reclaim_interval_s`` (4.5 s): heartbeats every second keep a 4 s lease alive,
    and the supervisor looks for expired leases twice a second.
    """

    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="forbid", validate_default=True)

    redis_url: SecretStr | None = Field(
        default=None,
        repr=False,
        validation_alias=AliasChoices("ORCHESTRATOR_REDIS_URL", "REDIS_URL", "redis_url"),
        description="redis://, rediss://, unix:// or redis+sentinel:// URL; unset = embedded server",
    )
    namespace: str = Field(default="orch", description="prefix of every key; isolates deployments")
    partitions: int = Field(
        default=DEFAULT_PARTITIONS,
        ge=1,
        le=MAX_PARTITIONS,
        description="runs are spread over this many partitions (hash slots); fixed for a namespace's life",
    )
    heartbeat_interval_s: float = Field(default=1.0, gt=0, description="worker heartbeat period")
    lease_s: float = Field(default=4.0, gt=0, description="a worker's claims lapse this long after its last heartbeat")
    reclaim_interval_s: float = Field(default=0.5, gt=0, description="supervisor scan period for expired leases")
    sweep_interval_s: float = Field(default=5.0, gt=0, description="supervisor period for the stuck-run sweep")
    sweep_after_s: float = Field(default=10.0, gt=0, description="a run idle this long is checked by the sweep")
    max_crashes: int = Field(default=3, ge=1, description="crashes of one step before it is quarantined")
    max_payload_bytes: int = Field(default=1 << 20, ge=1024, description="limit for input, updates, stashes")
    concurrency: int = Field(default=16, ge=1, le=10_000, description="steps one worker runs at once")
    block_ms: int = Field(default=500, ge=10, le=20_000, description="XREADGROUP BLOCK (< socket timeout)")
    drain_grace_s: float = Field(default=30.0, ge=0, description="SIGTERM: time in-flight steps get to finish")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", description="a worker's event loop: uvloop where installed (auto), or asyncio's own"
    )
    promote_interval_s: float = Field(default=0.2, gt=0, description="how often due retries are enqueued")
    retention_s: float = Field(
        default=7 * 86400, ge=0, description="completed and cancelled runs are purged after this; 0 = keep"
    )
    failed_retention_s: float = Field(
        default=30 * 86400, ge=0, description="failed (dead-lettered) runs are purged after this; 0 = keep"
    )
    max_run_steps: int = Field(
        default=10_000, ge=0, description="steps one run may commit before it fails as a runaway loop; 0 = no limit"
    )
    max_signals_per_run: int = Field(
        default=1000, ge=1, le=1_000_000, description="signals one run may be sent (a resent signal id counts once)"
    )
    max_map_items: int = Field(
        default=1000, ge=1, le=100_000, description="items one Map may run (each is a run of its own)"
    )
    max_output_entries: int = Field(
        default=1000, ge=1, le=1_000_000, description="live output entries (ctx.emit) kept per run, the newest"
    )
    permit_poll_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="a step waiting for a concurrency permit asks again this often (it is woken sooner when one frees)",
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve /metrics here; unset = off")
    metrics_host: str = Field(default="127.0.0.1", description="address /metrics binds to (0.0.0.0 for all)")
    data_dir: Path = Field(default=Path(".orchestrator"), description="embedded Redis data folder")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    faults: str = Field(default="", description="test only: armed crash points, e.g. 'mid_step=kill'")

    if TYPE_CHECKING:  # the URL is given as a plain str (or a SecretStr); pydantic makes it secret

        def __init__(self, *, redis_url: str | SecretStr | None = None, **values: Any) -> None: ...

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None:
            try:
                check_url(url.get_secret_value())
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return url

    @model_validator(mode="wrap")
    @classmethod
    def _validate(cls, data: Any, handler: pydantic.ValidatorFunctionWrapHandler) -> Settings:
        """Every way of building settings (the constructor, ``model_validate``, env) raises a
        ``ConfigError`` that never repeats a secret, instead of pydantic's error, which prints the
        whole input, URL and password included."""
        try:
            settings: Settings = handler(data)
        except pydantic.ValidationError as exc:
            raise settings_error(exc, data) from None
        problem = settings._cross_field_problem()
        if problem:
            raise ConfigError(f"configuration is invalid: {problem}")
        return settings

    def _cross_field_problem(self) -> str | None:
        if not NAME_PATTERN.match(self.namespace):
            return f"namespace {self.namespace!r} is invalid: expected 1-64 characters of A-Z a-z 0-9 _ . -"
        if self.lease_s <= 3 * self.heartbeat_interval_s:
            return (
                f"lease_s ({self.lease_s}) must be more than 3 x heartbeat_interval_s "
                f"({self.heartbeat_interval_s}) so one late heartbeat does not expire a live claim"
            )
        if self.reclaim_interval_s >= self.lease_s:
            return f"reclaim_interval_s ({self.reclaim_interval_s}) must be less than lease_s ({self.lease_s})"
        if self.sweep_after_s < self.lease_s:
            return f"sweep_after_s ({self.sweep_after_s}) must be at least lease_s ({self.lease_s})"
        return None

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    @property
    def redacted_url(self) -> str:
        """The Redis URL with any password replaced, safe for logs and output."""
        return redact_url(self.redis_url.get_secret_value()) if self.redis_url else "(embedded)"

    def plain_url(self) -> str:
        """The Redis URL, password included: for connecting only, never for output.

        Raises :class:`ConfigError` when no URL is set.
        """
        if self.redis_url is None:
            raise ConfigError(
                "no Redis URL: set ORCHESTRATOR_REDIS_URL (or REDIS_URL), or pass Settings(redis_url=...)"
            )
        return self.redis_url.get_secret_value()

    def with_url(self, url: str) -> Settings:
        """These settings with another Redis URL (checked like any URL)."""
        check_url(url)
        return self.model_copy(update={"redis_url": SecretStr(url)})


# Fields whose input is never shown in an error message, under any of their names.
SECRET_FIELDS = frozenset({"redis_url", "orchestrator_redis_url"})


def settings_error(exc: pydantic.ValidationError, data: Any) -> ConfigError:
    """A :class:`ConfigError` with one ``field: problem`` part per error.

    The input of a field is shown only for known fields that are not secret: never for the URL,
    never for an unknown name (``redis_ur=...`` is a URL too), never the whole input (what
    pydantic shows for an error that is not about one field). What is shown has every URL
    password and the given URL's password masked.
    """
    secrets = Secrets()
    if isinstance(data, Mapping):
        for key, value in data.items():
            if isinstance(value, str) and str(key).lower() in SECRET_FIELDS:
                secrets.add_url(value)
    parts = []
    for err in exc.errors()[:10]:
        name = ".".join(str(p) for p in err["loc"])
        name = "redis_url" if name.lower() in SECRET_FIELDS else name  # env var names -> the field's
        error = (err.get("ctx") or {}).get("error")
        message = str(error) if isinstance(error, ValueError) else err["msg"]
        shown = name in Settings.model_fields and name not in SECRET_FIELDS
        got = f" (got {_abbreviate(secrets.mask(repr(err.get('input'))))})" if shown else ""
        if err["type"] == "extra_forbidden":
            message = "not a setting" + _guess(name)
        named = message.startswith(f"{name} ")  # "redis_url 'redis://...': port ..." names itself
        parts.append(f"{message}{got}" if named else f"{name or '(root)'}: {message}{got}")
    return ConfigError(secrets.mask("configuration is invalid: " + "; ".join(parts)))


def _abbreviate(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _guess(name: str) -> str:
    guess = difflib.get_close_matches(name.lower(), sorted(Settings.model_fields), n=1)
    return f"; did you mean {guess[0]}?" if guess else ""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``ORCHESTRATOR_*`` variables that no setting reads, each with a guess at what was meant.

    pydantic-settings ignores unknown variables, so a typo (``ORCHESTRATOR_DRAIN_GRACE``)
    would silently do nothing; the CLI warns with these lines instead.
    """
    known = {f"ORCHESTRATOR_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    lines = []
    for name in sorted(k for k in environ if k.startswith("ORCHESTRATOR_") and k not in known):
        guess = difflib.get_close_matches(name, sorted(known), n=1)
        lines.append(f"{name} is not a setting and is ignored" + (f"; did you mean {guess[0]}?" if guess else ""))
    return lines
