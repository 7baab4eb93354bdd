"""What one committed step costs Redis: our stack against the minimal durable step, same server, same chains.

``python -m bench.stepcost [--chains 500] [--steps 10] [--workers 2] [--paced-runs 30] [--no-monitor]
[--quick] [--json [PATH]] [--redis-server BIN]``

The "before" baseline of issue 11 (a leaner step). One private redis-server (persistence
off); every figure is per committed step, and the ratios are taken within the run:

- **ours**: ``--chains`` x ``--steps`` no-op steps (``bench.flows:noop``, as in
  :mod:`bench.throughput`) through ``--workers`` real ``orchestrator worker`` processes
  (``--concurrency 64``) and one ``orchestrator supervisor``, submitted back to back by one
  client. ``CONFIG RESETSTAT`` just before the first submit; ``INFO commandstats`` and
  ``INFO cpu`` (the server's user + sys) as soon as the last run is done; the CPU of the worker
  and supervisor process trees from /proc around the same window.
- **ours, attribution pass**: the same workload once more with a ``MONITOR`` connection, which
  marks every command with who issued it: a client (``EVALSHA`` counted as one command, by
  script name) or a script (``[lua]``). Redis' ``commandstats`` counts both (an ``EVALSHA`` and
  every command inside it), so this pass is what splits the total; its own timings and CPU are
  not used (MONITOR slows Redis down).
- **ours, timing pass**: the same workload once more with ``SLOWLOG`` logging every command's
  execution time (threshold 0): each script's µs per call (an ``EVALSHA``'s time includes the
  commands it runs), beside the µs of the commands scripts run in the same pass (commandstats);
  the rest of a script's time is Lua and the calls into Redis around its commands. Skipped with
  ``--no-monitor`` too.
- **minimal**: :mod:`bench.minimal`, one redis-py client: ``XREADGROUP COUNT 100``, then one
  ``MULTI``/``EXEC`` per batch with, per entry, ``HSETNX`` of the result under ``{run}:{step}``,
  ``XADD`` of the next step (unless last) and ``XACK``. The same chains are seeded (one ``XADD``
  of each chain's first step) back to back, and measured the same way.
- **paced**: ``--paced-runs`` chains, one every 0.1 s (low load: one run at a time), through one
  worker (as the paced row of :mod:`bench.throughput`, whose recipe :func:`bench.measure.measure_ours`
  is reused here; once with plain ``def`` steps, run on the worker's step threads, once with
  ``async def`` steps, run on its event loop), through :mod:`bench.raw`'s batched loop (our
  scripts from a plain loop) and through the minimal loop; end-to-end p50 / p99 and the ratios.

The benchmark's own commands (the polls that wait for the end, ``INFO``, ``CONFIG``) are left
out of every count.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from bench import minimal
from bench.common import (
    Server,
    add_common_args,
    bench_server,
    command_stats,
    fmt,
    fmt_ratio,
    json_path,
    markdown,
    percentile,
    print_and_save,
    ratio,
    redis_cpu_s,
    run_main,
)
from bench.flows import STEPS, STEPS_ENV, make_noop
from bench.measure import Shape, measure_ours, run_finish_ms, submit_all
from bench.procs import POLL_S, Child, Fleet, child_env, proc_cpu_s, tree_pids, wait_registered, wait_until, worker_args
from bench.raw import consumer_args
from orchestrator import Client, Settings, scripts
from orchestrator.keys import Keys

CONCURRENCY = 64  # per worker, as bench.throughput runs them
TOP = 14  # commands listed one by one in the tables; the rest in one row
CONTAINERS = frozenset({"xinfo", "xgroup", "config", "client", "script", "object", "memory", "command", "function"})


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON next to the results."""

    chains: int
    steps: int
    workers: int
    paced_runs: int
    paced_interval_s: float
    monitor: bool
    quick: bool
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick`` only changes the defaults of sizes not given)."""
    parser = argparse.ArgumentParser(prog="python -m bench.stepcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=None, help="chains per load pass [500; 40 with --quick]")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"no-op steps per chain [{STEPS}]")
    parser.add_argument("--workers", type=int, default=2, help="our worker processes [2]")
    parser.add_argument("--paced-runs", type=int, default=None, help="chains per paced row [30; 5 with --quick]")
    parser.add_argument("--paced-interval-s", type=float, default=0.1, help="one chain every ... s when paced [0.1]")
    parser.add_argument("--no-monitor", action="store_true", help="skip the attribution pass (MONITOR)")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    chains = ns.chains if ns.chains is not None else (40 if ns.quick else 500)
    paced = ns.paced_runs if ns.paced_runs is not None else (5 if ns.quick else 30)
    if chains < 1 or ns.steps < 1 or ns.workers < 1 or paced < 1:
        parser.error("--chains, --steps, --workers and --paced-runs must be at least 1")
    return Options(
        chains=chains,
        steps=ns.steps,
        workers=ns.workers,
        paced_runs=paced,
        paced_interval_s=ns.paced_interval_s,
        monitor=not ns.no_monitor,
        quick=ns.quick,
        json_path=json_path(ns.json, "stepcost") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )


# -- the benchmark's own connection, and MONITOR ----------------------------------------------


class Poll:
    """The benchmark's connection for waiting on the end of a pass: one connection, and every
    command it sends counted, so that they can be taken out of Redis' counts."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True, single_connection_client=True)
        self.addr = str(self.redis.client_info()["addr"])  # connects now, before any counting starts
        self.sent: Counter[str] = Counter()

    def call(self, name: str, *args: Any) -> Any:
        """One command (``"XINFO GROUPS"`` for a subcommand, so redis-py parses the reply), counted under
        Redis' name for it (``xinfo|groups``)."""
        self.sent[name.lower().replace(" ", "|")] += 1
        return self.redis.execute_command(name, *args)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.redis.close()


