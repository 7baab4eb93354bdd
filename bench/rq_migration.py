"""Issue 14: an RQ ``depends_on`` chain against the same steps as a workflow on the same RQ workers, under ``kill -9``.

``python -m bench.rq_migration [--chains 20] [--work-ms 500] [--repeat 3] [--give-up-s 120] [--systems ...]``

The same job body for both: 3 steps, each :func:`bench.marks.step_body` (a start mark,
``--work-ms`` of sleep, an end mark), so a kill lands in the middle of a step and every system
is observed identically. Each runs on 2 ``rq worker`` processes of the same kind: RQ's default
forking ``Worker``, the JSON serializer, the flags of peer-benchmarks.md
(:mod:`bench.peers.rq_peer`); Redis with AOF (``appendfsync everysec``).

- ``rq``: ``--chains`` chains of 3 jobs enqueued up front, each ``depends_on`` the previous one
  (``job_timeout`` 60 s, ``Retry(max=3)``);
- ``workflow``: ``--chains`` runs of :data:`flow`, whose 3 steps run with ``executor=RQ(...)``
  (``timeout_s`` 60, ``Retry(max_attempts=4)``) on the same kind of RQ workers, plus one
  ``orchestrator worker`` and one ``orchestrator supervisor`` with default settings;
- ``workflow-preloaded``: the same, the RQ workers started through :data:`PRELOAD_MAIN`, which
  imports orchestrator before the fork (RQ's documented remedy for a costly job import).

Each trial: a warm-up, then :data:`HOP_CHAINS` chains of empty steps one at a time (the hop
between two steps, with no queue ahead), then the load. Once 30% of the steps have finished,
the benchmark waits until a step is running in a randomly chosen (seeded) RQ worker and, 20-80%
into that step's work, kills that worker's whole process tree (worker and work-horse, like an
OOM-killed container); the survivor keeps running and no replacement is started. Measured from
the marks, the same for all (with :func:`bench.recovery.analyse`): the steps cut short and the
time from the kill until each started again, steps that finished twice, chains lost (unfinished
``--give-up-s`` after the kill), the time until the chains cut short and all chains were done,
and the pace before the kill (steps/s on 2 workers). For the workflows also, from the runs'
histories, every ``crashed`` event after the kill and when it came. The systems alternate (rq,
workflow, workflow-preloaded, rq, ...), each trial on a flushed database and a fresh fleet.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel

from bench import marks
from bench.common import (
    Server,
    add_common_args,
    bench_server,
    fmt,
    json_path,
    markdown,
    print_and_save,
    run_main,
    spread,
)
from bench.procs import Child, Fleet, child_env, tree_pids, wait_registered, wait_until, worker_args
from orchestrator import Client, Retry, Settings, StepContext, Workflow
from orchestrator.bridge import RQ
from orchestrator.bridge.executor import SERIALIZER

if TYPE_CHECKING:  # RQ's work-horses import this module for every job: bench.recovery pulls Celery in
    from bench.recovery import Trial

QUEUE = "chain"  # the RQ queue of both systems
STEPS = 3
TIMEOUT_S = 60  # RQ's job timeout, both systems (a forking Worker's stall does not depend on it)
RETRIES = 3  # RQ's Retry(max=3); the workflow's Retry(max_attempts=1 + 3)
RQ_WORKERS = 2
KILL_AT = 0.3
WARM_CHAINS = 4
HOP_CHAINS = 3  # chains run one at a time, empty steps: the hop between two steps, nothing else
SYSTEMS = ("rq", "workflow", "workflow-preloaded")
# RQ's forking worker imports a job's module in every work-horse; RQ's docs suggest a worker
# script that imports it first, once, before the fork. For a bridged step that module is
# orchestrator's (~0.17 s to import here); the script runs `rq worker` with the same arguments.
PRELOAD_MAIN = (
    "import sys, orchestrator.bridge.horse, bench.rq_migration; from rq.cli import main; "
    "sys.argv[0] = 'rq'; sys.exit(main())"
)


# -- the workflow: the chain's 3 jobs as steps on the RQ workers (imported by them) ------------


class Chain(BaseModel):
    """A run's state: how long each step works."""

    work_ms: float = 0.0


