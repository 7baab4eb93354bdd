"""Throughput and overhead of no-op chains: our workers, the raw Redis loop of the same commands, RQ and Celery.

``python -m bench.throughput [--runs 200] [--steps 10] [--repeat 3] [--json [PATH]] [--quick] [--redis-server BIN]``

Every configuration runs against one private redis-server (persistence off) and follows the
recipe in :mod:`bench.measure`: a fresh keyspace, the consumer process(es) started and ready,
then ``--runs`` chains of ``--steps`` no-op steps submitted back to back ("load"), or one chain
every ``--paced-interval-s`` ("paced", low load: the end-to-end latency of one chain).

- ``raw batched`` / ``raw unbatched``: :mod:`bench.raw`, a plain redis-py loop issuing exactly
  our worker's Redis calls per step; batched is the limit every ratio is taken against.
- ``ours xN``: N real ``python -m orchestrator worker`` processes, ``--concurrency 64`` each.
- ``rq ...`` / ``celery ...``: the peers (:mod:`bench.peers`), same chains, their own workers
  with the settings of peer-benchmarks.md.

Configurations run interleaved (all of repetition 1, then repetition 2, ...), so slow phases
of a shared machine hit all of them.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Server,
    add_common_args,
    bench_server,
    fmt,
    fmt_ratio,
    json_path,
    markdown,
    median_or_none,
    percentile,
    print_and_save,
    ratio,
    run_main,
)
from bench.flows import STEPS
from bench.measure import Sample, Shape, measure_ours, measure_peer
from bench.peers.registry import PEERS, parse_peers
from bench.raw import RAW_BATCH, consumer_args
from orchestrator import Settings

CONCURRENCY = 64
WORKER_COUNTS = (1, 2)
PEER_WORKERS = {"rq simple-next": (1, 2), "celery prefork-durable": (1, 2)}  # others: 2 workers only
PACED_PEERS = ("rq simple-next", "celery prefork-durable")
RAW = "raw batched"


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON next to the results."""

    runs: int
    steps: int
    repeat: int
    quick: bool
    json_path: Path | None
    redis_server: str | None
    with_async: bool = False
    peers: tuple[str, ...] = tuple(PEERS)
    peer_cap_s: float = 10.0
    paced_runs: int = 20
    paced_interval_s: float = 0.1


