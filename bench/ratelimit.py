"""Rate limits: how closely the grants of a fleet-wide limit follow it, at the script and end to end.

``python -m bench.ratelimit [--rate 50] [--per-s 1] [--burst 1] [--callers 32] [--duration-s 20]
[--baseline-s 5] [--runs 300] [--workers 2] [--quick] [--json [PATH]] [--redis-server BIN]``

Issue 13, part 7: the rate limiter's precision (requests granted per window against the limit).
The promise (``orchestrator/ratelimit.py``, GCRA on the Redis clock): in any window of ``t``
seconds at most ``burst + t * rate / per_s`` units are let through. One private redis-server
(persistence off), two measurements:

1. **The script alone.** ``--callers`` threads of this process, each with a connection of a
   shared pool, ask ``rate.lua`` (``Store.rate``, mode ``admit``, cost 1) under a limit of
   ``--rate`` per ``--per-s`` seconds, ``--burst`` at once, for ``--duration-s`` seconds, each
   request with a run id of its own. A ``WAIT`` reply reserves the request's moment: the thread
   sleeps the milliseconds it was told (``time.sleep``) and asks again with the same run id, which
   its reservation then grants; a reservation whose moment falls after the end is dropped, not
   counted. Every ask is one pipelined round trip of three commands on one connection: the
   script, ``ZSCORE`` of the run id in the limit's reservations (the reserved moment, fractional
   ms, read after a ``WAIT``) and ``TIME``. Redis runs a connection's pipelined commands back to
   back, so **a grant's time is that** ``TIME`` (µs, the Redis clock), a few µs after the script's
   own clock read (``now_ms``: whole ms, floored). Reported: grants, asks per grant, the achieved
   rate (``(grants - burst)`` over the first grant to the last: the steady rate, against
   ``rate / per_s``; also grants over the whole duration), the most grants in any closed window
   of ``per_s`` and of ``per_s / 10`` seconds against the bound (``floor(burst + t * rate /
   per_s)``; a window over it is flagged VIOLATION in the table and ``held: false`` in the
   JSON), and the lateness of reserved grants: grant time minus reserved moment (the client's
   sleep accuracy, the GIL, the round trip). Then the ceiling: the same callers and the same
   round trips for ``--baseline-s`` seconds under a limit of 10^9 per second (every ask granted at
   once): what the script, this client and this machine can grant at most. Both phases report
   Redis' µs per ``rate.lua`` call (``INFO commandstats``, ``evalsha``) and Redis' CPU.
2. **End to end.** ``--workers`` ``orchestrator worker bench.flows:limited`` processes and one
   ``orchestrator supervisor`` (default settings: concurrency 16, each worker promotes due
   retries every ``promote_interval_s`` = 0.2 s, the supervisor every ``reclaim_interval_s`` =
   0.5 s), a workflow of one ``async`` step under the same limit (``bench.flows:make_limited``;
   the workers get the limit through ``BENCH_RATE``, ``BENCH_PER_S``, ``BENCH_BURST``). A
   warm-up run, then, once the limit's bucket is full again (``read_limits``: booked 0 ms ahead),
   ``--runs`` runs submitted back to back. Each step is claimed, admitted (``rate.lua``) and, when
   told to wait, given back (``defer.lua``: a ``rate_limited`` event whose ``until_ms`` is its
   reserved moment rounded up to the ms) into its queue's delayed set, promoted once due, claimed
   again and admitted by its reservation. Three times per start, from each run's history and
   state: the **schedule** (``until_ms`` of its first ``rate_limited`` event; for a start admitted
   at once, its claim), the **claim** after which it ran (the ``ok`` event's ``start_ms``: a
   worker's clock when it claimed the step, before the admission) and the **user-code start**
   (the step returns ``time.time()`` when its code runs, after the admission). The grant lies
   between the claim and the user-code start. Each is checked against the bound as in 1 (the
   schedule must hold it; the claims and starts are the limit as the steps see it, and any
   excess is reported, not hidden), with the achieved rate ``(runs - burst)`` over the first
   start to the last, the lateness of deferred claims and starts after their reserved moment
   (what the promote interval costs), every run completed with its step run once (one ``ok``,
   attempt 1, no error, no crash), the deferrals (``rate_limited`` events, and the fleet's
   counter), and the wall time (``time.time()`` before the first submit to the last
   ``completed`` event) against the ideal ``(runs - burst) * per_s / rate``.

The Redis clock, ``time.time()`` and the workers' ``start_ms`` are the same machine's clock.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    Server,
    add_common_args,
    bench_server,
    command_stats,
    finished_runs,
    fmt,
    fmt_ratio,
    json_path,
    markdown,
    print_and_save,
    ratio,
    redis_cpu_s,
    run_main,
    spread,
)
from bench.fanout import histories, only
from bench.flows import BURST_ENV, LIMIT, PER_S_ENV, RATE_ENV, make_limited
from bench.procs import POLL_S, Fleet, child_env, wait_registered, wait_until, worker_args
from orchestrator import Client, Settings, scripts
from orchestrator.keys import Keys
from orchestrator.ratelimit import RateLimit, read_limits
from orchestrator.store import Outcome, Store

DEFAULTS = Settings.model_fields
CEILING_RATE = 1e9  # the baseline's limit: per second, every ask granted at once
JOIN_SLACK_S = 30.0
TIMEOUT_S = 120.0  # beyond the ideal wall time, for the runs to complete
WINDOW_FRACTION = 10  # the short window is per_s / 10


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON next to the results."""

    rate: float
    per_s: float
    burst: float
    callers: int
    duration_s: float
    baseline_s: float
    runs: int
    workers: int
    quick: bool
    json_path: Path | None
    redis_server: str | None

    @property
    def unit_ms(self) -> float:
        """The time one unit takes (T of the GCRA): a start every ``unit_ms`` at the limit."""
        return self.per_s * 1000 / self.rate

    def bound(self, window_s: float, late_s: float = 0.0) -> int:
        """The most grants the promise allows in a closed window of ``window_s`` seconds (with
        ``late_s``: the README's bound for the starts, which come back up to a promote late)."""
        return math.floor(self.burst + (window_s + late_s) * self.rate / self.per_s + 1e-9)


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick`` only changes the defaults of sizes not given)."""
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=None, help="units per period [50; 20 quick]")
    parser.add_argument("--per-s", type=float, default=1.0, help="the period in seconds [1]")
    parser.add_argument("--burst", type=float, default=1.0, help="units at once [1]")
    parser.add_argument("--callers", type=int, default=None, help="threads asking the script [32; 8 quick]")
    parser.add_argument("--duration-s", type=float, default=None, help="seconds the callers ask [20; 3 quick]")
    parser.add_argument("--baseline-s", type=float, default=None, help="seconds of the no-limit ceiling [5; 1 quick]")
    parser.add_argument("--runs", type=int, default=None, help="runs submitted at once end to end [300; 40 quick]")
    parser.add_argument("--workers", type=int, default=2, help="worker processes [2]")
    add_common_args(parser)
    ns = parser.parse_args(argv)

    def size(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if ns.quick else full)

    options = Options(
        rate=size(ns.rate, 50.0, 20.0),
        per_s=ns.per_s,
        burst=ns.burst,
        callers=size(ns.callers, 32, 8),
        duration_s=size(ns.duration_s, 20.0, 3.0),
        baseline_s=size(ns.baseline_s, 5.0, 1.0),
        runs=size(ns.runs, 300, 40),
        workers=ns.workers,
        quick=ns.quick,
        json_path=json_path(ns.json, "ratelimit") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )
    if min(options.callers, options.runs, options.workers) < 1:
        parser.error("--callers, --runs and --workers must be at least 1")
    if min(options.duration_s, options.baseline_s) <= 0:
        parser.error("--duration-s and --baseline-s must be above 0")
    try:
        RateLimit(LIMIT, options.rate, per_s=options.per_s, burst=options.burst)
    except Exception as exc:  # the definition's own checks, in the parser's words
        parser.error(str(exc))
    return options


# -- counting ---------------------------------------------------------------------------------


def most_in_window(times_us: Sequence[int], width_us: int) -> int:
    """The most of ``times_us`` in any closed window ``[t, t + width_us]``: a window holding the
    most can always be slid until its end is one of the times, so those are the only ends tried."""
    ordered = sorted(times_us)
    most = first = 0
    for last, t in enumerate(ordered):
        while ordered[first] < t - width_us:
            first += 1
        most = max(most, last - first + 1)
    return most


def windows(times_us: Sequence[int], options: Options, late_s: float = 0.0) -> list[dict[str, Any]]:
    """The most in any window of ``per_s`` and of ``per_s / 10`` seconds, against the bound."""
    out = []
    for window_s in (options.per_s, options.per_s / WINDOW_FRACTION):
        most, bound = most_in_window(times_us, round(window_s * 1e6)), options.bound(window_s, late_s)
        out.append({"window_s": window_s, "most": most, "bound": bound, "excess": most - bound, "held": most <= bound})
    return out


def steady_rate(times_us: Sequence[int], burst: float, per_s: float) -> float | None:
    """Grants per period after the burst: ``(n - burst)`` over the first grant to the last."""
    if len(times_us) < 2:
        return None
    span_s = (max(times_us) - min(times_us)) / 1e6
    return None if span_s <= 0 else (len(times_us) - burst) / span_s * per_s


# -- 1. the script alone ----------------------------------------------------------------------


@dataclass
class Callers:
    """The threads of one script-level phase and what they record."""

    client: redis.Redis
    store: Store
    limit: RateLimit
    end_us: int = 0
    go: threading.Event = field(default_factory=threading.Event)
    grants_us: list[int] = field(default_factory=list)
    late_us: list[int] = field(default_factory=list)  # reserved grants: grant time - reserved moment
    asks: int = 0
    reserved_grants: int = 0
    dropped: int = 0  # reservations past the end, given up
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ask(self, run_id: str) -> tuple[Outcome, float | None, int]:
        """One round trip: the admission, the run id's reserved moment (ms) and the Redis time (µs)."""
        _, reserved_key = self.store.keys.rate_limit(self.limit.name)
        reply, score, now = scripts.execute(
            self.client,
            [
                self.store.rate(limit=self.limit, mode="admit", run_id=run_id, cost=self.limit.cost),
                scripts.command("ZSCORE", reserved_key, run_id),
                scripts.command("TIME"),
            ],
        )
        return Outcome.parse(reply), None if score is None else float(score), int(now[0]) * 1_000_000 + int(now[1])

    def request(self, run_id: str) -> int | None:
        """Ask until granted (sleeping the waits told); the grant's Redis time, None when dropped."""
        reserved: float | None = None
        asks = 0
        while True:
            out, score, now_us = self.ask(run_id)
            asks += 1
            if out.code == "OK":
                break
            if out.code != "WAIT":
                raise RuntimeError(f"rate.lua answered {out.code} {out.detail}")
            reserved = score if reserved is None else reserved
            if reserved is not None and reserved * 1000 > self.end_us:
                with self.lock:
                    self.dropped += 1  # its asks are not counted: asks per grant is of the grants
                return None
            time.sleep(int(out.detail[0]) / 1000)
        with self.lock:
            self.asks += asks
            self.grants_us.append(now_us)
            if reserved is not None:
                self.reserved_grants += 1
                self.late_us.append(now_us - round(reserved * 1000))
        return now_us

    def loop(self, k: int) -> None:
        self.go.wait()
        try:
            for n in itertools.count():
                granted = self.request(f"c{k}-{n}")
                if granted is None or granted >= self.end_us:
                    return
        except BaseException as exc:
            self.errors.append(exc)


