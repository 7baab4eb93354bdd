"""Agent-shaped capacity: N concurrent runs of async steps that each await a model call, against the ideal.

``python -m bench.agent [--runs 100,1000,5000] [--steps 10] [--workers 2] [--await-s 1.0] [--profile DIR]
[--quick] [--json [PATH]] [--redis-server BIN]``

Part 6 of issue 11. One private redis-server (persistence off). For each N, on a flushed
database, a fresh fleet of ``--workers`` real ``orchestrator worker`` processes running
``bench.flows:agent`` (``--steps`` ``async def`` steps that each ``await asyncio.sleep(await_s)``:
simulated LLM latency; ``--concurrency`` ceil(N / workers) + 8, so every run holds a slot) and one
``orchestrator supervisor``, default settings otherwise. N runs are submitted back to back by one
client, then we wait until every one is done; every run is checked afterwards (completed, exactly
``--steps`` commits, one ``ok`` event per step).

The ideal is N steps per ``await_s`` (each run's steps back to back, nothing but the await):
N / await_s steps/s. From every run's history (Redis-clock ``at`` of each commit, the worker's
``start_ms``/``end_ms`` of each step body):

- **steady steps/s**: each run's pace once started, (steps - 1) / (last commit - first commit),
  summed over the runs (they all run at once: every run has a slot). Ratio = steady / ideal,
  the same as await_s / a run's mean time per step.
- **overall steps/s**: N x steps / (first submit -> last commit); the submit ramp and the first
  dispatch are in it, so it stays below the ideal even for a perfect engine.
- **hop overhead** per step after the first: commit k - commit k-1 - await_s, split into
  *dispatch* (commit k-1 in Redis -> step k's execution created in a worker: the reply, the
  chained claim or the trip through the queue), *late wake-up* (step body - await_s: the event
  loop busy when the sleep ends) and *commit* (body end -> commit k runs in Redis).

CPU over the window first submit -> every run done: Redis (``INFO cpu``), the worker and
supervisor process trees (/proc), per committed step; Redis commands per step from ``INFO
commandstats`` (the benchmark's own polls taken out). ``--profile DIR`` runs each worker under
cProfile (``DIR/agent-<N>-w<i>.prof``; the timings are then not comparable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    Server,
    add_common_args,
    bench_server,
    command_calls,
    cpu_share,
    cpu_ticks,
    finished_runs,
    fmt,
    json_path,
    markdown,
    print_and_save,
    run_main,
    spread,
)
from bench.flows import AWAIT_ENV, STEPS, STEPS_ENV, make_agent
from bench.procs import Child, Fleet, child_env, wait_registered, wait_until, worker_args
from bench.stepcost import Meter, Window
from orchestrator import Client, Settings
from orchestrator.keys import Keys

SPARE_SLOTS = 8  # per worker, beyond its share of N (as bench.liveness)
TARGET_N, TARGET_RATIO = 1000, 0.8  # issue 11: at least 80% of the ideal at N = 1,000 on 2 workers
POLL_S = 0.05  # the end poll: one ZCARD per partition; coarse, the figures come from the histories
READ_CHUNK = 500  # runs per pipeline when reading the histories back
BAD_COUNTERS = ("redispatched", "crashes", "fenced", "lost_entries", "dropped_entries", "repaired", "dead_workers")


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON next to the results."""

    runs: tuple[int, ...]
    steps: int
    workers: int
    await_s: float
    profile: Path | None
    quick: bool
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick`` only changes the defaults of sizes not given)."""
    parser = argparse.ArgumentParser(prog="python -m bench.agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=None, help="concurrent runs per level [100,1000,5000; 20,100 quick]")
    parser.add_argument("--steps", type=int, default=None, help=f"awaiting steps per run [{STEPS}; 3 quick]")
    parser.add_argument("--workers", type=int, default=2, help="worker processes [2]")
    parser.add_argument("--await-s", type=float, default=None, help="each step's await, s [1.0; 0.5 quick]")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR", help="cProfile each worker into DIR")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    raw = ns.runs if ns.runs is not None else ("20,100" if ns.quick else "100,1000,5000")
    try:
        runs = tuple(int(v) for v in raw.split(",") if v.strip())
    except ValueError:
        parser.error(f"--runs: comma-separated integers expected, got {raw!r}")
    steps = ns.steps if ns.steps is not None else (3 if ns.quick else STEPS)
    await_s = ns.await_s if ns.await_s is not None else (0.5 if ns.quick else 1.0)
    if not runs or min(runs) < 1 or ns.workers < 1 or steps < 2 or await_s <= 0:
        parser.error("--runs values and --workers must be at least 1, --steps at least 2, --await-s above 0")
    if math.ceil(max(runs) / ns.workers) + SPARE_SLOTS > 10_000:
        parser.error("a worker's concurrency is at most 10,000: add --workers")
    return Options(
        runs=runs,
        steps=steps,
        workers=ns.workers,
        await_s=await_s,
        profile=ns.profile,
        quick=ns.quick,
        json_path=json_path(ns.json, "agent") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )


# -- one level --------------------------------------------------------------------------------


def spawn_workers(fleet: Fleet, n: int, concurrency: int, env: dict[str, str], options: Options) -> list[Child]:
    """The worker processes of one level, each under cProfile when ``--profile`` is given."""
    workers = []
    for i in range(options.workers):
        args = worker_args("bench.flows:agent", concurrency)
        if options.profile is not None:
            options.profile.mkdir(parents=True, exist_ok=True)
            args = ["cProfile", "-o", str(options.profile / f"agent-{n}-w{i}.prof"), "-m", *args]
        workers.append(fleet.spawn_module(f"agent-{n}-w{i}", args, env))
    return workers


def level(server: Server, n: int, options: Options) -> dict[str, Any]:
    """A fresh fleet, N runs submitted at once, measured until all are done; every run checked."""
    admin = server.admin
    admin.flushdb()
    settings = Settings(redis_url=server.url, namespace=f"agent-{uuid.uuid4().hex[:10]}")
    keys = Keys(settings.namespace, settings.partitions)
    env = child_env(settings, server.url, {STEPS_ENV: str(options.steps), AWAIT_ENV: repr(options.await_s)})
    concurrency = math.ceil(n / options.workers) + SPARE_SLOTS
    flow = make_agent(options.steps)
    run_ids = [f"a{i:06d}" for i in range(n)]
    with Fleet(server.log_dir) as fleet, Client(settings) as client:
        workers = spawn_workers(fleet, n, concurrency, env, options)
        supervisor = fleet.spawn_module(f"agent-{n}-sup", ["orchestrator", "supervisor"], env)
        wait_registered(admin, keys, options.workers, fleet)
        wait_until(lambda: bool(admin.exists(keys.leader)), 30, "the supervisor leading", fleet)
        client.redis.ping()  # the submitter's connection is open before the window starts
        admin.config_resetstat()
        meter = Meter(admin, workers, [supervisor])
        machine = (cpu_ticks(), time.process_time())
        for run_id in run_ids:
            client.submit(flow, run_id=run_id)
        submit_s = time.perf_counter() - meter.start[3]
        polls = wait_done(admin, keys, n, 60 + options.steps * options.await_s * 5 + n / 20, fleet)
        window = meter.stop()
        machine_cores = busy_cores(machine[0], cpu_ticks())
        own_cpu_s = time.process_time() - machine[1]  # this process: the submits and the polls
        calls = command_calls(admin)
        calls["zcard"] -= polls * keys.partitions * 2  # done + dead, per partition
        counters = client.stats()
    timelines = read_timelines(admin, keys, run_ids, options.steps)
    out: dict[str, Any] = {"runs": n, "concurrency": concurrency, "submit_s": submit_s}
    out |= costs(window, calls, counters, n * options.steps)
    out |= neighbours(window, machine_cores, own_cpu_s)
    out |= analyse(timelines, options)
    print(
        f"  {n:>6} runs: steady {fmt(out['steady_steps_per_s'])} steps/s of {fmt(out['ideal_steps_per_s'])} "
        f"({out['ratio']:.0%}), hop p50 {fmt(out['hop_ms']['p50'])} ms, worker CPU "
        f"{fmt(out['worker_cpu_us_per_step'])} µs/step, Redis CPU {fmt(out['redis_cpu_us_per_step'])} µs/step",
        flush=True,
    )
    return out


def busy_cores(before: list[int] | None, after: list[int] | None) -> float | None:
    """Cores of the machine busy over a window, anyone's (/proc/stat): the machine is shared."""
    share = cpu_share(before, after)
    return None if share is None else share["busy"] * (os.cpu_count() or 1)


