"""What keeping claims alive costs Redis per second, at 100, 1,000 and 10,000 in-flight steps.

``python -m bench.liveness [--inflight 100,1000,10000] [--workers 2] [--window-s 20] [--settle-s 6]
[--quick] [--json [PATH]] [--redis-server BIN]``

The "before" baseline of issue 11 (liveness that does not grow with in-flight steps). One
private redis-server (persistence off). For each N, on a flushed database, a fresh fleet of
``--workers`` real ``orchestrator worker`` processes (``bench.flows:hold``: one ``async def``
step that awaits for an hour; ``--concurrency`` ceil(N / workers) + 8, so N steps fit with room
to spare) and one ``orchestrator supervisor``, default settings otherwise (heartbeat 1 s, lease
4 s, reclaim 0.5 s, sweep 5 s after 10 s):

1. **idle**: the fleet registered and nothing submitted; one window.
2. N one-step runs submitted; wait until every one is claimed (N entries pending in the group,
   none queued, N runs in the active index), then ``--settle-s`` more.
3. **in flight**: one window with the whole fleet.
4. **workers only**: one window with the supervisor stopped (``SIGSTOP``, then ``SIGCONT``):
   the workers' heartbeats alone; the difference to 3 is the supervisor's part.

A window is ``CONFIG RESETSTAT``, ``--window-s`` seconds of sleep, then ``INFO commandstats``
(calls; an EVALSHA and every command its script runs both count) and the ``INFO cpu`` delta
(used_cpu_user + used_cpu_sys of the server), with the CPU of the worker and supervisor process
trees from /proc over the same seconds. After the windows the fleet-wide counters must show no
lost lease (no crash, nothing re-dispatched but the entries a full worker read ahead of its
slots and handed back after a lease, told apart by their history event and reported apart).

Which script did the work is read off the commands only one script runs in this steady state:
``XRANGE`` (alive.lua: a worker's beat in one partition, reading the cancels since its last),
``XINFO CONSUMERS`` (dead_pending.lua: the supervisor's reclaim, one per lane and tick),
``HMGET`` (sweep.lua checking a claimed run that has not moved for ``sweep_after_s``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
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
    command_calls,
    fmt,
    json_path,
    markdown,
    print_and_save,
    ratio,
    redis_cpu_s,
    run_main,
)
from bench.flows import HOLD_ENV, hold
from bench.procs import (
    Child,
    Fleet,
    child_env,
    proc_cpu_s,
    stop_quietly,
    tree_pids,
    wait_registered,
    wait_until,
    worker_args,
)
from orchestrator import Client, Settings
from orchestrator.keys import GROUP, Keys

SPARE_SLOTS = 8  # per worker, beyond its share of N: a fleet with room, still reading its queue
HOLD_S = 3600  # the held step's await: far longer than a level takes; the fleet is stopped before
FINGERPRINTS = {  # command run by one script only, in this steady state -> what it shows
    "xrange": "alive.lua: one per worker, partition and beat",
    "xinfo|consumers": "dead_pending.lua: one per lane and supervisor tick",
    "hmget": "sweep.lua: claimed runs checked",
    "xpending": "own_pending.lua (workers' audits), dead_pending.lua (dead workers only)",
}
BAD_COUNTERS = ("redispatched", "crashes", "lost_entries", "dropped_entries", "repaired", "dead_workers")
HANDED_BACK = "given up by"  # redispatch.lua's event detail when a live worker gives an entry back


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON next to the results."""

    inflight: tuple[int, ...]
    workers: int
    window_s: float
    settle_s: float
    idle_settle_s: float
    quick: bool
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick`` only changes the defaults of sizes not given)."""
    parser = argparse.ArgumentParser(prog="python -m bench.liveness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inflight", default=None, help="in-flight steps per level [100,1000,10000; 50,200 quick]")
    parser.add_argument("--workers", type=int, default=2, help="worker processes [2]")
    parser.add_argument("--window-s", type=float, default=None, help="seconds per measured window [20; 3 quick]")
    parser.add_argument("--settle-s", type=float, default=None, help="wait after all are claimed [6; 1 quick]")
    parser.add_argument("--idle-settle-s", type=float, default=None, help="wait before the idle window [3; 1 quick]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    raw = ns.inflight if ns.inflight is not None else ("50,200" if ns.quick else "100,1000,10000")
    try:
        inflight = tuple(int(v) for v in raw.split(",") if v.strip())
    except ValueError:
        parser.error(f"--inflight: comma-separated integers expected, got {raw!r}")
    if not inflight or min(inflight) < 1 or ns.workers < 1:
        parser.error("--inflight values and --workers must be at least 1")
    if math.ceil(max(inflight) / ns.workers) + SPARE_SLOTS > 10_000:
        parser.error("a worker's concurrency is at most 10,000: add --workers")
    return Options(
        inflight=inflight,
        workers=ns.workers,
        window_s=ns.window_s if ns.window_s is not None else (3.0 if ns.quick else 20.0),
        settle_s=ns.settle_s if ns.settle_s is not None else (1.0 if ns.quick else 6.0),
        idle_settle_s=ns.idle_settle_s if ns.idle_settle_s is not None else (1.0 if ns.quick else 3.0),
        quick=ns.quick,
        json_path=json_path(ns.json, "liveness") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )


# -- one window -------------------------------------------------------------------------------


def cpu_s(child: Child) -> float:
    """User+system CPU seconds of one child's process tree so far."""
    return sum(filter(None, (proc_cpu_s(pid) for pid in tree_pids(child.popen.pid))))


