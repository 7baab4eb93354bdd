"""The faults a Redis Cluster adds to a chaos run: a master's failover and live resharding.

Only on a loopback cluster the chaos run started itself (``orchestrator chaos --cluster``):

- **failover**: ``kill -9`` of a master that serves some of the namespace's partitions. Its
  replica is promoted after the node timeout (about 4 s here); the killed node is started again
  once that happened and rejoins as a replica. Replication is asynchronous, so the promoted
  replica may lack the master's last acknowledged writes: for the checks it counts as a restore
  from an older copy (the ledger lives on another server and keeps what the shard forgot).
- **resharding**: the slots of a quarter of the partitions (at least one) move to another
  master while the load runs, as ``redis-cli --cluster reshard`` would move them; clients meet
  ASK and TRYAGAIN meanwhile and MOVED afterwards. Done on a thread, so the load goes on.

Each fault is planned in its own slice of the fault window, failovers first.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.crc import key_slot

from orchestrator.chaos.cluster import ClusterNode, LoopbackCluster
from orchestrator.keys import Keys

FAILOVER = "master kill -9 (failover)"
RESHARD = "slots moved (resharding)"
REJOIN_TIMEOUT_S = 60.0


def partition_slots(keys: Keys) -> list[int]:
    """The hash slot of each partition of ``keys``'s namespace (its run and queue keys)."""
    return [key_slot(keys.tag(p).encode()) for p in range(keys.partitions)]


@dataclass
class ClusterFaults:
    """The planned failovers and reshardings of one chaos run (monotonic times)."""

    cluster: LoopbackCluster
    slots: list[int]
    rng: random.Random
    due: list[tuple[float, str]] = field(default_factory=list)
    killed: ClusterNode | None = None
    killed_slot: int = 0
    worker: threading.Thread | None = None
    moved_keys: int = 0
    errors: list[str] = field(default_factory=list)

    @classmethod
    def plan(
        cls,
        cluster: LoopbackCluster,
        keys: Keys,
        failovers: int,
        reshards: int,
        start: float,
        duration_s: float,
        rng: random.Random,
    ) -> ClusterFaults:
        kinds = [FAILOVER] * failovers + [RESHARD] * reshards
        plan = cls(cluster, sorted(set(partition_slots(keys))), rng)
        slice_s = duration_s / len(kinds) if kinds else 0.0
        for i, kind in enumerate(kinds):
            plan.due.append((start + (i + rng.uniform(0.2, 0.6)) * slice_s, kind))
        return plan

    @property
    def busy(self) -> bool:
        """A killed node not back yet, or a resharding still moving keys."""
        return self.killed is not None or (self.worker is not None and self.worker.is_alive())

    def tick(self, now: float) -> str | None:
        """Start the fault that is due (one at a time); return its name when one started."""
        if self.killed is not None and self._promoted():
            node, self.killed = self.killed, None
            # here, not on a thread: a child started from a thread gets SIGKILL when that thread
            # ends (processes.die_with_parent), which silently killed every rejoined node
            try:
                self.cluster.rejoin(node, REJOIN_TIMEOUT_S)
            except Exception as exc:
                self.errors.append(f"rejoin: {type(exc).__name__}: {exc}")
        if not self.due or now < self.due[0][0] or self.busy:
            return None
        _, kind = self.due.pop(0)
        if kind == FAILOVER:
            self.killed_slot = self.rng.choice(self.slots)
            self.killed = self.cluster.kill_master(self.killed_slot)
        else:
            share = self.rng.sample(self.slots, max(1, len(self.slots) // 4))
            self._background(lambda: self._reshard(share))
        return kind

    def url(self) -> str:
        """A live node's URL, for processes started from now on."""
        return self.cluster.live_nodes()[0].url

    def wait(self, timeout_s: float = REJOIN_TIMEOUT_S) -> list[str]:
        """Start the planned faults that had to wait for an earlier one (a failover not yet
        over when a resharding was due), then wait until none is under way and the cluster is
        whole again; returns the faults started here."""
        deadline = time.monotonic() + timeout_s
        started = []
        while (self.busy or self.due) and time.monotonic() < deadline:
            if kind := self.tick(float("inf")):
                started.append(kind)
            time.sleep(0.1)
        self.cluster.wait_ready(max(1.0, deadline - time.monotonic()))
        down = [n.url for n in self.cluster.nodes if n not in self.cluster.live_nodes()]
        if down:
            self.errors.append(f"nodes down after the faults: {', '.join(down)}")
        return started

    def _promoted(self) -> bool:
        try:
            return self.cluster.master_of_slot(self.killed_slot) is not self.killed
        except Exception:
            return False

    def _reshard(self, slots: list[int]) -> None:
        self.cluster.wait_ready(REJOIN_TIMEOUT_S)
        for slot in slots:
            owner = self.cluster.master_of_slot(slot)
            target = self.rng.choice([n for n in self.cluster.masters_now() if n is not owner])
            self.moved_keys += self.cluster.move_slot(slot, target)

    def _background(self, work: Callable[[], object]) -> None:
        def run() -> None:
            try:
                work()
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

        self.worker = threading.Thread(target=run, name="cluster-fault", daemon=True)
        self.worker.start()
