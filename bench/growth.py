"""Cost growth: does a step get slower as its run gets longer, and what does a run cost in Redis as it grows?

``python -m bench.growth [--length 1000] [--runs 3] [--sizes 1024,10240,102400] [--steps 20] [--json [PATH]]``

1. **Per-step overhead along a long run.** Runs of ``--length`` no-op steps, one at a time on
   one worker (nothing else queued), in two shapes: a chain of distinct steps
   (``bench.flows:noop``) and an agent loop, one step re-entered with ``Goto``
   (``bench.flows:loop``, so idempotency keys carry visit numbers). The time of step k is the
   gap between the commits of steps k-1 and k (``ok`` events, Redis server clock); "step 1"
   and "step N" are the mean gap over the first and last ``--window`` steps (the clock has
   1 ms resolution, a single gap would mostly be rounding).
2. **Redis memory per run.** Runs of ``--steps`` steps whose every step returns an update of
   each ``--sizes`` bytes, in two shapes: "append" (a new field per step: the state grows, an
   agent accumulating findings) and "replace" (one field rewritten: a draft). Memory is
   ``MEMORY USAGE ... SAMPLES 0`` of every key of the run. The comparison is measured too:
   the full state after each step (what a checkpointer that snapshots the whole state per
   step stores, as LangGraph's do) is rebuilt from the run's own step records, written to a
   Redis hash, and measured the same way.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    Server,
    add_common_args,
    bench_server,
    fmt,
    fmt_ratio,
    json_path,
    markdown,
    print_and_save,
    ratio,
    run_main,
)
from bench.flows import STEPS_ENV, Rounds, loop, make_noop, make_payload
from bench.procs import Fleet, child_env, wait_registered, wait_until, worker_args
from orchestrator import Client, Settings, Workflow
from orchestrator.keys import Keys

SHAPES = ("append", "replace")


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON."""

    length: int
    window: int
    runs: int
    sizes: tuple[int, ...]
    steps: int
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick``: 200-step runs, one run per case)."""
    parser = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=None, help="steps of a long run [1000; 200 with --quick]")
    parser.add_argument("--window", type=int, default=None, help="steps averaged at each end [50; 20 quick]")
    parser.add_argument("--runs", type=int, default=None, help="runs per shape and size [3; 1 with --quick]")
    parser.add_argument("--sizes", default="1024,10240,102400", help="update sizes in bytes [1024,10240,102400]")
    parser.add_argument("--steps", type=int, default=None, help="steps of a memory run [20; 10 with --quick]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    length = ns.length or (200 if ns.quick else 1000)
    window = ns.window or (20 if ns.quick else 50)
    if length < 2 * window + 1:
        parser.error("--length must be more than twice --window")
    return Options(
        length=length,
        window=window,
        runs=ns.runs or (1 if ns.quick else 3),
        sizes=tuple(int(s) for s in ns.sizes.split(",") if s),
        steps=ns.steps or (10 if ns.quick else 20),
        json_path=json_path(ns.json, "growth") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )


# -- running runs one at a time ---------------------------------------------------------------


class Session:
    """One namespace, its worker(s) and a client: the runs of one part of this benchmark."""

    def __init__(self, server: Server, fleet: Fleet, target: str, steps: int) -> None:
        self.settings = Settings(redis_url=server.url, namespace=f"growth-{uuid.uuid4().hex[:10]}")
        self.keys = Keys(self.settings.namespace, self.settings.partitions)
        self.server = server
        self.client = Client(self.settings)
        env = child_env(self.settings, server.url, {STEPS_ENV: str(steps)})
        fleet.spawn_module(f"growth-{target.split(':')[1]}-{self.settings.namespace}", worker_args(target), env)
        wait_registered(server.admin, self.keys, 1, fleet)
        self.fleet = fleet

    def run_alone(self, flow: Workflow[Any], data: dict[str, Any], timeout_s: float) -> str:
        """Submit one run and wait until it completes (nothing else is queued meanwhile)."""
        run_id = f"g{uuid.uuid4().hex[:10]}"
        self.client.submit(flow, data, run_id=run_id)
        key = self.keys.run(run_id).run
        wait_until(lambda: self.server.admin.hget(key, "status") == "completed", timeout_s, f"run {run_id}", self.fleet)
        return run_id

    def commit_times(self, run_id: str) -> list[int]:
        """Server ms of the submit and of each commit, in order."""
        events = self.client.events(run_id)
        return [ev.at for ev in events if ev.type in ("submitted", "ok")]

    def close(self) -> None:
        """Close the client; the worker stops with the fleet."""
        self.client.close()


def window_ms(times: list[int], window: int) -> tuple[float, float]:
    """Mean ms per step over the first and the last ``window`` steps (``times`` = submit, then each commit)."""
    first = (times[window] - times[0]) / window
    last = (times[-1] - times[-1 - window]) / window
    return first, last


# -- part 1: per-step overhead along a long run -----------------------------------------------


def long_runs(server: Server, options: Options) -> list[dict[str, Any]]:
    """Both shapes, ``runs`` runs each, one at a time; per run the mean step time at both ends."""
    rows = []
    for shape in ("chain", "loop"):
        with Fleet(server.log_dir) as fleet:
            target = "bench.flows:noop" if shape == "chain" else "bench.flows:loop"
            session = Session(server, fleet, target, options.length)
            flow: Workflow[Any] = make_noop(options.length) if shape == "chain" else loop
            data = {} if shape == "chain" else Rounds(rounds=options.length).model_dump()
            for i in range(options.runs):
                run_id = session.run_alone(flow, data, 60 + options.length / 20)
                times = session.commit_times(run_id)
                first, last = window_ms(times, options.window)
                memory = run_memory(server.admin, session.keys, run_id)
                row: dict[str, Any] = {"shape": shape, "run": i + 1, "length": options.length}
                row |= {"first_ms": first, "last_ms": last}
                row |= {"ratio": ratio(last, first), "total_s": (times[-1] - times[0]) / 1000, "memory": memory}
                rows.append(row)
                print(f"  {shape} run {i + 1}: step 1 {first:.2f} ms, step {options.length} {last:.2f} ms", flush=True)
            session.close()
    return rows


# -- part 2: memory per run -------------------------------------------------------------------


def key_bytes(admin: redis.Redis, key: str) -> int:
    """``MEMORY USAGE key SAMPLES 0``: every element counted, 0 for a key that does not exist."""
    return int(admin.memory_usage(key, samples=0) or 0)


def run_memory(admin: redis.Redis, keys: Keys, run_id: str) -> dict[str, int]:
    """Bytes of each key of a run (the stash and lease are gone once it completed)."""
    rk = keys.run(run_id)
    parts = {"run": rk.run, "state": rk.state, "results": rk.results, "history": rk.history}
    out = {name: key_bytes(admin, key) for name, key in parts.items()}
    out["total"] = sum(out.values())
    return out


def snapshot_bytes(admin: redis.Redis, client: Client, run_id: str) -> dict[str, int]:
    """Store the full state after every step in one hash, as a snapshot-per-step checkpointer would; measure it."""
    stored: dict[str, str] = client.redis.hgetall(client.keys.run(run_id).state)  # type: ignore[assignment]
    state: dict[str, Any] = {k: json.loads(v) for k, v in stored.items() if k in ("size", "shape")}  # the input
    records = sorted(client.results(run_id).values(), key=lambda r: r.end_ms)
    key = f"bench:snapshots:{{{run_id}}}"
    payload = 0
    for k, record in enumerate(records):
        state.update(record.update)
        blob = json.dumps(state, separators=(",", ":"))
        payload += len(blob)
        admin.hset(key, str(k), blob)
    measured = key_bytes(admin, key)
    admin.delete(key)
    return {"total": measured, "payload": payload}


def memory_runs(server: Server, options: Options) -> list[dict[str, Any]]:
    """Every size and shape, ``runs`` runs each, on one worker; bytes per run, ours and snapshot-per-step."""
    rows = []
    with Fleet(server.log_dir) as fleet:
        session = Session(server, fleet, "bench.flows:payload", options.steps)
        flow = make_payload(options.steps)
        for size in options.sizes:
            for shape in SHAPES:
                for i in range(options.runs):
                    run_id = session.run_alone(flow, {"size": size, "shape": shape}, 120)
                    ours = run_memory(server.admin, session.keys, run_id)
                    snap = snapshot_bytes(server.admin, session.client, run_id)
                    first, last = window_ms(session.commit_times(run_id), max(1, options.steps // 4))
                    rows.append(
                        {"size": size, "shape": shape, "run": i + 1, "steps": options.steps, "ours": ours}
                        | {"snapshots": snap, "first_step_ms": first, "last_step_ms": last}
                    )
                print(f"  {shape} {size} B: ours {ours['total']:,} B/run, snapshots {snap['total']:,} B", flush=True)
        session.close()
    return rows


# -- summary ----------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (a few runs per case: the median would just pick one)."""
    return sum(values) / len(values)