flow: Workflow[Chain] = Workflow("rq_migration", state=Chain)
ON_RQ = RQ(QUEUE, timeout_s=TIMEOUT_S)


def _work(ctx: StepContext, state: Chain, k: int) -> None:
    """The job body of step ``k``, as the RQ chain's job runs it (bench.peers.rq_jobs.step)."""
    marks.step_body(ctx.run_id, k, STEPS, state.work_ms, record=True)


@flow.step(executor=ON_RQ, retry=Retry(max_attempts=1 + RETRIES))
def fetch(ctx: StepContext, state: Chain) -> None:
    _work(ctx, state, 0)


@flow.step(executor=ON_RQ, retry=Retry(max_attempts=1 + RETRIES))
def transform(ctx: StepContext, state: Chain) -> None:
    _work(ctx, state, 1)


@flow.step(executor=ON_RQ, retry=Retry(max_attempts=1 + RETRIES))
def store(ctx: StepContext, state: Chain) -> None:
    _work(ctx, state, 2)


# -- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON."""

    chains: int
    work_ms: float
    repeat: int
    give_up_s: float
    systems: tuple[str, ...]
    seed: int
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick``: 4 chains of 300 ms steps, one kill each, give up after 20 s)."""
    parser = argparse.ArgumentParser(prog="python -m bench.rq_migration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=None, help="chains (runs) per trial [20; 4 with --quick]")
    parser.add_argument("--work-ms", type=float, default=None, help="work of each step, ms [500; 300 with --quick]")
    parser.add_argument("--repeat", type=int, default=None, help="kills per system [3; 1 with --quick]")
    parser.add_argument("--give-up-s", type=float, default=None, help="after the kill; then lost [120; 20 --quick]")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"which, in order [{','.join(SYSTEMS)}]")
    parser.add_argument("--seed", type=int, default=14, help="which RQ worker gets killed, and when [14]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    systems = tuple(name.strip() for name in ns.systems.split(",") if name.strip())
    if not systems or set(systems) - set(SYSTEMS):
        parser.error(f"--systems {ns.systems!r}: expected some of {', '.join(SYSTEMS)}")
    return Options(
        chains=ns.chains or (4 if ns.quick else 20),
        work_ms=ns.work_ms or (300.0 if ns.quick else 500.0),
        repeat=ns.repeat or (1 if ns.quick else 3),
        give_up_s=ns.give_up_s or (20.0 if ns.quick else 120.0),
        systems=systems,
        seed=ns.seed,
        json_path=json_path(ns.json, "rq_migration") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )


# -- the two systems --------------------------------------------------------------------------


def chain_id(i: int) -> str:
    return f"c{i:05d}"


def rq_worker_argv(preload: bool = False) -> list[str]:
    """``rq worker -S rq.serializers.JSONSerializer`` with peer-benchmarks.md's flags (``preload``:
    through :data:`PRELOAD_MAIN`)."""
    from bench.peers.rq_peer import RQ_MAIN, WORKER_FLAGS

    return [sys.executable, "-c", PRELOAD_MAIN if preload else RQ_MAIN, "worker", *WORKER_FLAGS, "-S", SERIALIZER]


def start_rq_workers(fleet: Fleet, server: Server, env: dict[str, str], tag: str, preload: bool) -> list[Child]:
    """Two forking RQ workers on :data:`QUEUE`, registered with RQ before anything is enqueued."""
    from rq import Worker

    argv = [*rq_worker_argv(preload), "--url", server.url, QUEUE]
    workers = [fleet.spawn(f"{tag}-rq{i}-{uuid.uuid4().hex[:6]}", argv, env) for i in range(RQ_WORKERS)]
    conn = redis.Redis.from_url(server.url)
    try:
        wait_until(lambda: Worker.count(connection=conn) >= RQ_WORKERS, 60, "RQ workers registering", fleet)
    finally:
        conn.close()
    return workers


class RqChains:
    """System 1: chains of 3 RQ jobs, each ``depends_on`` the previous one."""

    system = "rq"

    def __init__(self, server: Server, fleet: Fleet) -> None:
        from rq import Queue

        self.conn = redis.Redis.from_url(server.url)
        self.queue = Queue(QUEUE, connection=self.conn, serializer=SERIALIZER)
        env = child_env(None, server.url, {marks.URL_ENV: server.url})
        self.workers = start_rq_workers(fleet, server, env, "rq", preload=False)
        self.job_ids: dict[str, list[str]] = {}
        self.ids: list[str] = []

    def submit(self, wf: str, work_ms: float) -> None:
        from rq import Retry as RqRetry

        from bench.peers.rq_jobs import step

        previous = None
        for k in range(STEPS):
            previous = self.queue.enqueue(
                step,
                args=(wf, k, STEPS, work_ms, True, False),
                job_timeout=TIMEOUT_S,
                retry=RqRetry(max=RETRIES),
                depends_on=previous,
            )
            self.job_ids.setdefault(wf, []).append(previous.id)

    def warm(self, wf: str) -> None:
        """A one-job chain of an empty step: a chain of several can stall on ``depends_on`` for 15 s
        (peer-benchmarks.md, surprise 1), which is measured in the trial, not in the warm-up."""
        from bench.peers.rq_jobs import step

        self.queue.enqueue(step, args=(wf, 0, 1, 0.0, True, False), job_timeout=TIMEOUT_S)

    def extra(self, kill_t: float, unfinished: list[str]) -> dict[str, Any]:
        """RQ's status of every job of each unfinished chain (why it counted as lost)."""
        from rq.job import Job

        out = {}
        for wf in unfinished[:10]:
            jobs = Job.fetch_many(self.job_ids.get(wf, []), connection=self.conn, serializer=SERIALIZER)
            out[wf] = [None if job is None else job.get_status(refresh=False).value for job in jobs]
        return {"unfinished_jobs_status": out}

    def close(self) -> None:
        self.conn.close()


