"""The namespace's partition count, checked by every process before it reads or writes a run.

A run's keys are found from its id and the count (``keys.partition_of``), so every process of a
namespace must use the same count: the first one records it in the fleet's ``config`` hash and
the others compare theirs with it, and refuse to go on with another.
"""

from __future__ import annotations

import redis
from redis import asyncio as aredis

from orchestrator import scripts
from orchestrator.errors import ConfigError
from orchestrator.store import Store


def _mismatch(store: Store, recorded: int) -> ConfigError:
    keys = store.keys
    return ConfigError(
        f"partitions {keys.partitions} does not match namespace {keys.namespace!r}, which has {recorded} "
        f"partitions: set ORCHESTRATOR_PARTITIONS={recorded} (--partitions {recorded}); a namespace's "
        "partition count is fixed when it is first used"
    )


def check_layout(client: redis.Redis, store: Store, *, record: bool = True) -> int | None:
    """Record the count if the namespace has none (unless ``record`` is False: read-only users);
    raise :class:`ConfigError` if it has another. Returns the recorded count (None: none yet)."""
    if record:
        recorded: int | None = int(scripts.execute(client, [store.layout()])[0])
    else:
        value = client.hmget(store.keys.config, "partitions")[0]
        recorded = None if value is None else int(value)
    if recorded is not None and recorded != store.keys.partitions:
        raise _mismatch(store, recorded)
    return recorded


async def check_layout_async(client: aredis.Redis, store: Store) -> None:
    """:func:`check_layout` for the asyncio client (the worker)."""
    recorded = int((await scripts.execute_async(client, [store.layout()]))[0])
    if recorded != store.keys.partitions:
        raise _mismatch(store, recorded)