def quoted(text: str, start: int) -> tuple[str, int]:
    """The quoted token of a MONITOR line starting at or after ``start`` (names and SHAs: no escapes)."""
    first = text.find('"', start)
    if first < 0:
        return "", len(text)
    end = text.find('"', first + 1)
    return text[first + 1 : end], end + 1


class CommandTap(threading.Thread):
    """``MONITOR`` on a socket of its own: every command Redis runs, counted by who issued it.

    A line reads ``+<time> [<db> <client address>] "CMD" "arg" ...``, or ``[<db> lua]`` for a
    command a script ran. ``EVALSHA`` lines are also counted by script (SHA -> name). Commands
    from ``ignore`` addresses (the benchmark's own connections) are left out.

    Redis runs one command at a time and a script to its end, so the ``[lua]`` lines that
    follow an ``EVALSHA`` line are that script's commands, provided the server writes the
    ``EVALSHA`` line before the commands it runs (Redis 7.0 does): :meth:`begin` checks that
    order with a probe script and the per-script split is only kept when it holds.
    :meth:`finish` sends a marker through ``admin`` and stops once the tap has seen it, so
    every command before it is counted.
    """

    def __init__(self, url: str, ignore: set[str]) -> None:
        super().__init__(name="monitor-tap", daemon=True)
        parsed = urlparse(url)
        self.sock = socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379))
        self.sock.sendall(b"MONITOR\r\n")
        self.ignore = ignore
        self.marker = f"bench-tap-end-{uuid.uuid4().hex}"
        self.probe = f"bench-tap-probe-{uuid.uuid4().hex}"
        self.shas = {scripts.load(name).sha: name for name in scripts.names()}
        self.sent: Counter[str] = Counter()
        self.in_scripts: Counter[str] = Counter()
        self.by_script: Counter[str] = Counter()
        self.inside: dict[str, Counter[str]] = {}  # script -> commands it ran
        self.current = ""  # the script whose commands the next [lua] lines are
        self.ordered: bool | None = None  # EVALSHA line before its commands (None: not probed yet)
        self.probed = threading.Event()
        self.lines = 0
        self.done = threading.Event()
        self.start()

    def begin(self, admin: redis.Redis, timeout_s: float = 10.0) -> None:
        """Run the probe script through ``admin`` until the tap has seen its command (a probe
        sent before Redis handled the tap's MONITOR is not shown: it is sent again)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            admin.eval("return redis.call('EXISTS', KEYS[1])", 1, self.probe)
            if self.probed.wait(0.5):
                return
        raise RuntimeError(f"MONITOR did not show the probe script within {timeout_s:.0f} s")

    def run(self) -> None:
        rest = b""
        try:
            while not self.done.is_set():
                data = self.sock.recv(1 << 20)
                if not data:
                    return
                *lines, rest = (rest + data).split(b"\r\n")
                for line in lines:
                    self.count(line.decode("utf-8", "replace"))
        except OSError:
            return

    def count(self, line: str) -> None:
        """Count one MONITOR line (``+OK`` and other replies are not commands)."""
        open_at = line.find(" [")
        close_at = line.find("] ", open_at)
        if not line.startswith("+") or open_at < 0 or close_at < 0:
            return
        source = line[open_at + 2 : close_at].split(" ", 1)[-1]
        name, after = quoted(line, close_at)
        name = name.lower()
        if name in CONTAINERS:
            sub, after = quoted(line, after)
            name = f"{name}|{sub.lower()}"
        if source == "lua":
            self.script_command(name, line)
            return
        self.current = ""
        if source in self.ignore:
            if name == "eval" and self.probe in line:
                self.current = "probe"
            elif name == "echo" and self.marker in line:
                self.done.set()
            return
        self.lines += 1
        self.sent[name] += 1
        if name == "evalsha":
            sha, _ = quoted(line, after)
            self.current = self.shas.get(sha, sha[:12])
            self.by_script[self.current] += 1

    def script_command(self, name: str, line: str) -> None:
        """A command run by a script: counted, and put down to the script whose EVALSHA came last."""
        if self.probe in line:
            self.ordered = self.current == "probe"
            self.probed.set()
            return
        self.lines += 1
        self.in_scripts[name] += 1
        self.inside.setdefault(self.current or "?", Counter())[name] += 1

    def finish(self, admin: redis.Redis, timeout_s: float = 30.0) -> None:
        """Mark the end through ``admin`` (an ignored connection), wait until the tap read up to it, close."""
        admin.echo(self.marker)
        self.join(timeout_s)
        if not self.done.is_set():
            raise RuntimeError(f"MONITOR did not deliver the end marker within {timeout_s:.0f} s")
        self.sock.close()


# -- one load pass ----------------------------------------------------------------------------


def tree_cpu_s(child: Child) -> float:
    """User+system CPU seconds of one child's process tree so far (clock ticks: 10 ms resolution)."""
    return sum(filter(None, (proc_cpu_s(pid) for pid in tree_pids(child.popen.pid))))


