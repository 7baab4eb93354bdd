"""Recovery: ``kill -9`` one of two workers in the middle of a load; how long until its steps run again?

``python -m bench.recovery [--chains 100] [--work-ms 20] [--repeat 3] [--peer-repeat 1] [--json [PATH]]``

The load, the same for every system: ``--chains`` chains of 10 steps, each step working
``--work-ms`` (a sleep) inside :func:`bench.marks.step_body`, which notes every execution's
start and end; all chains submitted at once to 2 worker processes. Once 30% of the steps have
finished, the whole process tree of one worker (chosen at random, seeded) gets SIGKILL, like
an OOM-killed container; no replacement is started: the survivor must recover the work, as in
peer-benchmarks.md's W3. Redis runs with AOF (``appendfsync everysec``).

- ours: ``orchestrator worker bench.flows:timed`` with default settings (concurrency 16,
  lease 4 s) and one ``orchestrator supervisor`` (reclaim every 0.5 s);
- RQ and Celery: their durable settings from peer-benchmarks.md (:mod:`bench.peers`).

Measured from the execution marks, identically for all: each step that was running on the
killed worker (started, not finished) and the time from the kill until it started again
(p50/p99/max); steps that finished twice; chains never completed by the give-up time (lost);
the time until every chain unfinished at the kill had moved again, and until all were done.
For ours also, from the runs' histories: every claim the killed worker held (``crashed``
events, which include steps claimed but not yet started) and when it was claimed again.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

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
from bench.flows import STEPS, STEPS_ENV, Work, make_timed
from bench.peers.registry import PEERS, parse_peers
from bench.procs import Child, Fleet, child_env, wait_registered, wait_until, worker_args
from orchestrator import Client, Settings

WORKERS = 2
KILL_AT = 0.3
DEFAULT_PEERS = ("rq simple-deps", "rq simple-next", "celery prefork-durable")
GIVE_UP_S = {"ours": 60.0, "rq": 120.0, "celery": 40.0}  # ~3x the recovery bound each system's settings promise


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON."""

    chains: int
    steps: int
    work_ms: float
    repeat: int
    peer_repeat: int
    peers: tuple[str, ...]
    seed: int
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick``: 40 chains, one kill of ours)."""
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=None, help="chains of the load [100; 40 with --quick]")
    parser.add_argument("--work-ms", type=float, default=20.0, help="work of each step, ms [20]")
    parser.add_argument("--repeat", type=int, default=None, help="kills of our worker [3; 1 with --quick]")
    parser.add_argument("--peer-repeat", type=int, default=1, help="kills per peer [1]")
    parser.add_argument("--peers", default=None, help=f"comma-separated peer rows [{','.join(DEFAULT_PEERS)}]")
    parser.add_argument("--seed", type=int, default=5, help="which worker gets killed [5]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    peers = parse_peers(ns.peers, DEFAULT_PEERS)
    return Options(
        chains=ns.chains or (40 if ns.quick else 100),
        steps=STEPS,
        work_ms=ns.work_ms,
        repeat=ns.repeat or (1 if ns.quick else 3),
        peer_repeat=ns.peer_repeat,
        peers=peers,
        seed=ns.seed,
        json_path=json_path(ns.json, "recovery") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )


# -- the systems under test -------------------------------------------------------------------


class Ours:
    """Two of our workers and a supervisor, default settings, on a fresh namespace."""

    system = "ours"

    def __init__(self, server: Server, fleet: Fleet, options: Options) -> None:
        self.settings = Settings(redis_url=server.url, namespace=f"rec-{uuid.uuid4().hex[:10]}")
        self.client = Client(self.settings)
        self.flow = make_timed(options.steps)
        self.work = Work(work_ms=options.work_ms).model_dump()
        env = child_env(self.settings, server.url, {STEPS_ENV: str(options.steps), marks.URL_ENV: server.url})
        self.ids = [f"rec-w{i}-{uuid.uuid4().hex[:4]}" for i in range(WORKERS)]
        self.workers = [
            fleet.spawn_module(wid, worker_args("bench.flows:timed", worker_id=wid), env) for wid in self.ids
        ]
        fleet.spawn_module(f"rec-sup-{self.settings.namespace}", ["orchestrator", "supervisor"], env)
        wait_registered(server.admin, self.client.keys, WORKERS, fleet)

    def submit(self, wf: str, steps: int) -> None:
        """Submit chain ``wf`` (its run id) with the step work of this load."""
        self.client.submit(self.flow, self.work, run_id=wf)

    def history_recovery(self, killed_id: str, kill_t: float) -> dict[str, Any]:
        """From the runs' histories: each claim the killed worker held, and when its step was claimed again."""
        delays, redispatched = [], 0
        pipe = self.client.redis.pipeline(transaction=False)
        for part in self.client.keys.parts:
            pipe.zrange(part.done, 0, -1)
        run_ids: list[str] = [rid for ids in pipe.execute() for rid in ids]
        for run_id in run_ids:
            for ev in self.client.events(run_id):
                if ev.type == "crashed" and ev.worker == killed_id:
                    delays.append(ev.at / 1000 - kill_t)
                redispatched += ev.type == "redispatched"
        stats = self.client.stats()
        return {"claims_delays_s": delays, "redispatched_events": redispatched, "stats": stats}

    def close(self) -> None:
        """Close the client; the processes stop with the fleet."""
        self.client.close()


