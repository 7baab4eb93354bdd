"""Fleet-wide rate limits: how many units (step starts, or tokens the steps report) a key lets
through per period, across every worker, on the Redis clock (``rate.lua``: GCRA).

A step that names a rate limit is admitted after its claim, before its code runs. One that may
not start yet is given back with the moment it may (``defer.lua``): it waits in its queue's
delayed set holding no worker slot, no thread and no lease, and its place is reserved, so
waiting steps start in the order they asked and a crowd does not come back at once. A limit
counted in tokens (``cost=0``) admits a step while the key's debt is under one burst; the step
then reports what it used with ``ctx.spend(name, units)``, which pushes later steps back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from pydantic import BaseModel

from orchestrator import scripts
from orchestrator.connection import server_ms
from orchestrator.errors import DefinitionError, ValidationError
from orchestrator.keys import Keys

if TYPE_CHECKING:
    from orchestrator.store import Store
    from orchestrator.worker.batcher import Batcher

LIMIT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@dataclass(frozen=True)
class RateLimit:
    """At most ``rate`` units per ``per_s`` seconds across the fleet, ``burst`` of them at once.

    ``cost`` is what one step start takes (1: the limit counts calls; 0: the steps report what
    they used with ``ctx.spend``, e.g. tokens). In any window of ``t`` seconds at most
    ``burst + t * rate / per_s`` units are let through. ``orchestrator limits set`` overrides
    ``rate``, ``per_s`` and ``burst`` at run time, fleet-wide.
    """

    name: str
    rate: float
    per_s: float = 60.0
    burst: float = 1.0
    cost: float = 1.0

    def __post_init__(self) -> None:
        where = f"rate limit {self.name!r}"
        if not isinstance(self.name, str) or not LIMIT_NAME.match(self.name):
            raise DefinitionError(f"{where}: the name must be 1-100 characters of A-Z a-z 0-9 _ . : -")
        for label, value, low in (("rate", self.rate, 0), ("per_s", self.per_s, 0)):
            if not _number(value) or value <= low:
                raise DefinitionError(f"{where}: {label}={value!r} must be a number above 0")
        if not _number(self.burst) or self.burst < 1:
            raise DefinitionError(f"{where}: burst={self.burst!r} must be a number >= 1")
        if not _number(self.cost) or self.cost < 0:
            raise DefinitionError(f"{where}: cost={self.cost!r} must be a number >= 0")

    @property
    def per_ms(self) -> int:
        return max(1, math.ceil(self.per_s * 1000))


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


class Spender:
    """What ``ctx.spend`` charges: units a step used (tokens) against a rate limit its workflow
    declared, one per worker (shared by its step contexts), from a sync step's thread with the
    worker's blocking client, or through the worker's batcher from an async step."""

    def __init__(
        self, sync_redis: redis.Redis, batcher: Batcher, store: Store, limits: Mapping[str, Mapping[str, RateLimit]]
    ) -> None:
        self._redis = sync_redis
        self._batcher = batcher
        self._store = store
        self._limits = limits  # workflow name -> its declared limits

    def _call(self, workflow: str, name: str, units: float) -> scripts.Call:
        declared = self._limits.get(workflow, {})
        limit = declared.get(name)
        if limit is None:
            known = ", ".join(sorted(declared)) or "none"
            raise ValidationError(f"ctx.spend({name!r}, ...): no rate limit {name!r} is declared (declared: {known})")
        if not _number(units) or units < 0:
            raise ValidationError(f"ctx.spend({name!r}, {units!r}): expected a finite number of units >= 0")
        return self._store.rate(limit=limit, mode="spend", cost=float(units))

    def spend(self, workflow: str, name: str, units: float) -> None:
        scripts.execute(self._redis, [self._call(workflow, name, units)])

    async def aspend(self, workflow: str, name: str, units: float) -> None:
        await self._batcher.call(self._call(workflow, name, units))


class LimitState(BaseModel):
    """A rate limit as Redis holds it now: the run-time settings (None: the workflows' own),
    how far it is booked ahead (ms from now: the wait a new start would get beyond its burst),
    and how many starts wait for their reserved moment."""

    name: str
    rate: float | None = None
    per_s: float | None = None
    burst: float | None = None
    booked_ahead_ms: int = 0
    waiting: int = 0


def set_limit(client: redis.Redis, keys: Keys, name: str, rate: float, per_s: float, burst: float) -> LimitState:
    """Override limit ``name`` fleet-wide from now on (checked as a definition would be)."""
    checked = RateLimit(name, rate, per_s=per_s, burst=burst)
    state, _ = keys.rate_limit(name)
    client.hset(state, mapping={"rate": repr(float(rate)), "per_ms": checked.per_ms, "burst": repr(float(burst))})
    client.sadd(keys.rate_limits, name)
    return read_limits(client, keys, [name])[0]


def clear_limit(client: redis.Redis, keys: Keys, name: str) -> None:
    """Drop the run-time settings of ``name``: the workflows' definitions apply again."""
    state, _ = keys.rate_limit(name)
    client.hdel(state, "rate", "per_ms", "burst")


def read_limits(client: redis.Redis, keys: Keys, names: Sequence[str] | None = None) -> list[LimitState]:
    """The limits ``names`` (default: every one the fleet knows), as Redis holds them now."""
    if names is None:
        names = sorted(str(n) for n in client.smembers(keys.rate_limits))
    now = server_ms(client)
    pipe = client.pipeline(transaction=False)
    for name in names:
        state, reserved = keys.rate_limit(name)
        pipe.hmget(state, "tat", "rate", "per_ms", "burst")
        pipe.zcard(reserved)
    replies = pipe.execute()
    out = []
    for i, name in enumerate(names):
        (tat, rate, per_ms, burst), waiting = replies[2 * i], replies[2 * i + 1]
        out.append(
            LimitState(
                name=name,
                rate=float(rate) if rate else None,
                per_s=int(per_ms) / 1000 if per_ms else None,
                burst=float(burst) if burst else None,
                booked_ahead_ms=max(0, math.ceil(float(tat) - now)) if tat else 0,
                waiting=int(waiting),
            )
        )
    return out
