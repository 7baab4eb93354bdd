"""What a worker does at the level of its queues: consumer groups, malformed entries, due retries."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pydantic
import redis
import redis.asyncio as aredis

from orchestrator import scripts
from orchestrator.codec import Dispatch, describe_validation_error, dumps
from orchestrator.keys import GROUP, Keys
from orchestrator.store import Store
from orchestrator.worker.batcher import Batcher
from orchestrator.worker.runtime import Runtime

log = logging.getLogger("orchestrator.worker")

REJECTED_MAXLEN = 10_000


async def ensure_groups(client: aredis.Redis, streams: Sequence[str]) -> None:
    """Create the consumer group of each stream, reading from its start (idempotent)."""
    for stream in streams:
        try:
            await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def parse_entry(
    rt: Runtime, keys: Keys, lane: tuple[str, int], entry_id: str, fields: dict[str, str] | None
) -> Dispatch | None:
    """The dispatch an entry of ``lane`` (a queue in one partition) carries, or None when it is
    malformed or belongs to a run of another partition: then it is set aside in the ``rejected``
    stream with the reason, counted and acked (the run record is the source of truth; if it was a
    run's only dispatch, the sweep makes a valid one)."""
    queue, partition = lane
    try:
        dispatch = Dispatch.model_validate(fields or {})  # an unknown workflow is claimed, then failed clearly
    except pydantic.ValidationError as exc:
        reason = describe_validation_error(exc, what=f"stream entry {entry_id}")
    else:
        if keys.partition_of(dispatch.run) == partition:
            return dispatch
        reason = f"stream entry {entry_id}: run {dispatch.run!r} is not of partition {partition}, whose stream this is"
    log.warning("malformed stream entry set aside", extra={"queue": queue, "entry": entry_id, "reason": reason})
    kept = {str(k)[:100]: str(v)[:500] for k, v in list((fields or {}).items())[:20]}
    raw = dumps(kept, what="rejected entry")
    rejected = ("XADD", keys.rejected, "MAXLEN", "~", REJECTED_MAXLEN, "*")
    rt.batcher.send([scripts.command(*rejected, "queue", queue, "entry", entry_id, "reason", reason, "fields", raw)])
    rt.count("malformed")
    rt.batcher.send([rt.store.count("malformed")])
    rt.ack_in(keys.queue(queue, partition).stream, entry_id)
    return None


async def promote_due(batcher: Batcher, store: Store, queues: Sequence[str]) -> int:
    """Enqueue every due retry of ``queues`` (in every partition); returns how many this call moved."""
    lanes = [(q, p) for q in queues for p in range(store.keys.partitions)]
    dues = await batcher.call_many([store.due(queue=q, partition=p, limit=200) for q, p in lanes])
    calls = []
    for (queue, _), members in zip(lanes, dues, strict=True):
        if isinstance(members, BaseException):
            raise members
        calls += [store.promote(queue=queue, run_id=run_id) for run_id in members]
    if not calls:
        return 0
    return sum(1 for reply in await batcher.call_many(calls) if isinstance(reply, str) and reply)