@dataclass
class Trial:
    """What one kill did to one system."""

    system: str
    config: str
    repeat: int
    chains: int
    kill_after_steps: int
    killed: str
    in_flight: int
    rerun_s: list[float]
    never_rerun: int
    finished_twice: int
    reexecutions: int
    lost_chains: int
    all_done_s: float | None
    every_chain_moved_s: float | None
    extra: dict[str, Any]


def analyse(conn: redis.Redis, config: str, repeat: int, kill: tuple[float, set[int], str], chains: int) -> Trial:
    """The uniform measurements from the execution marks (see the module docstring)."""
    kill_t, pids, killed = kill
    execs = marks.executions(conn)
    ended = {(e.wf, e.k, e.pid) for e in execs if e.kind == "end"}
    starts: dict[tuple[str, int], list[float]] = defaultdict(list)
    for e in execs:
        if e.kind == "start":
            starts[(e.wf, e.k)].append(e.t)
    cut = [
        e for e in execs if e.kind == "start" and e.pid in pids and e.t <= kill_t and (e.wf, e.k, e.pid) not in ended
    ]
    rerun = [min((t for t in starts[(e.wf, e.k)] if t > kill_t), default=None) for e in cut]
    ends = marks.ends(conn)
    moved = []
    for wf in {f"c{i:05d}" for i in range(chains)} - {w for w, t in ends.items() if t <= kill_t}:
        later = [t for (w, _), ts in starts.items() if w == wf for t in ts if t > kill_t]
        moved.append(min(later) - kill_t if later else None)
    return Trial(
        system=config.split()[0],
        config=config,
        repeat=repeat,
        chains=chains,
        kill_after_steps=0,
        killed=killed,
        in_flight=len(cut),
        rerun_s=[t - kill_t for t in rerun if t is not None],
        never_rerun=sum(t is None for t in rerun),
        finished_twice=sum(1 for n in marks.finish_counts(conn).values() if n > 1),
        reexecutions=sum(len(ts) for ts in starts.values()) - len(starts),
        lost_chains=chains - len(ends),
        all_done_s=max(ends.values()) - kill_t if len(ends) == chains else None,
        every_chain_moved_s=None if None in moved or not moved else max(m for m in moved if m is not None),
        extra={},
    )


def load_and_kill(
    conn: redis.Redis, submit: Any, workers: list[Child], fleet: Fleet, options: Options, rng: random.Random
) -> tuple[float, set[int], int]:
    """Submit every chain, kill one worker's process tree at 30% of the steps; (kill time, pids, steps before).

    The kill waits a random 0-5 step durations past the threshold: the threshold is crossed
    right when a batch of steps has just finished, which would otherwise always kill in the
    short window between a step's end and its commit.
    """
    for i in range(options.chains):
        submit(f"c{i:05d}", options.steps)
    threshold = int(KILL_AT * options.chains * options.steps)
    wait_until(lambda: marks.steps_done(conn) >= threshold, 120, f"{threshold} steps finishing", fleet)
    time.sleep(rng.uniform(0, 5 * options.work_ms / 1000))
    victim = rng.choice(workers)
    steps_before = marks.steps_done(conn)
    kill_t = time.time()
    pids = set(fleet.kill(victim))
    return kill_t, pids, steps_before