class Workflows:
    """System 2: runs of :data:`flow`, every step on the RQ workers; our worker and supervisor, default settings."""

    def __init__(self, server: Server, fleet: Fleet, preload: bool = False) -> None:
        self.system = "workflow-preloaded" if preload else "workflow"
        self.settings = Settings(redis_url=server.url, namespace=f"rqm-{uuid.uuid4().hex[:10]}")
        self.client = Client(self.settings)
        env = child_env(self.settings, server.url, {marks.URL_ENV: server.url})
        self.workers = start_rq_workers(fleet, server, env, "wf", preload)
        fleet.spawn_module(f"wf-worker-{self.settings.namespace}", worker_args("bench.rq_migration:flow"), env)
        fleet.spawn_module(f"wf-sup-{self.settings.namespace}", ["orchestrator", "supervisor"], env)
        wait_registered(server.admin, self.client.keys, 1, fleet)
        self.ids: list[str] = []

    def submit(self, wf: str, work_ms: float) -> None:
        self.client.submit(flow, {"work_ms": work_ms}, run_id=wf)

    def warm(self, wf: str) -> None:
        """A run of empty steps."""
        self.submit(wf, 0.0)

    def extra(self, kill_t: float, unfinished: list[str]) -> dict[str, Any]:
        """From the histories: every ``crashed`` (and ``timeout``) event after the kill, when it came."""
        found = [
            {"run": run_id, "type": ev.type, "step": ev.step, "after_kill_s": ev.at / 1000 - kill_t,
             "worker": ev.worker, "rq_worker": ev.rq_worker, "detail": ev.detail}
            for run_id in self.ids
            for ev in self.client.events(run_id)
            if ev.type in ("crashed", "timeout", "fenced", "redispatched") and ev.at / 1000 > kill_t
        ]  # fmt: skip
        crashed = [e["after_kill_s"] for e in found if e["type"] == "crashed"]
        return {"events_after_kill": found, "crashed_after_kill_s": crashed, "stats": self.client.stats()}

    def close(self) -> None:
        self.client.close()


