"""Configuration: one pydantic settings model read from ``ORCHESTRATOR_*`` env vars.

Every CLI flag mirrors a field here (``--lease-s`` is ``ORCHESTRATOR_LEASE_S``); the Redis URL
also comes from plain ``REDIS_URL``. Timing relations are checked at start-up so a fleet never
runs with a lease that its own heartbeats cannot keep alive.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.connection import redact_url

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

    redis_url: str | None = Field(
        default=None,
        repr=False,
        validation_alias=AliasChoices("ORCHESTRATOR_REDIS_URL", "REDIS_URL", "redis_url"),
        description="redis://, rediss://, unix:// or redis+sentinel:// URL; unset = embedded server",
    )
    namespace: str = Field(default="orch", description="prefix of every key; isolates deployments")
    heartbeat_interval_s: float = Field(default=1.0, gt=0, description="worker heartbeat period")
    lease_s: float = Field(default=4.0, gt=0, description="a claim expires this long after its last heartbeat")
    reclaim_interval_s: float = Field(default=0.5, gt=0, description="supervisor scan period for expired leases")
    sweep_interval_s: float = Field(default=5.0, gt=0, description="supervisor period for the stuck-run sweep")
    sweep_after_s: float = Field(default=10.0, gt=0, description="a run idle this long is checked by the sweep")
    max_crashes: int = Field(default=3, ge=1, description="crashes of one step before it is quarantined")
    max_payload_bytes: int = Field(default=1 << 20, ge=1024, description="limit for input, updates, stashes")
    concurrency: int = Field(default=16, ge=1, le=10_000, description="steps one worker runs at once")
    block_ms: int = Field(default=500, ge=10, le=20_000, description="XREADGROUP BLOCK (< socket timeout)")
    drain_grace_s: float = Field(default=30.0, ge=0, description="SIGTERM: time in-flight steps get to finish")
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
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve /metrics here; unset = off")
    metrics_host: str = Field(default="127.0.0.1", description="address /metrics binds to (0.0.0.0 for all)")
    data_dir: Path = Field(default=Path(".orchestrator"), description="embedded Redis data folder")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    faults: str = Field(default="", description="test only: armed crash points, e.g. 'mid_step=kill'")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not NAME_PATTERN.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is invalid: expected 1-64 characters of A-Z a-z 0-9 _ . -")
        if self.lease_s <= 3 * self.heartbeat_interval_s:
            raise ValueError(
                f"lease_s ({self.lease_s}) must be more than 3 x heartbeat_interval_s "
                f"({self.heartbeat_interval_s}) so one late heartbeat does not expire a live claim"
            )
        if self.reclaim_interval_s >= self.lease_s:
            raise ValueError(
                f"reclaim_interval_s ({self.reclaim_interval_s}) must be less than lease_s ({self.lease_s})"
            )
        if self.sweep_after_s < self.lease_s:
            raise ValueError(f"sweep_after_s ({self.sweep_after_s}) must be at least lease_s ({self.lease_s})")
        return self

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    @property
    def redacted_url(self) -> str:
        """The Redis URL with any password replaced, safe for logs and output."""
        return redact_url(self.redis_url) if self.redis_url else "(embedded)"


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