def ask_phase(server: Server, store: Store, limit: RateLimit, callers: int, seconds: float) -> dict[str, Any]:
    """``callers`` threads asking for ``seconds``; grants, asks, lateness, Redis' cost."""
    admin = server.admin
    client = redis.Redis.from_url(server.url, decode_responses=True, max_connections=callers + 4)
    phase = Callers(client, store, limit)
    threads = [threading.Thread(target=phase.loop, args=(k,), name=f"caller-{k}") for k in range(callers)]
    try:
        for thread in threads:
            thread.start()
        admin.config_resetstat()
        cpu = redis_cpu_s(admin)
        sec, usec = admin.time()
        start_us = int(sec) * 1_000_000 + int(usec)
        phase.end_us = start_us + round(seconds * 1e6)
        phase.go.set()
        for thread in threads:
            thread.join(timeout=seconds + JOIN_SLACK_S)
        if any(thread.is_alive() for thread in threads):
            raise RuntimeError(f"callers still asking {JOIN_SLACK_S:.0f} s after the end")
        if phase.errors:
            raise phase.errors[0]
        cpu = redis_cpu_s(admin) - cpu
        evalsha = command_stats(admin).get("evalsha", {"calls": 0, "usec": 0})
    finally:
        phase.go.set()
        client.close()
    grants = sorted(phase.grants_us)
    return {
        "limit": asdict(limit),
        "callers": callers,
        "seconds": seconds,
        "start_us": start_us,
        "grants": len(grants),
        "reserved_grants": phase.reserved_grants,
        "immediate_grants": len(grants) - phase.reserved_grants,
        "dropped_reservations": phase.dropped,
        "asks": phase.asks,
        "asks_per_grant": ratio(phase.asks, len(grants)),
        "grants_per_s_over_duration": len(grants) / seconds,
        "script_calls": evalsha["calls"],
        "redis_us_per_script_call": ratio(evalsha["usec"], evalsha["calls"]),
        "redis_cpu_ms_per_s": cpu / seconds * 1000,
        "grants_us": [g - start_us for g in grants],
        "late_us": phase.late_us,
    }