def thread_cpu_s(child: Child) -> float:
    """CPU seconds of a single-threaded child to the µs (the scheduler's ``se.sum_exec_runtime``, in ms):
    the minimal loop spends well under a second per pass, where 10 ms ticks would be too coarse."""
    try:
        text = Path(f"/proc/{child.popen.pid}/sched").read_text()
    except OSError:
        return tree_cpu_s(child)
    for line in text.splitlines():
        if line.startswith("se.sum_exec_runtime"):
            return float(line.split(":")[1]) / 1000
    return tree_cpu_s(child)


@dataclass
class Window:
    """What Redis and the processes did between two points of a pass."""

    redis_cpu_s: float
    consumer_cpu_s: float
    supervisor_cpu_s: float
    elapsed_s: float


class Meter:
    """CPU of Redis and of the given child process trees, read at the start and the end of a window."""

    def __init__(
        self,
        admin: redis.Redis,
        consumers: Sequence[Child],
        supervisors: Sequence[Child] = (),
        consumer_cpu: Callable[[Child], float] = tree_cpu_s,
    ) -> None:
        self.admin, self.consumers, self.supervisors = admin, list(consumers), list(supervisors)
        self.consumer_cpu = consumer_cpu
        self.start = self.read()

    def read(self) -> tuple[float, float, float, float]:
        return (
            redis_cpu_s(self.admin),
            sum(self.consumer_cpu(c) for c in self.consumers),
            sum(tree_cpu_s(c) for c in self.supervisors),
            time.perf_counter(),
        )

    def stop(self) -> Window:
        end = self.read()
        return Window(*(b - a for a, b in zip(self.start, end, strict=True)))


def per_step(calls: Counter[str], steps: int) -> dict[str, float]:
    """Calls per committed step, most called first."""
    return {name: n / steps for name, n in sorted(calls.items(), key=lambda kv: (-kv[1], kv[0])) if n}


def load_figures(window: Window, calls: Counter[str], steps: int) -> dict[str, Any]:
    """The per-step figures of one load pass."""
    return {
        "steps": steps,
        "elapsed_s": window.elapsed_s,
        "steps_per_s": steps / window.elapsed_s,
        "commands_per_step": sum(calls.values()) / steps,
        "redis_cpu_us_per_step": window.redis_cpu_s / steps * 1e6,
        "consumer_cpu_us_per_step": window.consumer_cpu_s / steps * 1e6,
        "supervisor_cpu_us_per_step": window.supervisor_cpu_s / steps * 1e6,
        "calls": dict(calls),
        "calls_per_step": per_step(calls, steps),
    }


