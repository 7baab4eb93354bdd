"""Fleet-wide concurrency limits: at most ``limit`` steps holding a permit of a key at once,
across every worker (``permit.lua``).

A step that names a concurrency limit asks for a permit after its claim, before its code runs.
It holds the permit while its code runs, under a lease its worker's heartbeat renews, and gives
it back once its outcome is written; a worker killed with ``kill -9`` stops renewing and its
permits return when their lease ends (``lease_s``). A step that finds none free joins the
limit's waiting line and is given back to its queue (``defer.lua``): it waits holding no worker
slot, no thread and no lease, and is woken when a permit is free for it, in the order the
steps first asked. A wake that is lost (the releasing worker died) is made again by the
supervisor's sweep; a waiter that is never woken asks again every ``permit_poll_s``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aredis
from pydantic import BaseModel

from orchestrator import scripts
from orchestrator.connection import server_ms
from orchestrator.errors import DefinitionError
from orchestrator.keys import Keys
from orchestrator.ratelimit import LIMIT_NAME

if TYPE_CHECKING:
    from orchestrator.store import Store
    from orchestrator.workflow import Workflow

STALE_POLLS = 4  # a waiter that has not asked for this many polls has left the line


def stale_ms(permit_poll_s: float) -> int:
    """How long a waiter may go without asking before it leaves the line (``permit.lua``)."""
    return int(permit_poll_s * 1000 * STALE_POLLS)


@dataclass(frozen=True)
class ConcurrencyLimit:
    """At most ``limit`` steps hold a permit of ``name`` at once, fleet-wide.
    ``orchestrator limits set NAME N`` overrides ``limit`` at run time."""

    name: str
    limit: int

    def __post_init__(self) -> None:
        where = f"concurrency limit {self.name!r}"
        if not isinstance(self.name, str) or not LIMIT_NAME.match(self.name):
            raise DefinitionError(f"{where}: the name must be 1-100 characters of A-Z a-z 0-9 _ . : -")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise DefinitionError(f"{where}: limit={self.limit!r} must be a whole number of permits >= 1")


class PermitState(BaseModel):
    """A concurrency limit as Redis holds it now: the run-time limit (None: the workflows'
    own), the code's (as the workers announced it), the permits held (leases not ended) and
    the steps waiting for one."""

    name: str
    limit: int | None = None
    code_limit: int | None = None
    in_use: int = 0
    waiting: int = 0

    @property
    def effective(self) -> int | None:
        return self.limit if self.limit is not None else self.code_limit


def wake_calls(store: Store, name: str, pairs: Sequence[Any]) -> list[tuple[str, scripts.Call]]:
    """The wakes of the waiters a ``permit.lua`` reply named (queue, run, ...): (run, call)."""
    named = [(str(pairs[i]), str(pairs[i + 1])) for i in range(0, len(pairs) - 1, 2)]
    return [(run_id, store.promote(queue=queue, run_id=run_id, permit=name)) for queue, run_id in named if queue]


def forget_gone(store: Store, name: str, code_limit: int | str, woken: Sequence[tuple[str, Any]]) -> list[scripts.Call]:
    """The calls that take out of the line the waiters whose wake found their run ended."""
    return [store.permit(name, code_limit, "forget", run_id) for run_id, reply in woken if reply == "GONE"]


def wake_sync(client: redis.Redis, store: Store, name: str, code_limit: int | str, pairs: Sequence[Any]) -> int:
    """Wake the waiters ``pairs`` names and drop the ones whose run ended; how many were woken."""
    calls = wake_calls(store, name, pairs)
    if not calls:
        return 0
    replies = scripts.execute(client, [call for _, call in calls], raise_on_error=False)
    woken = [(run_id, reply) for (run_id, _), reply in zip(calls, replies, strict=True)]
    forget = forget_gone(store, name, code_limit, woken)
    if forget:
        scripts.execute(client, forget, raise_on_error=False)
    return sum(1 for _, reply in woken if isinstance(reply, str) and reply not in ("", "GONE"))


async def announce_permits(client: aredis.Redis, keys: Keys, workflows: Iterable[Workflow[Any]]) -> None:
    """Name the workflows' concurrency limits to the fleet, with the code's limit of each (the
    supervisor, which runs no workflow code, sweeps them with it; the last worker to start wins
    when two definitions differ, and ``limits set`` wins over both)."""
    declared = {limit.name: limit.limit for wf in workflows for limit in wf.concurrency_limits.values()}
    if not declared:
        return
    calls = [scripts.command("SADD", keys.permits, *sorted(declared))]
    calls += [scripts.command("HSET", keys.permit(name).info, "code_limit", limit) for name, limit in declared.items()]
    await scripts.execute_async(client, calls)


def set_concurrency(client: redis.Redis, keys: Keys, name: str, limit: int) -> PermitState:
    """Let at most ``limit`` steps hold ``name`` at once, fleet-wide, from now on."""
    ConcurrencyLimit(name, limit)
    client.hset(keys.permit(name).info, "limit", limit)
    client.sadd(keys.permits, name)
    return read_permits(client, keys, [name])[0]


def clear_concurrency(client: redis.Redis, keys: Keys, name: str) -> None:
    """Drop the run-time limit of ``name``: the workflows' definitions apply again."""
    client.hdel(keys.permit(name).info, "limit")


def read_permits(client: redis.Redis, keys: Keys, names: Sequence[str] | None = None) -> list[PermitState]:
    """The concurrency limits ``names`` (default: every one the fleet knows), as Redis holds them now."""
    if names is None:
        names = sorted(str(n) for n in client.smembers(keys.permits))
    now = server_ms(client)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pk = keys.permit(name)
        pipe.hmget(pk.info, "limit", "code_limit")
        pipe.zcount(pk.holders, f"({now}", "+inf")
        pipe.zcard(pk.waiting)
    replies = pipe.execute()
    out = []
    for i, name in enumerate(names):
        (limit, code_limit), in_use, waiting = replies[3 * i : 3 * i + 3]
        out.append(
            PermitState(
                name=name,
                limit=int(limit) if limit else None,
                code_limit=int(code_limit) if code_limit else None,
                in_use=int(in_use),
                waiting=int(waiting),
            )
        )
    return out