def summarize(long: list[dict[str, Any]], memory: list[dict[str, Any]], options: Options) -> dict[str, Any]:
    """Mean over runs per shape (and size); the issue's growth target on the worse shape."""
    overhead: list[dict[str, Any]] = []
    for shape in ("chain", "loop"):
        mine = [r for r in long if r["shape"] == shape]
        first, last = mean([r["first_ms"] for r in mine]), mean([r["last_ms"] for r in mine])
        history = mean([r["memory"]["history"] for r in mine])
        overhead.append({"shape": shape, "first_ms": first, "last_ms": last, "ratio": ratio(last, first)})
        overhead[-1] |= {"memory_per_step_bytes": mean([r["memory"]["total"] for r in mine]) / options.length}
        overhead[-1]["history_per_step_bytes"] = history / options.length
    mem: list[dict[str, Any]] = []
    for size in options.sizes:
        for shape in SHAPES:
            mine = [r for r in memory if r["size"] == size and r["shape"] == shape]
            ours = mean([r["ours"]["total"] for r in mine])
            snap = mean([r["snapshots"]["total"] for r in mine])
            row = {"size": size, "shape": shape, "ours_bytes": ours, "snapshot_bytes": snap}
            row |= {"ours_per_step": ours / options.steps, "snapshot_over_ours": ratio(snap, ours)}
            row |= {"first_step_ms": mean([r["first_step_ms"] for r in mine])}
            row |= {"last_step_ms": mean([r["last_step_ms"] for r in mine])}
            mem.append(row)
    worst = max((r["ratio"] for r in overhead if r["ratio"] is not None), default=None)
    goal: dict[str, Any] = {"target": f"step {options.length} / step 1 overhead", "value": worst, "bound": "<= 1.5"}
    goal["met"] = None if worst is None else worst <= 1.5
    return {"overhead": overhead, "memory": mem, "targets": [goal]}


