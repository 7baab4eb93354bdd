"""The article's compound-failure table, reproduced with real workers, real errors and real ``kill -9``.

``python -m bench.compound [--runs 200] [--rates 0.01,0.05] [--workers 4] [--work-ms 20] [--json [PATH]]``

Per row: ``--runs`` runs of the 17-step workflow :mod:`bench.faulty`, whose every step
execution fails with probability p (half exceptions, half ``kill -9`` of the worker running
it), from a seeded plan. ``--workers`` worker processes (concurrency 1 each, so a kill hits
exactly the step that decided it) and one supervisor, default settings, Redis with AOF
everysec; a driver restarts each killed worker at once, as a container orchestrator would.

Columns, and where each comes from:

- **predicted** (1-p)^17: the article's arithmetic;
- **naive, first failure ends the run**: computed from the same plan: a run completes only if
  the first execution of each of its 17 steps succeeds;
- **naive, restart from scratch**: simulated from the plan and this row's measurements, with
  one cost model for both sides: a step execution costs c (the median per-step time of this
  row's fault-free runs), a kill costs D more (the median kill -> re-run time measured in this
  row: someone has to notice), an error the retry backoff b. Our run of the same id, which made
  E executions, K kills and R errors, took E*c + K*D + R*b under this model; the naive run gets
  exactly that budget, restarts at step 1 after every failure, and draws each execution's
  outcome from the same plan (its n-th execution of step k is attempt n of the plan);
- **ours**: measured: runs completed, steps re-executed per run (executions - 17), the faults
  that hit each run, and the work saved: for each failure at step k, the measured work of steps
  1..k-1 that a restart from scratch would have redone, in step-seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Server,
    add_common_args,
    bench_server,
    finished_runs,
    fmt,
    json_path,
    markdown,
    print_and_save,
    run_main,
    spread,
)
from bench.faulty import EXECUTIONS, RETRY, STEPS, Costs, Plan, compound, naive_first_failure, naive_restart
from bench.marks import URL_ENV
from bench.procs import Fleet, child_env, wait_registered, worker_args
from orchestrator import Client, Settings


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON."""

    runs: int
    rates: tuple[float, ...]
    workers: int
    work_ms: float
    seed: int
    timeout_s: float
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick``: 40 runs per row)."""
    parser = argparse.ArgumentParser(prog="python -m bench.compound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per row [200; 40 with --quick]")
    parser.add_argument("--rates", default="0.01,0.05", help="failure probabilities per step execution [0.01,0.05]")
    parser.add_argument("--workers", type=int, default=4, help="worker processes, concurrency 1 each [4]")
    parser.add_argument("--work-ms", type=float, default=20.0, help="work of each step execution, ms [20]")
    parser.add_argument("--seed", type=int, default=17, help="seed of the failure plan [17]")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up on a row after [600]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    return Options(
        runs=ns.runs or (40 if ns.quick else 200),
        rates=tuple(float(r) for r in ns.rates.split(",") if r),
        workers=ns.workers,
        work_ms=ns.work_ms,
        seed=ns.seed,
        timeout_s=ns.timeout_s,
        json_path=json_path(ns.json, "compound") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )


@dataclass(frozen=True)
class Execution:
    """One line of ``bench:compound``: an execution of step k of a run and its planned outcome."""

    run: str
    k: int
    attempt: int
    outcome: str
    pid: int
    start: float
    end: float

    @classmethod
    def parse(cls, raw: str) -> Execution:
        run, k, attempt, what, pid, start, end = raw.split("|")
        return cls(run, int(k), int(attempt), what, int(pid), float(start), float(end))


class Driver:
    """Our worker processes, restarted as soon as one dies by SIGKILL (a container's restart policy)."""

    def __init__(self, fleet: Fleet, env: dict[str, str], workers: int) -> None:
        self.fleet, self.env = fleet, env
        self.serial = 0
        self.restarts = 0
        self.live = [self.start() for _ in range(workers)]

    def start(self) -> Any:
        """A new worker process with a new id, as a restarted container would be."""
        self.serial += 1
        wid = f"cmp-w{self.serial}-{uuid.uuid4().hex[:4]}"
        return self.fleet.spawn_module(
            wid, worker_args("bench.faulty:compound", concurrency=1, worker_id=wid), self.env
        )

    def tick(self) -> None:
        """Replace every worker that killed itself; any other death is a failure of the benchmark."""
        for i, child in enumerate(self.live):
            code = child.popen.poll()
            if code is None:
                continue
            if code != -9:
                raise RuntimeError(f"{child.name} exited with {code}, not by its planned kill:\n{child.log_tail()}")
            child.killed = True
            self.restarts += 1
            self.live[i] = self.start()


def run_row(server: Server, p: float, options: Options) -> dict[str, Any]:
    """One row through real processes; returns the raw material of the row (runs, executions, histories)."""
    server.admin.flushdb()
    settings = Settings(redis_url=server.url, namespace=f"cmp-{uuid.uuid4().hex[:10]}")
    env = child_env(settings, server.url, {URL_ENV: server.url})
    plan = Plan(p=p, seed=options.seed, work_ms=options.work_ms).model_dump()
    run_ids = [f"p{p:g}-r{i:04d}" for i in range(options.runs)]
    with Fleet(server.log_dir) as fleet, Client(settings) as client:
        fleet.spawn_module(f"cmp-sup-{settings.namespace}", ["orchestrator", "supervisor"], env)
        driver = Driver(fleet, env, options.workers)
        wait_registered(server.admin, client.keys, options.workers, fleet)
        started = time.perf_counter()
        for run_id in run_ids:
            client.submit(compound, plan, run_id=run_id)
        deadline = time.monotonic() + options.timeout_s
        while finished_runs(server.admin, client.keys, "done", "dead") < options.runs:
            driver.tick()
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        wall_s = time.perf_counter() - started
        infos = {rid: client.get(rid) for rid in run_ids}
        events = {rid: client.events(rid) for rid in run_ids}
        stats = client.stats()
    raw: list[str] = server.admin.lrange(EXECUTIONS, 0, -1)  # type: ignore[assignment]
    return {
        "p": p,
        "wall_s": wall_s,
        "restarts": driver.restarts,
        "infos": infos,
        "events": events,
        "executions": [Execution.parse(line) for line in raw],
        "stats": stats,
    }


# -- the columns ------------------------------------------------------------------------------


def kill_delays(row: dict[str, Any], event: str = "crashed") -> list[float]:
    """Seconds from each planned kill (its execution's end mark) to the claim that re-ran the step.

    With ``event="redispatched"``: to the supervisor's re-dispatch instead (the detection alone,
    before the re-dispatched step waits in the queue for a free worker).
    """
    out = []
    for e in row["executions"]:
        if e.outcome != "kill":
            continue
        after = [
            ev.at / 1000
            for ev in row["events"][e.run]
            if ev.type == event and ev.step == f"f{e.k}" and ev.at / 1000 >= e.end - 0.001
        ]
        if after:
            out.append(min(after) - e.end)
    return out


def per_run(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Executions, faults, re-executions and work saved of each run, from the execution list."""
    by_run: dict[str, list[Execution]] = defaultdict(list)
    for e in row["executions"]:
        by_run[e.run].append(e)
    out = {}
    for rid, info in row["infos"].items():
        mine = sorted(by_run[rid], key=lambda e: e.start)
        ok_work = {e.k: e.end - e.start for e in mine if e.outcome == "ok"}
        failures = [e for e in mine if e.outcome != "ok"]
        saved = sum(ok_work.get(j, 0.0) for f in failures for j in range(f.k))
        out[rid] = {
            "status": info.status,
            "duration_s": ((info.finished_ms or info.updated_ms) - info.created_ms) / 1000,
            "executions": len(mine),
            "faults": len(failures),
            "kills": sum(e.outcome == "kill" for e in failures),
            "reexecuted": len(mine) - len({e.k for e in mine}),
            "saved_steps": sum(f.k for f in failures),
            "saved_s": saved,
        }
    return out


def summarize_row(row: dict[str, Any], options: Options) -> dict[str, Any]:
    """The table row: prediction, both naive columns, ours, and the checks behind the targets."""
    p, runs = row["p"], per_run(row)
    ids = list(runs)
    completed = [r for r in runs.values() if r["status"] == "completed"]
    clean = [r["duration_s"] / STEPS for r in completed if r["faults"] == 0]
    step_s = statistics.median(clean) if clean else options.work_ms / 1000
    delays = kill_delays(row)
    costs = Costs(step_s, statistics.median(delays) if delays else 0.0, RETRY.backoff_s)
    budgets = {rid: costs.of(r["executions"], r["kills"], r["faults"] - r["kills"]) for rid, r in runs.items()}
    sims = [naive_restart(options.seed, rid, p, budgets[rid], costs) for rid in ids]
    return {
        "p": p,
        "runs": len(ids),
        "predicted": (1 - p) ** STEPS,
        "naive_first_failure": naive_first_failure(options.seed, ids, p),
        "naive_restart": sum(done for done, _ in sims) / len(ids),
        "naive_restart_executions_per_run": statistics.mean(used for _, used in sims),
        "executions_per_run": statistics.mean(r["executions"] for r in runs.values()),
        "ours_completed": len(completed) / len(ids),
        "ours_failed": len(ids) - len(completed),
        "faults_per_run": statistics.mean(r["faults"] for r in runs.values()),
        "kills": sum(r["kills"] for r in runs.values()),
        "errors": sum(r["faults"] - r["kills"] for r in runs.values()),
        "reexecuted_per_run": statistics.mean(r["reexecuted"] for r in runs.values()),
        "reexecuted_max": max(r["reexecuted"] for r in runs.values()),
        "runs_reexecuted_more_than_faults": sum(r["reexecuted"] > r["faults"] for r in runs.values()),
        "saved_steps_per_run": statistics.mean(r["saved_steps"] for r in runs.values()),
        "saved_s_per_run": statistics.mean(r["saved_s"] for r in runs.values()),
        "saved_s_total": sum(r["saved_s"] for r in runs.values()),
        "step_s_fault_free": step_s,
        "kill_to_rerun_s": spread(delays),
        "kill_to_redispatch_s": spread(kill_delays(row, "redispatched")),
        "worker_restarts": row["restarts"],
        "wall_s": row["wall_s"],
        "stats": {k: v for k, v in row["stats"].items() if k in STAT_KEYS},
    }


STAT_KEYS = ("runs_completed", "runs_failed", "steps_ok", "steps_retried", "crashes", "redispatched", "quarantined")


def pct(value: float) -> str:
    """A share as a percentage with one decimal."""
    return f"{value:.1%}"


def tables(rows: list[dict[str, Any]], options: Options) -> str:
    """The compound table and its details, as markdown."""
    main = markdown(
        [
            "p (fail/step)",
            "runs",
            "predicted (1-p)^17",
            "naive: first failure ends run",
            "naive: restart from scratch, same time",
            "ours completed",
            "faults per run (errors + kills)",
            "steps re-executed per run (max)",
            "runs re-executed > faults",
            "work saved per run",
        ],
        [
            [
                pct(r["p"]),
                str(r["runs"]),
                pct(r["predicted"]),
                pct(r["naive_first_failure"]),
                pct(r["naive_restart"]),
                pct(r["ours_completed"]),
                f"{r['faults_per_run']:.3f} ({r['errors']} + {r['kills']})",
                f"{r['reexecuted_per_run']:.3f} ({r['reexecuted_max']})",
                str(r["runs_reexecuted_more_than_faults"]),
                f"{r['saved_steps_per_run']:.2f} steps, {r['saved_s_per_run']:.3f} step-s",
            ]
            for r in rows
        ],
        right=tuple(range(1, 10)),
    )
    detail = markdown(
        [
            "p",
            "kill → re-run p50 / p99 / max s",
            "kill → re-dispatch p50 / max s",
            "worker restarts",
            "fault-free s/step (c)",
            "executions/run ours / naive",
            "wall s",
        ],
        [
            [
                pct(r["p"]),
                " / ".join(fmt(r["kill_to_rerun_s"][k], 2) for k in ("p50", "p99", "max")),
                " / ".join(fmt(r["kill_to_redispatch_s"][k], 2) for k in ("p50", "max")),
                str(r["worker_restarts"]),
                fmt(r["step_s_fault_free"], 3),
                f"{r['executions_per_run']:.2f} / {r['naive_restart_executions_per_run']:.2f}",
                fmt(r["wall_s"], 1),
            ]
            for r in rows
        ],
        right=(1, 2, 3, 4, 5, 6),
    )
    head = (
        f"{options.runs} runs x {STEPS} steps of {options.work_ms:g} ms per row, {options.workers} workers "
        f"(concurrency 1) + 1 supervisor, failures half exceptions, half kill -9 (seed {options.seed})"
    )
    return f"{head}\n\n{main}\n\n{detail}"


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for this table: full completion, and no re-execution without a fault."""
    complete = all(r["ours_completed"] == 1.0 for r in rows)
    bounded = all(r["runs_reexecuted_more_than_faults"] == 0 for r in rows)
    return [
        {"target": "100% completion in every row", "met": complete},
        {"target": "re-executed steps <= faults, every run", "met": bounded},
    ]


def run(options: Options) -> dict[str, Any]:
    """Every row on one private server with AOF on; the JSON document of the results."""
    rows = []
    with bench_server("compound", options.redis_server, appendfsync="everysec") as server:
        for p in options.rates:
            raw = run_row(server, p, options)
            rows.append(summarize_row(raw, options))
            r = rows[-1]
            print(
                f"  p={p:g}: ours {pct(r['ours_completed'])}, naive {pct(r['naive_first_failure'])} / "
                f"{pct(r['naive_restart'])}, {r['kills']} kills, {r['errors']} errors, {r['wall_s']:.0f} s",
                flush=True,
            )
    return {
        "benchmark": "compound",
        "environment": server.env,
        "settings": {k: v for k, v in asdict(options).items() if k != "json_path"}
        | {"steps": STEPS, "worker_concurrency": 1, "retry": "max_attempts 20, backoff 0.05 s"},
        "summary": {"rows": rows, "targets": targets(rows)},
        "markdown": tables(rows, options),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rows, print the tables and targets, optionally write JSON."""
    options = parse_args(argv)
    doc = run(options)
    for goal in doc["summary"]["targets"]:
        print(f"target {goal['target']}: {'met' if goal['met'] else '**missed**'}")
    return print_and_save(doc, options.json_path)


if __name__ == "__main__":
    run_main(main)