def ours_load(server: Server, options: Options, *, tap: bool, slowlog: bool = False) -> dict[str, Any]:
    """Our workers and a supervisor on ``chains`` x ``steps`` no-op steps; every run checked
    afterwards. ``tap``: the attribution pass (MONITOR); ``slowlog``: the timing pass (SLOWLOG)."""
    server.admin.flushdb()
    settings = Settings(redis_url=server.url, namespace=f"cost-{uuid.uuid4().hex[:10]}")
    keys = Keys(settings.namespace, settings.partitions)
    env = child_env(settings, server.url, {STEPS_ENV: str(options.steps)})
    flow = make_noop(options.steps)
    run_ids = [f"r{i:05d}" for i in range(options.chains)]
    total = options.chains * options.steps
    label = "tap" if tap else "slowlog" if slowlog else "ours"
    poll = Poll(server.url)
    try:
        with Fleet(server.log_dir) as fleet, Client(settings) as client:
            workers = [
                fleet.spawn_module(f"cost-{label}-w{i}", worker_args("bench.flows:noop", CONCURRENCY), env)
                for i in range(options.workers)
            ]
            supervisor = fleet.spawn_module(f"cost-{label}-sup", ["orchestrator", "supervisor"], env)
            wait_registered(server.admin, keys, options.workers, fleet)
            wait_until(lambda: bool(server.admin.exists(keys.leader)), 30, "the supervisor leading", fleet)
            client.redis.ping()  # the submitter's connection is open before the counting starts
            monitor = CommandTap(server.url, {poll.addr, admin_addr(server.admin)}) if tap else None
            if monitor is not None:
                monitor.begin(server.admin)
            if slowlog:
                slowlog_begin(server.admin, total)
            server.admin.config_resetstat()
            meter = Meter(server.admin, workers, [supervisor])
            for run_id in run_ids:
                client.submit(flow, run_id=run_id)
            until(
                lambda: sum(int(poll.call("ZCARD", p.done)) for p in keys.parts) >= options.chains,
                60 + total / 50,
                fleet,
            )
            window = meter.stop()
            stats = command_stats(server.admin)
            calls = Counter({name: v["calls"] for name, v in stats.items()}) - poll.sent
            if monitor is not None:
                monitor.finish(server.admin)
            timing = slowlog_timing(server.admin, total) if slowlog else None
        run_finish_ms(server.admin, keys, run_ids, options.steps)  # every run completed with exactly `steps` commits
    finally:
        poll.close()
    out = load_figures(window, calls, total) | {"usec": {name: v["usec"] for name, v in stats.items()}}
    out["script_time"] = script_time(out["usec"], total)
    if monitor is not None:
        out["attribution"] = {
            "sent_per_step": per_step(monitor.sent, total),
            "in_scripts_per_step": per_step(monitor.in_scripts, total),
            "evalsha_by_script_per_step": per_step(monitor.by_script, total),
            "sent": dict(monitor.sent),
            "in_scripts": dict(monitor.in_scripts),
            "evalsha_by_script": dict(monitor.by_script),
            "evalsha_line_first": monitor.ordered,
            "inside_by_script": {k: dict(v) for k, v in monitor.inside.items()} if monitor.ordered else None,
            "monitor_lines": monitor.lines,
        }
    if timing is not None:
        inside = {name: us / total for name, us in out["usec"].items() if name not in NOT_IN_SCRIPTS}
        out["slowlog"] = {"scripts": timing, "inside_us_per_step": dict(sorted(inside.items(), key=lambda kv: -kv[1]))}
    return out


def slowlog_begin(admin: redis.Redis, steps: int) -> None:
    """Log every command's execution time (SLOWLOG with a threshold of 0), for :func:`slowlog_timing`."""
    admin.config_set("slowlog-max-len", max(128, steps * 40))
    admin.config_set("slowlog-log-slower-than", 0)
    admin.slowlog_reset()


def slowlog_timing(admin: redis.Redis, steps: int) -> dict[str, dict[str, float]]:
    """Each script's µs per call and per step, from the SLOWLOG of the timing pass (an EVALSHA's
    time includes its commands'). Logging every command slows each one a little, so these read
    as shares more than as the measured pass's times. Puts the defaults back. (The commands a
    script runs are logged too, but only Redis marks them, with no client address; Valkey logs
    them under the caller's: their time comes from commandstats instead, :func:`script_time`.)"""
    shas = {scripts.load(name).sha: name for name in scripts.names()}
    by_script: dict[str, list[int]] = {}
    for entry in admin.slowlog_get(-1):
        words = entry["command"].decode("utf-8", "replace").split(" ", 2)
        if words[0].lower() == "evalsha" and len(words) > 1:
            calls_us = by_script.setdefault(shas.get(words[1], words[1][:12]), [0, 0])
            calls_us[0] += 1
            calls_us[1] += entry["duration"]
    admin.config_set("slowlog-log-slower-than", 10000)
    admin.config_set("slowlog-max-len", 128)
    admin.slowlog_reset()
    return {
        name: {"calls_per_step": calls / steps, "us_per_call": us / calls, "us_per_step": us / steps}
        for name, (calls, us) in sorted(by_script.items(), key=lambda kv: -kv[1][1])
    }


