"""``python -m bench``: every benchmark in one go, each on its own redis-server, then one report.

``python -m bench [--quick] [--redis-server BIN] [--only throughput,growth,recovery,compound,backlog] [--out DIR]``

Runs the benchmarks one after another with their default sizes (``--quick``: the smoke
sizes); the issue-11 benchmarks (``stepcost``, ``liveness``, ``agent``, ``shards``), issue 12's ``parked``,
issue 13's ``fanout`` and ``ratelimit`` and issue 14's ``rq_migration`` run only when named in ``--only``.
It writes ``<out>/<name>.json`` for each, plus ``<out>/report.md`` (every table, the
targets, the machine and the load average before and after) and ``<out>/all.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.common import RESULTS, cpu_share, cpu_ticks, loadavg, run_main, write_json

BENCHMARKS = ("throughput", "growth", "recovery", "compound", "backlog")
# run when named in --only (liveness alone ~4 min)
OPTIONAL = ("stepcost", "liveness", "agent", "shards", "parked", "fanout", "ratelimit", "rq_migration")


def module(name: str) -> ModuleType:
    """Import a benchmark module only when it runs (the peers pull in RQ and Celery)."""
    import importlib

    return importlib.import_module(f"bench.{name}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line -> which benchmarks, at which sizes, where the results go."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes for every benchmark")
    parser.add_argument("--redis-server", metavar="BINARY", help="redis-server binary [found as the CLI finds it]")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"which to run [{','.join(BENCHMARKS)}]")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the JSON and report [{RESULTS}]")
    ns = parser.parse_args(argv)
    ns.only = [b.strip() for b in ns.only.split(",") if b.strip()]
    unknown = set(ns.only) - set(BENCHMARKS) - set(OPTIONAL)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(BENCHMARKS + OPTIONAL)}")
    return ns


def run_one(name: str, ns: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """One benchmark with its defaults, its JSON written; (document, seconds it took)."""
    argv = ["--json", str(ns.out / f"{name}.json")]
    argv += ["--quick"] if ns.quick else []
    argv += ["--redis-server", ns.redis_server] if ns.redis_server else []
    bench = module(name)
    options = bench.parse_args(argv)
    print(f"\n== {name} ==", flush=True)
    started = time.perf_counter()
    doc: dict[str, Any] = bench.run(options)
    elapsed = time.perf_counter() - started
    doc["elapsed_s"] = elapsed
    print()
    print(doc["markdown"], flush=True)
    write_json(ns.out / f"{name}.json", doc)
    return doc, elapsed


def fmt_load(values: list[float] | None) -> str:
    """1/5/15-minute load average, two decimals."""
    return "-" if values is None else " ".join(f"{v:.2f}" for v in values)


def fmt_share(share: dict[str, float] | None) -> str:
    """Busy and stolen CPU shares as percentages."""
    return "-" if share is None else f"{share['busy']:.0%} / {share['steal']:.1%}"


def report(docs: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """Every table of the run with the facts needed to read it."""
    env = next(iter(docs.values()))["environment"] if docs else {}
    lines = [
        "# Benchmark report",
        "",
        f"- machine: {meta['platform']}, {env.get('cpu_count')} CPUs; {env.get('python')}",
        f"- redis-server {env.get('redis_server')} ({env.get('redis_server_binary')}, {env.get('redis_allocator')}); "
        f"redis-py {env.get('redis_py')}, hiredis {env.get('hiredis')}, pydantic {env.get('pydantic')}, "
        f"rq {env.get('rq')}, celery {env.get('celery')}, kombu {env.get('kombu')}",
        f"- commit {env.get('git_commit')}; {'quick' if meta['quick'] else 'full'} sizes",
        f"- load average before / after: {fmt_load(meta['loadavg_before'])} / {fmt_load(meta['loadavg_after'])}",
        f"- machine CPU busy / stolen during the run (all processes, ours included): {fmt_share(meta['cpu_share'])}",
        f"- total time: {meta['total_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in meta['elapsed_s'].items())})",
    ]
    for name, doc in docs.items():
        share = fmt_share(doc["environment"].get("cpu_share_during_run"))
        lines += ["", f"## {name}", "", f"({doc['elapsed_s']:.0f} s; machine CPU busy / stolen: {share})", ""]
        lines += [doc["markdown"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks in order, then write the report; the load average is taken before and after."""
    ns = parse_args(argv)
    meta: dict[str, Any] = {"quick": ns.quick, "platform": platform.platform(), "loadavg_before": loadavg()}
    meta["cpu_count"] = os.cpu_count()
    ticks = cpu_ticks()
    docs: dict[str, dict[str, Any]] = {}
    elapsed: dict[str, float] = {}
    started = time.perf_counter()
    for name in ns.only:
        docs[name], elapsed[name] = run_one(name, ns)
    meta |= {"loadavg_after": loadavg(), "total_s": time.perf_counter() - started, "elapsed_s": elapsed}
    meta["cpu_share"] = cpu_share(ticks, cpu_ticks())
    text = report(docs, meta)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "report.md").write_text(text)
    write_json(ns.out / "all.json", {"meta": meta, "summaries": {n: d["summary"] for n, d in docs.items()}})
    print(f"\nwrote {ns.out / 'report.md'}; total {meta['total_s']:.0f} s, load average {meta['loadavg_after']}")
    return 0


if __name__ == "__main__":
    run_main(main)