def wait_all(conn: redis.Redis, chains: int, give_up_s: float, kill_t: float, fleet: Fleet) -> None:
    """Wait until every chain is done, or give up (its unfinished chains then count as lost)."""
    while conn.hlen(marks.ENDS) < chains and time.time() - kill_t < give_up_s:
        fleet.check_alive()
        time.sleep(0.05)


def trial_ours(server: Server, options: Options, repeat: int, rng: random.Random) -> Trial:
    """One kill of one of our two workers, on a fresh keyspace, measured from the marks and the histories."""
    server.admin.flushdb()
    with Fleet(server.log_dir) as fleet:
        ours = Ours(server, fleet, options)
        try:
            kill_t, pids, before = load_and_kill(server.admin, ours.submit, ours.workers, fleet, options, rng)
            killed_id = next(wid for wid, w in zip(ours.ids, ours.workers, strict=True) if w.killed)
            wait_all(server.admin, options.chains, GIVE_UP_S["ours"], kill_t, fleet)
            trial = analyse(server.admin, "ours x2", repeat, (kill_t, pids, killed_id), options.chains)
            trial.extra = ours.history_recovery(killed_id, kill_t)
        finally:
            ours.close()
    trial.kill_after_steps = before
    return trial


def trial_peer(server: Server, name: str, options: Options, repeat: int, rng: random.Random) -> Trial:
    """One kill of one of a peer's two workers, on a fresh keyspace, measured from the marks."""
    server.admin.flushdb()
    spec = PEERS[name]
    peer = spec.factory(server.url)
    env = child_env(None, server.url, {marks.URL_ENV: server.url})
    try:
        with Fleet(server.log_dir) as fleet:
            peer.start(fleet, WORKERS, env)

            def submit(wf: str, steps: int) -> None:
                peer.submit(wf, steps, options.work_ms, record=True)

            kill_t, pids, before = load_and_kill(peer.conn, submit, peer.workers, fleet, options, rng)
            killed = next(w.name for w in peer.workers if w.killed)
            wait_all(peer.conn, options.chains, GIVE_UP_S[spec.system], kill_t, fleet)
            trial = analyse(peer.conn, f"{name} x{WORKERS}", repeat, (kill_t, pids, killed), options.chains)
            unfinished = sorted({f"c{i:05d}" for i in range(options.chains)} - set(marks.ends(peer.conn)))
            lost = peer.diagnose(unfinished[:10])
    finally:
        peer.close()
    trial.kill_after_steps = before
    trial.extra = {"give_up_s": GIVE_UP_S[spec.system], "settings": spec.settings, "lost_chains_status": lost}
    return trial


# -- summary ----------------------------------------------------------------------------------


def summarize(trials: list[Trial]) -> dict[str, Any]:
    """Per configuration: rerun delays pooled over its kills, the worst of everything else."""
    rows = []
    for config in dict.fromkeys(t.config for t in trials):
        mine = [t for t in trials if t.config == config]
        row: dict[str, Any] = {"config": config, "kills": len(mine), "in_flight": sum(t.in_flight for t in mine)}
        row["rerun_s"] = spread([v for t in mine for v in t.rerun_s])
        row["never_rerun"] = sum(t.never_rerun for t in mine)
        row["finished_twice"] = [t.finished_twice for t in mine]
        row["reexecutions"] = [t.reexecutions for t in mine]
        row["lost_chains"] = [t.lost_chains for t in mine]
        row["all_done_s"] = [t.all_done_s for t in mine]
        row["every_chain_moved_s"] = [t.every_chain_moved_s for t in mine]
        if mine[0].system == "ours":
            row["claims_lost"] = spread([v for t in mine for v in t.extra["claims_delays_s"]])
        rows.append(row)
    ours = next((r for r in rows if r["config"].startswith("ours")), None)
    goals = []
    if ours:
        p99 = ours["rerun_s"]["p99"]
        met = p99 is not None and p99 <= 5
        goals.append({"target": "kill -9 -> re-run p99 (s)", "value": p99, "bound": "<= 5", "met": met})
        lost = sum(ours["lost_chains"])
        goals.append({"target": "lost runs", "value": lost, "bound": "= 0", "met": lost == 0})
    return {"rows": rows, "targets": goals}