def window(server: Server, name: str, seconds: float, workers: Sequence[Child], supervisor: Child) -> dict[str, Any]:
    """``seconds`` of the fleet doing whatever it does: Redis calls and CPU, worker and supervisor CPU, per second."""
    admin = server.admin
    admin.config_resetstat()
    before = (redis_cpu_s(admin), sum(cpu_s(w) for w in workers), cpu_s(supervisor), time.perf_counter())
    time.sleep(seconds)
    calls = command_calls(admin)
    after = (redis_cpu_s(admin), sum(cpu_s(w) for w in workers), cpu_s(supervisor), time.perf_counter())
    redis_s, workers_s, supervisor_s, elapsed = (b - a for a, b in zip(before, after, strict=True))
    return {
        "window": name,
        "seconds": elapsed,
        "commands_per_s": sum(calls.values()) / elapsed,
        "evalsha_per_s": calls.get("evalsha", 0) / elapsed,
        "redis_cpu_ms_per_s": redis_s / elapsed * 1000,
        "worker_cpu_ms_per_s": workers_s / elapsed * 1000,
        "supervisor_cpu_ms_per_s": supervisor_s / elapsed * 1000,
        "fingerprints_per_s": {name: calls.get(name, 0) / elapsed for name in FINGERPRINTS},
        "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
    }


# -- one level --------------------------------------------------------------------------------


def claimed(server: Server, keys: Keys, n: int) -> bool:
    """Every step claimed: N entries pending in the group, none waiting, N runs in the active index."""
    admin = server.admin
    pipe = admin.pipeline(transaction=False)
    for p in range(keys.partitions):
        lane = keys.queue(hold.queue, p)
        pipe.xpending(lane.stream, GROUP)
        pipe.zcard(lane.queued)
        pipe.zcard(keys.part(p).active)
    replies = pipe.execute()
    pending = sum(int(summary["pending"]) for summary in replies[0::3])
    return pending >= n and sum(replies[1::3]) == 0 and sum(replies[2::3]) >= n


def level(server: Server, n: int, options: Options) -> dict[str, Any]:
    """A fresh fleet: idle window, N steps claimed, a window with the fleet, a window with the workers only."""
    server.admin.flushdb()
    settings = Settings(redis_url=server.url, namespace=f"live-{uuid.uuid4().hex[:10]}")
    keys = Keys(settings.namespace, settings.partitions)
    # drain_grace 0: on SIGTERM a worker hands its held steps back at once instead of waiting 30 s
    env = child_env(settings, server.url, {HOLD_ENV: str(HOLD_S), "ORCHESTRATOR_DRAIN_GRACE_S": "0"})
    concurrency = math.ceil(n / options.workers) + SPARE_SLOTS
    out: dict[str, Any] = {"inflight": n, "concurrency": concurrency}
    with Fleet(server.log_dir) as fleet, Client(settings) as client:
        workers = [
            fleet.spawn_module(f"live-{n}-w{i}", worker_args("bench.flows:hold", concurrency), env)
            for i in range(options.workers)
        ]
        supervisor = fleet.spawn_module(f"live-{n}-sup", ["orchestrator", "supervisor"], env)
        wait_registered(server.admin, keys, options.workers, fleet)
        wait_until(lambda: bool(server.admin.exists(keys.leader)), 30, "the supervisor leading", fleet)
        time.sleep(options.idle_settle_s)
        out["idle"] = window(server, "idle", options.window_s, workers, supervisor)
        print(f"  {n:>6} in flight: idle window done; submitting", flush=True)
        started = time.perf_counter()
        for i in range(n):
            client.submit(hold, run_id=f"h{i:06d}")
        out["submit_s"] = time.perf_counter() - started
        done = wait_until(lambda: claimed(server, keys, n), 60 + n / 100, f"{n} steps claimed", fleet)
        out["claim_s"] = done - started
        time.sleep(options.settle_s)
        out["inflight_fleet"] = window(server, "in flight", options.window_s, workers, supervisor)
        stop_quietly(supervisor.popen.pid)
        try:
            out["inflight_workers"] = window(server, "in flight, workers only", options.window_s, workers, supervisor)
        finally:
            os.kill(supervisor.popen.pid, signal.SIGCONT)
        fleet.check_alive()
        out["still_claimed"] = claimed(server, keys, n)
        stats = client.stats()
        out["hand_backs"] = hand_backs(client.redis, keys, n)
    out["counters"] = stats
    out["leases_lost"] = sum(stats.get(k, 0) for k in BAD_COUNTERS) - out["hand_backs"]
    out |= marginal(out, n)
    print(
        f"  {n:>6} in flight: Redis CPU {fmt(out['inflight_fleet']['redis_cpu_ms_per_s'], 1)} ms/s "
        f"(idle {fmt(out['idle']['redis_cpu_ms_per_s'], 1)}), {fmt(out['inflight_fleet']['commands_per_s'])} "
        f"commands/s, leases lost {out['leases_lost']}, read-ahead entries handed back {out['hand_backs']}",
        flush=True,
    )
    return out