def script_level(server: Server, options: Options) -> dict[str, Any]:
    """The limit under ``--callers`` for ``--duration-s``, then the no-limit ceiling."""
    store = Store(Keys(f"rl-{uuid.uuid4().hex[:10]}", DEFAULTS["partitions"].default))
    limit = RateLimit(LIMIT, options.rate, per_s=options.per_s, burst=options.burst)
    limited = ask_phase(server, store, limit, options.callers, options.duration_s)
    grants = [g + limited["start_us"] for g in limited["grants_us"]]
    rate = steady_rate(grants, options.burst, options.per_s)
    limited |= {
        "achieved_per_period": rate,
        "ratio_to_limit": ratio(rate, options.rate),
        "windows": windows(grants, options),
        "late_ms": {k: None if v is None else v / 1000 for k, v in spread(limited["late_us"]).items() if k != "n"},
    }
    print(
        f"  script, limit {options.rate:g} per {options.per_s:g} s: {limited['grants']:,} grants, "
        f"{fmt(rate, 2)} per period ({fmt_ratio(limited['ratio_to_limit'])} of the limit), most in a window "
        + ", ".join(f"{w['most']} (bound {w['bound']})" for w in limited["windows"]),
        flush=True,
    )
    unlimited = RateLimit("ceiling", CEILING_RATE, per_s=1.0)
    ceiling = ask_phase(server, store, unlimited, options.callers, options.baseline_s)
    ceiling["achieved_per_s"] = ceiling["grants"] / options.baseline_s
    ceiling.pop("grants_us")  # tens of thousands, all at once: nothing to read in them
    print(f"  script, no limit: {ceiling['achieved_per_s']:,.0f} grants/s", flush=True)
    for w in limited["windows"]:
        if not w["held"]:
            print(f"  LIMIT VIOLATED: {w['most']} grants in {w['window_s']:g} s, over {w['bound']}", file=sys.stderr)
    return {"limited": limited, "ceiling": ceiling}