System = RqChains | Workflows


# -- one trial --------------------------------------------------------------------------------


def running_in(conn: redis.Redis, pids: set[int]) -> dict[tuple[str, int, int], float]:
    """Executions started in one of ``pids`` and not ended: (wf, step, pid) -> start time."""
    execs = marks.executions(conn)
    ended = {(e.wf, e.k, e.pid) for e in execs if e.kind == "end"}
    started = {(e.wf, e.k, e.pid): e.t for e in execs if e.kind == "start" and e.pid in pids}
    return {key: t for key, t in started.items() if key not in ended}


def kill_mid_step(
    conn: redis.Redis, victim: Child, fleet: Fleet, work_s: float, rng: random.Random
) -> tuple[float, set[int]]:
    """Kill ``victim``'s process tree 20-80% into a step it runs; (the time just before, the pids killed).

    A step found too late (past 90% of its work, the poll being slow) is let go: the kill must
    not land between the step's end and the system's bookkeeping of it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fleet.check_alive()
        running = running_in(conn, set(tree_pids(victim.popen.pid)))
        if running:
            key, started = max(running.items(), key=lambda item: item[1])
            time.sleep(max(0.0, started + rng.uniform(0.2, 0.8) * work_s - time.time()))
            kill_t = time.time()
            if kill_t < started + 0.9 * work_s and key in running_in(conn, {key[2]}):
                return kill_t, set(fleet.kill(victim))
        time.sleep(0.01)
    raise RuntimeError("no step ran in the chosen RQ worker for 60 s")


def trial(
    server: Server, make: Callable[[Server, Fleet], System], options: Options, repeat: int, rng: random.Random
) -> Trial:
    """One kill of one of a system's two RQ workers, on a flushed database and a fresh fleet."""
    from bench.recovery import analyse, wait_all

    server.admin.flushdb()
    with Fleet(server.log_dir) as fleet:
        system = make(server, fleet)
        try:
            warm_up(system, server.admin, fleet)
            hop_ms = hops(system, server.admin, fleet)
            submitted_t = time.time()
            system.ids = ids = [chain_id(i) for i in range(options.chains)]
            for wf in ids:
                system.submit(wf, options.work_ms)
            threshold = int(KILL_AT * options.chains * STEPS)
            wait_until(lambda: marks.steps_done(server.admin) >= threshold, 120, f"{threshold} steps", fleet)
            victim = rng.choice(system.workers)
            before_t, steps_before = time.time(), marks.steps_done(server.admin)
            kill_t, pids = kill_mid_step(server.admin, victim, fleet, options.work_ms / 1000, rng)
            wait_all(server.admin, options.chains, options.give_up_s, kill_t, fleet)
            config = f"{system.system} x{RQ_WORKERS}"
            result = analyse(server.admin, config, repeat, (kill_t, pids, victim.name), options.chains)
            unfinished = sorted(set(ids) - set(marks.ends(server.admin)))
            result.extra = system.extra(kill_t, unfinished) | cut_chains(server.admin, kill_t, pids)
            result.extra["steps_per_s_before_kill"] = steps_before / (before_t - submitted_t)
            result.extra["hop_ms"] = hop_ms
        finally:
            system.close()
            # measured; an RQ worker that thinks itself busy can take 10 s or more to honour SIGTERM
            for worker in system.workers:
                if worker.alive:
                    fleet.kill(worker)
    result.kill_after_steps = steps_before
    return result


def warm_up(system: System, admin: redis.Redis, fleet: Fleet) -> None:
    """A few chains of empty steps first, so first connections stay out of the measurement; marks reset."""
    for i in range(WARM_CHAINS):
        system.warm(f"warm{i}")
    wait_until(lambda: len(marks.ends(admin)) >= WARM_CHAINS, 60, "warm-up chains", fleet)
    marks.reset(admin)


