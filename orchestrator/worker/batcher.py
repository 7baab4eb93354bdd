"""Automatic batching of Redis calls: one pipeline carries everything that queued up meanwhile.

Steps finish one by one on the event loop; sending each commit alone would cost a round trip
per step. The batcher keeps one pipeline in flight and puts every call submitted while it is
in flight into the next one, so batches grow with load and latency stays one round trip when
the worker is idle.

Acks ride along: nobody waits for them, so they join the next batch that goes anyway (a claim
or a commit) and go alone only when none has gone within a few milliseconds. Sent on their
own, they took the one in-flight slot just when the next step's commit was ready, adding a
round trip to every step of a run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aredis

from orchestrator import scripts
from orchestrator.scripts import Call

log = logging.getLogger("orchestrator.worker")

MAX_BATCH = 1000
RIDE_WITHIN_S = 0.005  # how long a fire-and-forget call waits for a batch to ride with


class Batcher:
    """Sends :class:`Call` objects in pipelines from one background task."""

    def __init__(self, client: aredis.Redis) -> None:
        self._client = client
        self._pending: list[tuple[Call, asyncio.Future[Any] | None]] = []
        self._riders: list[Call] = []
        self._riders_timer: asyncio.TimerHandle | None = None
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def call(self, call: Call) -> Any:
        """Send one call in the next batch; its reply (raises the call's own error)."""
        return await self._queue(call)

    async def call_many(self, calls: Sequence[Call]) -> list[Any]:
        """Replies in order; a failed call's reply is its exception (not raised)."""
        return list(await asyncio.gather(*[self._queue(call) for call in calls], return_exceptions=True))

    def _queue(self, call: Call) -> asyncio.Future[Any]:
        """Put ``call`` in the next batch; the future gets its reply (or its error)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((call, future))
        self._wakeup.set()
        return future

    def send(self, calls: Sequence[Call]) -> None:
        """Fire and forget (counters, rejected entries): errors are logged, nobody waits."""
        self._pending.extend((call, None) for call in calls)
        self._wakeup.set()

    def send_riding(self, calls: Sequence[Call]) -> None:
        """Fire and forget with the next batch, or alone after :data:`RIDE_WITHIN_S` (acks)."""
        self._riders.extend(calls)
        if self._riders_timer is None:
            self._riders_timer = asyncio.get_running_loop().call_later(RIDE_WITHIN_S, self._release_riders)

    def _release_riders(self) -> None:
        """Move the waiting riders into the queue (their batch is the next one)."""
        if self._riders_timer is not None:
            self._riders_timer.cancel()
            self._riders_timer = None
        if self._riders:
            self._pending.extend((call, None) for call in self._riders)
            self._riders = []
            self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                self._release_riders()
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[tuple[Call, asyncio.Future[Any] | None]]) -> None:
        try:
            replies = await scripts.execute_async(self._client, [c for c, _ in batch], raise_on_error=False)
        except Exception as exc:  # connection lost beyond the client's retries
            replies = [exc] * len(batch)
        for (call, future), reply in zip(batch, replies, strict=True):
            if future is None:
                if isinstance(reply, Exception):
                    log.warning(
                        "background redis call failed", extra={"command": str(call.command[0]), "error": str(reply)}
                    )
            elif not future.done():
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def close(self) -> None:
        """Send what is queued, then stop."""
        self._release_riders()
        self._closing = True
        self._wakeup.set()
        if self._task:
            await self._task