def slowlog_table(timing: dict[str, Any]) -> str:
    """The scripts' time per call and per step, and how much of it their commands take."""
    scripts_us = sum(t["us_per_step"] for t in timing["scripts"].values())
    inside_us = sum(timing["inside_us_per_step"].values())
    rows = [
        [name, fmt(t["calls_per_step"], 3), fmt(t["us_per_call"], 1), fmt(t["us_per_step"], 1)]
        for name, t in timing["scripts"].items()
        if t["us_per_step"] >= 0.05
    ]
    rows.append(["**all scripts**", "", "", fmt(scripts_us, 1)])
    top = ", ".join(f"{name} {us:.1f}" for name, us in list(timing["inside_us_per_step"].items())[:8])
    rows.append([f"of which the commands they run ({top})", "", "", fmt(inside_us, 1)])
    headers = ["script (SLOWLOG of the timing pass)", "EVALSHA calls/step", "µs per call", "µs per step"]
    return markdown(headers, rows, right=(1, 2, 3))


# the commands our stack sends outside scripts under load (the attribution pass shows the rest at
# ~0.15 per step): every other command's time in commandstats is taken as run by a script
NOT_IN_SCRIPTS = ("evalsha", "xreadgroup")


def script_time(usec: dict[str, int], steps: int) -> dict[str, float]:
    """Redis' own timing of commands per step (commandstats µs, not CPU): the scripts (an EVALSHA's µs
    include its commands'), the commands inside them, and the difference, the cost of running Lua.

    Nearly every command but ``evalsha`` and ``xreadgroup`` comes from a script in our stack (the
    attribution pass shows ~0.15 plain commands per step), so the commands inside are taken as all
    the others.
    """
    scripts_us = usec.get("evalsha", 0)
    inside_us = sum(v for name, v in usec.items() if name not in NOT_IN_SCRIPTS)
    return {
        "evalsha_us_per_step": scripts_us / steps,
        "commands_inside_us_per_step": inside_us / steps,
        "script_overhead_us_per_step": (scripts_us - inside_us) / steps,
    }


def admin_addr(admin: redis.Redis) -> str:
    """The address of the admin connection (a benchmark's sync client uses one connection at a time)."""
    return str(admin.client_info()["addr"])


def until(predicate: Callable[[], bool], timeout_s: float, fleet: Fleet) -> float:
    """Poll every 10 ms until ``predicate`` holds (failing fast if a child died); the perf_counter time."""
    return wait_until(predicate, timeout_s, "every chain completing", fleet)


# -- the minimal durable step -----------------------------------------------------------------


class Minimal:
    """One minimal consumer child on a fresh keyspace, the seeder's connection and the end check."""

    def __init__(self, server: Server, fleet: Fleet, steps: int, name: str) -> None:
        server.admin.flushdb()
        self.server, self.steps = server, steps
        self.prefix = f"min-{uuid.uuid4().hex[:10]}"
        self.stream = minimal.stream_key(self.prefix)
        self.out = server.log_dir / f"{self.prefix}.json"
        env = child_env(None, server.url, {STEPS_ENV: str(steps)})
        env |= {minimal.URL_ENV: server.url, minimal.PREFIX_ENV: self.prefix, minimal.OUT_ENV: str(self.out)}
        self.child = fleet.spawn_module(name, ["bench.minimal"], env)
        wait_until(lambda: bool(server.admin.exists(minimal.ready_key(self.prefix))), 30, "the minimal consumer", fleet)
        self.seeder = redis.Redis.from_url(server.url, decode_responses=True)
        self.seeder.ping()

    def seed(self, run_id: str) -> None:
        """A chain's first step: one XADD, as a submit is one call."""
        self.seeder.xadd(self.stream, {"run": run_id, "step": 0})

    def done(self, poll: Poll, chains: int) -> bool:
        """Every step entry added, delivered and acked (each ack went in the EXEC that wrote its result)."""
        if poll.call("XLEN", self.stream) < chains * self.steps:
            return False
        group = next(g for g in poll.call("XINFO GROUPS", self.stream) if g["name"] == minimal.GROUP)
        last = poll.call("XINFO STREAM", self.stream)["last-generated-id"]
        return int(group["pending"]) == 0 and group["last-delivered-id"] == last

    def results(self, run_ids: Sequence[str]) -> int:
        """Step results written: one field per step of every run."""
        pipe = self.server.admin.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hlen(minimal.results_key(self.prefix, run_id))
        return sum(pipe.execute())

    def report(self) -> dict[str, Any]:
        """What the child wrote when it stopped: end times of runs and its tallies."""
        doc: dict[str, Any] = json.loads(self.out.read_text())
        return doc

    def close(self) -> None:
        self.seeder.close()