def hops(system: System, admin: redis.Redis, fleet: Fleet) -> list[float]:
    """:data:`HOP_CHAINS` chains of empty steps, one at a time: ms from a step's end mark to the next
    step's start mark (what the system adds between two steps, with no queue ahead); marks reset."""
    out = []
    for i in range(HOP_CHAINS):
        wf = f"hop{i}"
        system.submit(wf, 0.0)
        wait_until(lambda: wf in marks.ends(admin), 60, f"chain {wf}", fleet)  # noqa: B023 (called right here)
    at = {(e.wf, e.k, e.kind): e.t for e in marks.executions(admin)}
    for i in range(HOP_CHAINS):
        out += [(at[(f"hop{i}", k + 1, "start")] - at[(f"hop{i}", k, "end")]) * 1000 for k in range(STEPS - 1)]
    marks.reset(admin)
    return out


def cut_chains(conn: redis.Redis, kill_t: float, pids: set[int]) -> dict[str, Any]:
    """Each chain whose step the kill cut short: kill -> that chain done (None: not done when we gave up)."""
    execs = marks.executions(conn)
    ended = {(e.wf, e.k, e.pid) for e in execs if e.kind == "end"}
    cut = sorted({e.wf for e in execs if e.kind == "start" and e.pid in pids and (e.wf, e.k, e.pid) not in ended})
    ends = marks.ends(conn)
    return {"cut_chains": cut, "cut_chain_done_s": [ends[wf] - kill_t if wf in ends else None for wf in cut]}


# -- summary ----------------------------------------------------------------------------------


def summarize(trials: list[Trial], options: Options) -> dict[str, Any]:
    """Per system: re-run delays pooled over its kills, the per-kill figures listed."""
    rows = []
    for system in options.systems:
        mine = [t for t in trials if t.system == system]
        row: dict[str, Any] = {"system": system, "config": mine[0].config, "kills": len(mine)}
        row["in_flight"] = sum(t.in_flight for t in mine)
        row["rerun_s"] = spread([v for t in mine for v in t.rerun_s])
        row["never_rerun"] = sum(t.never_rerun for t in mine)
        for name in ("finished_twice", "reexecutions", "lost_chains", "all_done_s"):
            row[name] = [getattr(t, name) for t in mine]
        row["cut_chain_done_s"] = [v for t in mine for v in t.extra["cut_chain_done_s"]]
        row["steps_per_s_before_kill"] = [t.extra["steps_per_s_before_kill"] for t in mine]
        row["hop_ms"] = spread([v for t in mine for v in t.extra["hop_ms"]])
        if system != "rq":
            row["crashed_after_kill"] = spread([v for t in mine for v in t.extra["crashed_after_kill_s"]])
        rows.append(row)
    return {"rows": rows, "ideal_steps_per_s": RQ_WORKERS / (options.work_ms / 1000)}