def neighbours(window: Window, machine_cores: float | None, own_cpu_s: float) -> dict[str, Any]:
    """How busy the machine was over the window, and how much of that was not this benchmark: a
    level that shared the CPU with someone else's tests is a noisier level."""
    ours = (window.consumer_cpu_s + window.supervisor_cpu_s + window.redis_cpu_s + own_cpu_s) / window.elapsed_s
    others = None if machine_cores is None else max(0.0, machine_cores - ours)
    return {"machine_busy_cores": machine_cores, "our_cores": ours, "others_cores": others}


def costs(window: Window, calls: Counter[str], counters: dict[str, int], total: int) -> dict[str, Any]:
    """CPU and Redis commands per committed step over the window; the fleet's counters of trouble."""
    return {
        "steps": total,
        "elapsed_s": window.elapsed_s,
        "worker_cpu_us_per_step": window.consumer_cpu_s / total * 1e6,
        "redis_cpu_us_per_step": window.redis_cpu_s / total * 1e6,
        "supervisor_cpu_s": window.supervisor_cpu_s,
        "supervisor_cpu_us_per_step": window.supervisor_cpu_s / total * 1e6,
        "worker_cpu_share": window.consumer_cpu_s / window.elapsed_s,  # cores the workers kept busy
        "redis_cpu_share": window.redis_cpu_s / window.elapsed_s,
        "commands_per_step": sum(calls.values()) / total,
        # XRANGE: alive.lua, a worker's beat in one partition (one per worker, partition and second)
        "beats_per_step": calls.get("xrange", 0) / total,
        "counters": counters,
        "trouble": {k: counters.get(k, 0) for k in BAD_COUNTERS if counters.get(k, 0)},
        "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
    }


