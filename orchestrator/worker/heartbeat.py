"""The worker's liveness thread: registers the worker and renews the lease of every live claim.

It runs on its own OS thread with its own Redis connection, so a step that blocks the event
loop (a sync call inside an async step) or holds a thread for an hour cannot stop it. It
stops renewing a claim when the step has not called ``ctx.heartbeat()`` within its
``heartbeat_timeout_s`` (stalled) or has run past its timeout; that claim's lease then lapses
and the supervisor hands the step to another worker.
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
        self._queues = list(queues)
        self._info = dict(info)
        self._table = table
        self._interval_s = interval_s
        self._lease_ms = lease_ms
        self._faults = faults
        self._stopped = threading.Event()
        self._failing_since: float | None = None
        self.beats = 0

    def stop(self) -> None:
        """Stop beating and wait for a beat in flight, so none lands after deregistration."""
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=10)

    def run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self.beat()
            except Exception:  # never let the liveness thread die quietly while steps run
                log.exception("heartbeat failed unexpectedly; retrying", extra={"worker": self._worker_id})

    def beat(self) -> None:
        """Register the worker and renew live claims; report stalled and lost ones."""
        if self._faults.frozen:
            return
        now = time.monotonic()
        items = self._table.snapshot()
        live = [item for item in items if not item.stalled(now) and not item.ctx.cancelled]
        for item in items:
            if item.stalled(now) and not item.ctx.cancelled:
                item.on_lost("stalled")
        calls = [
            self._store.heartbeat(
                worker=self._worker_id, ttl_ms=self._lease_ms * 10, queues=self._queues, info=self._info
            )
        ]
        calls += [self._store.renew(run_id=i.run_id, token=i.token, lease_ms=self._lease_ms) for i in live]
        try:
            replies: list[Any] = scripts.execute(self._client, calls, raise_on_error=False)
        except REDIS_FAILURES as exc:
            self._report_failure(exc)
            return
        self._failing_since = None
        self.beats += 1
        for item, reply in zip(live, replies[1:], strict=True):
            if reply == 0:
                item.on_lost("lease lost")

    def _report_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning(
                "heartbeat failed; claims will expire if Redis stays unreachable",
                extra={"worker": self._worker_id, "error": str(exc)},
            )
