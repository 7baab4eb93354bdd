"""What every step execution of one worker shares, and the signals that end an attempt early."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from orchestrator.codec import Dispatch
from orchestrator.faults import Faults
from orchestrator.metrics import WorkerMetrics
from orchestrator.output import Emitter
from orchestrator.ratelimit import Spender
from orchestrator.settings import Settings
from orchestrator.store import Claimed, Store
from orchestrator.worker.batcher import Batcher
from orchestrator.worker.heartbeat import InFlightTable
from orchestrator.worker.usercode import StepThreads


class StepTimeout(Exception):
    """An attempt ran past its step's ``timeout_s`` or stopped heartbeating."""


class Shutdown(BaseException):
    """The worker is stopping at once; leave the step for the supervisor."""


class Released(BaseException):
    """Graceful shutdown ran out of grace; give the step back."""


class Superseded(BaseException):
    """This worker claimed the same stream entry again (Redis lost writes and delivered it once
    more): the new claim owns the entry, this attempt stops and writes nothing."""


@dataclass
class Runtime:
    """What every step execution of one worker shares."""

    worker_id: str
    served: tuple[str, ...]
    settings: Settings
    store: Store
    batcher: Batcher
    sync_redis: redis.Redis
    table: InFlightTable
    faults: Faults
    loop: asyncio.AbstractEventLoop
    threads: StepThreads
    metrics: WorkerMetrics
    may_chain: Callable[[], bool]  # may a commit claim its run's next step for this worker?
    # run a step the commit claimed: (queue, entry id, dispatch, claim, claim token, steps chained in a row)
    start_chained: Callable[[str, str, Dispatch, Claimed, str, int], None]
    stopping_now: Callable[[], bool]  # an immediate stop: stop resending outcomes
    emitter: Emitter  # ctx.emit: the runs' live output
    spender: Spender  # ctx.spend: units charged to rate limits
    rq_redis: redis.Redis | None = None  # RQ's kind of client, for bridged steps (orchestrator.bridge)
    counts: Counter[str] = field(default_factory=Counter)
    acks: dict[str, list[str]] = field(default_factory=dict)

    def count(self, name: str, amount: int = 1) -> None:
        """This worker's own tally, for its logs; the fleet-wide counters are kept by the
        scripts themselves, in the same atomic step as what they count."""
        self.counts[name] += amount

    def ack(self, queue: str, run_id: str, entry_id: str) -> None:
        """Ack after the current loop iteration, together with every other step that finished in it.

        The entry is in ``queue``'s stream of ``run_id``'s partition: workers set aside entries
        found in another partition's stream (``parse_entry``)."""
        self.ack_in(self.store.keys.queue_of(queue, run_id).stream, entry_id)

    def ack_in(self, stream: str, entry_id: str) -> None:
        if not self.acks:
            self.loop.call_soon(self._send_acks)
        self.acks.setdefault(stream, []).append(entry_id)

    def _send_acks(self) -> None:
        acks, self.acks = self.acks, {}
        self.batcher.send_riding([self.store.ack_owned(stream, self.worker_id, ids) for stream, ids in acks.items()])

    def flush(self) -> None:
        """Queue every pending ack now (at shutdown, before the batcher closes)."""
        self._send_acks()


def now_ms() -> int:
    return int(time.time() * 1000)
