"""Retention: deleting finished runs, by the supervisor on a schedule and by ``orchestrator runs purge``.

Finished runs are indexed by when they finished (``done``: completed and cancelled; ``dead``:
failed), so the runs past a retention are the front of an index: a purge pages through that
front, deleting each run with ``purge.lua``, and costs what it deletes, not what is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from orchestrator import scripts
from orchestrator.connection import server_ms
from orchestrator.store import Store

PAGE = 500


@dataclass
class Purged:
    """What a purge pass did: runs deleted, runs kept (not selected), stale index entries dropped."""

    purged: int = 0
    kept: int = 0
    dropped: int = 0
    complete: bool = True  # False when the budget ran out before every due run was seen


def purge_finished(
    client: redis.Redis,
    store: Store,
    index: str,
    statuses: Sequence[str],
    *,
    age_ms: int,
    budget_s: float | None = None,
    dry_run: bool = False,
    on_page: Callable[[Purged], None] | None = None,
) -> Purged:
    """Delete the runs of a finished-run index (``done`` or ``dead``) in ``statuses`` that
    finished at least ``age_ms`` ago (by the Redis clock), oldest first, in pipelined pages.

    With ``dry_run`` nothing is deleted; the runs that would be are counted.
    """
    cutoff_ms = server_ms(client) - age_ms
    result = Purged()
    deadline = None if budget_s is None else time.monotonic() + budget_s
    for part in store.keys.parts:
        key = part.done if index == "done" else part.dead
        if not _purge_index(client, store, key, index, statuses, cutoff_ms, result, deadline, dry_run, on_page):
            result.complete = False
            return result
    return result


def _purge_index(
    client: redis.Redis,
    store: Store,
    key: str,
    index: str,
    statuses: Sequence[str],
    cutoff_ms: int,
    result: Purged,
    deadline: float | None,
    dry_run: bool,
    on_page: Callable[[Purged], None] | None,
) -> bool:
    """One partition's index, added to ``result``; False when the deadline came first."""
    seen = result.kept + (result.purged if dry_run else 0)  # the offset counts only this index's runs
    while True:
        offset = result.kept + (result.purged if dry_run else 0) - seen
        run_ids: list[str] = client.zrangebyscore(key, "-inf", cutoff_ms, start=offset, num=PAGE)  # type: ignore[assignment]
        if dry_run:
            pipe = client.pipeline(transaction=False)
            for run_id in run_ids:
                pipe.hmget(store.keys.run(run_id).run, "status", "finished_ms")
            for status, finished_ms in pipe.execute():
                due = finished_ms is None or int(finished_ms) <= cutoff_ms
                if status in statuses and due:
                    result.purged += 1
                else:
                    result.kept += 1
        else:
            calls = [store.purge(run_id=rid, index=index, cutoff_ms=cutoff_ms, statuses=statuses) for rid in run_ids]
            for reply in scripts.execute(client, calls):
                result.purged += reply == 1
                result.kept += reply == 0
                result.dropped += reply == -1
        if on_page is not None:
            on_page(result)
        if len(run_ids) < PAGE:
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
