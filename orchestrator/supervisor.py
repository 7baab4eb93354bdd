"""``Supervisor``: finds work that nobody is doing and gives it back to the workers.

Every ``reclaim_interval_s`` the leader (one of any number of replicas, by a lease in
Redis) re-dispatches the entries pending for workers whose heartbeat deadline has passed (the
worker died or froze; it looks only at those workers' entries, so the cost grows with workers,
not with steps in flight), removes dead workers from the fleet, and enqueues due retries. Every
``sweep_interval_s`` it sweeps: a run with no live claim, no queued or pending entry and no
scheduled retry gets its current step enqueued again (this covers writes lost by Redis and
trimmed streams), and finished runs past their retention are purged. The sweep looks only at
runs that need a look (see ``passed.lua``), so its cost does not grow with the backlog.

Every action is a script that re-checks the run before it writes, so two supervisors acting
at once (a leader change) at worst do nothing twice; they never enqueue a step twice. A queue
whose stream or consumer group vanished gets its group again; an error on one queue is logged
and the tick goes on with the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from orchestrator import scripts
from orchestrator.children import check_parent, relay
from orchestrator.codec import Dispatch
from orchestrator.connection import REDIS_FAILURES, close, connect, is_cluster, probe_cluster
from orchestrator.errors import ConfigError, RedisRefused, RedisUnavailable
from orchestrator.faults import Faults
from orchestrator.keys import GROUP, Keys
from orchestrator.layout import check_layout
from orchestrator.metrics import FleetCollector, MetricsServer, SupervisorMetrics
from orchestrator.outage import Outage
from orchestrator.permits import stale_ms, wake_sync
from orchestrator.retention import purge_finished
from orchestrator.settings import Settings
from orchestrator.store import FINISHED_IN, Outcome, Store

log = logging.getLogger("orchestrator.supervisor")

SCAN_LIMIT = 500
# its consumer group exists before any worker starts, so autoscalers watching it (KEDA) work
DEFAULT_QUEUE = "default"
Lane = tuple[str, int]  # a queue in one partition: one stream, its group, its queued and delayed sets
# Fleet-wide counters only the supervisor knows; the scripts count everything else themselves.
OWN_COUNTERS = frozenset({"dead_workers", "lost_entries", "purged", "consumers_removed"})
# How long one sweep or purge may keep paging in a tick: work left over goes on at the next
# tick (a reclaim interval later), so a big repair never holds up reclaiming for long.
BUDGET_S = 0.5
PASSED_PAGE = 2000  # index entries passed.lua scans per call
LOGGED_REPAIRS = 20  # repaired runs logged one by one per sweep call; the rest in one line
# A live claim is looked at again after as long as it has run, up to this many sweep_after_s: a
# run whose worker beats but lost track of it with no entry pending (an operator deleted the
# stream) is repaired within that; an hour-long step is looked at a dozen times, not 360.
LIVE_CLAIM_LOOKS = 30


class Supervisor:
    """Run with ``run()`` (blocking) and stop with ``shutdown()`` from another thread."""

    def __init__(self, settings: Settings | None = None, *, supervisor_id: str | None = None) -> None:
        self.settings = settings or Settings()
        self.settings.plain_url()  # raises ConfigError when no URL is set
        self.id = supervisor_id or f"sup-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.keys = Keys(self.settings.namespace, self.settings.partitions)
        self.store = Store(self.keys)
        self.redis = connect(self.settings.plain_url(), probe=self.keys.cluster_probe)
        self._faults = Faults(self.settings.faults)
        self._stopped = threading.Event()
        self._groups: set[Lane] = set()
        self._finished_groups: set[str] = set()  # partitions whose finished stream has its group (children.relay)
        self._deleted_seen: dict[Lane, str] = {}  # highest deleted entry id already looked behind
        self._sweep_cursor: dict[Lane, str] = {}  # where an unfinished sweep of a lane's index resumes
        self._last_seen: dict[str, float] = {}  # last heartbeat of workers found dead, for detection latency
        self.is_leader = False
        self.totals: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self._fleet = FleetCollector(self.redis, self.keys, lease_ms=self.settings.lease_ms)
        self.registry.register(self._fleet)
        self.metrics = SupervisorMetrics(self.registry)
        self.metrics_port: int | None = None

    def __repr__(self) -> str:
        return f"Supervisor({self.id!r})"

    def shutdown(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        """Tick every ``reclaim_interval_s`` until :meth:`shutdown`. While Redis is unreachable
        (or refuses us) it retries with a growing pause and says so (see ``outage``); it never
        exits on its own."""
        exporter = self._serve_metrics()
        log.info(
            "supervisor started",
            extra={"supervisor": self.id, "redis": self.settings.redacted_url, "lease_s": self.settings.lease_s},
        )
        outage = Outage(log, "supervising", self.settings.plain_url(), fields={"supervisor": self.id})
        next_sweep = time.monotonic()
        probed = False
        try:
            while not self._stopped.is_set():
                now = time.monotonic()
                sweep = now >= next_sweep
                next_sweep = now + self.settings.sweep_interval_s if sweep else next_sweep
                pause_s = self.settings.reclaim_interval_s
                try:
                    if not probed:  # another partition count: refused
                        self._match_topology()
                        check_layout(self.redis, self.store)
                        probed = True
                    if self.tick(sweep=sweep, purge=sweep).get("unfinished"):
                        next_sweep = now  # work left over: go on at the next tick
                    outage.recovered()
                except (*REDIS_FAILURES, RedisUnavailable, RedisRefused) as exc:
                    pause_s = max(pause_s, outage.failed(exc))
                self._stopped.wait(pause_s)
        finally:
            self._resign()
            if exporter is not None:
                exporter.close()
            close(self.redis)
            log.info("supervisor stopped", extra={"supervisor": self.id, **self.totals})

    def _match_topology(self) -> None:
        """Reconnect with a cluster client when the URL names a Redis Cluster node that could not
        be reached when this supervisor was made (it was taken for a single server, and would
        refuse every later call); raises what redis-py raised while the node cannot be reached."""
        url = self.settings.plain_url()
        if probe_cluster(url, self.keys.cluster_probe) and not is_cluster(self.redis):
            close(self.redis)
            self.redis = self._fleet.client = connect(url, cluster=True)

    def _serve_metrics(self) -> MetricsServer | None:
        host, port = self.settings.metrics_host, self.settings.metrics_port
        if port is None:
            return None
        try:
            exporter = MetricsServer(self.registry, host, port)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port} (metrics_port): cannot serve /metrics on {host}:{port}: "
                f"{(exc.strerror or str(exc)).lower()}; pick a free port, or 0 for any"
            ) from None
        self.metrics_port = exporter.port
        return exporter

    def tick(self, *, sweep: bool = True, purge: bool = False) -> dict[str, int]:
        """One round of work if this replica leads; returns what it did."""
        lease_ms = int(self.settings.reclaim_interval_s * 3000) + 1000
        leader = scripts.execute(self.redis, [self.store.leader(candidate=self.id, lease_ms=lease_ms)])[0] == 1
        if leader != self.is_leader:
            log.info("leadership " + ("taken" if leader else "lost"), extra={"supervisor": self.id})
            self.is_leader = leader
        if not leader:
            return {}
        done: dict[str, int] = {}
        queues: list[str] = sorted(set(self.redis.smembers(self.keys.queues)) | {DEFAULT_QUEUE})  # type: ignore[arg-type]
        lanes = [(queue, p) for queue in queues for p in range(self.keys.partitions)]
        for lane in lanes:
            self._per_lane(done, lane, self._ensure_group)
        # one round trip each for every lane's dead workers' entries and due retries, not one per lane
        pending, due = self._scan_pending(lanes), self._due(lanes)
        for lane in lanes:
            self._per_lane(done, lane, lambda ln: self.reclaim(ln, pending[ln]))
            self._per_lane(done, lane, lambda ln: {"promoted": self.promote(ln, due[ln])})
        self._add(done, {"expired": self.expire()})
        self._add(done, {"permit_waiters_woken": self.sweep_permits()})
        parts = range(self.keys.partitions)
        self._add(done, relay(self.redis, self.store, parts, self.id, groups=self._finished_groups, reclaim=sweep))
        self._add(done, {"trimmed": self.trim(lanes)})
        self._add(done, {"dead_workers": self.reap_workers()})
        if sweep:
            for lane in lanes:
                self._per_lane(done, lane, self.sweep_queue)
                self._per_lane(done, lane, lambda ln: {"consumers_removed": self.reap_consumers(ln)})
            self._add(done, self.sweep_active())
        if purge:
            self._add(done, self.purge())
        done = {k: v for k, v in done.items() if v}
        own = [self.store.count(k, v) for k, v in done.items() if k in OWN_COUNTERS]
        if own:
            scripts.execute(self.redis, own)
        self._add(self.totals, done)
        return done

    def _per_lane(self, into: dict[str, int], lane: Lane, work: Callable[[Lane], dict[str, int] | None]) -> None:
        """Do one lane's part of a tick; an error there is logged and the tick goes on."""
        try:
            self._add(into, work(lane) or {})
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._groups.discard(lane)  # made again at the next tick
            queue, partition = lane
            log.warning(
                "supervisor work on a queue failed", extra={"queue": queue, "partition": partition, "error": str(exc)}
            )

    @staticmethod
    def _add(into: dict[str, int], more: dict[str, int]) -> None:
        for key, value in more.items():
            into[key] = into.get(key, 0) + value

    def _ensure_group(self, lane: Lane) -> None:
        """Create the queue's consumer group (and stream) unless this supervisor saw it lately.

        A group that vanished (Redis lost its data, an operator's DEL) is noticed through a
        NOGROUP error anywhere in the tick, and made again here at the next tick.
        """
        if lane in self._groups:
            return
        queue, partition = lane
        try:
            self.redis.xgroup_create(self.keys.queue(queue, partition).stream, GROUP, id="0", mkstream=True)
            log.info("consumer group created", extra={"queue": queue, "partition": partition})
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(lane)

    def _resign(self) -> None:
        with contextlib.suppress(redis.RedisError):
            scripts.execute(self.redis, [self.store.resign(candidate=self.id)])

    # -- reclaiming -----------------------------------------------------------------------

    def _scan_pending(self, lanes: list[Lane]) -> dict[Lane, Any]:
        """Each lane's entries pending for workers whose deadline passed (at most
        ``SCAN_LIMIT``), in one round trip; a lane's error is its value."""
        calls = [self.store.dead_pending(queue=q, partition=p, limit=SCAN_LIMIT) for q, p in lanes]
        return dict(zip(lanes, scripts.execute(self.redis, calls, raise_on_error=False), strict=True))

    def trim(self, lanes: list[Lane]) -> int:
        """Drop every lane's delivered and acked stream entries, in one round trip (commits
        only XACK); how many were dropped. A lane's error is logged; the tick goes on."""
        replies = scripts.execute(
            self.redis, [self.store.trim(queue=q, partition=p) for q, p in lanes], raise_on_error=False
        )
        for (queue, partition), reply in zip(lanes, replies, strict=True):
            if isinstance(reply, Exception):
                log.warning(
                    "trimming a queue's stream failed",
                    extra={"queue": queue, "partition": partition, "error": str(reply)},
                )
        return sum(reply for reply in replies if isinstance(reply, int))

    def _due(self, lanes: list[Lane]) -> dict[Lane, Any]:
        """Each lane's retries due now, in one round trip; a lane's error is its value."""
        calls = [self.store.due(queue=q, partition=p, limit=SCAN_LIMIT) for q, p in lanes]
        return dict(zip(lanes, scripts.execute(self.redis, calls, raise_on_error=False), strict=True))

    def reclaim(self, lane: Lane, pending: Any = None) -> dict[str, int]:
        """Re-dispatch the entries pending for workers whose deadline passed, unless their run's
        claim is live elsewhere. At most ``SCAN_LIMIT`` per tick; the rest at the next ticks
        (what is re-dispatched leaves the dead worker's list). ``pending``: the lane's
        :meth:`_scan_pending` reply, if it was read already.
        """
        queue, partition = lane
        stream = self.keys.queue(queue, partition).stream
        if pending is None:
            pending = self._scan_pending([lane])[lane]
        if isinstance(pending, Exception):
            raise pending
        if not pending:
            return {}
        owners = {str(pending[i]): str(pending[i + 1]) for i in range(0, len(pending), 2)}
        ids = list(owners)
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(stream, entry_id, entry_id)
        found: list[tuple[str, Dispatch]] = []
        lost: list[str] = []
        for entry_id, rows in zip(ids, pipe.execute(), strict=True):
            dispatch = Dispatch.from_xrange(rows)
            if dispatch is None:
                lost.append(entry_id)
            else:
                found.append((entry_id, dispatch))
        if lost:  # payload trimmed or unreadable: nothing to re-run from here; the sweep repairs its run
            scripts.execute(self.redis, self.store.ack(queue, partition, lost))
            log.warning(
                "pending entries without a readable payload dropped", extra={"queue": queue, "count": len(lost)}
            )
        self._faults.hit("before_redispatch")
        counts: dict[str, int] = {"lost_entries": len(lost)}
        calls = [self.store.redispatch(queue=queue, entry_id=eid, consumer=owners[eid], dispatch=d) for eid, d in found]
        replies = scripts.execute(self.redis, calls)
        self._observe_detection(found, owners, replies)
        for (entry_id, dispatch), reply in zip(found, replies, strict=True):
            outcome = Outcome.parse(reply)
            key = {"REDISPATCHED": "redispatched", "DROPPED": "dropped_entries"}.get(outcome.code)
            if key:
                counts[key] = counts.get(key, 0) + 1
            if outcome.code == "REDISPATCHED":
                log.warning(
                    "step re-dispatched: its worker's heartbeat stopped",
                    extra={
                        "run_id": dispatch.run,
                        "step": dispatch.step,
                        "entry": entry_id,
                        "new_entry": outcome.detail[0],
                    },
                )
        return counts

    def _observe_detection(self, found: list[tuple[str, Dispatch]], owners: dict[str, str], replies: list[Any]) -> None:
        """Detection latency: from the dead owner's last heartbeat to the re-dispatch."""
        dead = [
            owners[eid]
            for (eid, _), reply in zip(found, replies, strict=True)
            if Outcome.parse(reply).code == "REDISPATCHED"
        ]
        if not dead:
            return
        sec, usec = self.redis.time()
        now_ms = sec * 1000 + usec // 1000
        for owner, last in zip(dead, self.redis.zmscore(self.keys.workers, dead), strict=True):
            seen = float(last) if last is not None else self._last_seen.get(owner)  # reaped a tick earlier
            if seen is not None:
                self.metrics.detection.observe(max(0.0, (now_ms - seen) / 1000))

    def promote(self, lane: Lane, run_ids: Any = None) -> int:
        """Enqueue the lane's due retries (``run_ids``: from :meth:`_due`, if it looked already)."""
        queue, _ = lane
        if run_ids is None:
            run_ids = self._due([lane])[lane]
        if isinstance(run_ids, Exception):
            raise run_ids
        calls = [self.store.promote(queue=queue, run_id=run_id) for run_id in run_ids]
        return sum(1 for reply in scripts.execute(self.redis, calls) if reply)

    def sweep_permits(self) -> int:
        """End the permits whose lease ended (their worker died) and drop the waiters that stopped
        asking, for every concurrency limit; wake the waiters that fit now (a wake the releasing
        worker did not make, or a permit a dead worker held). Returns how many were woken."""
        names = sorted(str(name) for name in self.redis.smembers(self.keys.permits))
        if not names:
            return 0
        calls = [self.store.permit(name, "", "sweep", stale_ms(self.settings.permit_poll_s)) for name in names]
        woken = 0
        for name, reply in zip(names, scripts.execute(self.redis, calls, raise_on_error=False), strict=True):
            if isinstance(reply, list) and reply and reply[0] != "INVALID":
                woken += wake_sync(self.redis, self.store, name, "", reply[1:])
            elif reply:
                log.warning("permit sweep failed", extra={"concurrency_limit": name, "reply": str(reply)})
        return woken

    def expire(self) -> int:
        """Fail the runs whose deadline has passed (at most ``SCAN_LIMIT`` per partition and
        tick; the rest at the next ticks): a round trip for the lists, one for the runs' queues,
        one for the expiries."""
        listed = scripts.execute(
            self.redis, [self.store.expired(partition=p, limit=SCAN_LIMIT) for p in range(self.keys.partitions)]
        )
        run_ids = [run_id for page in listed for run_id in page]
        if not run_ids:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hget(self.keys.run(run_id).run, "queue")
        queues = pipe.execute()
        calls = [
            self.store.expire(run_id=rid, queue=q or DEFAULT_QUEUE) for rid, q in zip(run_ids, queues, strict=True)
        ]
        expired = 0
        for run_id, reply in zip(run_ids, scripts.execute(self.redis, calls), strict=True):
            outcome = Outcome.parse(reply)
            if outcome.code == "EXPIRED":
                expired += 1
                log.warning("run failed: its deadline passed", extra={"run_id": run_id})
        return expired

    def reap_workers(self) -> int:
        """Drop workers whose heartbeat is older than a lease from the fleet (their steps are
        reclaimed above; their consumers are removed by :meth:`reap_consumers`), and their
        deadlines from every partition (a deadline that is gone has passed)."""
        call = self.store.reap_workers(age_ms=self.settings.lease_ms, limit=SCAN_LIMIT)
        reply = scripts.execute(self.redis, [call])[0]
        now, rows = int(reply[0]), reply[1:]
        reaped = [str(rows[i]) for i in range(0, len(rows), 2)]
        if reaped:
            scripts.execute(self.redis, [scripts.command("HDEL", part.alive, *reaped) for part in self.keys.parts])
        for i in range(0, len(rows), 2):
            worker_id, last_ms = rows[i], int(float(rows[i + 1]))
            self._last_seen[worker_id] = float(last_ms)  # its steps may be re-dispatched a tick later
            while len(self._last_seen) > 1000:
                del self._last_seen[next(iter(self._last_seen))]
            log.warning("worker presumed dead: no heartbeat", extra={"worker": worker_id, "silent_ms": now - last_ms})
        return len(rows) // 2

    def reap_consumers(self, lane: Lane) -> int:
        """Remove consumers of workers no longer in the fleet once nothing is pending for them."""
        stream = self.keys.queue(*lane).stream
        consumers = self.redis.xinfo_consumers(stream, GROUP)
        idle = [str(c["name"]) for c in consumers if not c["pending"] and c["idle"] > self.settings.lease_ms]
        if not idle:
            return 0
        beats = self.redis.zmscore(self.keys.workers, idle)
        gone = [name for name, beat in zip(idle, beats, strict=True) if beat is None]
        calls = [self.store.reap_consumer(stream=stream, consumer=name) for name in gone]
        return sum(int(reply) for reply in scripts.execute(self.redis, calls))

    # -- sweeping -------------------------------------------------------------------------

    def sweep_queue(self, lane: Lane) -> dict[str, int]:
        """Check the runs of ``queue`` whose entry the consumer group has passed or lost.

        Runs whose entry still waits ahead of the group are not looked at: the cost is the
        runs that need a look, whatever the backlog behind them. A scan that needs more than
        :data:`BUDGET_S` resumes where it stopped at the next tick (``unfinished`` in the result).
        """
        counts: dict[str, int] = {}
        deadline = time.monotonic() + BUDGET_S
        queue, partition = lane
        cursor = self._sweep_cursor.pop(lane, "-inf")
        while True:
            call = self.store.passed(
                queue=queue,
                partition=partition,
                cursor=cursor,
                limit=PASSED_PAGE,
                deleted_seen=self._deleted_seen.get(lane, ""),
            )
            _horizon, deleted, cursor, *run_ids = scripts.execute(self.redis, [call])[0]
            self._add(counts, self._sweep_runs([(rid, queue) for rid in run_ids]))
            if not cursor:
                self._deleted_seen[lane] = deleted  # every run before that deletion was looked at
                return counts
            if time.monotonic() > deadline:
                self._sweep_cursor[lane] = cursor
                return {**counts, "unfinished": 1}

    def sweep_active(self) -> dict[str, int]:
        """Check claimed runs and retries that have not moved for ``sweep_after_s``, in every partition."""
        counts: dict[str, int] = {}
        deadline = time.monotonic() + BUDGET_S
        for part in self.keys.parts:
            self._add(counts, self._sweep_active(part.active, deadline))
            if counts.get("unfinished"):
                return counts
        return counts

    def _sweep_active(self, active: str, deadline: float) -> dict[str, int]:
        age_ms = int(self.settings.sweep_after_s * 1000)
        counts: dict[str, int] = {}
        while True:
            call = self.store.stale(key=active, age_ms=age_ms, limit=SCAN_LIMIT)
            run_ids = scripts.execute(self.redis, [call])[0][1::2]
            pipe = self.redis.pipeline(transaction=False)
            for run_id in run_ids:
                pipe.hget(self.keys.run(run_id).run, "queue")
            queues = pipe.execute()
            # every run checked is re-scored (or leaves the index), so the next page is new runs
            self._add(counts, self._sweep_runs([(r, q or DEFAULT_QUEUE) for r, q in zip(run_ids, queues, strict=True)]))
            if len(run_ids) < SCAN_LIMIT:
                return counts
            if time.monotonic() > deadline:
                return {**counts, "unfinished": 1}

    def _sweep_runs(self, runs: list[tuple[str, str]]) -> dict[str, int]:
        if not runs:
            return {}
        after_ms = int(self.settings.sweep_after_s * 1000)
        calls = [
            self.store.sweep(run_id=rid, queue=q, after_ms=after_ms, live_claim_max_ms=after_ms * LIVE_CLAIM_LOOKS)
            for rid, q in runs
        ]
        counts = {"swept": len(calls)}
        repaired: list[tuple[str, str]] = []
        for (run_id, _), reply_item in zip(runs, scripts.execute(self.redis, calls), strict=True):
            outcome = Outcome.parse(reply_item)
            key = outcome.code.lower()
            counts[key] = counts.get(key, 0) + 1
            if outcome.code == "REPAIRED":
                repaired.append((run_id, str(outcome.detail[1])))
            elif outcome.code == "CHILDREN":  # waiting for child runs: check them (another slot each)
                self._add(counts, check_parent(self.redis, self.store, run_id))
        for run_id, reason in repaired[:LOGGED_REPAIRS]:
            log.warning(
                "run had no queued or scheduled work; repaired (reason says how)",
                extra={"run_id": run_id, "reason": reason},
            )
        if len(repaired) > LOGGED_REPAIRS:  # a lost stream: one line for the rest, not one per run
            log.warning(
                "more runs had no queued or scheduled work; repaired",
                extra={"runs": len(repaired) - LOGGED_REPAIRS, "reasons": ",".join(sorted({r for _, r in repaired}))},
            )
        return counts

    def purge(self) -> dict[str, int]:
        """Delete finished runs past their retention (completed and cancelled: ``retention_s``;
        failed: ``failed_retention_s``), paging until caught up or :data:`BUDGET_S` is spent."""
        counts: dict[str, int] = {}
        for index, retention_s in (("done", self.settings.retention_s), ("dead", self.settings.failed_retention_s)):
            if retention_s > 0:
                done = purge_finished(
                    self.redis, self.store, index, FINISHED_IN[index], age_ms=int(retention_s * 1000), budget_s=BUDGET_S
                )
                self._add(counts, {"purged": done.purged, "unfinished": int(not done.complete)})
        return counts
