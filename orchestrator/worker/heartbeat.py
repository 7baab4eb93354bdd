"""The worker's liveness thread: registers the worker and keeps its claims live.

It runs on its own OS thread with its own Redis connection, so a step that blocks the event
loop (a sync call inside an async step) or holds a thread for an hour cannot stop it. A beat
is one pipelined round trip: the worker's fleet entry, and one ``alive.lua`` per partition,
which moves the worker's deadline on (every claim the worker holds in that partition is live
until then: liveness costs a call per partition, not per claim) and returns the runs cancelled
since the last beat, whose running steps are stopped. A step that has not called
``ctx.heartbeat()`` within its ``heartbeat_timeout_s`` (stalled) is stopped and fails as a
timeout. The same round trip renews the concurrency permits the worker's steps hold: one
``permit.lua`` call per limit they hold. When a beat finds the worker's deadline had passed
(Redis unreachable for a lease, the process frozen), the supervisor may have handed its steps
to others: every step it holds in that partition is stopped and given back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from orchestrator import scripts
from orchestrator.connection import REDIS_FAILURES
from orchestrator.context import StepContext
from orchestrator.faults import Faults
from orchestrator.permits import ConcurrencyLimit
from orchestrator.store import Store

log = logging.getLogger("orchestrator.worker")


@dataclass
class InFlight:
    """A claimed step that is running on this worker."""

    token: str
    queue: str
    entry_id: str
    run_id: str
    fence: int
    ctx: StepContext
    heartbeat_timeout_s: float | None
    started: float = field(default_factory=time.monotonic)
    permit: ConcurrencyLimit | None = None  # the concurrency permit it holds while its code runs
    on_lost: Callable[[str], None] = lambda reason: None

    def stalled(self, now: float) -> bool:
        hb = self.heartbeat_timeout_s
        return hb is not None and now - self.ctx.last_progress > hb


class InFlightTable:
    """Thread-safe map of claim token -> :class:`InFlight`."""

    def __init__(self) -> None:
        self._items: dict[str, InFlight] = {}
        self._lock = threading.Lock()

    def add(self, item: InFlight) -> None:
        with self._lock:
            self._items[item.token] = item

    def remove(self, token: str) -> None:
        with self._lock:
            self._items.pop(token, None)

    def snapshot(self) -> list[InFlight]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class Heartbeat(threading.Thread):
    """Beats every ``interval_s`` until :meth:`stop`; a beat is one pipelined round trip."""

    def __init__(
        self,
        *,
        client: redis.Redis,
        store: Store,
        worker_id: str,
        queues: Sequence[str],
        info: Mapping[str, str],
        table: InFlightTable,
        interval_s: float,
        lease_ms: int,
        faults: Faults,
    ) -> None:
        super().__init__(name="orchestrator-heartbeat", daemon=True)
        self._client = client
        self._store = store
        self._worker_id = worker_id
        self._queues = queues  # the worker's lanes: it adds the priority lanes that come in use
        self._info = dict(info)
        self._table = table
        self._interval_s = interval_s
        self._lease_ms = lease_ms
        self._faults = faults
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._failing_since: float | None = None
        # monotonic time until which every partition has this worker's deadline ahead (the last
        # beat that reached all of them, sent at least this long before its lease ends)
        self._live_until = 0.0
        self._cancels_seen = [""] * store.keys.partitions  # per partition: the last cancels entry read
        self.beats = 0

    def stop(self) -> None:
        """Stop beating and wait for a beat in flight, so none lands after deregistration."""
        self._stopped.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout=10)

    def live(self) -> bool:
        """Whether this worker's deadline is ahead in every partition, as far as its beats tell:
        after a pause (a frozen process, Redis out of reach) its claims would be born dead, so the
        worker reads nothing until a beat lands (:meth:`wake` asks for one at once)."""
        return time.monotonic() < self._live_until

    def wake(self) -> None:
        """Beat now rather than at the next interval."""
        self._wake.set()

    def run(self) -> None:
        while True:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                self.beat()
            except Exception:  # never let the liveness thread die quietly while steps run
                log.exception("heartbeat failed unexpectedly; retrying", extra={"worker": self._worker_id})

    def beat(self) -> None:
        """Register the worker and keep its claims live; stop stalled, cancelled and lost steps."""
        if self._faults.frozen:
            return
        sent = time.monotonic()
        items = self._table.snapshot()  # before the beat: a claim made after it is not in doubt
        for item in items:
            if item.stalled(sent) and not item.ctx.cancelled:
                item.on_lost("stalled")
        calls = [
            self._store.heartbeat(
                worker=self._worker_id, ttl_ms=self._lease_ms * 10, queues=tuple(self._queues), info=self._info
            )
        ]
        calls += [
            self._store.alive(partition=p, worker=self._worker_id, lease_ms=self._lease_ms, cancels_seen=seen)
            for p, seen in enumerate(self._cancels_seen)
        ]
        calls += self._renewals(items)
        try:
            replies: list[Any] = scripts.execute(self._client, calls, raise_on_error=False)
        except REDIS_FAILURES as exc:
            self._report_failure(exc)
            self._stop_unsure_holders(items)
            return
        self._failing_since = None
        self.beats += 1
        parts = len(self._cancels_seen)
        lapsed, cancelled = self._read_partitions(replies[1 : 1 + parts], sent)
        permits_lost = {str(run_id) for reply in replies[1 + parts :] if isinstance(reply, list) for run_id in reply}
        keys = self._store.keys
        for item in items:
            if item.ctx.cancelled:
                continue
            if item.run_id in cancelled:
                item.on_lost("run cancelled")
            elif lapsed and keys.partition_of(item.run_id) in lapsed:
                item.on_lost("claims lapsed")
            elif item.permit is not None and item.run_id in permits_lost:
                item.on_lost("permit lost")
        self._stop_unsure_holders(items)

    def _stop_unsure_holders(self, items: list[InFlight]) -> None:
        """Stop the steps that hold a concurrency permit once no beat has renewed it for most of
        a lease (Redis out of reach): the permit may be free again on the server, so the step
        must not run on beside the one that takes it (a sync step's thread cannot be stopped:
        its worker stops waiting for it and writes nothing it returns)."""
        if self.live():
            return
        for item in items:
            if item.permit is not None and not item.ctx.cancelled:
                item.on_lost("permit lease may have ended")

    def _renewals(self, items: list[InFlight]) -> list[scripts.Call]:
        """One ``permit.lua`` renew per concurrency limit the steps hold: their permits' leases
        move on with the worker's own (a refused renewal is a permit its claim no longer owns)."""
        held: dict[str, tuple[ConcurrencyLimit, list[str]]] = {}
        for item in items:
            if item.permit is not None:
                held.setdefault(item.permit.name, (item.permit, []))[1].extend((item.run_id, item.token))
        return [
            self._store.permit(limit.name, limit.limit, "renew", self._lease_ms, *pairs)
            for limit, pairs in held.values()
        ]

    def _read_partitions(self, replies: list[Any], sent: float) -> tuple[set[int], set[str]]:
        """The partitions where this worker's deadline had passed, and the runs cancelled since
        the last beat; moves each partition's cancels cursor on."""
        lapsed: set[int] = set()
        cancelled: set[str] = set()
        reached = 0
        for partition, reply in enumerate(replies):
            if isinstance(reply, Exception):  # this partition's node is failing: try again next beat
                continue
            reached += 1
            if int(reply[0]) == 0 and self._cancels_seen[partition]:  # not at the first beat: joining
                lapsed.add(partition)
            self._cancels_seen[partition] = str(reply[1])
            cancelled.update(str(run_id) for run_id in reply[2:])
        if reached == len(self._cancels_seen):
            self._live_until = sent + self._lease_ms / 1000 * 0.75
        return lapsed, cancelled

    def _report_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning(
                "heartbeat failed; claims will expire if Redis stays unreachable",
                extra={"worker": self._worker_id, "error": str(exc)},
            )