@dataclass(frozen=True)
class Config:
    """One row: who consumes (our/raw command lines, or a peer and its worker count) and the load shape."""

    name: str
    mode: str  # "load" | "paced"
    consumers: tuple[tuple[str, ...], ...] = ()
    peer: str | None = None
    workers: int = 0


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick`` only changes the defaults of sizes not given)."""
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="chains per load measurement [200; 50 with --quick]")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps per chain [{STEPS}]")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repetitions [3; 1 with --quick]")
    parser.add_argument("--with-async", action="store_true", help="also measure workers with async def steps")
    parser.add_argument("--peers", default=None, help="comma-separated peer rows [all installed; '' for none]")
    parser.add_argument("--peer-cap-s", type=float, default=None, help="time cap of peer runs [10; 5 with --quick]")
    parser.add_argument("--paced-runs", type=int, default=None, help="chains per paced measurement [20; 10 quick]")
    parser.add_argument("--paced-interval-s", type=float, default=0.1, help="one chain every ... s when paced [0.1]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    runs = ns.runs if ns.runs is not None else (50 if ns.quick else 200)
    repeat = ns.repeat if ns.repeat is not None else (1 if ns.quick else 3)
    peers = parse_peers(ns.peers, tuple(PEERS))
    if runs < 1 or ns.steps < 1 or repeat < 1:
        parser.error("--runs, --steps and --repeat must be at least 1")
    return Options(
        runs=runs,
        steps=ns.steps,
        repeat=repeat,
        quick=ns.quick,
        json_path=json_path(ns.json, "throughput") if ns.json is not None else None,
        redis_server=ns.redis_server,
        with_async=ns.with_async,
        peers=peers,
        peer_cap_s=ns.peer_cap_s if ns.peer_cap_s is not None else (5.0 if ns.quick else 10.0),
        paced_runs=ns.paced_runs if ns.paced_runs is not None else (10 if ns.quick else 20),
        paced_interval_s=ns.paced_interval_s,
    )


def configurations(options: Options) -> list[Config]:
    """Every row in the interleaving order of one repetition: load rows first, then the paced ones."""
    worker = ("orchestrator", "worker", "bench.flows:noop", "--concurrency", str(CONCURRENCY))
    rows = [Config(f"raw {m}", "load", (tuple(consumer_args(m)),)) for m in ("batched", "unbatched")]
    rows += [Config(f"ours x{n}", "load", (worker,) * n) for n in WORKER_COUNTS]
    worker_async = ("orchestrator", "worker", "bench.flows:noop_async", "--concurrency", str(CONCURRENCY))
    if options.with_async:
        rows += [Config(f"ours x{n} async", "load", (worker_async,) * n) for n in WORKER_COUNTS]
    for name in options.peers:
        rows += [Config(f"{name} x{n}", "load", peer=name, workers=n) for n in PEER_WORKERS.get(name, (2,))]
    rows += [Config(f"{RAW} paced", "paced", (tuple(consumer_args("batched")),))]
    rows += [Config("ours x1 paced", "paced", (worker,))]
    if options.with_async:
        rows += [Config("ours x1 async paced", "paced", (worker_async,))]
    rows += [Config(f"{name} x1 paced", "paced", peer=name, workers=1) for name in PACED_PEERS if name in options.peers]
    return rows


def shape_of(config: Config, options: Options) -> Shape:
    """The load or paced shape of a row; peers get the time cap (their slow configurations would take minutes)."""
    if config.mode == "paced":
        return Shape(options.paced_runs, options.steps, options.paced_interval_s)
    return Shape(options.runs, options.steps, cap_s=options.peer_cap_s if config.peer is not None else None)


def measure(server: Server, config: Config, repeat: int, options: Options) -> Sample:
    """Dispatch to the ours/raw or the peer recipe."""
    shape = shape_of(config, options)
    if config.peer is not None:
        sample = measure_peer(server, PEERS[config.peer], config.workers, repeat, shape)
        sample.config = config.name
        return sample
    return measure_ours(server, config.name, repeat, config.consumers, shape)


def run_all(server: Server, options: Options) -> list[Sample]:
    """Repetitions interleaved, so drift of the machine hits every row alike."""
    samples = []
    for repeat in range(1, options.repeat + 1):
        for config in configurations(options):
            sample = measure(server, config, repeat, options)
            samples.append(sample)
            rate = f"{fmt(sample.steps_per_s)} steps/s" if sample.steps_per_s is not None else "paced"
            print(
                f"  repeat {repeat} {config.name:28} {rate:>15}  elapsed {sample.elapsed_s:6.2f} s"
                f"{' (capped)' if sample.capped else ''}  done {sample.completed_runs}/{sample.runs}  "
                f"p50/p99 {fmt(sample.latency_p50_ms, 1)}/{fmt(sample.latency_p99_ms, 1)} ms  "
                f"CPU µs/step {fmt(sample.consumer_cpu_us_per_step)}/{fmt(sample.redis_cpu_us_per_step)}",
                flush=True,
            )
    return samples


# -- summary ----------------------------------------------------------------------------------


def summarize(samples: Sequence[Sample], options: Options) -> dict[str, Any]:
    """Load rows (median and range of steps/s over the repetitions) and paced rows (latency over all chains)."""
    load, paced = [], []
    for config in configurations(options):
        mine = [s for s in samples if s.config == config.name]
        if not mine:
            continue
        row: dict[str, Any] = {"config": config.name, "peer": config.peer is not None, "repeats": len(mine)}
        row["consumer_cpu_us_per_step"] = median_or_none(s.consumer_cpu_us_per_step for s in mine)
        row["redis_cpu_us_per_step"] = median_or_none(s.redis_cpu_us_per_step for s in mine)
        if config.mode == "load":
            rates = [s.steps_per_s or 0.0 for s in mine]
            row |= {"steps_per_s": statistics.median(rates), "steps_per_s_min": min(rates)}
            row |= {"steps_per_s_max": max(rates), "capped": sum(s.capped for s in mine)}
            row["completed_runs"] = [s.completed_runs for s in mine]
            row["latency_p50_ms"] = median_or_none(s.latency_p50_ms for s in mine)
            row["latency_p99_ms"] = median_or_none(s.latency_p99_ms for s in mine)
            load.append(row)
        else:
            pooled = [v for s in mine for v in s.latencies_ms]
            row |= {"chains": len(pooled), "runs_submitted": sum(s.runs for s in mine)}
            row["latency_p50_ms"] = percentile(pooled, 0.5) if pooled else None
            row["latency_p99_ms"] = percentile(pooled, 0.99) if pooled else None
            row["per_step_ms"] = row["latency_p50_ms"] / options.steps if pooled else None
            paced.append(row)
    add_ratios(load, paced)
    return {"load": load, "paced": paced, "targets": targets(load, paced)}


def add_ratios(load: list[dict[str, Any]], paced: list[dict[str, Any]]) -> None:
    """Each figure as a ratio to the raw limit and to the best peer, as the issue asks."""
    raw = next((r["steps_per_s"] for r in load if r["config"] == RAW), None)
    best_peer = max((r["steps_per_s"] for r in load if r["peer"]), default=None)
    for row in load:
        row["ratio_to_raw"] = ratio(row["steps_per_s"], raw)
        row["ratio_to_best_peer"] = ratio(row["steps_per_s"], best_peer)
    raw_p50 = next((r["latency_p50_ms"] for r in paced if r["config"] == f"{RAW} paced"), None)
    peer_p50s = [r["latency_p50_ms"] for r in paced if r["peer"] and r["latency_p50_ms"] is not None]
    best = min(peer_p50s, default=None)
    for row in paced:
        row["ratio_to_raw"] = ratio(row["latency_p50_ms"], raw_p50)
        row["ratio_to_best_peer"] = ratio(row["latency_p50_ms"], best)


def target(name: str, value: float | None, limit: float, at_least: bool) -> dict[str, Any]:
    """One of the issue's targets: the measured ratio, the bound, and whether it was met (None: not measured)."""
    met = None if value is None else (value >= limit if at_least else value <= limit)
    return {"target": name, "value": value, "bound": f"{'>=' if at_least else '<='} {limit:g}", "met": met}