def minimal_load(server: Server, options: Options) -> dict[str, Any]:
    """The minimal loop on the same chains, measured as ours is."""
    run_ids = [f"r{i:05d}" for i in range(options.chains)]
    total = options.chains * options.steps
    poll = Poll(server.url)
    try:
        with Fleet(server.log_dir) as fleet:
            loop = Minimal(server, fleet, options.steps, "cost-minimal")
            server.admin.config_resetstat()
            meter = Meter(server.admin, [loop.child], consumer_cpu=thread_cpu_s)
            for run_id in run_ids:
                loop.seed(run_id)
            until(lambda: loop.done(poll, options.chains), 60 + total / 50, fleet)
            window = meter.stop()
            calls = Counter({name: v["calls"] for name, v in command_stats(server.admin).items()}) - poll.sent
            loop.close()
        written = loop.results(run_ids)
        if written != total:
            raise RuntimeError(f"the minimal loop wrote {written} step results, expected {total}")
        report = loop.report()
    finally:
        poll.close()
    return load_figures(window, calls, total) | {"results_written": written, "consumer": report["counts"]}


# -- paced: one run at a time -----------------------------------------------------------------


def paced_row(config: str, latencies_ms: list[float], runs: int, steps: int) -> dict[str, Any]:
    """p50 / p99 of one paced row."""
    return {
        "config": config,
        "chains": len(latencies_ms),
        "runs": runs,
        "latency_p50_ms": percentile(latencies_ms, 0.5) if latencies_ms else None,
        "latency_p99_ms": percentile(latencies_ms, 0.99) if latencies_ms else None,
        "per_step_ms": percentile(latencies_ms, 0.5) / steps if latencies_ms else None,
        "latencies_ms": latencies_ms,
    }


def minimal_paced(server: Server, shape: Shape) -> dict[str, Any]:
    """Chains seeded one every ``interval_s``; latency = the EXEC that wrote the last step - the seed."""
    run_ids = [f"p{i:05d}" for i in range(shape.runs)]
    poll = Poll(server.url)
    try:
        with Fleet(server.log_dir) as fleet:
            loop = Minimal(server, fleet, shape.steps, "cost-minimal-paced")
            submitted, _ = submit_all(shape, lambda i: loop.seed(run_ids[i]))
            until(lambda: loop.done(poll, shape.runs), 60 + shape.runs * shape.interval_s, fleet)
            loop.close()
        ends = loop.report()["ends"]
    finally:
        poll.close()
    latencies = [(ends[rid] - t) * 1000 for rid, t in zip(run_ids, submitted, strict=True) if rid in ends]
    return paced_row("minimal loop paced", latencies, shape.runs, shape.steps)


def paced(server: Server, options: Options) -> list[dict[str, Any]]:
    """Ours (one worker), our scripts from the raw loop, and the minimal loop, one chain at a time."""
    shape = Shape(options.paced_runs, options.steps, options.paced_interval_s)
    worker = tuple(worker_args("bench.flows:noop", CONCURRENCY))
    # the same chain of `async def` steps: no hand-off to a step thread and back
    worker_async = tuple(worker_args("bench.flows:noop_async", CONCURRENCY))
    consumers = (
        ("ours x1 paced", worker),
        ("ours x1 paced, async steps", worker_async),
        ("raw batched paced", tuple(consumer_args("batched"))),
    )
    rows = []
    for config, consumer in consumers:
        sample = measure_ours(server, config, 1, (consumer,), shape)
        rows.append(paced_row(config, sample.latencies_ms, shape.runs, shape.steps))
    rows.append(minimal_paced(server, shape))
    base = rows[-1]["latency_p50_ms"]
    for row in rows:
        row["ratio_to_minimal"] = ratio(row["latency_p50_ms"], base)
    return rows


# -- summary and tables -----------------------------------------------------------------------


def summarize(ours: dict[str, Any], tap: dict[str, Any] | None, mini: dict[str, Any]) -> dict[str, Any]:
    """Ratios ours / minimal per committed step."""
    sent = sum(tap["attribution"]["sent_per_step"].values()) if tap else None
    in_scripts = sum(tap["attribution"]["in_scripts_per_step"].values()) if tap else None
    return {
        "commands_per_step": {"ours": ours["commands_per_step"], "minimal": mini["commands_per_step"]},
        "commands_sent_per_step": {"ours": sent, "minimal": mini["commands_per_step"]},
        "commands_in_scripts_per_step": {"ours": in_scripts, "minimal": 0.0},
        "attribution_pass_commands_per_step": tap["commands_per_step"] if tap else None,
        "ratios": {
            "commands_per_step": ratio(ours["commands_per_step"], mini["commands_per_step"]),
            "commands_sent_per_step": ratio(sent, mini["commands_per_step"]),
            "redis_cpu_us_per_step": ratio(ours["redis_cpu_us_per_step"], mini["redis_cpu_us_per_step"]),
            "consumer_cpu_us_per_step": ratio(ours["consumer_cpu_us_per_step"], mini["consumer_cpu_us_per_step"]),
            "steps_per_s": ratio(ours["steps_per_s"], mini["steps_per_s"]),
        },
    }


