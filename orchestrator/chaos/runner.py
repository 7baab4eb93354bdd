"""``orchestrator chaos``: a synthetic workload under real faults, then the invariant check.

The run starts its own supervisors and worker processes (``orchestrator.chaos.flows``) in a
fresh namespace, keeps a mix of runs in flight, and for ``duration_s`` injects faults:
``kill -9`` of random workers at random times (restarted shortly after, like a container),
workers that kill themselves at a random crash point, supervisor kills, malformed stream
entries, and, when it owns the Redis server, ``kill -9`` + restart of Redis itself and
restarts from an older copy of its data that lose the last seconds of acknowledged writes
(``rollback``). Runs whose submit such a restore forgot are resubmitted with the same id and
input, as the README tells users to. Then it stops injecting, waits for every run to finish,
and checks the invariants (``checker``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from orchestrator.bridge.executor import SERIALIZER
from orchestrator.chaos import flows
from orchestrator.chaos.checker import Checker, Report, Violation, children_of
from orchestrator.chaos.cluster import LoopbackCluster
from orchestrator.chaos.cluster_faults import FAILOVER, ClusterFaults
from orchestrator.chaos.ledger import Ledger
from orchestrator.chaos.rollback import Rollbacks
from orchestrator.client import Client
from orchestrator.connection import check_topology, close, connect, is_cluster, redis_failure
from orchestrator.embedded import RedisServer
from orchestrator.errors import InvalidTransition, OrchestratorError, RedisUnavailable, RunNotFound
from orchestrator.keys import GROUP
from orchestrator.priority import PRIORITIES, Priority, lane
from orchestrator.processes import ProcessGroup, child_pids
from orchestrator.settings import Settings

Echo = Callable[[str], None]
CRASH_POINTS = (
    "after_claim",
    "mid_step",
    "after_stash",
    "before_commit",
    "after_persist_before_ack",
    "before_children",  # a parent's commit durable, its children not submitted: hit far less often
    "before_fan_in",  # a map item's run finished, its value not handed on: the supervisor's relay must
    "after_permit",  # a concurrency permit taken, no code run: its lease must return it
    "before_permit_release",  # the outcome durable, the permit not given back: its lease must return it
)
HOLD_SHARE, HOLD_S = 0.5, (1.0, 6.0)  # with lost writes: effect runs whose send step works this long
# runs submitted with a deadline (deadline_s): some finish in time, the others fail at it (I11)
DEADLINE_SHARE, DEADLINE_S = 0.1, (0.5, 6.0)
CANCEL_SHARE, CANCEL_AFTER_S = 0.3, (0.2, 1.5)  # parents cancelled this long after their submit
PRIORITY_MIX: tuple[Priority, ...] = ("high", "normal", "normal", "normal", "low")  # 20% high, 20% low


def priority_of(run_id: str) -> Priority:
    """A run's priority, the same at every (re)submit of its id: every level is in the mix, so a
    run that starved (a low one under the high ones) would be left unfinished (I1)."""
    return PRIORITY_MIX[zlib.crc32(run_id.encode()) % len(PRIORITY_MIX)]


RESTORED = "restore from an older copy"  # the fault's name in the report
# what an RQ worker's log says when Redis went away under it (a restart we injected)
REDIS_AWAY = ("Connection refused", "Connection closed by server", "loading the dataset", "Connection reset")


@dataclass
class ChaosConfig:
    """What the chaos run does; the CLI flags mirror these fields."""

    duration_s: float = 60.0
    workers: int = 3
    supervisors: int = 2
    concurrency: int = 8
    kills_per_minute: float = 30.0
    crash_point_share: float = 0.3
    redis_restarts: int = 2
    lost_writes: int = 0  # restores from an older copy (each loses 2-5 s of writes)
    failovers: int = 1  # on a cluster the run started: kill -9 of a master, its replica promoted
    reshards: int = 1  # on a cluster the run started: a quarter of the partitions' slots moved
    supervisor_kills: int = 1
    rq_workers: int = 1  # RQ workers running the bridged step (none on a Redis Cluster: RQ cannot)
    in_flight: int = 30
    work_s: float = 0.05
    fail_rate: float = 0.05
    malformed_every_s: float = 10.0
    drain_timeout_s: float = 180.0
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))


@dataclass
class Injected:
    """The faults injected so far, with the server-clock time of each worker kill."""

    counts: dict[str, int] = field(default_factory=dict)
    kills: list[tuple[str, int]] = field(default_factory=list)

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


class ChaosRun:
    """One chaos run against ``settings.redis_url``; ``server`` is set when we own Redis, and
    ``cluster`` when we own the Redis Cluster it points at (failovers and resharding then).

    ``ledger_url`` puts the ledger on another server (workers get it as
    ``ORCHESTRATOR_LEDGER_URL``): required for ``lost_writes`` and for a cluster's failovers,
    since a restore from an older copy (or a promoted replica that missed the last writes)
    would roll back a ledger kept in the same Redis along with what it observes.
    """

    def __init__(
        self,
        settings: Settings,
        config: ChaosConfig,
        *,
        server: RedisServer | None,
        logs: Path,
        echo: Echo,
        ledger_url: str | None = None,
        cluster: LoopbackCluster | None = None,
    ) -> None:
        if config.lost_writes and (server is None or ledger_url is None):
            raise ValueError(
                "lost_writes restores Redis from an older copy: it needs a server the chaos run started "
                "itself (never yours) and a ledger on another server"
            )
        if cluster is not None and ledger_url is None:
            raise ValueError("a cluster's failovers may lose writes: the ledger must live on another server")
        self.cluster = cluster
        self.rollbacks: Rollbacks | None = None
        self.cluster_faults: ClusterFaults | None = None
        self.config = config
        self.settings = settings.model_copy(update={"namespace": f"chaos-{uuid.uuid4().hex[:8]}"})
        self.server = server
        self.echo = echo
        self.rng = random.Random(config.seed)
        self.client = Client(self.settings)
        self.ledger_redis = connect(ledger_url) if ledger_url else None
        self.ledger = Ledger(self.ledger_redis or self.client.redis, self.settings.namespace)
        env = {
            **os.environ,
            "ORCHESTRATOR_REDIS_URL": self.settings.plain_url(),
            "ORCHESTRATOR_NAMESPACE": self.settings.namespace,
        }
        env.pop("REDIS_URL", None)
        env.pop("ORCHESTRATOR_LEDGER_URL", None)
        if ledger_url:
            env["ORCHESTRATOR_LEDGER_URL"] = ledger_url
        self.procs = ProcessGroup(env, logs)
        self.injected = Injected()
        self.submitted: list[str] = []
        self.inputs: dict[str, tuple[str, dict[str, float]]] = {}  # run id -> workflow, input
        self.vanished: set[str] = set()  # forgotten by a restore, resubmitted
        self.restores_ms: list[int] = []
        self.rescan = False  # a restore happened: look for vanished runs
        self.open_runs: set[str] = set()
        self.signal_at: dict[str, float] = {}  # approval run id -> when to send it its signal (again)
        self.cancel_at: dict[str, float] = {}  # parent run id -> when to cancel it (children running)
        self.signal_sends = 0
        self.unsure: list[tuple[str, str, dict[str, float]]] = []  # submits whose outcome we did not see
        self.deadlines: dict[str, float] = {}  # run id -> its deadline_s, for the runs given one
        self.unexpected: list[Violation] = []
        self.armed: set[str] = set()
        self.killed: set[str] = set()
        self.exited: set[str] = set()
        self.restarts: list[float] = []
        self.rq_restarts: list[float] = []
        self.rq = False  # RQ workers in the fleet (set at start: not on a Redis Cluster)
        self.clock_offset_ms = 0
        self.serial = 0

    # -- processes ------------------------------------------------------------------------

    def _start_worker(self) -> None:
        self.serial += 1
        name = f"chaos-w{self.serial}"
        env = {}
        if self.rng.random() < self.config.crash_point_share:
            point = self.rng.choice(CRASH_POINTS)
            rare = point in ("before_children", "before_fan_in", "after_permit", "before_permit_release")
            nth = self.rng.randint(1, 3) if rare else self.rng.randint(3, 40)
            env["ORCHESTRATOR_FAULTS"] = f"{point}=kill#{nth}"
            self.armed.add(name)
        self.procs.start(
            name,
            "worker",
            "orchestrator.chaos.flows:WITH_RQ" if self.rq else "orchestrator.chaos.flows:ALL",
            "--concurrency",
            str(self.config.concurrency),
            "--worker-id",
            name,
            env=env,
        )

    def _start_rq_worker(self) -> None:
        """A real ``rq worker`` for the bridged step, started as docs/from-rq.md says."""
        self.serial += 1
        name = f"chaos-rq{self.serial}"
        args = ["worker", flows.RQ_QUEUE, "--url", self.settings.plain_url(), "-S", SERIALIZER]
        args += ["--job-monitoring-interval", "1", "--name", f"{name}-{self.settings.namespace}"]
        self.procs.start(name, *args, module="rq.cli")

    def _workers(self, prefix: str = "chaos-w") -> list[str]:
        return [n for n in self.procs.procs if n.startswith(prefix) and self.procs.alive(n)]

    def _server_ms(self) -> int:
        return int(time.time() * 1000) + self.clock_offset_ms

    def _kill_worker(self) -> None:
        alive = self._workers() + (self._workers("chaos-rq") if self.rq else [])
        if not alive:
            return
        name = self.rng.choice(alive)
        if name.startswith("chaos-rq"):
            self._kill_rq(name)
            return
        if self.procs.kill(name) is not None:
            self.killed.add(name)
            self.injected.kills.append((name, self._server_ms()))
            self.injected.add("worker kill -9")
            self._restart_later()

    def _kill_rq(self, name: str) -> None:
        """kill -9 of an RQ work-horse alone (its RQ worker sees it die), or of the RQ worker and
        its work-horse together (a lost machine: only the horse's beat stops)."""
        proc = self.procs.procs[name]
        horses = child_pids(proc.pid)
        if horses and self.rng.random() < 0.5:
            for pid in horses:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.injected.add("rq work-horse kill -9")
            return
        if self.procs.kill(name) is None:
            return
        for pid in horses:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.killed.add(name)
        self.injected.add("rq worker + work-horse kill -9")
        self.rq_restarts.append(time.monotonic() + self.rng.uniform(0.2, 1.0))

    def _restart_later(self) -> None:
        """A replacement worker comes up after a short while, like a restarted container."""
        self.restarts.append(time.monotonic() + self.rng.uniform(0.2, 1.0))

    def _watch_exits(self) -> None:
        """Note each process death once: a worker that hit its armed crash point is a fault we
        injected, any other death we did not cause is a violation (I7). Dead workers are
        restarted after a short delay, like containers."""
        for name, proc in self.procs.procs.items():
            code = proc.poll()
            if code is None or name in self.killed or name in self.exited:
                continue
            self.exited.add(name)
            if name in self.armed and code == -9:
                self.injected.add("crash point kill")
                self.injected.kills.append((name, self._server_ms()))
            elif name.startswith("chaos-rq") and self._rq_lost_redis(name):
                self.injected.add("rq worker quit as Redis restarted (RQ's own)")
            else:
                self.unexpected.append(Violation("I7", "-", f"{name} exited with code {code} on its own"))
            if name.startswith("chaos-w"):
                self._restart_later()
            elif name.startswith("chaos-rq"):
                self.rq_restarts.append(time.monotonic())

    def _rq_lost_redis(self, name: str) -> bool:
        """RQ 3.0's worker quits when Redis goes away at the wrong moment (at its start, or in
        the middle of its own bookkeeping of a job): RQ's process, running none of our code
        (its work-horses run the bridged steps), so it is counted apart from I7 and restarted."""
        log = (self.procs.logs / f"{name}.log").read_text(errors="replace").splitlines()[-80:]
        return any(sign in line for line in log for sign in REDIS_AWAY)

    # -- load -----------------------------------------------------------------------------

    def _submit_one(self) -> None:
        name = self.rng.choices(list(flows.MIX), weights=list(flows.MIX.values()))[0]
        if self.rq and self.rng.random() < flows.RQ_SHARE:
            name = flows.tools.name
        run_id = f"{name}-{len(self.submitted) + len(self.unsure):05d}"
        knobs = {"work_s": self.config.work_s, "fail_rate": self.config.fail_rate}
        if (
            self.config.lost_writes
            and name in (flows.effects.name, flows.tools.name)
            and self.rng.random() < HOLD_SHARE
        ):
            # a send that outlives a rollback: Redis forgets its claim while it still runs
            knobs["hold_s"] = self.rng.uniform(*HOLD_S)
        if self.rng.random() < DEADLINE_SHARE:
            self.deadlines[run_id] = self.rng.uniform(*DEADLINE_S)
        self._submit(run_id, name, knobs)

    def _submit(self, run_id: str, name: str, knobs: dict[str, float]) -> None:
        workflow = next(wf for wf in flows.WITH_RQ if wf.name == name)
        try:
            self.client.submit(
                workflow, knobs, run_id=run_id, deadline_s=self.deadlines.get(run_id), priority=priority_of(run_id)
            )
        except (redis.RedisError, OSError, RedisUnavailable):
            self.unsure.append((run_id, name, knobs))  # resubmitted later: same id, same run
            return
        if run_id not in self.inputs:
            self.submitted.append(run_id)
            self.inputs[run_id] = (name, knobs)
            if name in flows.PARENTS and self.rng.random() < CANCEL_SHARE:
                self.cancel_at[run_id] = time.monotonic() + self.rng.uniform(*CANCEL_AFTER_S)
        self.open_runs.add(run_id)

    def _cancel_due(self) -> None:
        """Cancel the parents due for it: their children and map items must not be left running (I13)."""
        now = time.monotonic()
        for run_id, at in list(self.cancel_at.items()):
            if now >= at:
                with contextlib.suppress(InvalidTransition, RunNotFound):  # finished, or forgotten by a restore
                    self.client.cancel(run_id, "chaos: a parent cancelled while its children run")
                del self.cancel_at[run_id]

    def _send_signals(self) -> None:
        """Send each approval run its ``go`` signal, and again every 1-3 s while it is open:
        one signal id per run, so every resend (as an app's retry after a lost reply) must be a
        duplicate, and a signal that a restore from an older copy forgot is delivered again."""
        now = time.monotonic()
        for run_id in self.open_runs - self.signal_at.keys():
            if run_id.startswith(flows.approvals.name):
                # before or after the run starts to wait: either must be delivered once; a run
                # a restore from an older copy opened again is sent its signal again
                self.signal_at[run_id] = now + self.rng.uniform(0.0, 2.0)
        for run_id, at in list(self.signal_at.items()):
            if run_id not in self.open_runs:
                del self.signal_at[run_id]
            elif now >= at:
                payload = {"token": flows.signal_token(run_id)}
                try:
                    self.client.signal(run_id, "go", payload, signal_id=f"{run_id}:go", workflow=flows.approvals)
                    self.signal_sends += 1
                except (InvalidTransition, RunNotFound):
                    pass  # finished (at a deadline), or forgotten by a restore: resubmitted, sent again
                self.signal_at[run_id] = now + self.rng.uniform(1.0, 3.0)

    def _retry_unsure(self) -> None:
        pending, self.unsure = self.unsure, []
        for run_id, name, knobs in pending:
            self._submit(run_id, name, knobs)

    def _unfinished(self, candidates: list[str], *, existing: bool = False) -> list[str]:
        """The runs among ``candidates`` that have not finished; with ``existing``, a run that
        does not exist is not waited for (a child its cancelled parent never started)."""
        pipe = self.client.redis.pipeline(transaction=False)
        for rid in candidates:
            pipe.hget(self.client.keys.run(rid).run, "status")
        return [
            rid
            for rid, status in zip(candidates, pipe.execute(), strict=True)
            if status not in ("completed", "failed", "cancelled") and not (existing and status is None)
        ]

    def _resubmit_vanished(self) -> None:
        """After a restore from an older copy: the runs whose submit was in the lost seconds
        are gone. Report them and submit each again with the same id and input (what the
        README tells users to do after Redis lost writes); they must then finish (I1)."""
        if not self.rescan:
            return
        pipe = self.client.redis.pipeline(transaction=False)
        for rid in self.submitted:
            pipe.exists(self.client.keys.run(rid).run)
        gone = [rid for rid, found in zip(self.submitted, pipe.execute(), strict=True) if not found]
        for rid in gone:
            self.vanished.add(rid)
            self._submit(rid, *self.inputs[rid])
        self.open_runs = set(self._unfinished(self.submitted))  # runs finished in the lost seconds, too
        self.rescan = False
        self.echo(
            f"  restored Redis from an older copy: {len(gone)} runs vanished (their submit was in the "
            "lost seconds); resubmitted with the same id and input"
        )

    def _inject_malformed(self) -> None:
        stream = self.client.keys.queue(flows.QUEUE, self.rng.randrange(self.client.keys.partitions)).stream
        junk = self.rng.choice(
            [
                {"junk": "1"},
                {"run": "x{y}", "wf": "chaos_chain", "step": "c0", "visit": "1"},
                {"run": "nobody", "wf": "chaos_chain", "step": "c0", "visit": "0"},
            ]
        )
        self.client.redis.xadd(stream, junk)  # type: ignore[arg-type]
        self.injected.add("malformed entry")

    # -- the run --------------------------------------------------------------------------

    def run(self) -> Report:
        cfg = self.config
        try:  # refuse a deployment we cannot serve (a cluster node answers CROSSSLOT) before starting anything
            check_topology(self.client.redis, self.client.keys.cluster_probe)
        except redis.RedisError as exc:
            raise redis_failure(exc, self.settings.plain_url()) from None
        sec, usec = self.client.redis.time()
        self.clock_offset_ms = sec * 1000 + usec // 1000 - int(time.time() * 1000)
        for i in range(cfg.supervisors):
            self.procs.start(f"chaos-s{i + 1}", "supervisor")
        self.rq = cfg.rq_workers > 0 and not is_cluster(self.client.redis)
        for _ in range(cfg.rq_workers if self.rq else 0):
            self._start_rq_worker()
        for _ in range(cfg.workers):
            self._start_worker()
        self._wait_for_workers()
        self.echo(
            f"namespace {self.settings.namespace}: {cfg.workers} workers, {cfg.supervisors} supervisors, "
            f"{cfg.rq_workers if self.rq else 0} RQ workers; "
            f"injecting faults for {cfg.duration_s:g} s (seed {cfg.seed})"
        )
        try:
            self._inject(cfg)
            self.echo(
                f"faults stopped after {sum(self.injected.counts.values())} injections; waiting for "
                f"{len(self.submitted)} runs to finish ..."
            )
            self._drain(cfg)
        finally:
            self.procs.stop_all()
        return self._check()

    def _wait_for_workers(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.client.redis.zcard(self.client.keys.workers) < self.config.workers:
            exited = [name for name in self.procs.procs if name.startswith("chaos-w") and not self.procs.alive(name)]
            if time.monotonic() > deadline or exited:
                self.procs.stop_all()
                why = f"{', '.join(exited)} exited" if exited else f"not all registered within {timeout_s:g} s"
                raise OrchestratorError(f"chaos workers did not start ({why}); see their logs in {self.procs.logs}")
            time.sleep(0.05)

    def _inject(self, cfg: ChaosConfig) -> None:
        start = time.monotonic()
        end = start + cfg.duration_s
        rate_s = 60.0 / cfg.kills_per_minute if cfg.kills_per_minute > 0 else float("inf")
        next_kill = start + self.rng.uniform(0.5, 1.5) * rate_s if rate_s != float("inf") else end
        restarts = [start + cfg.duration_s * (i + 1) / (cfg.redis_restarts + 1) for i in range(cfg.redis_restarts)]
        sup_kills = [
            start + cfg.duration_s * (i + 0.5) / max(1, cfg.supervisor_kills) for i in range(cfg.supervisor_kills)
        ]
        self._plan_owned_faults(cfg, start)
        next_junk = start + cfg.malformed_every_s
        next_poll = start
        last_report = start
        while (now := time.monotonic()) < end:
            try:
                if now >= next_poll:
                    self._resubmit_vanished()
                    self.open_runs = set(self._unfinished(sorted(self.open_runs)))
                    next_poll = now + 0.25
                    self._retry_unsure()
                    self._send_signals()
                    self._cancel_due()
                while len(self.open_runs) + len(self.unsure) < cfg.in_flight:
                    self._submit_one()
                if now >= next_junk:
                    self._inject_malformed()
                    next_junk = now + cfg.malformed_every_s
            except (redis.RedisError, OSError, RedisUnavailable):
                pass  # Redis is restarting: the load resumes when it is back
            if now >= next_kill:
                self._kill_worker()
                next_kill = now + self.rng.uniform(0.5, 1.5) * rate_s  # jittered, but the rate holds
            if sup_kills and now >= sup_kills[0]:
                sup_kills.pop(0)
                self._kill_supervisor()
            self._owned_faults(now, restarts)
            self._watch_exits()
            self._replace_workers(now)
            if now - last_report >= 10:
                last_report = now
                self.echo(
                    f"  {now - start:5.0f} s: {len(self.submitted)} runs submitted, faults {self.injected.counts}"
                )
            time.sleep(0.02)
        self._end_faults()

    def _end_faults(self) -> None:
        """Start the workers still due for a restart; wait for a cluster fault under way."""
        self._replace_workers(float("inf"))
        if self.cluster_faults is not None:
            self._finish_cluster_faults(self.cluster_faults)

    def _plan_owned_faults(self, cfg: ChaosConfig, start: float) -> None:
        """Plan the faults only a Redis we started can take: restarts and restores of our
        server, failovers and resharding of our cluster."""
        if self.server is not None:
            self.rollbacks = Rollbacks.plan(self.server, cfg.lost_writes, start, cfg.duration_s, self.rng)
        if self.cluster is not None:
            self.cluster_faults = ClusterFaults.plan(
                self.cluster, self.client.keys, cfg.failovers, cfg.reshards, start, cfg.duration_s, self.rng
            )

    def _owned_faults(self, now: float, restarts: list[float]) -> None:
        if self.rollbacks is not None:  # we own Redis: restart it, restore it from older copies
            self._redis_faults(now, restarts, self.rollbacks)
        if self.cluster_faults is not None:  # we own the cluster: fail a master over, move slots
            self._cluster_faults(now, self.cluster_faults)

    def _cluster_faults(self, now: float, faults: ClusterFaults) -> None:
        """A failover or a resharding when due. Processes started from then on get a live
        node's URL; a failover counts as a restore from an older copy (see cluster_faults)."""
        kind = faults.tick(now)
        if kind is not None:
            self._cluster_fault_started(kind, faults)

    def _cluster_fault_started(self, kind: str, faults: ClusterFaults, late: bool = False) -> None:
        self.injected.add(kind)
        self.procs.env["ORCHESTRATOR_REDIS_URL"] = faults.url()
        if kind == FAILOVER:
            self._restored()
        self.echo(f"  cluster: {kind}" + (" (after the fault window: the one before took longer)" if late else ""))

    def _finish_cluster_faults(self, faults: ClusterFaults) -> None:
        for kind in faults.wait():  # planned in the window, started late: an earlier one was not over
            self._cluster_fault_started(kind, faults, late=True)
        self.procs.env["ORCHESTRATOR_REDIS_URL"] = faults.url()
        if faults.errors:
            raise OrchestratorError(f"a cluster fault could not be injected: {'; '.join(faults.errors)}")
        self.echo(f"  cluster: {faults.moved_keys} keys moved with their slots; every node back")

    def _replace_workers(self, now: float) -> None:
        for due in [t for t in self.restarts if t <= now]:
            self.restarts.remove(due)
            self._start_worker()
        for due in [t for t in self.rq_restarts if t <= now]:
            self.rq_restarts.remove(due)
            self._start_rq_worker()

    def _kill_supervisor(self) -> None:
        alive = [n for n in self.procs.procs if n.startswith("chaos-s") and self.procs.alive(n)]
        if not alive:
            return
        name = self.rng.choice(alive)
        self.procs.kill(name)
        self.killed.add(name)
        self.injected.add("supervisor kill -9")
        self.procs.start(f"{name}-r{self.injected.counts['supervisor kill -9']}", "supervisor")

    def _redis_faults(self, now: float, restarts: list[float], rollbacks: Rollbacks) -> None:
        """``kill -9`` + restart, and restores from an older copy, when due (our own server only)."""
        if restarts and now >= restarts[0]:
            restarts.pop(0)
            self._restart_redis()
        if rollbacks.tick(now):
            self._restored()

    def _restart_redis(self) -> None:
        assert self.server is not None
        self.server.restart(hard=True)
        self.injected.add("redis kill -9 + restart")

    def _restored(self) -> None:
        self.restores_ms.append(self._server_ms())
        self.injected.add(RESTORED)
        self.rescan = True

    def _drain(self, cfg: ChaosConfig) -> None:
        deadline = time.monotonic() + cfg.drain_timeout_s
        while time.monotonic() < deadline:
            try:
                self._resubmit_vanished()
                self._retry_unsure()
                self.open_runs = set(self._unfinished(self.submitted))
                self._send_signals()
                kids = [k for listed in children_of(self.client, self._parents()).values() for k in listed]
                if (
                    not self.unsure
                    and not self.open_runs
                    and not self._unfinished(kids, existing=True)
                    and not self._pending()
                ):
                    return
            except (redis.RedisError, OSError, RedisUnavailable):
                pass
            self._watch_exits()
            self._replace_workers(float("inf"))
            time.sleep(0.25)
        self.echo(f"drain timed out after {cfg.drain_timeout_s:g} s; checking what is there")

    def _parents(self) -> list[str]:
        return [rid for rid in self.submitted if rid.startswith(flows.PARENTS)]

    def _pending(self) -> int:
        """Entries pending in the chaos queue's lanes (one not read yet has no group: none)."""
        pipe = self.client.redis.pipeline(transaction=False)
        for level in PRIORITIES:
            for stream in self.client.keys.streams(lane(flows.QUEUE, level)):
                pipe.xpending(stream, GROUP)
        replies = pipe.execute(raise_on_error=False)
        return sum(int(summary["pending"]) for summary in replies if isinstance(summary, dict))

    def _check(self) -> Report:
        report = Report()
        report.faults.update(self.injected.counts)
        report.violations.extend(self.unexpected)
        for run_id, _, _ in self.unsure:
            report.violations.append(Violation("I1", run_id, "submit never got an answer"))
        bound_ms = int(
            (self.settings.lease_s + self.settings.sweep_after_s + self.settings.sweep_interval_s + 5) * 1000
        )
        report.vanished = len(self.vanished)
        report.signal_sends = self.signal_sends
        checker = Checker(self.client, self.ledger, max_crashes=self.settings.max_crashes, recovery_bound_ms=bound_ms)
        return checker.check(self.submitted, self.injected.kills, report, restores_ms=self.restores_ms)

    def close(self) -> None:
        self.client.close()
        if self.ledger_redis is not None:
            close(self.ledger_redis)