# -- 2. end to end ----------------------------------------------------------------------------


def limit_idle(admin: redis.Redis, keys: Keys) -> bool:
    """The limit's bucket full again: nothing booked ahead, nobody waiting."""
    (state,) = read_limits(admin, keys, [LIMIT])
    return state.booked_ahead_ms == 0 and state.waiting == 0


def run_record(run_id: str, events: list[dict[str, Any]], info: Any, started_ms: float | None) -> dict[str, Any]:
    """One run's times and bookkeeping from its history, its record and its state."""
    ok = only(events, "ok", run_id, "call")
    deferrals = [e for e in events if e["type"] == "rate_limited"]
    return {
        "run_id": run_id,
        "completed": info.status == "completed" and events[-1]["type"] == "completed",
        "ran_once": sum(1 for e in events if e["type"] == "ok") == 1
        and ok["attempt"] == 1
        and info.errors == 0
        and info.crashes == 0,
        "deferrals": len(deferrals),
        "reserved_ms": deferrals[0]["until_ms"] if deferrals else None,
        "claim_ms": ok["start_ms"],
        "started_ms": started_ms,
        "completed_at": events[-1]["at"],
    }


def analyze(records: list[dict[str, Any]], t0: float, options: Options) -> dict[str, Any]:
    """Windows, rate, lateness and bookkeeping of the end-to-end runs."""
    deferred = [r for r in records if r["reserved_ms"] is not None]
    schedule = [round((r["reserved_ms"] if r["reserved_ms"] is not None else r["claim_ms"]) * 1000) for r in records]
    claims = [r["claim_ms"] * 1000 for r in records]
    starts = [round(r["started_ms"] * 1000) for r in records if r["started_ms"] is not None]
    rate = steady_rate(starts, options.burst, options.per_s)
    wall_s = (max(r["completed_at"] for r in records) - t0 * 1000) / 1000
    ideal_s = max(0.0, options.runs - options.burst) * options.per_s / options.rate
    start_span_s = (max(starts) - min(starts)) / 1e6 if starts else None

    def late(key: str) -> dict[str, Any]:
        return spread([r[key] - r["reserved_ms"] for r in deferred if r[key] is not None])

    return {
        "runs": len(records),
        "completed": sum(r["completed"] for r in records),
        "ran_once": sum(r["ran_once"] for r in records),
        "started_recorded": len(starts),
        "deferred_runs": len(deferred),
        "deferrals": sum(r["deferrals"] for r in records),
        "deferrals_per_run": dict(sorted(Counter(r["deferrals"] for r in records).items())),
        "achieved_per_period": rate,
        "ratio_to_limit": ratio(rate, options.rate),
        "start_span_s": start_span_s,
        "wall_s": wall_s,
        "ideal_s": ideal_s,
        "ratio_to_ideal": ratio(wall_s, ideal_s),
        "ratio_start_span_to_ideal": ratio(start_span_s, ideal_s),
        "windows": {"schedule": windows(schedule, options), "claim": windows(claims, options)}
        | {"user start": windows(starts, options)}
        | {"user start, README bound": windows(starts, options, Settings().promote_interval_s)},
        "late_claim_ms": late("claim_ms"),
        "late_start_ms": late("started_ms"),
        "claim_to_start_ms": spread([r["started_ms"] - r["claim_ms"] for r in records if r["started_ms"] is not None]),
    }