def main_table(summary: dict[str, Any], ours: dict[str, Any], mini: dict[str, Any], options: Options) -> str:
    """Ours, minimal and the ratio, per committed step."""
    ratios = summary["ratios"]
    sent = summary["commands_sent_per_step"]["ours"]
    rows = [
        [
            f"ours ({options.workers} workers + supervisor)",
            fmt(ours["steps_per_s"]),
            fmt(ours["commands_per_step"], 1),
            fmt(sent, 1),
            fmt(ours["redis_cpu_us_per_step"]),
            fmt(ours["consumer_cpu_us_per_step"]) + f" (+{fmt(ours['supervisor_cpu_us_per_step'], 1)} supervisor)",
        ],
        [
            "minimal (1 client)",
            fmt(mini["steps_per_s"]),
            fmt(mini["commands_per_step"], 1),
            fmt(mini["commands_per_step"], 1),
            fmt(mini["redis_cpu_us_per_step"]),
            fmt(mini["consumer_cpu_us_per_step"]),
        ],
        [
            "ours ÷ minimal",
            fmt_ratio(ratios["steps_per_s"]),
            fmt_ratio(ratios["commands_per_step"]),
            fmt_ratio(ratios["commands_sent_per_step"]),
            fmt_ratio(ratios["redis_cpu_us_per_step"]),
            fmt_ratio(ratios["consumer_cpu_us_per_step"]),
        ],
    ]
    headers = [
        "per committed step",
        "steps/s",
        "Redis commands (commandstats: sent + run by scripts)",
        "commands sent (EVALSHA = 1; attribution pass)",
        "Redis CPU µs",
        "worker / client CPU µs",
    ]
    return markdown(headers, rows, right=(1, 2, 3, 4, 5))


def commands_table(ours: dict[str, Any], tap: dict[str, Any] | None) -> str:
    """Our top commands per step: Redis' count in the measured pass, and in the attribution pass
    split into sent by a client and run inside scripts (the two add up to that pass's count)."""
    att = tap["attribution"] if tap else {"sent_per_step": {}, "in_scripts_per_step": {}}
    tap_calls = tap["calls_per_step"] if tap else {}
    names = list(ours["calls_per_step"])
    names += [n for n in tap_calls if n not in ours["calls_per_step"]]

    def cells(label: str, group: Sequence[str]) -> list[str]:
        return [
            label,
            fmt(sum(ours["calls_per_step"].get(n, 0.0) for n in group), 2),
            fmt(sum(tap_calls.get(n, 0.0) for n in group), 2) if tap else "-",
            fmt(sum(att["sent_per_step"].get(n, 0.0) for n in group), 2) if tap else "-",
            fmt(sum(att["in_scripts_per_step"].get(n, 0.0) for n in group), 2) if tap else "-",
        ]

    rows = [cells(name, [name]) for name in names[:TOP]]
    if names[TOP:]:
        rows.append(cells(f"{len(names) - TOP} others", names[TOP:]))
    rows.append(cells("**total**", names))
    headers = [
        "command (ours)",
        "calls/step (commandstats)",
        "attribution pass: calls/step (commandstats)",
        "of which sent by a client",
        "of which run inside scripts",
    ]
    return markdown(headers, rows, right=(1, 2, 3, 4))


def scripts_table(tap: dict[str, Any], steps: int) -> str:
    """Which scripts a step calls (EVALSHA by script) and, when the server's MONITOR order allows
    it, the commands each runs, per call and per step (attribution pass)."""
    att = tap["attribution"]
    inside: dict[str, dict[str, int]] | None = att["inside_by_script"]
    rows = []
    for name, per_step_calls in att["evalsha_by_script_per_step"].items():
        calls = att["evalsha_by_script"][name]
        mine = Counter((inside or {}).get(name, {}))
        top = ", ".join(f"{cmd} {n / calls:.2g}" for cmd, n in mine.most_common(8))
        more = f", {len(mine) - 8} more" if len(mine) > 8 else ""
        rows.append(
            [
                name,
                fmt(per_step_calls, 3),
                fmt(sum(mine.values()) / calls, 1) if inside else "-",
                fmt(sum(mine.values()) / steps, 2) if inside else "-",
                top + more if inside else "-",
            ]
        )
    total_inside = sum(sum(c.values()) for c in (inside or {}).values())
    rows.append(["**all scripts**", fmt(sum(att["evalsha_by_script_per_step"].values()), 2), "", "", ""])
    if inside:
        rows[-1][3] = fmt(total_inside / steps, 2)
    headers = ["script (ours)", "EVALSHA calls/step", "commands run per call", "commands run /step", "per call"]
    return markdown(headers, rows, right=(1, 2, 3))


def minimal_table(mini: dict[str, Any]) -> str:
    """The minimal loop's commands per step (all sent by its client: it runs no script)."""
    rows = [[name, fmt(n, 2)] for name, n in mini["calls_per_step"].items()]
    rows.append(["**total**", fmt(mini["commands_per_step"], 2)])
    return markdown(["command (minimal)", "calls/step"], rows, right=(1,))