def wait_done(admin: redis.Redis, keys: Keys, n: int, timeout_s: float, fleet: Fleet) -> int:
    """Poll the done indexes every ``POLL_S`` until all N runs finished; how many polls it took."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while True:
        polls += 1
        if finished_runs(admin, keys, "done", "dead") >= n:
            return polls
        fleet.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} runs did not finish within {timeout_s:.0f} s")
        time.sleep(POLL_S)


# -- the runs' histories ----------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """One run as its history tells it: submitted (Redis ms) and, per step, (commit at, start, end)."""

    submitted_ms: int
    steps: list[tuple[int, int, int]]


def read_timelines(admin: redis.Redis, keys: Keys, run_ids: Sequence[str], steps: int) -> list[Timeline]:
    """Every run's history, after checking each completed with exactly ``steps`` commits, one per step."""
    out = []
    for at in range(0, len(run_ids), READ_CHUNK):
        chunk = run_ids[at : at + READ_CHUNK]
        pipe = admin.pipeline(transaction=False)
        for run_id in chunk:
            pipe.hmget(keys.run(run_id).run, "status", "seq")
            pipe.lrange(keys.run(run_id).history, 0, -1)
        replies = pipe.execute()
        for run_id, (status, seq), history in zip(chunk, replies[0::2], replies[1::2], strict=True):
            out.append(timeline(run_id, status, seq, [json.loads(e) for e in history], steps))
    return out


