"""Throughput of the step path: our worker processes against a raw redis-py loop of the same commands.

``python -m bench.throughput [--runs 200] [--steps 10] [--repeat 3] [--json [out.json]] [--quick] [--redis-server BIN]``

Every configuration runs against one private redis-server (persistence off) and follows the
same recipe: fresh namespace, start the consumer process(es), wait until they are registered,
submit the runs back to back with ``Client.submit``, then poll the ``done`` zset every 10 ms.
steps/s = runs x steps / (first submit -> last run completed). The configurations:

- ``raw batched``: one process, a plain loop: XREADGROUP COUNT 100, one pipeline of claim
  EVALSHAs, one pipeline of commit EVALSHAs plus the ack of the batch (XACK and XDEL, as the
  worker sends them). The Redis-side limit of our protocol from one Python client.
- ``raw unbatched``: the same loop with COUNT 1 and one round trip per call.
- ``ours xN``: N real ``python -m orchestrator worker`` processes, ``--concurrency 64`` each.

The raw consumer runs as a subprocess of this very module (``--raw-consumer``) so that, like the
workers, it is a separate process from the submitter and consumes while runs are submitted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis

import orchestrator
from bench.flows import STEPS, STEPS_ENV, Empty, make_noop, steps_from_env
from orchestrator import Client, Settings, Workflow, scripts
from orchestrator.codec import Dispatch
from orchestrator.connection import connect
from orchestrator.embedded import RedisServer
from orchestrator.keys import GROUP, Keys
from orchestrator.scripts import Call
from orchestrator.store import Claimed, Outcome, Store
from orchestrator.worker.execution import claim_token

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "throughput.json"
CONCURRENCY = 64
WORKER_COUNTS = (1, 2)
RAW_BATCH = 100
POLL_S = 0.010
STOP_GRACE_S = 10.0
REGISTER_TIMEOUT_S = 30.0
RAW_MODES = ("batched", "unbatched")
StreamReply = list[tuple[str, list[tuple[str, dict[str, str]]]]]  # XREADGROUP with decode_responses


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What one benchmark invocation measures; recorded in the JSON next to the results."""

    runs: int
    steps: int
    repeat: int
    quick: bool
    json_path: Path | None
    redis_server: str | None
    with_async: bool = False