def tables(summary: dict[str, Any], options: Options) -> str:
    """Both parts as markdown tables, with the target line."""
    over = markdown(
        ["shape", "step 1 ms", f"step {options.length} ms", "ratio", "Redis bytes per step (history)"],
        [
            [
                r["shape"],
                fmt(r["first_ms"], 2),
                fmt(r["last_ms"], 2),
                fmt_ratio(r["ratio"]),
                f"{fmt(r['memory_per_step_bytes'])} ({fmt(r['history_per_step_bytes'])})",
            ]
            for r in summary["overhead"]
        ],
        right=(1, 2, 3, 4),
    )
    mem = markdown(
        ["update", "shape", "ours per run", "per step", "snapshots per run", "snapshots ÷ ours", "ms/step 1st/last ¼"],
        [
            [
                f"{r['size'] / 1024:g} KiB",
                r["shape"],
                f"{fmt(r['ours_bytes'] / 1024)} KiB",
                f"{fmt(r['ours_per_step'] / 1024, 1)} KiB",
                f"{fmt(r['snapshot_bytes'] / 1024)} KiB",
                fmt_ratio(r["snapshot_over_ours"]),
                f"{fmt(r['first_step_ms'], 1)} / {fmt(r['last_step_ms'], 1)}",
            ]
            for r in summary["memory"]
        ],
        right=(2, 3, 4, 5, 6),
    )
    goal = summary["targets"][0]
    met = {True: "met", False: "**missed**"}.get(goal["met"], "not measured")
    head = f"{options.runs} run(s) per shape, {options.length} no-op steps each, one worker, means of {options.window}"
    head2 = f"{options.runs} run(s) per size and shape, {options.steps} steps each"
    return (
        f"{head}-step windows\n\n{over}\n\ntarget {goal['target']} {goal['bound']}: {fmt_ratio(goal['value'])}, "
        f"{met}\n\n{head2}\n\n{mem}"
    )


def run(options: Options) -> dict[str, Any]:
    """Both parts on one private server (persistence off: memory, not disk, is measured); the JSON document."""
    with bench_server("growth", options.redis_server) as server:
        long = long_runs(server, options)
        memory = memory_runs(server, options)
    summary = summarize(long, memory, options)
    return {
        "benchmark": "growth",
        "environment": server.env,
        "settings": {k: v for k, v in asdict(options).items() if k != "json_path"} | {"workers": 1},
        "summary": summary,
        "markdown": tables(summary, options),
        "samples": {"long_runs": long, "memory_runs": memory},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
