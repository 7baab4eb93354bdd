"""``orchestrator migrate``: move a namespace from the layout before partitions to the partitioned one.

Before partitions, a run's keys were tagged with its id, a queue was one stream, and the run
indexes were fleet-wide (:class:`~orchestrator.keys.LegacyKeys`). Now every key a script touches
for a run shares its partition's tag (:class:`~orchestrator.keys.Keys`). The migration, on the
same Redis (a single server or Sentinel's primary: ``RENAME`` across slots works there):

1. refuses to start while workers or a leading supervisor are alive (a stopped fleet holds no
   claim, so nothing is in flight), and records the namespace's partition count;
2. renames each run's keys (record, state, results, stash, history, lease) to its partition's
   names and files it in its partition's index with the score it had: finished runs in
   ``done``/``dead``, unfinished ones in ``active``, retries waiting out a backoff also in their
   queue's ``delayed`` set with their due time;
3. creates every lane's consumer group and enqueues the current step of each unfinished run
   through the sweep (``sweep.lua``): its old stream entry is not carried over (a stream entry
   cannot move between streams), so the sweep finds no entry and adds one, recording a
   ``repaired`` event ("no queued entry") in the run's history; a retry keeps its due time;
4. deletes the old streams, their ``queued`` and ``delayed`` sets and the old indexes.

Every step is idempotent: a migration that stops half-way (a crash, Ctrl-C) is finished by
running it again. Counters, fleet keys and the rejected stream keep their names. Committed
steps are never run again: results and state move with their run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import redis

from orchestrator import scripts
from orchestrator.connection import is_cluster
from orchestrator.errors import ConfigError
from orchestrator.keys import GROUP, Keys, LegacyKeys
from orchestrator.layout import check_layout
from orchestrator.store import Outcome, Store

PAGE = 500
INDEXES = ("active", "done", "dead")


@dataclass
class Migrated:
    """What a migration did (or, dry, would do)."""

    runs: int = 0
    keys_renamed: int = 0
    enqueued: int = 0  # unfinished runs whose current step was enqueued in its partition's stream
    scheduled: int = 0  # retries that keep waiting out their backoff
    old_keys_deleted: int = 0


def legacy_runs(client: redis.Redis, legacy: LegacyKeys, queues: Sequence[str]) -> dict[str, tuple[str, float]]:
    """Every run the old indexes know: run id -> (index, score). A run waiting in a queue's
    stream was indexed in that queue's ``queued`` set (unfinished: ``active`` here)."""
    found: dict[str, tuple[str, float]] = {}
    for index in INDEXES:
        rows: list[tuple[str, float]] = client.zrange(legacy.index(index), 0, -1, withscores=True)  # type: ignore[assignment]
        for run_id, score in rows:
            found[str(run_id)] = (index, float(score))
    for queue in queues:
        waiting: list[str] = client.zrange(legacy.queue(queue).queued, 0, -1)  # type: ignore[assignment]
        for run_id in waiting:
            found.setdefault(str(run_id), ("active", 0.0))
    return found


def _pages(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), PAGE):
        yield items[start : start + PAGE]


def migrate(
    client: redis.Redis,
    keys: Keys,
    *,
    dry_run: bool = False,
    force: bool = False,
    on_page: Callable[[int, int], None] | None = None,
) -> Migrated:
    """Move namespace ``keys.namespace`` to the partitioned layout with ``keys.partitions``
    partitions; see the module docstring. ``on_page(done, total)`` reports progress."""
    if is_cluster(client):
        raise ConfigError(
            "orchestrator migrate moves data written before partitions, which only ever ran on a single "
            "server (or Sentinel): there is nothing to migrate on a Redis Cluster; point --redis-url at the "
            "old server, migrate there, then move the data"
        )
    legacy = LegacyKeys(keys.namespace)
    store = Store(keys)
    if not force:
        _refuse_a_live_fleet(client, keys)
    queues = sorted(str(q) for q in client.smembers(keys.queues))
    runs = legacy_runs(client, legacy, queues)
    result = Migrated(runs=len(runs))
    if dry_run:
        return result
    check_layout(client, store)  # records the partition count (or refuses another)
    run_ids = sorted(runs)
    for done, page in enumerate(_pages(run_ids), start=1):
        result.keys_renamed += _move_runs(client, keys, legacy, page, runs)
        if on_page is not None:
            on_page(min(done * PAGE, len(run_ids)), len(run_ids))
    _move_retries(client, keys, legacy, queues)
    for queue in queues:
        for stream in keys.streams(queue):
            try:
                client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
    unfinished = [rid for rid in run_ids if runs[rid][0] == "active"]
    for page in _pages(unfinished):
        enqueued, scheduled = _enqueue(client, keys, store, page)
        result.enqueued += enqueued
        result.scheduled += scheduled
    result.old_keys_deleted = _delete_old(client, legacy, queues)
    return result


