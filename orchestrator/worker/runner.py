"""``Worker``: reads step dispatches from the queues' streams and runs them, many at once.

One asyncio loop reads with XREADGROUP (as many entries as it has free slots, so nothing
waits in a local buffer where a crash would strand it), claims the batch in one pipeline and
runs each claimed step: async steps on the loop, sync steps on a pool of threads. Commits,
acks and counters from all steps are batched into shared pipelines (see ``batcher``). A
separate thread heartbeats (see ``heartbeat``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, cast

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster

from orchestrator import faults as fault_points
from orchestrator import scripts
from orchestrator._version import __version__
from orchestrator.bridge.connection import rq_client
from orchestrator.codec import Dispatch
from orchestrator.connection import (
    REDIS_FAILURES,
    aclose,
    close,
    cluster_reply,
    connect,
    connect_async,
    is_cluster,
    outcome_unknown_or_passing,
    probe_cluster,
)
from orchestrator.errors import ConfigError, DefinitionError, RedisRefused, RedisUnavailable
from orchestrator.faults import Faults
from orchestrator.keys import GROUP, Keys
from orchestrator.layout import check_layout_async
from orchestrator.metrics import MetricsServer, WorkerMetrics, step_positions, zero_fields
from orchestrator.outage import Outage
from orchestrator.output import Emitter
from orchestrator.permits import announce_permits
from orchestrator.priority import Picker, lanes_of, split
from orchestrator.ratelimit import Spender
from orchestrator.settings import Settings
from orchestrator.store import Claimed, Store, new_claim_token
from orchestrator.worker.audit import PendingAudit
from orchestrator.worker.batcher import Batcher
from orchestrator.worker.execution import StepExecution
from orchestrator.worker.heartbeat import Heartbeat, InFlightTable
from orchestrator.worker.loop import loop_factory
from orchestrator.worker.queues import ensure_groups, parse_entry, promote_due
from orchestrator.worker.runtime import Released, Runtime, Shutdown
from orchestrator.worker.usercode import StepThreads
from orchestrator.workflow import Workflow

log = logging.getLogger("orchestrator.worker")
REDIRECTED_PAUSE_S = 0.05  # a cluster read that met MOVED or ASK: the slot map is patched, read again soon
# how long an entry read ahead may wait for a slot while the worker's slots chain their runs' steps
CHAIN_YIELD_S = 0.5
LAPSED_PAUSE_S = 0.02  # this worker's deadline may have passed: wait for the beat asked for, then go on


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs the steps of ``workflows``; every workflow's queue is read.

    Use ``run()`` (blocking) or ``await run_async()``; stop with ``shutdown()`` from any
    thread. The CLI maps SIGTERM to ``shutdown()`` and a second signal to
    ``shutdown(immediate=True)``.
    """

    def __init__(
        self,
        workflows: Sequence[Workflow[Any]],
        settings: Settings | None = None,
        *,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.settings.plain_url()  # raises ConfigError when no URL is set
        if not workflows:
            raise DefinitionError("a worker needs at least one workflow")
        self.workflows: dict[str, Workflow[Any]] = {}
        for wf in workflows:
            if wf.name in self.workflows:
                raise DefinitionError(f"workflow {wf.name!r} is given twice")
            wf.first_step  # noqa: B018 - raises DefinitionError for a workflow without steps
            self.workflows[wf.name] = wf
            self.workflows.update((item.name, item) for item in wf.items.values())  # its map items' runs
        self.id = worker_id or new_worker_id()
        self.keys = Keys(self.settings.namespace, self.settings.partitions)
        self.store = Store(self.keys)
        self.queues = sorted({wf.queue for wf in workflows})
        self.lanes = list(self.queues)  # the queues and the priority lanes of them in use (priority.py)
        # every lane's stream in every partition -> (lane, partition); lanes are added as they come in use
        self._streams: dict[str, tuple[str, int]] = {}
        self._add_lanes(self.queues)
        self._picker = Picker()  # which read entries start first (priorities)
        self._faults = Faults(self.settings.faults)
        self._table = InFlightTable()
        self._executions: dict[str, StepExecution] = {}  # by claim token
        # the one execution of each stream entry, by (stream, entry id): ids repeat across streams
        self._by_entry: dict[tuple[str, str], StepExecution] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._claiming = 0  # entries in a claim call still in flight: their slots are taken
        self._slot_freed: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = False  # set at once by shutdown(), from any thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._immediate = False
        # entries read when no slot was free for them (one read takes from every lane's stream):
        # pending for this worker, claimed in order as slots free, handed back after a lease;
        # (queue, entry id, dispatch, monotonic time read)
        self._waiting: deque[tuple[str, str, Dispatch, float]] = deque()
        self._heartbeat_thread: Heartbeat  # made by run_async
        self.rt: Runtime | None = None
        self.metrics = WorkerMetrics()
        self.metrics_port: int | None = None

    def __repr__(self) -> str:
        return f"Worker({self.id!r}, workflows={sorted(self.workflows)}, queues={self.queues})"

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        with asyncio.Runner(loop_factory=loop_factory(self.settings.event_loop)) as runner:
            runner.run(self.run_async())

    def shutdown(self, *, immediate: bool = False) -> None:
        """Ask the worker to stop (thread-safe). Graceful first; ``immediate`` skips the drain."""
        self._stop_requested = True  # no new chained steps, even before the loop gets to it
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(self._begin_shutdown, immediate)

    def _begin_shutdown(self, immediate: bool) -> None:
        assert self._stopping is not None
        if immediate and not self._immediate:
            self._immediate = True
            log.warning(
                "stopping now: in-flight steps are abandoned to the supervisor",
                extra={"worker": self.id, "in_flight": len(self._executions)},
            )
            for execution in list(self._executions.values()):
                execution.abort_with(Shutdown())
        if not self._stopping.is_set():
            log.info(
                "draining: no new steps; in-flight steps may finish",
                extra={"worker": self.id, "in_flight": len(self._executions), "grace_s": self.settings.drain_grace_s},
            )
        self._stopping.set()

    async def run_async(self) -> None:
        """Serve until shutdown. Shutdown order, each phase logged:

        1. stop reading new entries;
        2. let in-flight steps finish for up to ``drain_grace_s``, heartbeats still going;
        3. release steps still running (re-enqueued at once, not counted as crashes) and
           ack their entries; on an immediate stop, abandon them to the supervisor instead;
        4. flush queued commits, acks and counters;
        5. stop the heartbeat and deregister this worker;
        6. close connections.
        """
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        fault_points.arm(self._faults)
        exporter = self._serve_metrics()  # first: a port in use stops the worker before it connects
        try:
            clients = await self._connect()
            if clients is not None:
                await self._serve(*clients)
        finally:
            if exporter is not None:
                exporter.close()
            log.info("worker stopped", extra={"worker": self.id, **dict(self.rt.counts if self.rt else {})})

    async def _connect(self) -> tuple[aredis.Redis, redis.Redis] | None:
        """Clients for the URL once its server has said whether it is a Redis Cluster node,
        waiting as long as it takes (a node that is down now may be a cluster node when it is
        back: taken for a single server, it would refuse every later call); None when a shutdown
        came first."""
        assert self._stopping is not None
        url = self.settings.plain_url()
        outage = Outage(log, "starting the worker", url, fields={"worker": self.id})
        while not self._stopping.is_set():
            try:
                cluster = await asyncio.to_thread(probe_cluster, url, self.keys.cluster_probe)
                sync_redis = await asyncio.to_thread(connect, url, cluster=cluster)  # reads a slot map
            except (*REDIS_FAILURES, RedisUnavailable, RedisRefused) as exc:
                await self._pause(outage.failed(exc))
                continue
            outage.recovered()
            return connect_async(url, cluster=cluster), sync_redis
        return None

    async def _serve(self, async_redis: aredis.Redis, sync_redis: redis.Redis) -> None:
        """Start up, serve until shutdown, then stop in the order :meth:`run_async` says."""
        assert self._loop is not None and self._slot_freed is not None
        bridged = any(step.executor for wf in self.workflows.values() for step in wf.steps)
        rq_redis = rq_client(sync_redis) if bridged else None  # refuses a Redis Cluster, saying why
        batcher = Batcher(async_redis)
        self.rt = Runtime(
            self.id,
            tuple(sorted(self.workflows)),
            self.settings,
            self.store,
            batcher,
            sync_redis,
            self._table,
            self._faults,
            self._loop,
            StepThreads(self._loop, self._slot_freed.set),
            self.metrics,
            may_chain=self._may_chain,
            start_chained=self._start_chained,
            stopping_now=lambda: self._immediate,
            emitter=Emitter(sync_redis, batcher, self.keys, self.settings.max_output_entries),
            spender=Spender(sync_redis, batcher, self.store, {n: wf.rate_limits for n, wf in self.workflows.items()}),
            rq_redis=rq_redis,
        )
        self.metrics.info.info({"version": __version__, "worker": self.id})
        heartbeat = self._heartbeat_thread = self._heartbeat(sync_redis)
        started = False
        try:
            started = await self._start_up(async_redis)
            if started:
                heartbeat.beat()
                heartbeat.start()
                batcher.start()
                log.info(
                    "worker started",
                    extra={
                        "worker": self.id,
                        "queues": ",".join(self.queues),
                        "workflows": ",".join(sorted(self.workflows)),
                        "concurrency": self.settings.concurrency,
                        "redis": self.settings.redacted_url,
                    },
                )
                promoter = asyncio.create_task(self._housekeeping_loop(), name="promoter")
                await self._fetch_loop(async_redis)
                promoter.cancel()
                await self._hand_back_waiting()
                await self._drain()
        finally:
            self.rt.flush()
            await batcher.close()
            heartbeat.stop()
            if started:
                await self._deregister(async_redis)
            await aclose(async_redis)
            close(sync_redis)

    async def _start_up(self, client: aredis.Redis) -> bool:
        """Create the queues' groups and announce this worker's steps, waiting for Redis as long
        as it takes (see ``outage``); False when a shutdown came first."""
        assert self._stopping is not None
        outage = Outage(log, "starting the worker", self.settings.plain_url(), fields={"worker": self.id})
        while not self._stopping.is_set():
            try:
                await check_layout_async(client, self.store)  # another partition count: refused
                await client.sadd(self.keys.queues, *self.queues)
                self._add_lanes(str(q) for q in await client.smembers(self.keys.queues))
                await ensure_groups(client, list(self._streams))
                limits = {name for wf in self.workflows.values() for name in wf.rate_limits}
                if limits:  # so that `orchestrator limits list` knows them
                    await client.sadd(self.keys.rate_limits, *sorted(limits))
                await announce_permits(client, self.keys, self.workflows.values())
                await self._announce_steps(client)
            except REDIS_FAILURES as exc:
                await self._pause(outage.failed(exc))
                continue
            outage.recovered()
            return True
        return False

    async def _pause(self, delay_s: float) -> None:
        """Sleep ``delay_s``, or less if a shutdown comes."""
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)

    async def _announce_steps(self, client: aredis.Redis) -> None:
        """Create this worker's workflows' counters at 0, so their first increments show in rate()."""
        steps = {name: [s.name for s in wf.steps] for name, wf in self.workflows.items()}
        calls = [scripts.command("HINCRBY", self.keys.stats_detail, f, 0) for f in zero_fields(steps)]
        # each step's place in its workflow, for `orchestrator stats` to list steps in that order
        positions = [part for pair in step_positions(steps).items() for part in pair]
        if positions:
            calls.append(scripts.command("HSET", self.keys.stats_detail, *positions))
        await scripts.execute_async(client, calls)
        self.metrics.announce({name: {s.name: s.runs_on for s in wf.steps} for name, wf in self.workflows.items()})
        self.metrics.concurrency.set(self.settings.concurrency)

    def _serve_metrics(self) -> MetricsServer | None:
        host, port = self.settings.metrics_host, self.settings.metrics_port
        if port is None:
            return None
        try:
            server = MetricsServer(self.metrics.registry, host, port)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port} (metrics_port): cannot serve /metrics on {host}:{port}: "
                f"{(exc.strerror or str(exc)).lower()}; pick a free port, or 0 for any"
            ) from None
        self.metrics_port = server.port
        return server

    def _heartbeat(self, sync_redis: redis.Redis) -> Heartbeat:
        info = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "queues": ",".join(self.queues),
            "workflows": ",".join(sorted(self.workflows)),
            "concurrency": str(self.settings.concurrency),
            "started_ms": str(int(time.time() * 1000)),
        }
        return Heartbeat(
            client=sync_redis,
            store=self.store,
            worker_id=self.id,
            queues=self.lanes,  # announced at every beat: a queues set lost with Redis' data comes back
            info=info,
            table=self._table,
            interval_s=self.settings.heartbeat_interval_s,
            lease_ms=self.settings.lease_ms,
            faults=self._faults,
        )

    async def _drain(self) -> None:
        if self._tasks and not self._immediate:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_grace_s)
            if pending:
                log.warning(
                    "grace period over: giving back steps still running",
                    extra={"worker": self.id, "steps": len(pending)},
                )
                for execution in list(self._executions.values()):
                    execution.abort_with(Released("worker shutting down"))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)

    async def _deregister(self, async_redis: aredis.Redis) -> None:
        """Leave the fleet; leave the consumer groups too unless entries are still pending for us."""
        calls = [scripts.command("ZREM", self.keys.workers, self.id), scripts.command("DEL", self.keys.worker(self.id))]
        # its claims lapse now rather than a lease later (a step still running after the grace)
        calls += [scripts.command("HDEL", part.alive, self.id) for part in self.keys.parts]
        calls += [self.store.reap_consumer(stream=stream, consumer=self.id) for stream in self._streams]
        try:
            await scripts.execute_async(async_redis, calls)
        except REDIS_FAILURES as exc:
            log.warning("could not deregister; the supervisor will clean up", extra={"error": str(exc)})

    # -- reading and claiming -------------------------------------------------------------

    def _open_slots(self) -> int:
        """Slots not running a step: running steps and abandoned step threads both take one."""
        assert self.rt is not None
        return self.settings.concurrency - len(self._tasks) - self._claiming - self.rt.threads.abandoned

    def _free_slots(self) -> int:
        """Open slots not promised to an entry already read (``_waiting``)."""
        return self._open_slots() - len(self._waiting)

    def _may_chain(self) -> bool:
        """A committing step may hand its slot to its run's next step unless the worker is
        stopping, or an entry it read has waited :data:`CHAIN_YIELD_S` for a slot (the step
        finishing still holds its slot, so the count stays the same): then freed slots go to
        the entries read, and chained runs' next steps queue behind them."""
        if self._stop_requested:
            return False
        if self._free_slots() >= 0 or not self._waiting:
            return True
        return time.monotonic() - min(item[3] for item in self._waiting) < CHAIN_YIELD_S

    def _start_chained(
        self, queue: str, entry_id: str, dispatch: Dispatch, claimed: Claimed, token: str, chained: int
    ) -> None:
        """Run a step its predecessor's commit claimed for this worker (the ``chained``-th in a
        row), or give it back at once (re-enqueued, no crash counted) when a stop came while
        that commit was in flight."""
        if not self._stop_requested:
            self._handle_claim(queue, entry_id, dispatch, claimed, token, chained)
            return
        assert self.rt is not None
        execution = self._execution(queue, entry_id, dispatch, claimed, token, chained)
        self._track(execution, execution.hand_back("worker stopping"))

    def _add_lanes(self, in_use: Iterable[str]) -> None:
        """Serve the priority lanes of this worker's queues that are ``in_use`` (the namespace's
        queues set) from now on (the readers create their groups)."""
        for queue in lanes_of(self.queues, sorted(in_use)):
            if queue not in self.lanes:
                self.lanes.append(queue)
            for p in range(self.keys.partitions):
                self._streams.setdefault(self.keys.queue(queue, p).stream, (queue, p))

    def _read_partitions(self, client: aredis.Redis) -> list[int | None]:
        """What each reader reads: every stream at once on one server (None); on a Redis Cluster,
        where one call's keys must share a hash slot, one reader per partition (its lanes'
        streams share the partition's tag), each blocking on its own connection."""
        if not is_cluster(client):
            return [None]
        return list(range(self.keys.partitions))

    def _streams_of(self, partition: int | None) -> list[str]:
        return [s for s, (_, p) in self._streams.items() if partition is None or p == partition]

    def _read_count(self) -> int:
        """The COUNT of each read (COUNT applies per stream): the free slots shared out over
        every stream, at least one each. Reading every stream at once keeps a new entry from
        waiting for its stream's turn; what comes beyond the free slots waits in ``_waiting``
        (at most one entry per stream)."""
        return max(1, self._free_slots() // len(self._streams))

    async def _claim_waiting(self) -> None:
        """Claim as many waiting entries as there are open slots: by priority (``Picker``: the
        highest level first, each level its share), oldest first within a level."""
        take = min(self._open_slots(), len(self._waiting))
        left = list(self._waiting)
        batch = self._picker.pick(left, take, lambda item: split(item[0])[1])
        self._waiting = deque(left)
        await self._claim([(queue, eid, d, new_claim_token(self.id)) for queue, eid, d, _ in batch])

    async def _hand_back_waiting(self) -> None:
        """At a stop, entries read but never started go back to the queue at once (claimed and
        handed back, as a stopping worker does with a chained step), not after a lease."""
        batch = [(queue, eid, d, new_claim_token(self.id)) for queue, eid, d, _ in self._waiting]
        self._waiting.clear()
        if batch:
            await self._claim(batch)

    async def _wait_for_slot(self) -> None:
        assert self._stopping is not None and self._slot_freed is not None
        self._slot_freed.clear()
        waiters = {asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(self._slot_freed.wait())}
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()

    async def _fetch_loop(self, client: aredis.Redis) -> None:
        """Read every stream until a stop: one reader, or one per partition on a cluster."""
        await asyncio.gather(*(self._reader(client, partition) for partition in self._read_partitions(client)))

    async def _reader(self, client: aredis.Redis, partition: int | None) -> None:
        assert self._stopping is not None
        outage = Outage(log, "reading the queues", self.settings.plain_url(), fields={"worker": self.id})
        served = len(self._streams)
        offsets: dict[Any, Any] = dict.fromkeys(self._streams_of(partition), ">")
        while not self._stopping.is_set():
            if len(self._streams) != served:  # a priority lane came in use (streams are only added)
                served = len(self._streams)
                streams = self._streams_of(partition)
                await ensure_groups(client, [s for s in streams if s not in offsets])
                offsets = dict.fromkeys(streams, ">")
                continue
            if self._waiting and self._open_slots() > 0:
                await self._claim_waiting()
                continue
            if self._free_slots() <= 0:
                await self._wait_for_slot()
                continue
            if not self._heartbeat_thread.live():  # after a pause: claims would be born dead
                self._heartbeat_thread.wake()
                await self._pause(LAPSED_PAUSE_S)
                continue
            try:
                reply = await self._read(client, offsets)
                outage.recovered()
            except redis.ResponseError as exc:
                if is_cluster(client) and cluster_reply(exc):  # a read aimed at a slot's old owner
                    await self._pause(REDIRECTED_PAUSE_S)
                    continue
                if "NOGROUP" not in str(exc):  # refused for now (MISCONF, READONLY, OOM...): wait, retry
                    await self._pause(outage.failed(exc))
                    continue
                # the stream or its group vanished (Redis lost its data, an operator's DEL): make it again
                log.warning("a queue's consumer group is gone; creating it again", extra={"error": str(exc)})
                await ensure_groups(client, list(offsets))
                continue
            except REDIS_FAILURES as exc:
                await self._pause(outage.failed(exc))
                continue
            if reply:
                await self._start(reply)

    async def _read(self, client: aredis.Redis, offsets: dict[Any, Any]) -> Any:
        """One XREADGROUP of ``offsets``' streams, blocking up to ``block_ms``.

        On a cluster the node is named: redis-py's cluster client cannot find XREADGROUP's keys
        in its command table (they follow STREAMS) and would ask a node with ``COMMAND GETKEYS``
        before every read, while every stream of one read shares one partition's slot. After a
        slot moved, the read fails once (MOVED) and the next one goes to the new owner.
        """
        count, block = self._read_count(), self.settings.block_ms
        if not is_cluster(client):
            return await client.xreadgroup(GROUP, self.id, offsets, count=count, block=block)
        cluster = cast(acluster.RedisCluster, client)
        node = cluster.get_node_from_key(next(iter(offsets)))
        streams = ["STREAMS", *offsets, *offsets.values()]
        return await cluster.execute_command(
            "XREADGROUP", "GROUP", GROUP, self.id, "COUNT", count, "BLOCK", block, *streams, target_nodes=node
        )

    async def _start(self, reply: Any) -> None:
        assert self.rt is not None
        batch: list[tuple[str, str, Dispatch, str]] = []
        for stream, entries in reply:
            lane = self._streams[stream]
            queue = lane[0]
            for entry_id, fields in entries:
                dispatch = parse_entry(self.rt, self.keys, lane, entry_id, fields)  # None: set aside
                if dispatch is not None:
                    batch.append((queue, entry_id, dispatch, new_claim_token(self.id)))
        read_at = time.monotonic()
        self._waiting.extend((queue, eid, d, read_at) for queue, eid, d, _ in batch)
        if self._waiting and self._open_slots() > 0:
            await self._claim_waiting()

    async def _claim(self, batch: list[tuple[str, str, Dispatch, str]]) -> None:
        """Claim a batch in one pipeline; a claim whose reply is lost is sent again, same token.

        A resent claim that did run gets the same claim back (claim.lua knows its token), so a
        lost reply costs neither a crash count nor the step: without the resend the claim would
        sit unused until its lease lapsed, and the next claim would count a crash.
        """
        assert self.rt is not None
        self._claiming += len(batch)  # their slots are taken until each claim is handled
        try:
            await self._send_claims(batch)
        finally:
            self._claiming -= len(batch)

    async def _send_claims(self, batch: list[tuple[str, str, Dispatch, str]]) -> None:
        assert self.rt is not None
        delay_s = 0.05
        for _ in range(6):
            calls = [
                self.store.claim(
                    dispatch=d,
                    queue=queue,
                    entry_id=eid,
                    token=token,
                    worker=self.id,
                    max_crashes=self.settings.max_crashes,
                    max_steps=self.settings.max_run_steps,
                )
                for queue, eid, d, token in batch
            ]
            replies = await self.rt.batcher.call_many(calls)
            unanswered = []
            for item, reply_item in zip(batch, replies, strict=True):
                queue, entry_id, dispatch, token = item
                if not isinstance(reply_item, BaseException):
                    self._handle_claim(queue, entry_id, dispatch, Claimed.parse(reply_item), token)
                elif outcome_unknown_or_passing(reply_item) and not self._stop_requested:
                    unanswered.append(item)
                else:
                    log.error(
                        "claim failed; the entry stays pending for the supervisor",
                        extra={"run_id": dispatch.run, "step": dispatch.step, "error": str(reply_item)},
                    )
            if not unanswered:
                return
            batch = unanswered
            await asyncio.sleep(delay_s)
            delay_s *= 2
        log.error("claims got no answer; their entries stay pending for the supervisor", extra={"count": len(batch)})

    def _handle_claim(
        self, queue: str, entry_id: str, dispatch: Dispatch, claimed: Claimed, token: str, chained: int = 0
    ) -> None:
        assert self.rt is not None
        fields = {"run_id": dispatch.run, "step": dispatch.step, "entry": entry_id}
        if claimed.code != "RUN":
            self._skip(queue, entry_id, dispatch, claimed, fields)
            return
        if self._stop_requested:  # claimed while stopping: give it back at once, no crash counted
            execution = self._execution(queue, entry_id, dispatch, claimed, token, chained)
            self._track(execution, execution.hand_back("worker stopping"))
            return
        metrics = self.rt.metrics
        # a chained step did not wait in the queue (its entry is where its run's chain started)
        wait_ms = 0 if chained else claimed.server_ms - int(entry_id.split("-")[0])
        metrics.queue_wait.labels(dispatch.wf, queue).observe(max(0, wait_ms) / 1000)
        if claimed.crashed_now:
            self.rt.count("crashes")
            metrics.attempts.labels(dispatch.wf, dispatch.step, "crashed", self._runs_on(dispatch)).inc()
            metrics.saved_steps.labels(dispatch.wf).inc(claimed.steps_done)
            metrics.saved_seconds.labels(dispatch.wf).inc(claimed.work_ms / 1000)
            log.warning(
                "previous attempt crashed; resuming from the last persisted step",
                extra={**fields, "crashes": claimed.crashes, "has_stash": claimed.snapshot is not None},
            )
        execution = self._execution(queue, entry_id, dispatch, claimed, token, chained)
        self._track(execution, execution.run())

    def _execution(
        self, queue: str, entry_id: str, dispatch: Dispatch, claimed: Claimed, token: str, chained: int = 0
    ) -> StepExecution:
        """A new execution of an entry; one still running the same step of the same entry is
        superseded (a chained step carries the entry its run's chain started from: the step
        before it, still finishing, is not).

        The same entry reaches this worker twice only when Redis lost writes (its group's
        last-delivered id went back): the earlier claim is gone from Redis, so that attempt
        can no longer write anything, and the worker stops it rather than run the step twice.
        """
        assert self.rt is not None
        entry = (self.keys.queue_of(queue, dispatch.run).stream, entry_id)
        earlier = self._by_entry.get(entry)
        if earlier is not None and not earlier.finished and earlier.token != token and earlier.dispatch == dispatch:
            earlier.supersede()
        workflow = self.workflows.get(dispatch.wf)
        execution = StepExecution(self.rt, queue, entry_id, dispatch, claimed, workflow, token, chained)
        self._by_entry[entry] = execution
        return execution

    def _track(self, execution: StepExecution, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` for ``execution`` as a task that holds a slot until it ends."""
        d = execution.dispatch
        task = asyncio.create_task(work, name=f"step:{d.run}:{d.step}")
        self._tasks.add(task)
        self._executions[execution.token] = execution
        self.metrics.in_flight.set(len(self._tasks))
        token = execution.token
        task.add_done_callback(lambda t: self._finished(t, token))

    def _runs_on(self, dispatch: Dispatch) -> str:
        """The executor label of a dispatched step (``worker`` for one this worker does not know)."""
        wf = self.workflows.get(dispatch.wf)
        step = next((s for s in wf.steps if s.name == dispatch.step), None) if wf else None
        return step.runs_on if step else "worker"

    def _skip(self, queue: str, entry_id: str, dispatch: Dispatch, claimed: Claimed, fields: dict[str, str]) -> None:
        assert self.rt is not None
        counter = {"DUP": "duplicates", "QUARANTINED": "quarantined", "BUSY": "busy"}.get(claimed.code)
        if counter:
            self.rt.count(counter)
        if claimed.code == "DUP":
            self.rt.metrics.attempts.labels(dispatch.wf, dispatch.step, "duplicate", self._runs_on(dispatch)).inc()
        level = logging.WARNING if claimed.code in ("QUARANTINED", "MISSING", "WRONG_WF") else logging.INFO
        log.log(level, f"entry not run: {claimed.code.lower()}", extra={**fields, "detail": claimed.detail})
        if claimed.code == "LAPSED":  # this worker's deadline had passed: claim again after a beat
            self._heartbeat_thread.wake()
            self.rt.loop.call_later(LAPSED_PAUSE_S, self._requeue, queue, entry_id, dispatch)
            return
        # BUSY: another claim runs the step; if it dies, this pending entry recovers it (this
        # worker's audit gives it up then)
        if claimed.code != "BUSY":
            self.rt.ack(queue, dispatch.run, entry_id)

    def _requeue(self, queue: str, entry_id: str, dispatch: Dispatch) -> None:
        """Put an entry read but not claimed back at the front of the line, and wake the reader."""
        self._waiting.appendleft((queue, entry_id, dispatch, time.monotonic()))
        if self._slot_freed is not None:
            self._slot_freed.set()

    async def _give_back_waiting(self, older_than_s: float) -> None:
        """Entries read ahead that found no free slot for ``older_than_s`` (every slot busy with long
        steps) go back to the stream for any worker with room (not counted as crashes)."""
        assert self.rt is not None
        cutoff = time.monotonic() - older_than_s
        old = [item for item in self._waiting if item[3] < cutoff]
        if not old:
            return
        self._waiting = deque(item for item in self._waiting if item[3] >= cutoff)
        calls = [
            self.store.redispatch(queue=queue, entry_id=eid, consumer=self.id, dispatch=d, giver=self.id)
            for queue, eid, d, _ in old
        ]
        await self.rt.batcher.call_many(calls)
        log.info("entries read ahead found no free slot; handed back", extra={"worker": self.id, "entries": len(old)})

    def _known_entries(self) -> set[tuple[str, str]]:
        """(stream, entry id) of every entry this worker is running or waiting to claim."""
        waiting = {(self.keys.queue_of(queue, d.run).stream, eid) for queue, eid, d, _ in self._waiting}
        return set(self._by_entry) | waiting

    def _finished(self, task: asyncio.Task[None], token: str) -> None:
        self._tasks.discard(task)
        execution = self._executions.pop(token, None)
        if execution is not None:
            entry = (self.keys.queue_of(execution.queue, execution.dispatch.run).stream, execution.entry_id)
            if self._by_entry.get(entry) is execution:
                del self._by_entry[entry]
        self.metrics.in_flight.set(len(self._tasks))
        if self._slot_freed:
            self._slot_freed.set()
        if not task.cancelled() and task.exception():
            log.error("step execution crashed inside the worker", exc_info=task.exception(), extra={"token": token})

    # -- retries --------------------------------------------------------------------------

    async def _housekeeping_loop(self) -> None:
        """Move due retries from each queue's delayed set onto its stream; every lease, audit
        the entries pending for this worker (``audit``)."""
        assert self.rt is not None
        outage = Outage(log, "promoting due retries", self.settings.plain_url(), fields={"worker": self.id})
        audit = PendingAudit(self.rt.batcher, self.store, self.id, self._streams, self.settings.lease_ms)
        delay_s = self.settings.promote_interval_s
        next_audit = time.monotonic() + self.settings.lease_s
        while True:
            await asyncio.sleep(delay_s)
            try:
                await promote_due(self.rt.batcher, self.store, self.lanes)
                if time.monotonic() >= next_audit:
                    next_audit = time.monotonic() + self.settings.lease_s
                    self._add_lanes(await self.rt.batcher.call(scripts.command("SMEMBERS", self.keys.queues)))
                    await self._give_back_waiting(older_than_s=self.settings.lease_s)
                    await audit.run(self._known_entries())
            except REDIS_FAILURES as exc:
                delay_s = max(self.settings.promote_interval_s, outage.failed(exc))
                continue
            outage.recovered()
            delay_s = self.settings.promote_interval_s