def tables(summary: dict[str, Any], options: Options) -> str:
    """The kill table, the pace table and the workflows' history figures, as markdown."""
    from bench.recovery import seconds

    rows = summary["rows"]
    kills = markdown(
        ["system", "kills", "steps cut short", "kill → re-run p50 / max s", "never re-run", "finished twice",
         "re-executions", "lost chains", "kill → cut chain done s", "kill → all done s"],
        [
            [r["config"], str(r["kills"]), str(r["in_flight"]),
             " / ".join(fmt(r["rerun_s"][k], 1) for k in ("p50", "max")), str(r["never_rerun"]),
             ", ".join(map(str, r["finished_twice"])), ", ".join(map(str, r["reexecutions"])),
             ", ".join(map(str, r["lost_chains"])), seconds(r["cut_chain_done_s"]), seconds(r["all_done_s"])]
            for r in rows
        ],
        right=tuple(range(1, 10)),
    )  # fmt: skip
    ideal = summary["ideal_steps_per_s"]
    pace = markdown(
        ["system", "hop p50 / max ms (one chain alone)", "steps/s before the kill", "/ ideal"],
        [
            [r["config"], " / ".join(fmt(r["hop_ms"][k], 0) for k in ("p50", "max")),
             ", ".join(f"{v:.2f}" for v in r["steps_per_s_before_kill"]),
             ", ".join(f"{v / ideal:.2f}" for v in r["steps_per_s_before_kill"])]
            for r in rows
        ],
        right=(1, 2, 3),
    )  # fmt: skip
    lines = [
        f"{options.chains} chains x {STEPS} steps of {options.work_ms:g} ms on {RQ_WORKERS} forking RQ workers; one "
        f"RQ worker and its work-horse killed (kill -9) mid-step after 30% of the steps; per-kill figures in kill "
        f"order; gave up {options.give_up_s:g} s after the kill",
        "",
        kills,
        "",
        f"Pace: the hop from a step's end to the next step's start ({HOP_CHAINS} chains of empty steps, one at a "
        f"time); steps/s from the first submit to the kill, against the ideal {ideal:.1f} ({RQ_WORKERS} workers / "
        f"{options.work_ms:g} ms)",
        "",
        pace,
    ]
    for r in rows:
        if "crashed_after_kill" in r:
            c = r["crashed_after_kill"]
            lines.append(
                f"\n{r['config']}, from the histories: {c['n']} `crashed` events after the kills, "
                f"p50 / max {fmt(c['p50'], 1)} / {fmt(c['max'], 1)} s after the kill"
            )
    return "\n".join(lines)


def print_trial(t: Trial) -> None:
    """One progress line per kill."""
    from bench.recovery import seconds

    r = spread(t.rerun_s)
    print(
        f"  {t.config} kill {t.repeat}: {t.in_flight} cut short, re-run p50/max {fmt(r['p50'], 1)}/"
        f"{fmt(r['max'], 1)} s, never {t.never_rerun}, twice {t.finished_twice}, lost {t.lost_chains}, "
        f"all done {seconds([t.all_done_s])} s",
        flush=True,
    )


def run(options: Options) -> dict[str, Any]:
    """The systems alternately, ``--repeat`` kills each, on one private server with AOF on; the JSON document."""
    rng = random.Random(options.seed)
    trials = []
    makers: dict[str, Callable[[Server, Fleet], System]] = {
        "rq": RqChains,
        "workflow": Workflows,
        "workflow-preloaded": lambda server, fleet: Workflows(server, fleet, preload=True),
    }
    with bench_server("rq_migration", options.redis_server, appendfsync="everysec") as server:
        for repeat in range(1, options.repeat + 1):
            for name in options.systems:
                trials.append(trial(server, makers[name], options, repeat, rng))
                print_trial(trials[-1])
    summary = summarize(trials, options)
    settings = {k: v for k, v in asdict(options).items() if k != "json_path"}
    settings |= {"steps": STEPS, "rq_workers": RQ_WORKERS, "kill_at": KILL_AT, "queue": QUEUE}
    settings |= {"warm_chains": WARM_CHAINS, "hop_chains": HOP_CHAINS}
    settings["rq_worker"] = " ".join(["rq", *rq_worker_argv()[3:], "--url", "URL", QUEUE])
    settings["rq"] = f"{STEPS} jobs enqueued up front with depends_on; job_timeout={TIMEOUT_S}, Retry(max={RETRIES})"
    settings["workflow"] = (
        f"{STEPS} steps with executor=RQ({QUEUE!r}, timeout_s={TIMEOUT_S}), retry=Retry(max_attempts="
        f"{1 + RETRIES}); 1 orchestrator worker and 1 supervisor, default settings (concurrency 16, lease 4 s, "
        "heartbeat 1 s, reclaim every 0.5 s)"
    )
    settings["workflow-preloaded"] = f"as workflow, the RQ workers started as python -c {PRELOAD_MAIN!r} worker ..."
    return {
        "benchmark": "rq_migration",
        "environment": server.env,
        "settings": settings,
        "summary": summary,
        "markdown": tables(summary, options),
        "trials": [asdict(t) for t in trials],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the kills, print the table, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