def end_to_end(server: Server, options: Options) -> dict[str, Any]:
    """``--runs`` runs of the limited workflow through ``--workers`` workers and a supervisor."""
    admin = server.admin
    settings = Settings(redis_url=server.url, namespace=f"rle-{uuid.uuid4().hex[:10]}")
    keys = Keys(settings.namespace, settings.partitions)
    flow = make_limited(options.rate, options.per_s, options.burst)
    extra = {RATE_ENV: repr(options.rate), PER_S_ENV: repr(options.per_s), BURST_ENV: repr(options.burst)}
    env = child_env(settings, server.url, extra)
    run_ids = [f"rl-{i:05d}" for i in range(options.runs)]
    with Fleet(server.log_dir) as fleet, Client(settings) as client:
        for i in range(options.workers):
            fleet.spawn_module(f"ratelimit-w{i}", worker_args("bench.flows:limited"), env)
        fleet.spawn_module("ratelimit-sup", ["orchestrator", "supervisor"], env)
        wait_registered(admin, keys, options.workers, fleet)
        wait_until(lambda: bool(admin.exists(keys.leader)), 30, "the supervisor leading", fleet)
        client.submit(flow, run_id="warm").wait(timeout_s=30, poll_s=POLL_S)
        wait_until(lambda: limit_idle(admin, keys), 30 + options.burst * options.unit_ms / 1000, "the bucket full")
        cpu = redis_cpu_s(admin), fleet.cpu_s()
        t0 = time.time()
        for run_id in run_ids:
            client.submit(flow, run_id=run_id)
        submit_s = time.time() - t0
        wait_until(
            lambda: finished_runs(admin, keys, "done", "dead") >= options.runs + 1,
            TIMEOUT_S + (options.runs - options.burst) * options.unit_ms / 1000,
            "every run finished",
            fleet,
        )
        fleet_cpu = fleet.cpu_s()
        redis_cpu = redis_cpu_s(admin) - cpu[0]
        events = histories(admin, keys, run_ids)
        records = [run_record(r, events[r], client.get(r), client.state(r, flow).started_ms) for r in run_ids]
        counters = client.stats()
    out = analyze(records, t0, options) | {"namespace": settings.namespace, "submit_s": submit_s}
    out |= {
        "counted_rate_limited": counters.get("rate_limited", 0),
        "redis_cpu_s": redis_cpu,
        "fleet_cpu_s": None if fleet_cpu is None or cpu[1] is None else fleet_cpu - cpu[1],
        "counters": counters,
        "records": records,
    }
    print(
        f"  end to end: {out['completed']}/{options.runs} completed, {out['deferrals']} deferrals, "
        f"{fmt(out['achieved_per_period'], 2)} starts per period ({fmt_ratio(out['ratio_to_limit'])}), wall "
        f"{out['wall_s']:.2f} s against {out['ideal_s']:.2f} s ({fmt_ratio(out['ratio_to_ideal'])})",
        flush=True,
    )
    return out


