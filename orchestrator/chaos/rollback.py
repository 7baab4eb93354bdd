"""Lost writes for the chaos run: Redis restarted from an older copy of its data.

A machine crash under ``appendfsync everysec`` or a failover to a lagging replica brings
Redis back without its last acknowledged writes: commits, claims, acks, stream entries and
whole submits are gone, while the processes that made them live on. The chaos run injects
that N times: take a snapshot, let the load run on for 2-5 s, then ``kill -9`` Redis and
start it from the snapshot (:meth:`orchestrator.embedded.RedisServer.restore`). Only on a
server the chaos run started itself, and with the ledger on another server, so that the
observer keeps what the restored Redis forgot.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.embedded import RedisServer

HOLD_S = (2.0, 5.0)  # how long the load runs on between a snapshot and its restore


@dataclass
class Rollbacks:
    """The planned snapshot/restore pairs of one chaos run (monotonic times)."""

    server: RedisServer
    due: list[tuple[float, float]] = field(default_factory=list)  # (snapshot at, restore at)
    snapshot: Path | None = None

    @classmethod
    def plan(cls, server: RedisServer, count: int, start: float, duration_s: float, rng: random.Random) -> Rollbacks:
        """``count`` pairs, one in each equal slice of the fault window, each restore inside its
        slice (so every one happens while faults are still being injected)."""
        plan = cls(server)
        slot_s = duration_s / count if count else 0.0
        for i in range(count):
            hold_s = min(rng.uniform(*HOLD_S), 0.8 * slot_s)
            at = start + i * slot_s + rng.uniform(0.1, 0.9) * (slot_s - hold_s)
            plan.due.append((at, at + hold_s))
        return plan

    def tick(self, now: float) -> bool:
        """Take the snapshot or do the restore that is due; True right after a restore."""
        if not self.due:
            return False
        snapshot_at, restore_at = self.due[0]
        if self.snapshot is None and now >= snapshot_at:
            self.snapshot = self.server.snapshot()
        elif self.snapshot is not None and now >= restore_at:
            self.server.restore(self.snapshot)
            self.snapshot = None
            self.due.pop(0)
            return True
        return False