def hand_backs(client: redis.Redis, keys: Keys, n: int) -> int:
    """Entries a live worker read ahead of its free slots (at most one per stream per read) and
    gave back after a lease, as its steps hold their slots for an hour: the fleet's
    ``redispatched`` counter counts them with a dead worker's entries, their history event
    (redispatch.lua's "given up by") tells them apart."""
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.lrange(keys.run(f"h{i:06d}").history, 0, -1)
    events = (json.loads(raw) for history in pipe.execute() for raw in history)
    return sum(1 for e in events if e.get("type") == "redispatched" and HANDED_BACK in e.get("detail", ""))


def marginal(out: dict[str, Any], n: int) -> dict[str, Any]:
    """Per in-flight step per second: (in flight - idle) / N; the supervisor's part: fleet - workers only."""
    idle, fleet, workers = out["idle"], out["inflight_fleet"], out["inflight_workers"]

    def per_step(key: str, scale: float = 1.0) -> float:
        return float(fleet[key] - idle[key]) / n * scale

    return {
        "per_inflight": {
            "redis_cpu_us_per_s": per_step("redis_cpu_ms_per_s", 1000),
            "commands_per_s": per_step("commands_per_s"),
            "evalsha_per_s": per_step("evalsha_per_s"),
            "worker_cpu_us_per_s": per_step("worker_cpu_ms_per_s", 1000),
            "supervisor_cpu_us_per_s": per_step("supervisor_cpu_ms_per_s", 1000),
        },
        "supervisor_share": {
            "redis_cpu": share(fleet, workers, "redis_cpu_ms_per_s"),
            "commands": share(fleet, workers, "commands_per_s"),
        },
    }


def share(fleet: dict[str, Any], workers: dict[str, Any], key: str) -> float | None:
    """The supervisor's part of a figure of the whole fleet (what stopping it took away)."""
    return ratio(fleet[key] - workers[key], fleet[key])


# -- tables -----------------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def windows_table(levels: list[dict[str, Any]]) -> str:
    """Every window, per second."""
    rows = []
    for lv in levels:
        for key in ("idle", "inflight_fleet", "inflight_workers"):
            w = lv[key]
            rows.append(
                [
                    f"{lv['inflight']:,}" if key != "idle" else f"0 (fleet of the {lv['inflight']:,} level)",
                    w["window"],
                    fmt(w["commands_per_s"]),
                    fmt(w["evalsha_per_s"]),
                    fmt(w["redis_cpu_ms_per_s"], 1),
                    fmt(w["worker_cpu_ms_per_s"], 1),
                    fmt(w["supervisor_cpu_ms_per_s"], 1) if key != "inflight_workers" else "(stopped)",
                ]
            )
    headers = [
        "in flight",
        "window",
        "Redis commands/s (commandstats)",
        "of which EVALSHA/s",
        "Redis CPU ms/s",
        "workers' CPU ms/s",
        "supervisor CPU ms/s",
    ]
    return markdown(headers, rows, right=(2, 3, 4, 5, 6))