def paced_table(rows: list[dict[str, Any]]) -> str:
    return markdown(
        ["paced, one chain at a time", "chains", "latency p50 / p99 ms", "per step ms (p50/steps)", "÷ minimal (p50)"],
        [
            [
                r["config"],
                f"{r['chains']}/{r['runs']}",
                f"{fmt(r['latency_p50_ms'], 1)} / {fmt(r['latency_p99_ms'], 1)}",
                fmt(r["per_step_ms"], 2),
                fmt_ratio(r["ratio_to_minimal"]),
            ]
            for r in rows
        ],
        right=(1, 2, 3, 4),
    )


def tables(doc: dict[str, Any], options: Options) -> str:
    """Every table of the run, ready for docs/benchmarks.md."""
    ours, tap, mini = doc["ours"], doc.get("attribution_pass"), doc["minimal"]
    head = (
        f"{options.chains} chains x {options.steps} no-op steps = {options.chains * options.steps} committed steps "
        f"per pass; ours: {options.workers} workers (--concurrency {CONCURRENCY}) + 1 supervisor; "
        "minimal: one redis-py client (XREADGROUP COUNT 100, one MULTI/EXEC per batch: HSETNX + XADD + XACK per entry)"
    )
    parts = [head, main_table(doc["summary"], ours, mini, options)]
    st = ours["script_time"]
    parts += [
        f"Redis' own timing of ours (commandstats µs per step, not CPU): scripts (EVALSHA) "
        f"{fmt(st['evalsha_us_per_step'], 1)}, of which the commands they run "
        f"{fmt(st['commands_inside_us_per_step'], 1)} and running Lua around them "
        f"{fmt(st['script_overhead_us_per_step'], 1)}."
    ]
    if tap:
        parts += [
            "Ours by command. Redis' commandstats count an EVALSHA and every command the script runs, so "
            "a command's calls are what clients sent plus what scripts ran; the split comes from the "
            "attribution pass (the same workload again with MONITOR, which marks commands run by scripts).",
            commands_table(ours, tap),
            scripts_table(tap, options.chains * options.steps),
        ]
    else:
        parts += [commands_table(ours, None)]
    if doc["timing_pass"]:
        parts += [
            "Where the scripts' time goes (the same workload once more, with SLOWLOG logging every "
            "command's execution time; logging slows each command a little, so read them as shares):",
            slowlog_table(doc["timing_pass"]["slowlog"]),
        ]
    parts += [minimal_table(mini)]
    pace = f"paced: {options.paced_runs} chains x {options.steps} steps, one every {options.paced_interval_s:g} s"
    parts += [pace + "; ours and raw on 1 worker/consumer, no supervisor", paced_table(doc["paced"])]
    return "\n\n".join(parts)


def bench_settings(options: Options) -> dict[str, Any]:
    """Everything that shapes the numbers besides the machine, for the JSON."""
    return {
        **{k: v for k, v in asdict(options).items() if k != "json_path"},
        "worker_concurrency": CONCURRENCY,
        "minimal_batch": minimal.BATCH,
        "block_ms": Settings.model_fields["block_ms"].default,
        "redis_persistence": "off (appendonly no, save '')",
        "step": "ours: bench.flows:noop (def returning None, run on a thread); minimal: no step body",
        "poll_s": POLL_S,
        "excluded": "the benchmark's own polls, INFO and CONFIG commands",
    }


def run(options: Options) -> dict[str, Any]:
    """Every pass on one private server; the JSON document of the results."""
    with bench_server("stepcost", options.redis_server) as server:
        print(f"  ours: {options.chains} x {options.steps} steps ...", flush=True)
        ours = ours_load(server, options, tap=False)
        tap = timing = None
        if options.monitor:
            print("  ours again, attribution pass (MONITOR) ...", flush=True)
            tap = ours_load(server, options, tap=True)
            print("  ours again, timing pass (SLOWLOG) ...", flush=True)
            timing = ours_load(server, options, tap=False, slowlog=True)
        print("  minimal loop ...", flush=True)
        mini = minimal_load(server, options)
        print("  paced ...", flush=True)
        paced_rows = paced(server, options)
    doc: dict[str, Any] = {
        "benchmark": "stepcost",
        "environment": server.env,
        "settings": bench_settings(options),
        "ours": ours,
        "attribution_pass": tap,
        "timing_pass": timing,
        "minimal": mini,
        "paced": paced_rows,
    }
    doc["summary"] = summarize(ours, tap, mini) | {"paced": [dict(r, latencies_ms=None) for r in paced_rows]}
    doc["markdown"] = tables(doc, options)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """Run every pass, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