def _refuse_a_live_fleet(client: redis.Redis, keys: Keys) -> None:
    workers = int(client.zcard(keys.workers))
    leader = client.get(keys.leader)
    if workers or leader:
        raise ConfigError(
            f"namespace {keys.namespace!r} has {workers} registered worker(s) and "
            f"{'a' if leader else 'no'} leading supervisor: stop every worker and supervisor before "
            "migrating (a stopped worker leaves the fleet at once; a killed one within a lease), or pass --force"
        )


def _move_runs(
    client: redis.Redis, keys: Keys, legacy: LegacyKeys, page: Sequence[str], runs: dict[str, tuple[str, float]]
) -> int:
    """Rename one page of runs' keys and file them in their partitions' indexes; keys renamed."""
    pipe = client.pipeline(transaction=False)
    moves = [
        (old, new)
        for rid in page
        for old, new in zip(vars(legacy.run(rid)).values(), vars(keys.run(rid)).values(), strict=True)
    ]
    for old, _ in moves:
        pipe.exists(old)
    present = pipe.execute()
    pipe = client.pipeline(transaction=False)
    renamed = 0
    for (old, new), there in zip(moves, present, strict=True):
        if there:
            pipe.rename(old, new)
            renamed += 1
    for rid in page:
        index, score = runs[rid]
        part = keys.part_of(rid)
        pipe.zadd({"active": part.active, "done": part.done, "dead": part.dead}[index], {rid: score})
    pipe.execute()
    return renamed


def _move_retries(client: redis.Redis, keys: Keys, legacy: LegacyKeys, queues: Sequence[str]) -> None:
    """Retries waiting out a backoff: into their partition's ``delayed`` set, same due time."""
    for queue in queues:
        due: list[tuple[str, float]] = client.zrange(legacy.queue(queue).delayed, 0, -1, withscores=True)  # type: ignore[assignment]
        pipe = client.pipeline(transaction=False)
        for run_id, at in due:
            pipe.zadd(keys.queue_of(queue, run_id).delayed, {run_id: at})
        pipe.execute()


def _enqueue(client: redis.Redis, keys: Keys, store: Store, page: Sequence[str]) -> tuple[int, int]:
    """The sweep on each unfinished run: enqueues its current step, or keeps its retry waiting.
    Returns (runs enqueued, retries kept)."""
    pipe = client.pipeline(transaction=False)
    for run_id in page:
        pipe.hget(keys.run(run_id).run, "queue")
    queues = pipe.execute()
    calls = [store.sweep(run_id=rid, queue=q or "default") for rid, q in zip(page, queues, strict=True)]
    enqueued = scheduled = 0
    for reply in scripts.execute(client, calls):
        code = Outcome.parse(reply).code
        enqueued += code in ("REPAIRED", "QUEUED")
        scheduled += code == "SCHEDULED"
    return enqueued, scheduled


def _delete_old(client: redis.Redis, legacy: LegacyKeys, queues: Sequence[str]) -> int:
    old = [legacy.index(name) for name in INDEXES]
    for queue in queues:
        qk = legacy.queue(queue)
        old += [qk.stream, qk.queued, qk.delayed]
    return int(client.unlink(*old))