def timeline(run_id: str, status: str | None, seq: str | None, events: list[dict[str, Any]], steps: int) -> Timeline:
    """One run's timeline; raises when the run did not complete with each step committed exactly once."""
    ok = sorted((e for e in events if e["type"] == "ok"), key=lambda e: int(e["at"]))
    names = [e["step"] for e in ok]
    if status != "completed" or seq is None or int(seq) != steps or names != [f"a{k}" for k in range(steps)]:
        raise RuntimeError(f"run {run_id} ended {status} after {seq} commits, steps {names}, expected {steps}")
    submitted = next(int(e["at"]) for e in events if e["type"] == "submitted")
    return Timeline(submitted, [(int(e["at"]), int(e["start_ms"]), int(e["end_ms"])) for e in ok])


def analyse(timelines: list[Timeline], options: Options) -> dict[str, Any]:
    """Steady and overall steps/s against the ideal, and what each hop between two steps cost."""
    await_ms = options.await_s * 1000
    n, steps = len(timelines), options.steps
    hop, dispatch, late, commit, first = [], [], [], [], []
    paces = []
    for t in timelines:
        first.append(t.steps[0][0] - t.submitted_ms - await_ms)
        for (prev_at, _, _), (at, start, end) in zip(t.steps, t.steps[1:], strict=False):
            hop.append(at - prev_at - await_ms)
            dispatch.append(start - prev_at)
            late.append(end - start - await_ms)
            commit.append(at - end)
        paces.append((steps - 1) / max(1, t.steps[-1][0] - t.steps[0][0]) * 1000)
    ideal = n / options.await_s
    steady = sum(paces)
    began = min(t.submitted_ms for t in timelines)
    ended = max(t.steps[-1][0] for t in timelines)
    overall = n * steps / max(1, ended - began) * 1000
    return {
        "ideal_steps_per_s": ideal,
        "steady_steps_per_s": steady,
        "ratio": steady / ideal,
        "overall_steps_per_s": overall,
        "overall_ratio": overall / ideal,
        "inflight_window_steps_per_s": inflight_window(timelines),
        "submit_to_last_commit_s": (ended - began) / 1000,
        "hop_ms": spread(hop) | {"mean": statistics.fmean(hop)},
        "first_step_extra_ms": spread(first),
        "hop_split_ms": {
            "dispatch": spread(dispatch) | {"mean": statistics.fmean(dispatch)},
            "late_wake_up": spread(late) | {"mean": statistics.fmean(late)},
            "commit": spread(commit) | {"mean": statistics.fmean(commit)},
        },
    }


def inflight_window(timelines: list[Timeline]) -> float | None:
    """A cross-check read straight off the commits: steps/s between the last run's first commit and the
    first run's last commit (every run in flight). Biased low when the runs move in step (the window
    holds one fewer burst of commits than periods), so the table uses the runs' paces."""
    start = max(t.steps[0][0] for t in timelines)
    end = min(t.steps[-1][0] for t in timelines)
    if end <= start:
        return None
    inside = sum(1 for t in timelines for at, _, _ in t.steps if start < at <= end)
    return inside / (end - start) * 1000


# -- tables -----------------------------------------------------------------------------------