def parse_args(argv: Sequence[str] | None) -> tuple[Options, str | None]:
    """Command line -> options; the second item is the hidden ``--raw-consumer`` mode of a child."""
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs submitted per measurement [200; 50 with --quick]")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps per run [{STEPS}]")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repetitions [3; 1 with --quick]")
    parser.add_argument("--quick", action="store_true", help="smoke run: defaults to 50 runs, 1 repeat")
    parser.add_argument(
        "--json",
        nargs="?",
        const=str(DEFAULT_JSON),
        default=None,
        metavar="PATH",
        help=f"also write the results as JSON [{DEFAULT_JSON.relative_to(REPO)} when PATH is omitted]",
    )
    parser.add_argument(
        "--with-async", action="store_true", help="also measure workers whose steps are async def (no thread per step)"
    )
    parser.add_argument("--redis-server", metavar="BINARY", help="redis-server binary [found as the CLI finds it]")
    parser.add_argument("--raw-consumer", choices=RAW_MODES, default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    runs = ns.runs if ns.runs is not None else (50 if ns.quick else 200)
    repeat = ns.repeat if ns.repeat is not None else (1 if ns.quick else 3)
    if runs < 1 or ns.steps < 1 or repeat < 1:
        parser.error("--runs, --steps and --repeat must be at least 1")
    json_path = Path(ns.json) if ns.json else None
    options = Options(runs, ns.steps, repeat, ns.quick, json_path, ns.redis_server, ns.with_async)
    return options, ns.raw_consumer


# -- child processes --------------------------------------------------------------------------


def child_env(settings: Settings, steps: int) -> dict[str, str]:
    """Environment of a worker or raw consumer: our settings as ORCHESTRATOR_* variables, nothing inherited.

    Inherited ORCHESTRATOR_* or REDIS_URL variables are dropped so a developer's shell cannot
    point a benchmark process at another server or namespace.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_") and k != "REDIS_URL"}
    env["ORCHESTRATOR_REDIS_URL"] = settings.redis_url or ""
    env["ORCHESTRATOR_NAMESPACE"] = settings.namespace
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env[STEPS_ENV] = str(steps)
    return env


@dataclass
class Child:
    """One subprocess we started, with its log file for post-mortems."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the child's output, to show why it died instead of just that it did."""
        return self.log_path.read_text(errors="replace")[-chars:]


class Fleet:
    """The subprocesses of one measurement; leaving the block stops every one of them, error or not."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def spawn(self, name: str, module_args: Sequence[str], env: dict[str, str]) -> Child:
        """``python -m <module_args>`` with output in a log file (a pipe nobody reads could fill up and block it)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(
                [sys.executable, "-m", *module_args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def cpu_s(self) -> float | None:
        """User+system CPU seconds of all children so far (all threads), from /proc; None off Linux."""
        total = 0.0
        for child in self.children:
            try:
                stat = Path(f"/proc/{child.popen.pid}/stat").read_text()
            except OSError:
                return None
            fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": fields 3.. of proc(5)
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def check_alive(self) -> None:
        """Fail fast with the child's log when one died, instead of polling until the timeout."""
        for child in self.children:
            code = child.popen.poll()
            if code is not None:
                raise RuntimeError(f"{child.name} exited with {code} during the measurement:\n{child.log_tail()}")

    def stop(self) -> None:
        """SIGTERM all (the worker drains), then SIGKILL whatever still runs after the grace period."""
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            try:
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()
        self.children.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- one measurement --------------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement of one configuration."""

    config: str
    repeat: int
    runs: int
    steps: int
    submit_s: float
    elapsed_s: float
    steps_per_s: float
    server_span_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    consumer_cpu_us_per_step: float | None
    redis_cpu_us_per_step: float | None


@dataclass
class Bench:
    """What all measurements of one invocation share: the server, the admin connection, the workflow."""

    options: Options
    url: str
    admin: redis.Redis
    log_dir: Path
    flow: Workflow[Empty]
    samples: list[Sample] = field(default_factory=list)

    def fresh_settings(self) -> Settings:
        """A namespace of its own per measurement, so no key of an earlier one is ever read."""
        return Settings(redis_url=self.url, namespace=f"bench-{uuid.uuid4().hex[:12]}")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that actually occurred, no interpolation."""
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def wait_registered(admin: redis.Redis, keys: Keys, expected: int, fleet: Fleet) -> None:
    """Submitting before the consumers listen would measure their start-up, not their throughput."""
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while admin.zcard(keys.workers) < expected:
        fleet.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{expected} consumer(s) did not register within {REGISTER_TIMEOUT_S} s")
        time.sleep(POLL_S)


def submit_runs(client: Client, flow: Workflow[Empty], runs: int) -> None:
    """A plain loop of ``Client.submit``, one round trip each, as an application would submit."""
    for _ in range(runs):
        client.submit(flow)


def wait_done(admin: redis.Redis, keys: Keys, runs: int, fleet: Fleet, timeout_s: float) -> float:
    """Poll the ``done`` zset every 10 ms; the perf_counter time at which all runs were seen done."""
    deadline = time.monotonic() + timeout_s
    while True:
        if admin.zcard(keys.done) >= runs:
            return time.perf_counter()
        fleet.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {admin.zcard(keys.done)} of {runs} runs completed within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def run_times(admin: redis.Redis, keys: Keys, steps: int) -> list[tuple[int, int]]:
    """(created_ms, finished_ms) of every run, after checking each completed with exactly ``steps`` commits.

    A benchmark that silently lost or duplicated steps would report a meaningless number.
    """
    ids: list[str] = admin.zrange(keys.done, 0, -1)  # type: ignore[assignment]
    pipe = admin.pipeline(transaction=False)
    for run_id in ids:
        pipe.hmget(keys.run(run_id).run, "status", "seq", "created_ms", "finished_ms")
    out = []
    for run_id, (status, seq, created, finished) in zip(ids, pipe.execute(), strict=True):
        if status != "completed" or int(seq) != steps:
            raise RuntimeError(f"run {run_id} ended {status} after {seq} committed steps, expected {steps}")
        out.append((int(created), int(finished)))
    return out


def redis_cpu_s(admin: redis.Redis) -> float:
    """CPU seconds redis-server has used: with the children's CPU, it shows on which side the time goes."""
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def per_step_us(before: float | None, after: float | None, total_steps: int) -> float | None:
    """CPU microseconds per step over the timed window; per step so configurations compare directly."""
    if before is None or after is None:
        return None
    return (after - before) / total_steps * 1e6


def measure(bench: Bench, config: str, repeat: int, consumer_args: Sequence[Sequence[str]]) -> Sample:
    """Start the consumers, submit, wait for completion, and stop the consumers again."""
    opts = bench.options
    bench.admin.flushdb()  # every measurement starts on an empty keyspace
    settings = bench.fresh_settings()
    keys = Keys(settings.namespace)
    env = child_env(settings, opts.steps)
    total = opts.runs * opts.steps
    with Fleet(bench.log_dir) as fleet, Client(settings) as client:
        for i, args in enumerate(consumer_args):
            fleet.spawn(f"r{repeat}-{config.replace(' ', '_')}-{i}", args, env)
        wait_registered(bench.admin, keys, len(consumer_args), fleet)
        cpu_before = (fleet.cpu_s(), redis_cpu_s(bench.admin))
        start = time.perf_counter()
        submit_runs(client, bench.flow, opts.runs)
        submitted = time.perf_counter()
        end = wait_done(bench.admin, keys, opts.runs, fleet, timeout_s=60 + total / 50)
        cpu_after = (fleet.cpu_s(), redis_cpu_s(bench.admin))
    times = run_times(bench.admin, keys, opts.steps)
    latencies = [finished - created for created, finished in times]
    span_ms = max(f for _, f in times) - min(c for c, _ in times)
    return Sample(
        config=config,
        repeat=repeat,
        runs=opts.runs,
        steps=opts.steps,
        submit_s=submitted - start,
        elapsed_s=end - start,
        steps_per_s=total / (end - start),
        server_span_s=span_ms / 1000,
        latency_p50_ms=percentile(latencies, 0.50),
        latency_p99_ms=percentile(latencies, 0.99),
        consumer_cpu_us_per_step=per_step_us(cpu_before[0], cpu_after[0], total),
        redis_cpu_us_per_step=per_step_us(cpu_before[1], cpu_after[1], total),
    )


def configurations(with_async: bool = False) -> list[tuple[str, list[list[str]]]]:
    """(name, consumer command lines) in the interleaving order of one repetition."""
    raw = [(f"raw {mode}", [["bench.throughput", "--raw-consumer", mode]]) for mode in RAW_MODES]
    worker = ["orchestrator", "worker", "bench.flows:noop", "--concurrency", str(CONCURRENCY)]
    ours = [(f"ours x{n}", [worker] * n) for n in WORKER_COUNTS]
    if with_async:
        worker_async = ["orchestrator", "worker", "bench.flows:noop_async", "--concurrency", str(CONCURRENCY)]
        ours += [(f"ours x{n} async", [worker_async] * n) for n in WORKER_COUNTS]
    return raw + ours


# -- the raw consumer (child process) ---------------------------------------------------------


def now_ms() -> int:
    """Wall-clock ms, as the worker stamps ``start_ms``/``end_ms`` into records and events."""
    return int(time.time() * 1000)


class RawConsumer:
    """The worker's Redis traffic per step, and nothing else: no asyncio, no threads, no pydantic, no heartbeats.

    It sends the very calls the worker builds (``Store.claim``, ``Store.commit``, ``Store.ack``,
    run by ``scripts.execute``) with the same arguments the worker would pass, so the gap
    between this and ``ours`` is what our Python side costs.
    """

    def __init__(self, settings: Settings, flow: Workflow[Empty], batch: int) -> None:
        assert settings.redis_url
        self.settings = settings
        self.flow = flow
        self.batch = batch
        self.redis = connect(settings.redis_url)
        self.keys = Keys(settings.namespace)
        self.store = Store(self.keys)
        self.queue = flow.queue
        self.stream = self.keys.queue(flow.queue).stream
        self.id = f"raw-{socket.gethostname()}-{os.getpid()}"
        self.counts: Counter[str] = Counter()
        self.stopping = False

    def register(self) -> None:
        """Create the consumer group like the worker does, then appear in the workers zset (the readiness signal)."""
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists already
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        self.redis.zadd(self.keys.workers, {self.id: now_ms()})

    def read(self) -> list[tuple[str, Dispatch]]:
        """XREADGROUP as the worker issues it; entries are trusted (``model_construct``: no validation)."""
        block = self.settings.block_ms
        reply: StreamReply | None = self.redis.xreadgroup(  # type: ignore[assignment]
            GROUP, self.id, {self.stream: ">"}, count=self.batch, block=block
        )
        out = []
        for _stream, entries in reply or []:
            for entry_id, f in entries:
                d = Dispatch.model_construct(run=f["run"], wf=f["wf"], step=f["step"], visit=int(f["visit"]))
                out.append((entry_id, d))
        return out

    def claim(self, entry_id: str, d: Dispatch) -> Call:
        """The claim the worker builds in ``Worker._start``: same token scheme, lease and crash limit."""
        return self.store.claim(
            dispatch=d,
            entry_id=entry_id,
            token=claim_token(self.id, entry_id),
            worker=self.id,
            lease_ms=self.settings.lease_ms,
            max_crashes=self.settings.max_crashes,
        )

    def commit(self, entry_id: str, d: Dispatch, claimed: Claimed, start_ms: int) -> Call:
        """The commit the worker would send for a step that returned None: next step in order, empty update."""
        end_ms = now_ms()
        next_step = self.flow.step_after(d.step)
        meta = {"step": d.step, "visit": d.visit, "attempt": claimed.attempt, "fence": claimed.fence}
        meta |= {"worker": self.id, "start_ms": start_ms, "end_ms": end_ms}
        record = json.dumps({**meta, "update": {}, "next": next_step, "cost": {}}, separators=(",", ":"))
        return self.store.commit(
            dispatch=d,
            queue=self.queue,
            token=claim_token(self.id, entry_id),
            record=record,
            event=json.dumps(meta, separators=(",", ":")),
            next_step=next_step,
            duration_ms=end_ms - start_ms,
            state={},
        )

    def ack(self, entry_ids: list[str]) -> list[Call]:
        """The worker's ack of its own entries, so the raw loop keeps sending what the worker sends.

        ``Store.ack_owned`` (ack.lua: XACK+XDEL of entries still pending for this consumer) where
        the store has it, else ``Store.ack`` (a plain XACK and XDEL).
        """
        owned = getattr(self.store, "ack_owned", None)
        if owned is not None:
            return [owned(self.queue, self.id, entry_ids)]
        return self.store.ack(self.queue, entry_ids)

    def tally(self, replies: Sequence[Any]) -> None:
        """Count commit outcomes, so a log shows whether anything but OK happened."""
        for reply in replies:
            self.counts[f"commit_{Outcome.parse(reply).code}"] += 1

    def run_batched(self, batch: list[tuple[str, Dispatch]]) -> None:
        """Two round trips for the whole batch: all claims, then all commits with the ack of the batch."""
        claims = scripts.execute(self.redis, [self.claim(eid, d) for eid, d in batch])
        start = now_ms()
        commits = []
        for (eid, d), reply in zip(batch, claims, strict=True):
            claimed = Claimed.parse(reply)
            if claimed.code == "RUN":
                commits.append(self.commit(eid, d, claimed, start))
            else:
                self.counts[f"claim_{claimed.code}"] += 1
        replies = scripts.execute(self.redis, [*commits, *self.ack([eid for eid, _ in batch])])
        self.tally(replies[: len(commits)])

    def run_unbatched(self, batch: list[tuple[str, Dispatch]]) -> None:
        """One round trip per call: claim, commit, then the ack (one call, or the XACK+XDEL pair of ``Store.ack``)."""
        for eid, d in batch:
            claimed = Claimed.parse(scripts.execute(self.redis, [self.claim(eid, d)])[0])
            if claimed.code == "RUN":
                self.tally(scripts.execute(self.redis, [self.commit(eid, d, claimed, now_ms())]))
            else:
                self.counts[f"claim_{claimed.code}"] += 1
            scripts.execute(self.redis, self.ack([eid]))

    def serve(self) -> None:
        """Consume until SIGTERM; the flag is checked between reads (at most ``block_ms`` late)."""
        handle = self.run_batched if self.batch > 1 else self.run_unbatched
        while not self.stopping:
            batch = self.read()
            if batch:
                handle(batch)
                self.counts["batches"] += 1

    def close(self) -> None:
        """Deregister and leave the tallies in the log, so an odd outcome can be checked afterwards."""
        self.redis.zrem(self.keys.workers, self.id)
        self.redis.close()
        print(json.dumps({"consumer": self.id, **self.counts}), flush=True)


def raw_consumer_main(mode: str) -> int:
    """Entry point of the child: settings from ORCHESTRATOR_* like a worker, stop on SIGTERM."""
    consumer = RawConsumer(Settings(), make_noop(steps_from_env()), RAW_BATCH if mode == "batched" else 1)

    def stop(signum: int, frame: FrameType | None) -> None:
        consumer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer.register()
    try:
        consumer.serve()
    finally:
        consumer.close()
    return 0


# -- environment and report -------------------------------------------------------------------


def package_version(name: str) -> str | None:
    """Installed version of ``name``, None when absent (hiredis is optional and changes the numbers)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit measured, with ``-dirty`` when the work tree differs: numbers belong to code."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(admin: redis.Redis) -> dict[str, Any]:
    """Versions and machine facts, so a number can be traced to what produced it."""
    info = admin.info("server")
    return {
        "redis_server": info.get("redis_version"),
        "redis_py": redis.__version__,
        "hiredis": package_version("hiredis"),
        "pydantic": package_version("pydantic"),
        "orchestrator": orchestrator.__version__,
        "git_commit": git_commit(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def bench_settings(options: Options, block_ms: int) -> dict[str, Any]:
    """Everything that shapes the numbers besides the machine, for the JSON."""
    return {
        "runs": options.runs,
        "steps": options.steps,
        "repeat": options.repeat,
        "quick": options.quick,
        "worker_concurrency": CONCURRENCY,
        "worker_processes": list(WORKER_COUNTS),
        "raw_batch_count": RAW_BATCH,
        "block_ms": block_ms,
        "poll_interval_s": POLL_S,
        "redis_persistence": "off (appendonly no, save '')",
        "step": "def returning None (the worker runs it on a thread); 'async' rows: async def",
        "raw_ack": "Store.ack_owned (ack.lua)" if hasattr(Store, "ack_owned") else "Store.ack (XACK + XDEL)",
        "order": [name for name, _ in configurations(options.with_async)],
    }


def median_or_none(values: Iterable[float | None]) -> float | None:
    """Median of the known values; CPU figures are unknown where /proc is missing."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """One row per configuration: medians and ranges over the repetitions, ratio to raw batched."""
    rows: list[dict[str, Any]] = []
    for name, _ in configurations(with_async=True):
        mine = [s for s in samples if s.config == name]
        if not mine:
            continue
        rates = [s.steps_per_s for s in mine]
        rows.append(
            {
                "config": name,
                "steps_per_s_median": statistics.median(rates),
                "steps_per_s_min": min(rates),
                "steps_per_s_max": max(rates),
                "submit_s_median": statistics.median(s.submit_s for s in mine),
                "latency_p50_ms_median": statistics.median(s.latency_p50_ms for s in mine),
                "latency_p99_ms_median": statistics.median(s.latency_p99_ms for s in mine),
                "consumer_cpu_us_per_step_median": median_or_none(s.consumer_cpu_us_per_step for s in mine),
                "redis_cpu_us_per_step_median": median_or_none(s.redis_cpu_us_per_step for s in mine),
            }
        )
    base = next((r["steps_per_s_median"] for r in rows if r["config"] == "raw batched"), None)
    for row in rows:
        row["ratio_to_raw_batched"] = row["steps_per_s_median"] / base if base else None
    return rows


def fmt(value: float | None) -> str:
    """A whole number with thousands separators, or "-" for unknown."""
    return "-" if value is None else f"{value:,.0f}"


def markdown_table(rows: Sequence[dict[str, Any]], options: Options) -> str:
    """The summary as a markdown table, ready to paste into bench/README.md."""
    lines = [
        f"{options.runs} runs x {options.steps} steps, median of {options.repeat} [min-max]",
        "",
        "| configuration | steps/s | ratio to raw batched | submit s | run latency p50 / p99 ms "
        "| CPU µs/step consumer / redis |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = f"{r['steps_per_s_median']:,.0f} [{r['steps_per_s_min']:,.0f}-{r['steps_per_s_max']:,.0f}]"
        ratio = f"{r['ratio_to_raw_batched']:.2f}" if r["ratio_to_raw_batched"] else "-"
        lat = f"{r['latency_p50_ms_median']:,.0f} / {r['latency_p99_ms_median']:,.0f}"
        cpu = f"{fmt(r['consumer_cpu_us_per_step_median'])} / {fmt(r['redis_cpu_us_per_step_median'])}"
        lines.append(f"| {r['config']} | {rate} | {ratio} | {r['submit_s_median']:.3f} | {lat} | {cpu} |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def warm_scripts(admin: redis.Redis) -> None:
    """Load every script up front, so no configuration pays the one-time NOSCRIPT round trip."""
    for name in scripts.names():
        admin.script_load(scripts.load(name).source)


def run_all(bench: Bench) -> None:
    """Repetitions interleaved (raw batched, raw unbatched, ours x1, ours x2, again), so drift hits all alike."""
    for repeat in range(1, bench.options.repeat + 1):
        for name, consumers in configurations(bench.options.with_async):
            sample = measure(bench, name, repeat, consumers)
            bench.samples.append(sample)
            print(
                f"  repeat {repeat} {name:14} {sample.steps_per_s:8,.0f} steps/s  "
                f"elapsed {sample.elapsed_s:6.3f} s  submit {sample.submit_s:5.3f} s  "
                f"p50/p99 {sample.latency_p50_ms:,.0f}/{sample.latency_p99_ms:,.0f} ms  "
                f"CPU µs/step {fmt(sample.consumer_cpu_us_per_step)}/{fmt(sample.redis_cpu_us_per_step)}",
                flush=True,
            )


@contextlib.contextmanager
def private_server(data_dir: Path, binary: str | None) -> Iterator[RedisServer]:
    """A redis-server of our own, persistence off; stopped on the way out whatever happened."""
    server = RedisServer(data_dir, appendfsync=None, binary=binary)
    try:
        yield server.start()
    finally:
        server.stop()


class Interrupt:
    """Whether we were told to stop: Ctrl-C also reaches redis-server and the children (same process
    group), so the first error the main loop sees may be a dropped connection rather than the signal."""

    signum = 0

    @classmethod
    def handler(cls, signum: int, frame: FrameType | None) -> None:
        """SIGINT/SIGTERM/SIGHUP unwind the stack, so the ``finally`` blocks stop the children and the server."""
        cls.signum = signum
        for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        raise KeyboardInterrupt


def benchmark(options: Options) -> tuple[dict[str, Any], list[Sample]]:
    """All measurements on one private server, which is gone again when this returns (or raises)."""
    with (
        tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp,
        private_server(Path(tmp) / "redis", options.redis_server) as server,
    ):
        admin = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            warm_scripts(admin)
            env = {**environment(admin), "redis_server_binary": server.binary}
            print(f"redis-server {env['redis_server']} ({server.binary}), {env['python']}, {env['cpu_count']} CPUs")
            print(f"load average at start: {env['loadavg_at_start']}")
            bench = Bench(options, server.url, admin, Path(tmp), make_noop(options.steps))
            run_all(bench)
            env["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        finally:
            admin.close()
    return env, bench.samples


def write_json(path: Path, env: dict[str, Any], options: Options, rows: Any, samples: Sequence[Sample]) -> None:
    """Everything needed to compare two runs later: environment, settings, summary and every sample."""
    doc = {
        "environment": env,
        "settings": bench_settings(options, Settings.model_fields["block_ms"].default),
        "summary": rows,
        "samples": [asdict(s) for s in samples],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run every configuration against a private server, print the table, optionally write JSON."""
    options, raw_mode = parse_args(argv)
    if raw_mode:
        return raw_consumer_main(raw_mode)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, Interrupt.handler)
    env, samples = benchmark(options)
    rows = summarize(samples)
    print()
    print(markdown_table(rows, options))
    if options.json_path:
        write_json(options.json_path, env, options, rows, samples)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, redis.ConnectionError):
        if not Interrupt.signum:
            raise
        print(f"interrupted by signal {Interrupt.signum}; children and redis-server stopped", file=sys.stderr)
        sys.exit(128 + Interrupt.signum)