def targets(load: list[dict[str, Any]], paced: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's throughput and latency targets, each as a ratio measured in this run."""
    rate = {r["config"]: r["steps_per_s"] for r in load}
    p50 = {r["config"]: r["latency_p50_ms"] for r in paced}
    ours = rate.get("ours x2")
    rq_simple = max((v for k, v in rate.items() if k.startswith("rq simple") and k.endswith("x2")), default=None)
    return [
        target("ours x2 / raw batched (no-op steps/s)", ratio(ours, rate.get(RAW)), 0.25, True),
        target("ours x2 / best RQ SimpleWorker x2", ratio(ours, rq_simple), 10, True),
        target("ours x2 / Celery x2", ratio(ours, rate.get("celery prefork-durable x2")), 5, True),
        target("paced 10-step run p50: ours / raw", ratio(p50.get("ours x1 paced"), p50.get(f"{RAW} paced")), 2, False),
    ]


def latency_cell(row: dict[str, Any], runs: int) -> str:
    """Latency under load; for a capped row only how many chains finished by the cap (their latency says little)."""
    if row["capped"]:
        return "chains done: " + ", ".join(f"{n}/{runs}" for n in row["completed_runs"])
    return f"{fmt(row['latency_p50_ms'])} / {fmt(row['latency_p99_ms'])}"


def tables(summary: dict[str, Any], options: Options) -> str:
    """The summary as markdown tables, ready for docs/benchmarks.md."""
    columns = ["configuration", "steps/s [min-max]", "÷ raw batched", "÷ best peer", "latency p50 / p99 ms"]
    load = markdown(
        [*columns, "CPU µs/step consumer / redis"],
        [
            [
                r["config"] + (f" (capped in {r['capped']} of {r['repeats']})" if r["capped"] else ""),
                f"{fmt(r['steps_per_s'])} [{fmt(r['steps_per_s_min'])}-{fmt(r['steps_per_s_max'])}]",
                fmt_ratio(r["ratio_to_raw"]),
                fmt_ratio(r["ratio_to_best_peer"]),
                latency_cell(r, options.runs),
                f"{fmt(r['consumer_cpu_us_per_step'])} / {fmt(r['redis_cpu_us_per_step'])}",
            ]
            for r in summary["load"]
        ],
        right=(1, 2, 3, 4, 5),
    )
    paced = markdown(
        ["configuration", "chains", "latency p50 / p99 ms", "per step ms (p50/steps)", "÷ raw", "÷ best peer"],
        [
            [
                r["config"],
                f"{r['chains']}/{r['runs_submitted']}",
                f"{fmt(r['latency_p50_ms'], 1)} / {fmt(r['latency_p99_ms'], 1)}",
                fmt(r["per_step_ms"], 2),
                fmt_ratio(r["ratio_to_raw"]),
                fmt_ratio(r["ratio_to_best_peer"]),
            ]
            for r in summary["paced"]
        ],
        right=(1, 2, 3, 4, 5),
    )
    goals = markdown(
        ["target", "measured", "bound", "met"],
        [
            [t["target"], fmt_ratio(t["value"]), t["bound"], {True: "yes", False: "**no**"}.get(t["met"], "-")]
            for t in summary["targets"]
        ],
    )
    head = f"{options.runs} chains x {options.steps} no-op steps, median of {options.repeat} [min-max]"
    pace = f"paced: {options.paced_runs} chains x {options.steps} steps, one every {options.paced_interval_s:g} s"
    pace += f", pooled over {options.repeat} repetitions"
    return f"{head}\n\n{load}\n\n{pace}\n\n{paced}\n\n{goals}"


def bench_settings(options: Options) -> dict[str, Any]:
    """Everything that shapes the numbers besides the machine, for the JSON."""
    return {
        **{k: v for k, v in asdict(options).items() if k != "json_path"},
        "worker_concurrency": CONCURRENCY,
        "raw_batch_count": RAW_BATCH,
        "block_ms": Settings.model_fields["block_ms"].default,
        "redis_persistence": "off (appendonly no, save '')",
        "step": "ours and raw: def returning None (the worker runs it on a thread); peers: a function whose "
        "last step writes one end mark (bench.marks), the others do nothing",
        "peer_settings": {name: PEERS[name].settings for name in options.peers},
        "order": [c.name for c in configurations(options)],
    }


def run(options: Options) -> dict[str, Any]:
    """All measurements on one private server; the JSON document of the results."""
    with bench_server("throughput", options.redis_server) as server:
        samples = run_all(server, options)
    summary = summarize(samples, options)
    return {
        "benchmark": "throughput",
        "environment": server.env,
        "settings": bench_settings(options),
        "summary": summary,
        "markdown": tables(summary, options),
        "samples": [asdict(s) for s in samples],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