# -- summary and tables -----------------------------------------------------------------------


def summarize(script: dict[str, Any], e2e: dict[str, Any], options: Options) -> dict[str, Any]:
    """The headline figures; every ratio is of figures listed next to it."""
    limited, ceiling = script["limited"], script["ceiling"]
    keep = ("runs", "completed", "ran_once", "deferred_runs", "deferrals", "counted_rate_limited")
    keep += ("achieved_per_period", "ratio_to_limit", "wall_s", "ideal_s", "ratio_to_ideal", "start_span_s")
    keep += ("ratio_start_span_to_ideal", "windows", "late_claim_ms", "late_start_ms", "claim_to_start_ms")
    return {
        "limit": {"rate": options.rate, "per_s": options.per_s, "burst": options.burst},
        "script": {
            "grants": limited["grants"],
            "asks_per_grant": limited["asks_per_grant"],
            "achieved_per_period": limited["achieved_per_period"],
            "ratio_to_limit": limited["ratio_to_limit"],
            "windows": limited["windows"],
            "held": all(w["held"] for w in limited["windows"]),
            "late_ms": limited["late_ms"],
            "redis_us_per_script_call": limited["redis_us_per_script_call"],
            "ceiling_grants": ceiling["grants"],
            "ceiling_per_s": ceiling["achieved_per_s"],
            "ceiling_redis_us_per_script_call": ceiling["redis_us_per_script_call"],
            "ratio_limit_to_ceiling": ratio(options.rate / options.per_s, ceiling["achieved_per_s"]),
        },
        "end_to_end": {key: e2e[key] for key in keep}
        | {"schedule_held": all(w["held"] for w in e2e["windows"]["schedule"])}
        | {"starts_held": all(w["held"] for w in e2e["windows"]["user start, README bound"])},
    }