def target(levels: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """The issue's target: steady steps/s at least 80% of the ideal at N = 1,000 on 2 workers."""
    row = next((lv for lv in levels if lv["runs"] == TARGET_N), None)
    value = None if row is None or workers != 2 else row["ratio"]
    met = None if value is None else value >= TARGET_RATIO
    name = f"steady steps/s ÷ ideal at N = {TARGET_N:,} on 2 workers"
    return {"target": name, "value": value, "bound": f">= {TARGET_RATIO:g}", "met": met}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def tables(levels: list[dict[str, Any]], goal: dict[str, Any], options: Options) -> str:
    head = (
        f"{options.workers} workers (concurrency ceil(N/{options.workers}) + {SPARE_SLOTS}) + 1 supervisor, "
        f"default settings; N runs of {options.steps} async steps each awaiting {options.await_s:g} s, "
        f"submitted at once; ideal = N / {options.await_s:g} s"
    )
    rate = markdown(
        ["N", "steady steps/s", "ideal", "steady ÷ ideal", "overall steps/s (÷ ideal)", "submit s", "all done s"],
        [
            [
                f"{lv['runs']:,}",
                fmt(lv["steady_steps_per_s"]),
                fmt(lv["ideal_steps_per_s"]),
                pct(lv["ratio"]),
                f"{fmt(lv['overall_steps_per_s'])} ({pct(lv['overall_ratio'])})",
                fmt(lv["submit_s"], 2),
                fmt(lv["submit_to_last_commit_s"], 1),
            ]
            for lv in levels
        ],
        right=(1, 2, 3, 4, 5, 6),
    )
    return "\n\n".join([head, rate, costs_table(levels), hops_table(levels), goal_line(goal)])


def costs_table(levels: list[dict[str, Any]]) -> str:
    """CPU and Redis commands per committed step, and how busy the shared machine was."""

    def cores(lv: dict[str, Any]) -> str:
        others = "-" if lv["others_cores"] is None else f"{lv['others_cores']:.2f}"
        return f"{lv['worker_cpu_share']:.2f} / {lv['redis_cpu_share']:.2f} / {lv['our_cores']:.2f} / {others}"

    return markdown(
        [
            "N",
            "worker CPU µs/step",
            "Redis CPU µs/step",
            "supervisor CPU µs/step",
            "Redis commands/step",
            "of which liveness (XRANGE: beats)",
            "cores busy: workers / Redis / all ours / others",
        ],
        [
            [
                f"{lv['runs']:,}",
                fmt(lv["worker_cpu_us_per_step"]),
                fmt(lv["redis_cpu_us_per_step"]),
                fmt(lv["supervisor_cpu_us_per_step"], 1),
                fmt(lv["commands_per_step"], 1),
                fmt(lv["beats_per_step"], 2),
                cores(lv),
            ]
            for lv in levels
        ],
        right=(1, 2, 3, 4, 5, 6),
    )


def hops_table(levels: list[dict[str, Any]]) -> str:
    """What a hop between two steps cost beyond the await, and where it went (medians, ms)."""

    def cell(figures: dict[str, Any]) -> str:
        return f"{fmt(figures['p50'])} / {fmt(figures['p99'])}"

    return markdown(
        [
            "N",
            "hop ms p50 / p99 (mean)",
            "dispatch p50 / p99",
            "late wake-up p50 / p99",
            "commit p50 / p99",
            "first step: extra ms p50 / p99",
        ],
        [
            [
                f"{lv['runs']:,}",
                f"{cell(lv['hop_ms'])} ({fmt(lv['hop_ms']['mean'])})",
                cell(lv["hop_split_ms"]["dispatch"]),
                cell(lv["hop_split_ms"]["late_wake_up"]),
                cell(lv["hop_split_ms"]["commit"]),
                cell(lv["first_step_extra_ms"]),
            ]
            for lv in levels
        ],
        right=(1, 2, 3, 4, 5),
    )


def goal_line(goal: dict[str, Any]) -> str:
    met = {True: "met", False: "**no**"}.get(goal["met"], "not measured")
    value = "-" if goal["value"] is None else f"{goal['value']:.1%}"
    return f"target {goal['target']} {goal['bound']}: {value}, {met}"


def run(options: Options) -> dict[str, Any]:
    """Every level on one private server; the JSON document of the results."""
    with bench_server("agent", options.redis_server) as server:
        levels = [level(server, n, options) for n in options.runs]
    goal = target(levels, options.workers)
    keep = ("calls", "counters")
    return {
        "benchmark": "agent",
        "environment": server.env,
        "settings": {
            **{k: v for k, v in asdict(options).items() if k != "json_path"},
            "spare_slots": SPARE_SLOTS,
            "redis_persistence": "off (appendonly no, save '')",
            "step": "bench.flows:agent, async def awaiting asyncio.sleep(await_s)",
        },
        "summary": {"levels": [{k: v for k, v in lv.items() if k not in keep} for lv in levels], "target": goal},
        "markdown": tables(levels, goal, options),
        "levels": levels,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run every level, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
