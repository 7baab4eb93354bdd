"""The outside observer: what synthetic steps record about themselves, and two fake receivers.

Steps of the chaos and test workflows write here *before* they return, so the record of an
execution survives even when its result is lost to a ``kill -9``. The invariant checker then
compares this ledger with the orchestrator's own records: a step whose result was persisted
must not appear again with a higher fencing token; a step must have seen the state its
predecessors committed; an effect must be applied once per idempotency key however often it
was requested (the deduping receiver); and a receiver that keeps the highest fencing token it
has seen per idempotency key must end up agreeing with the persisted record (the fenced
receiver).

The Redis connection comes from the process's own settings (``ORCHESTRATOR_REDIS_URL`` or
``REDIS_URL``, and ``ORCHESTRATOR_NAMESPACE``), which worker processes already have. A test
that routes a worker through a fault proxy, or a chaos run that rolls its Redis back to an
older copy, sets ``ORCHESTRATOR_LEDGER_URL`` to another server, so the observer's own writes
are not subject to the faults it observes.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from orchestrator.connection import connect
from orchestrator.context import StepContext
from orchestrator.keys import Keys, LedgerKeys
from orchestrator.settings import Settings

HOLD_TICK_S = 0.05  # how often a holder stamps its entry
FRESH_S = 1.0  # a holder whose stamp is older has stopped (at most half a permit's lease: below)


@dataclass(frozen=True)
class Execution:
    """One execution of a step visit, as the step itself recorded it."""

    key: str
    run: str
    step: str
    fence: int
    attempt: int
    worker: str
    saw: Any = None


class Ledger:
    """Read and write access to one namespace's ledger."""

    def __init__(self, client: redis.Redis, namespace: str, *, fresh_s: float = FRESH_S) -> None:
        self.fresh_s = fresh_s  # a holder whose stamp is older has stopped (killed, or told to stop)
        self.redis = client
        self.keys: LedgerKeys = Keys(namespace).ledger
        self.fenced = self.keys.fenced

    # -- written by steps -----------------------------------------------------------------

    def record(self, ctx: StepContext, saw: Any = None) -> None:
        """Note that this attempt of this step visit is executing, and what it saw."""
        doc = {
            "key": ctx.idempotency_key,
            "run": ctx.run_id,
            "step": ctx.step,
            "fence": ctx.fencing_token,
            "attempt": ctx.attempt,
            "worker": ctx.worker_id,
            "saw": saw,
        }
        self.redis.rpush(self.keys.executions, json.dumps(doc))

    def send_effect(self, ctx: StepContext, payload: str) -> bool:
        """The fake receiver: counts every request, applies the effect once per idempotency key."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.keys.requests, ctx.idempotency_key, 1)
        pipe.hsetnx(self.keys.effects, ctx.idempotency_key, payload)
        return bool(pipe.execute()[1])

    def send_fenced(self, idempotency_key: str, fencing_token: int) -> bool:
        """The fenced receiver: keeps the highest fencing token seen per idempotency key
        (``ZADD GT``) and accepts a write only when its token is that highest one, so a late
        write from an attempt that was replaced (a lower token) is refused. Returns accepted."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.fenced, {idempotency_key: fencing_token}, gt=True, ch=True)
        pipe.zscore(self.fenced, idempotency_key)
        kept = pipe.execute()[1]
        return kept is not None and int(kept) == fencing_token

    def hold(self, ctx: StepContext, limit: str, seconds: float) -> None:
        """Work ``seconds`` as a holder of a permit of concurrency limit ``limit``, heartbeating,
        and keep the most holders seen at once: each holder stamps its entry every
        :data:`HOLD_TICK_S` and counts the runs with an entry stamped within ``fresh_s`` (one
        killed, or stopped because its claim or permit was lost, stops stamping; a permit it held
        returns only after a lease, longer than that). A permit is a run's: a new attempt of a
        run whose worker died takes its permit over, so the two attempts count once."""
        me = f"{limit}|{ctx.run_id}|{ctx.fencing_token}"
        deadline = time.monotonic() + seconds
        try:
            while True:
                pipe = self.redis.pipeline(transaction=False)
                pipe.hset(self.keys.holding, me, repr(time.time()))
                pipe.hgetall(self.keys.holding)
                stamps: dict[str, str] = pipe.execute()[1]
                fresh = time.time() - self.fresh_s
                mine = (k.split("|") for k, v in stamps.items() if float(v) > fresh)
                live = len({run for name, run, _ in mine if name == limit})
                self.redis.zadd(self.keys.most_holding, {limit: live}, gt=True)
                if time.monotonic() >= deadline:
                    return
                time.sleep(min(HOLD_TICK_S, max(0.0, deadline - time.monotonic())))
                ctx.heartbeat()  # raises when the attempt must stop (its claim or permit lost)
        finally:
            with contextlib.suppress(redis.RedisError):
                self.redis.hdel(self.keys.holding, me)

    def item_done(self, run_id: str, item: str) -> None:
        self.redis.hincrby(self.keys.items, f"{run_id}:{item}", 1)

    # -- read by checks -------------------------------------------------------------------

    def executions(self) -> list[Execution]:
        raw: list[str] = self.redis.lrange(self.keys.executions, 0, -1)  # type: ignore[assignment]
        return [Execution(**json.loads(item)) for item in raw]

    def execution_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ex in self.executions():
            counts[ex.key] = counts.get(ex.key, 0) + 1
        return counts

    def fences(self, key: str) -> list[int]:
        return [ex.fence for ex in self.executions() if ex.key == key]

    def effects(self) -> dict[str, str]:
        return self.redis.hgetall(self.keys.effects)  # type: ignore[return-value]

    def effect_requests(self) -> dict[str, int]:
        raw: dict[str, str] = self.redis.hgetall(self.keys.requests)  # type: ignore[assignment]
        return {k: int(v) for k, v in raw.items()}

    def fenced_tokens(self) -> dict[str, int]:
        """The token the fenced receiver kept, per idempotency key (fences are below 2**53, so
        the zset's float scores hold them exactly)."""
        raw: list[tuple[str, float]] = self.redis.zrange(self.fenced, 0, -1, withscores=True)  # type: ignore[assignment]
        return {key: int(score) for key, score in raw}

    def most_holding(self) -> dict[str, int]:
        """The most holders of each concurrency limit seen at once (by :meth:`hold`)."""
        raw: list[tuple[str, float]] = self.redis.zrange(self.keys.most_holding, 0, -1, withscores=True)  # type: ignore[assignment]
        return {name: int(score) for name, score in raw}

    def items(self) -> dict[str, int]:
        raw: dict[str, str] = self.redis.hgetall(self.keys.items)  # type: ignore[assignment]
        return {k: int(v) for k, v in raw.items()}


_local: dict[tuple[str, str], Ledger] = {}
_lock = threading.Lock()


def current() -> Ledger:
    """The ledger of this process's own namespace (one client per process and namespace)."""
    direct = os.environ.get("ORCHESTRATOR_LEDGER_URL")
    url = direct or os.environ.get("ORCHESTRATOR_REDIS_URL") or os.environ.get("REDIS_URL") or ""
    key = (url, os.environ.get("ORCHESTRATOR_NAMESPACE", ""))
    with _lock:
        if key not in _local:
            settings = Settings()
            target = direct or (settings.plain_url() if settings.redis_url else None)
            if not target:
                raise RuntimeError("the ledger needs ORCHESTRATOR_REDIS_URL or REDIS_URL in the environment")
            probe = Keys(settings.namespace).cluster_probe
            fresh_s = min(FRESH_S, settings.lease_s / 2)  # a dead holder's stamp ends before its permit
            _local[key] = Ledger(connect(target, probe=probe), settings.namespace, fresh_s=fresh_s)
        return _local[key]