def checked(w: dict[str, Any], promised: bool = True) -> str:
    """The most in a window, flagged when over the bound: a VIOLATION where the README promises
    the bound, plain figures where it does not (the starts against the moments' strict bound)."""
    if w["held"]:
        return str(w["most"])
    return f"**{w['most']}: VIOLATION, {w['excess']} over**" if promised else f"{w['most']} ({w['excess']} over)"


def script_table(script: dict[str, Any], options: Options) -> str:
    limited, ceiling = script["limited"], script["ceiling"]
    per = f"per {options.per_s:g} s"
    rows = [
        [
            f"{options.rate:g} {per}, burst {options.burst:g}",
            str(limited["callers"]),
            f"{limited['seconds']:g}",
            f"{limited['grants']:,}",
            f"{limited['asks_per_grant']:.2f}",
            f"{fmt(limited['achieved_per_period'], 2)} {per}",
            f"**{fmt_ratio(limited['ratio_to_limit'])}**",
            fmt(limited["redis_us_per_script_call"], 1),
            fmt(limited["redis_cpu_ms_per_s"], 1),
        ],
        [
            f"none ({CEILING_RATE:.0e} per 1 s): the ceiling",
            str(ceiling["callers"]),
            f"{ceiling['seconds']:g}",
            f"{ceiling['grants']:,}",
            f"{ceiling['asks_per_grant']:.2f}",
            f"{fmt(ceiling['achieved_per_s'])} per 1 s",
            "-",
            fmt(ceiling["redis_us_per_script_call"], 1),
            fmt(ceiling["redis_cpu_ms_per_s"], 1),
        ],
    ]
    headers = ["limit", "callers", "s", "grants", "asks / grant", "achieved", "achieved / limit"]
    headers += ["Redis µs / rate.lua call", "Redis CPU ms/s"]
    return markdown(headers, rows, right=(1, 2, 3, 4, 5, 6, 7, 8))


def windows_table(script: dict[str, Any], e2e: dict[str, Any]) -> str:
    series = [("script: grants (Redis `TIME` after the OK)", script["limited"]["windows"])]
    series += [
        ("end to end: schedule (reserved moments, `until_ms`)", e2e["windows"]["schedule"]),
        ("end to end: claims (`ok` `start_ms`, before the admission)", e2e["windows"]["claim"]),
        ("end to end: user-code starts (after the admission)", e2e["windows"]["user start"]),
        (
            "end to end: user-code starts against the README's bound, a promote late "
            f"(t + {Settings().promote_interval_s:g} s)",
            e2e["windows"]["user start, README bound"],
        ),
    ]
    promised = {"end to end: claims", "end to end: user-code starts (after"}  # held to the README's bound below
    rows = [
        [what, f"{w['window_s']:g}", checked(w, not any(what.startswith(p) for p in promised)), str(w["bound"])]
        for what, ws in series
        for w in ws
    ]
    return markdown(["what is timed", "window s", "most in any window", "bound"], rows, right=(1, 2, 3))


def lateness_table(script: dict[str, Any], e2e: dict[str, Any]) -> str:
    late = script["limited"]["late_ms"]
    n = len(script["limited"]["late_us"])
    rows = [["script: grant - reserved moment", str(n), *(fmt(late[k], 2) for k in ("p50", "p99", "max"))]]
    for what, s in (
        ("end to end: claim - reserved moment", e2e["late_claim_ms"]),
        ("end to end: user-code start - reserved moment", e2e["late_start_ms"]),
        ("end to end: user-code start - claim (every run)", e2e["claim_to_start_ms"]),
    ):
        rows.append([what, str(s["n"]), fmt(s["p50"], 1), fmt(s["p99"], 1), fmt(s["max"], 1)])
    return markdown(["ms", "n", "p50", "p99", "max"], rows, right=(1, 2, 3, 4))