def per_step_table(levels: list[dict[str, Any]]) -> str:
    """The marginal cost of one in-flight step, per second, and the supervisor's part of it."""
    rows = [
        [
            f"{lv['inflight']:,}",
            fmt(lv["per_inflight"]["redis_cpu_us_per_s"], 1),
            fmt(lv["per_inflight"]["commands_per_s"], 2),
            fmt(lv["per_inflight"]["evalsha_per_s"], 2),
            fmt(lv["per_inflight"]["worker_cpu_us_per_s"], 1),
            fmt(lv["per_inflight"]["supervisor_cpu_us_per_s"], 1),
            f"{pct(lv['supervisor_share']['redis_cpu'])} / {pct(lv['supervisor_share']['commands'])}",
            str(lv["leases_lost"]),
            str(lv["hand_backs"]),
        ]
        for lv in levels
    ]
    headers = [
        "in flight",
        "Redis CPU µs/s per in-flight step",
        "commands/s per in-flight step",
        "EVALSHA/s per in-flight step",
        "workers' CPU µs/s per in-flight step",
        "supervisor CPU µs/s per in-flight step",
        "supervisor's part of Redis CPU / commands",
        "leases lost",
        "read-ahead entries handed back (not lost)",
    ]
    return markdown(headers, rows, right=(1, 2, 3, 4, 5, 6, 7, 8))


def fingerprints_table(levels: list[dict[str, Any]]) -> str:
    """Script calls read off the commands only one script runs here, per second."""
    rows = []
    for lv in levels:
        fleet, workers = lv["inflight_fleet"]["fingerprints_per_s"], lv["inflight_workers"]["fingerprints_per_s"]
        rows.append(
            [
                f"{lv['inflight']:,}",
                fmt(workers["xrange"]),
                fmt(fleet["xinfo|consumers"]),
                fmt(fleet["hmget"]),
                fmt(fleet["xpending"], 1),
            ]
        )
    headers = [
        "in flight",
        "worker beats per partition/s (XRANGE, workers only)",
        "reclaim: lanes checked/s (XINFO CONSUMERS)",
        "sweep: claimed runs checked/s (HMGET)",
        "XPENDING/s",
    ]
    return markdown(headers, rows, right=(1, 2, 3, 4))


def tables(levels: list[dict[str, Any]], options: Options) -> str:
    head = (
        f"{options.workers} workers (async step awaiting; concurrency ceil(N/{options.workers}) + {SPARE_SLOTS}) "
        f"+ 1 supervisor, default settings; {options.window_s:g} s windows, "
        f"the in-flight ones {options.settle_s:g} s after the last claim"
    )
    return "\n\n".join([head, windows_table(levels), per_step_table(levels), fingerprints_table(levels)])


def bench_settings(options: Options) -> dict[str, Any]:
    defaults = Settings.model_fields
    return {
        **{k: v for k, v in asdict(options).items() if k != "json_path"},
        "spare_slots": SPARE_SLOTS,
        "hold_s": HOLD_S,
        "heartbeat_interval_s": defaults["heartbeat_interval_s"].default,
        "lease_s": defaults["lease_s"].default,
        "reclaim_interval_s": defaults["reclaim_interval_s"].default,
        "sweep_interval_s": defaults["sweep_interval_s"].default,
        "sweep_after_s": defaults["sweep_after_s"].default,
        "redis_persistence": "off (appendonly no, save '')",
        "step": "bench.flows:hold, async def awaiting asyncio.sleep(hold_s)",
        "fingerprints": FINGERPRINTS,
    }


def run(options: Options) -> dict[str, Any]:
    """Every level on one private server; the JSON document of the results."""
    with bench_server("liveness", options.redis_server) as server:
        levels = [level(server, n, options) for n in options.inflight]
    summary = {
        "levels": [
            {
                "inflight": lv["inflight"],
                "idle": {k: v for k, v in lv["idle"].items() if k != "calls"},
                "inflight_fleet": {k: v for k, v in lv["inflight_fleet"].items() if k != "calls"},
                "inflight_workers": {k: v for k, v in lv["inflight_workers"].items() if k != "calls"},
                "per_inflight": lv["per_inflight"],
                "supervisor_share": lv["supervisor_share"],
                "leases_lost": lv["leases_lost"],
                "hand_backs": lv["hand_backs"],
                "still_claimed": lv["still_claimed"],
                "claim_s": lv["claim_s"],
            }
            for lv in levels
        ]
    }
    return {
        "benchmark": "liveness",
        "environment": server.env,
        "settings": bench_settings(options),
        "summary": summary,
        "markdown": tables(levels, options),
        "levels": levels,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run every level, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
