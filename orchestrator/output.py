"""Live step output: what a step emits while it runs (``ctx.emit``), for a client to follow.

An LLM step can show its tokens as they arrive: each ``ctx.emit(data)`` appends one entry to
the run's ``output`` stream (``keys.py``), which clients read from any entry id on
(``Run.output``, ``Run.follow_output``, ``orchestrator history RUN -f``), so a page that
reconnects resumes where it stopped. The stream keeps the last ``max_output_entries`` entries
(trimmed approximately at each append) and goes when the run is purged.

Emitted data is not state and not part of the durability promise: it never changes the run's
state, an emit is one unfenced XADD with no retry (one that Redis refuses is dropped with a
warning), an attempt that crashes or is replaced keeps what it emitted, and the attempt that
runs the step again emits again. Each entry names the attempt and fencing token it came from,
so a reader can tell the attempts apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel

from orchestrator import scripts
from orchestrator.codec import loads
from orchestrator.connection import REDIS_FAILURES
from orchestrator.keys import Keys
from orchestrator.runs import TERMINAL

if TYPE_CHECKING:
    from orchestrator.context import StepContext
    from orchestrator.worker.batcher import Batcher

log = logging.getLogger("orchestrator.output")


class OutputEvent(BaseModel):
    """One entry of a run's live output, as ``ctx.emit`` wrote it."""

    id: str  # the stream entry id: pass it as ``after`` to resume after this entry
    at: int  # when it was written (ms since the epoch, the Redis clock: the id's first part)
    step: str
    visit: int
    attempt: int
    fence: int
    data: Any

    @classmethod
    def parse(cls, entry_id: str, fields: dict[str, str]) -> OutputEvent:
        return cls(
            id=entry_id,
            at=int(entry_id.split("-", 1)[0]),
            step=fields.get("step", ""),
            visit=int(fields.get("visit", 0)),
            attempt=int(fields.get("attempt", 0)),
            fence=int(fields.get("fence", 0)),
            data=loads(fields.get("data", "null"), what=f"output entry {entry_id}"),
        )


class Emitter:
    """Appends emits to their runs' output streams, one per worker (shared by its step
    contexts): from a sync step's thread with the worker's blocking client, from an async step
    through the worker's batcher, never blocking the event loop."""

    def __init__(self, sync_redis: redis.Redis, batcher: Batcher, keys: Keys, max_entries: int) -> None:
        self._redis = sync_redis
        self._batcher = batcher
        self._keys = keys
        self._max = max_entries

    def _call(self, ctx: StepContext, raw: str) -> scripts.Call:
        stream = self._keys.run(ctx.run_id).output
        return scripts.command(
            "XADD", stream, "MAXLEN", "~", self._max, "*", "step", ctx.step, "visit", ctx.visit,
            "attempt", ctx.attempt, "fence", ctx.fencing_token, "data", raw,
        )  # fmt: skip

    def send(self, ctx: StepContext, raw: str) -> bool:
        try:
            scripts.execute(self._redis, [self._call(ctx, raw)])
            return True
        except (*REDIS_FAILURES, redis.ResponseError) as exc:
            log.warning("emitted output dropped", extra={"run_id": ctx.run_id, "error": str(exc)})
            return False

    async def asend(self, ctx: StepContext, raw: str) -> bool:
        try:
            await self._batcher.call(self._call(ctx, raw))
            return True
        except (*REDIS_FAILURES, redis.ResponseError) as exc:
            log.warning("emitted output dropped", extra={"run_id": ctx.run_id, "error": str(exc)})
            return False


def read_output(
    client: redis.Redis, keys: Keys, run_id: str, after: str = "0-0", count: int = 1000
) -> list[OutputEvent]:
    """The run's output entries after the entry id ``after`` (all from ``0-0``), oldest first."""
    raw: Any = client.xrange(keys.run(run_id).output, f"({after}" if after != "0-0" else "-", "+", count=count)
    return [OutputEvent.parse(entry_id, fields) for entry_id, fields in raw]


def follow_output(
    client: redis.Redis, keys: Keys, run_id: str, after: str, timeout_s: float, block_ms: int
) -> Iterator[OutputEvent]:
    """Yield the run's output entries after ``after`` as they are written (XREAD BLOCK), until
    the run has finished and everything it emitted was yielded."""
    from orchestrator.errors import RunNotFound, WaitTimeout

    rk = keys.run(run_id)
    deadline = time.monotonic() + timeout_s
    last = after
    while True:
        status = client.hget(rk.run, "status")
        if status is None:
            raise RunNotFound(f"no run {run_id!r}", run_id=run_id)
        finished = status in TERMINAL  # read before the entries: what it emitted is there by now
        left_ms = int((deadline - time.monotonic()) * 1000)
        block = None if finished else max(1, min(block_ms, left_ms))
        replies: Any = client.xread({rk.output: last}, count=1000, block=block)
        entries = [entry for _, batch in replies or [] for entry in batch]
        for entry_id, fields in entries:
            last = entry_id
            yield OutputEvent.parse(entry_id, fields)
        if finished and not entries:
            return
        if not entries and left_ms <= 0:
            raise WaitTimeout(f"run {run_id!r} did not finish within {timeout_s} s; it goes on", run_id=run_id)