def e2e_table(e2e: dict[str, Any], options: Options) -> str:
    per = f"per {options.per_s:g} s"
    once = f"{e2e['ran_once']}/{e2e['runs']}"
    rows = [
        [
            f"{e2e['completed']}/{e2e['runs']}",
            once,
            f"{e2e['deferred_runs']} / {e2e['deferrals']} ({e2e['counted_rate_limited']} counted)",
            f"{fmt(e2e['achieved_per_period'], 2)} {per}",
            f"**{fmt_ratio(e2e['ratio_to_limit'])}**",
            fmt(e2e["start_span_s"], 2),
            f"{e2e['wall_s']:.2f}",
            f"{e2e['ideal_s']:.2f}",
            f"**{fmt_ratio(e2e['ratio_to_ideal'])}**",
        ]
    ]
    headers = ["completed", "ran once (attempt 1, no error)", "runs deferred / deferrals", "starts achieved"]
    headers += ["achieved / limit", "first to last start s", "wall s", "ideal s", "measured / ideal"]
    return markdown(headers, rows, right=(3, 4, 5, 6, 7, 8))


def tables(script: dict[str, Any], e2e: dict[str, Any], options: Options) -> str:
    limit = f"{options.rate:g} per {options.per_s:g} s, burst {options.burst:g}"
    promote = DEFAULTS["promote_interval_s"].default
    return "\n\n".join(
        [
            f"The script alone (`rate.lua`, limit {limit}): {options.callers} threads of one process asking for "
            f"{options.duration_s:g} s, each request with a run id of its own, sleeping the wait told and asking "
            "again with the same id; achieved = (grants - burst) over the first grant to the last. The ceiling: the "
            f"same threads and round trips (script + `ZSCORE` + `TIME`) for {options.baseline_s:g} s, every ask "
            "granted",
            script_table(script, options),
            f"Grants and starts in any closed window against the bound floor(burst + t x rate / per_s). End to end: "
            f"{options.runs} runs of one `async` step under the same limit, submitted back to back to "
            f"{options.workers} workers (default settings) and a supervisor",
            windows_table(script, e2e),
            f"How late grants and starts came after their reserved moment (end to end: the runs deferred; a worker "
            f"promotes due runs every {promote:g} s)",
            lateness_table(script, e2e),
            f"End to end: ideal wall = ({options.runs} - {options.burst:g}) x {options.per_s:g} / {options.rate:g} s; "
            "wall: `time.time()` before the first submit to the last `completed` event",
            e2e_table(e2e, options),
        ]
    )


def run(options: Options) -> dict[str, Any]:
    """Both measurements on one private server; the JSON document of the results."""
    with bench_server("ratelimit", options.redis_server) as server:
        script, e2e = script_level(server, options), end_to_end(server, options)
    summary = summarize(script, e2e, options)
    settings = {k: v for k, v in asdict(options).items() if k != "json_path"}
    settings |= {
        "concurrency": DEFAULTS["concurrency"].default,
        "promote_interval_s": DEFAULTS["promote_interval_s"].default,
        "reclaim_interval_s": DEFAULTS["reclaim_interval_s"].default,
        "redis_persistence": "off (appendonly no, save '')",
        "grant_time": "Redis TIME pipelined right after the script on the same connection (µs)",
    }
    return {
        "benchmark": "ratelimit",
        "environment": server.env,
        "settings": settings,
        "summary": summary,
        "markdown": tables(script, e2e, options),
        "script": script,
        "end_to_end": {k: v for k, v in e2e.items() if k != "counters"},
        "counters": e2e["counters"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run both measurements, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
