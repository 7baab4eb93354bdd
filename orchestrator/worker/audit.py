"""A worker's audit of the entries pending for it: gives back the ones it is not running.

Liveness is per worker (``alive.lua``): while a worker beats, the supervisor leaves every
entry pending for it alone. So an entry the worker lost track of would wait forever: a claim
or a chained commit whose reply was lost with the connection, an XREADGROUP reply lost the same
way, an ack that failed. Every ``lease_s`` the worker compares, per stream, how many entries
Redis holds for it with how many it knows of (``own_pending.lua``: one call per stream, whatever
the steps in flight); only where Redis holds more does it list its entries idle for a lease,
and an entry unknown at two audits in a row is given up: ``redispatch.lua`` re-checks the run
and re-enqueues the step (or drops an entry that no longer matters).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from orchestrator import scripts
from orchestrator.codec import Dispatch
from orchestrator.store import Outcome, Store
from orchestrator.worker.batcher import Batcher

log = logging.getLogger("orchestrator.worker")

PAGE = 1000  # entries listed per stream and audit


class PendingAudit:
    """Finds and gives back entries pending for ``worker`` that it does not know of."""

    def __init__(
        self, batcher: Batcher, store: Store, worker: str, lanes: Mapping[str, tuple[str, int]], lease_ms: int
    ) -> None:
        self._batcher = batcher
        self._store = store
        self._worker = worker
        self._lanes = lanes  # stream -> (queue, partition): the worker's own, which gains the priority lanes in use
        self._lease_ms = lease_ms
        self._suspects: set[tuple[str, str]] = set()

    async def run(self, known: set[tuple[str, str]]) -> int:
        """One audit; ``known``: (stream, entry id) of every entry this worker is handling.
        Returns how many entries it gave up."""
        streams = list(self._lanes)
        per_stream: dict[str, int] = {}
        for stream, _ in known:
            per_stream[stream] = per_stream.get(stream, 0) + 1
        calls = [
            self._store.own_pending(
                stream=s, consumer=self._worker, known=per_stream.get(s, 0), idle_ms=self._lease_ms, limit=PAGE
            )
            for s in streams
        ]
        listings = await self._batcher.call_many(calls)
        unknown = {
            (stream, str(entry_id))
            for stream, ids in zip(streams, listings, strict=True)
            if not isinstance(ids, Exception)
            for entry_id in ids
        } - known
        orphans, self._suspects = unknown & self._suspects, unknown - self._suspects
        return await self._give_up(sorted(orphans)) if orphans else 0

    async def _give_up(self, orphans: list[tuple[str, str]]) -> int:
        rows = await self._batcher.call_many([scripts.command("XRANGE", s, e, e) for s, e in orphans])
        calls = []
        for (stream, entry_id), found in zip(orphans, rows, strict=True):
            queue, partition = self._lanes[stream]
            dispatch = Dispatch.from_xrange(found)
            if dispatch is None:  # unreadable: nothing to re-run from here; the sweep repairs its run
                calls += self._store.ack(queue, partition, [entry_id])
                continue
            calls.append(
                self._store.redispatch(
                    queue=queue, entry_id=entry_id, consumer=self._worker, dispatch=dispatch, giver=self._worker
                )
            )
        given = 0
        for call, reply in zip(calls, await self._batcher.call_many(calls), strict=True):
            if call.script is not None and not isinstance(reply, Exception):
                given += Outcome.parse(reply).code == "REDISPATCHED"
        log.warning(
            "entries pending for this worker that it was not running were given back",
            extra={"worker": self._worker, "entries": len(orphans), "redispatched": given},
        )
        return given