def seconds(values: Sequence[float | None]) -> str:
    """A list of per-kill figures, "never" for a kill after which it did not happen."""
    return ", ".join("never" if v is None else f"{v:.1f}" for v in values)


def tables(summary: dict[str, Any], options: Options) -> str:
    """The recovery table, our history-based figures and the targets, as markdown."""
    body = markdown(
        [
            "system",
            "kills",
            "steps cut short",
            "kill → re-run p50 / p99 / max s",
            "never re-run",
            "finished twice",
            "re-executions",
            "lost chains",
            "every chain moving again s",
            "kill → all done s",
        ],
        [
            [
                r["config"],
                str(r["kills"]),
                str(r["in_flight"]),
                " / ".join(fmt(r["rerun_s"][k], 2) for k in ("p50", "p99", "max")),
                str(r["never_rerun"]),
                ", ".join(map(str, r["finished_twice"])),
                ", ".join(map(str, r["reexecutions"])),
                ", ".join(map(str, r["lost_chains"])),
                seconds(r["every_chain_moved_s"]),
                seconds(r["all_done_s"]),
            ]
            for r in summary["rows"]
        ],
        right=tuple(range(1, 10)),
    )
    head = (
        f"{options.chains} chains x {options.steps} steps of {options.work_ms:g} ms, 2 workers, one killed "
        f"(whole process tree) after 30% of the steps; per-kill figures are listed in kill order"
    )
    lines = [head, "", body]
    for r in summary["rows"]:
        if "claims_lost" in r:
            lines.append("")
            c = r["claims_lost"]
            lines.append(
                f"{r['config']}, from the histories: {c['n']} claims held by the killed worker (started or not), "
                f"claimed again after p50 / p99 / max {fmt(c['p50'], 2)} / {fmt(c['p99'], 2)} / {fmt(c['max'], 2)} s"
            )
    for goal in summary["targets"]:
        met = "met" if goal["met"] else "**missed**"
        value = fmt(goal["value"], 2) if isinstance(goal["value"], float) else str(goal["value"])
        lines.append(f"\ntarget {goal['target']} {goal['bound']}: {value}, {met}")
    return "\n".join(lines)


def run(options: Options) -> dict[str, Any]:
    """Our kills first, then each peer's, on one private server with AOF on; the JSON document."""
    rng = random.Random(options.seed)
    trials = []
    with bench_server("recovery", options.redis_server, appendfsync="everysec") as server:
        for repeat in range(1, options.repeat + 1):
            trials.append(trial_ours(server, options, repeat, rng))
            print_trial(trials[-1])
        for name in options.peers:
            for repeat in range(1, options.peer_repeat + 1):
                trials.append(trial_peer(server, name, options, repeat, rng))
                print_trial(trials[-1])
    summary = summarize(trials)
    settings = {k: v for k, v in asdict(options).items() if k != "json_path"}
    settings |= {"workers": WORKERS, "kill_at": KILL_AT, "give_up_s": GIVE_UP_S}
    settings["peer_settings"] = {name: PEERS[name].settings for name in options.peers}
    settings["ours"] = "default settings: concurrency 16, lease 4 s, heartbeat 1 s, reclaim every 0.5 s"
    return {
        "benchmark": "recovery",
        "environment": server.env,
        "settings": settings,
        "summary": summary,
        "markdown": tables(summary, options),
        "trials": [asdict(t) for t in trials],
    }


def print_trial(t: Trial) -> None:
    """One progress line per kill, so a long run shows what it is doing."""
    r = spread(t.rerun_s)
    print(
        f"  {t.config} kill {t.repeat}: {t.in_flight} cut short, "
        f"re-run p50/max {fmt(r['p50'], 2)}/{fmt(r['max'], 2)} s,"
        f" never {t.never_rerun}, twice {t.finished_twice}, lost {t.lost_chains}, all done "
        f"{seconds([t.all_done_s])} s",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the kills, print the table, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
