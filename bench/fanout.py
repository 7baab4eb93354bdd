"""Fan-out with ``Map``: what an item costs against a chain step, and whether ``parallelism`` holds
with slow items.

``python -m bench.fanout [--items 1000] [--chains 100] [--steps 10] [--slow-items 100] [--item-s 1.0]
[--parallelism 8] [--workers 2] [--repeat 5] [--quick] [--json [PATH]] [--redis-server BIN]``

Issue 13, part 7 (the parts that exist: rate limits are not built yet, so their precision is not
measured here). One private redis-server (persistence off), one fleet for every phase:
``--workers`` ``orchestrator worker`` processes (default settings; ``bench.flows:noop`` and
``bench.flows:fanout``) and one ``orchestrator supervisor``. A warm-up (one chain, one map of 2
items, not counted), a second of the idle fleet, then:

1. **Map against chains**, ``--repeat`` times a baseline then a map, and one more baseline at the
   end, so that every map has a baseline right before and after it and drift over the run shows:

   - **chains**: ``--chains`` runs of the ``--steps``-step no-op chain (``bench.flows:noop``),
     submitted back to back. steps/s = chains x steps / (the last run's ``completed`` event ``at``
     minus ``time.time()`` just before the first submit).
   - **map**: one ``bench.flows:fanout`` run whose first step (``spread``) returns ``Map`` over
     ``--items`` no-op items (``noop_item``, a plain function returning its index; parallelism
     None: all at once), then the no-op step ``gather``. items/s = items / (the run's
     ``completed`` ``at`` minus ``time.time()`` just before the submit). From the histories:
     submit to the first item started (the earliest item ``ok`` event's ``start_ms``), and the
     fan-in: the last item's commit (the latest item ``ok`` ``at``) to ``children_done`` (the
     parent's next step queued) and to ``gather``'s ``start_ms``. Every item must commit exactly
     once and the values come back in item order.

   The ratios are of the medians: median items/s over median steps/s, and so on.
2. **Slow map**: one run mapping ``--slow-items`` items of ``llm_item`` (``async``, awaits
   ``--item-s`` seconds: a model call), ``parallelism=--parallelism``. Ideal wall time =
   ceil(items / parallelism) x item_s; measured = submit to ``completed`` as in 1. The most items
   running at once, by a sweep of the items' attempt intervals (``start_ms`` .. ``end_ms`` of
   every event that has them: user code running, the workers' clock), and of the items' lives
   (their ``submitted`` ``at`` .. ``ok`` ``at``: started by the map and not yet committed, the
   Redis clock). Both must be <= parallelism; a violation is flagged in the table and the JSON.

Around each phase: ``CONFIG RESETSTAT`` before the submit, ``INFO commandstats`` and
``INFO cpu`` of Redis and the CPU of the fleet (workers + supervisor) once the last run is done.
The benchmark's own polls for the end (counted, one ZCARD per partition or one HGET each) are
taken out of the command counts; everything else stays in: the submits, and the fleet's
background work (heartbeats, the supervisor's ticks) during the phase, measured alone for a
second before the phases and reported next to the figures. Per item includes the mapping
parent's submit and its two steps; per step includes each chain's submit.

``time.time()`` (the client) and ``at`` (the Redis clock) and ``start_ms`` (a worker's) are the
same machine's clock; the figures are whole ms.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    Server,
    add_common_args,
    bench_server,
    command_calls,
    finished_runs,
    fmt,
    fmt_ratio,
    json_path,
    markdown,
    print_and_save,
    ratio,
    redis_cpu_s,
    run_main,
)
from bench.flows import ITEM_S_ENV, PERMITS_ENV, STEPS, STEPS_ENV, Fan, fanout, make_noop
from bench.procs import POLL_S, Fleet, child_env, wait_registered, wait_until, worker_args
from orchestrator import Client, Settings
from orchestrator.children import children_of
from orchestrator.keys import Keys

DEFAULTS = Settings.model_fields
IDLE_S = 1.0  # the fleet's background, measured alone before the phases
# the figures of a slow map the summary keeps
SLOW_KEYS = ("items", "committed", "item_s", "parallelism", "rounds", "wall_s", "ideal_s", "ratio_to_ideal")
SLOW_KEYS += ("overhead_per_round_ms", "most_running", "parallelism_held")
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON next to the results."""

    items: int
    chains: int
    steps: int
    slow_items: int
    item_s: float
    parallelism: int
    workers: int
    repeat: int
    quick: bool
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick`` only changes the defaults of sizes not given)."""
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=None, help="no-op items of the map [1000; 60 quick]")
    parser.add_argument("--chains", type=int, default=None, help="no-op chains per baseline [100; 10 quick]")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per chain [{STEPS}; 5 quick]")
    parser.add_argument("--slow-items", type=int, default=None, help="items of the slow map [100; 12 quick]")
    parser.add_argument("--item-s", type=float, default=None, help="seconds each slow item awaits [1.0; 0.2 quick]")
    parser.add_argument("--parallelism", type=int, default=None, help="the slow map's parallelism [8; 4 quick]")
    parser.add_argument("--workers", type=int, default=2, help="worker processes [2]")
    parser.add_argument("--repeat", type=int, default=None, help="maps, each after a baseline [5; 1 quick]")
    add_common_args(parser)
    ns = parser.parse_args(argv)

    def size(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if ns.quick else full)

    options = Options(
        items=size(ns.items, 1000, 60),
        chains=size(ns.chains, 100, 10),
        steps=size(ns.steps, STEPS, 5),
        slow_items=size(ns.slow_items, 100, 12),
        item_s=size(ns.item_s, 1.0, 0.2),
        parallelism=size(ns.parallelism, 8, 4),
        workers=ns.workers,
        repeat=size(ns.repeat, 5, 1),
        quick=ns.quick,
        json_path=json_path(ns.json, "fanout") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )
    sizes = (options.items, options.chains, options.steps, options.slow_items, options.parallelism, options.workers)
    if min(*sizes, options.repeat) < 1:
        parser.error("--items, --chains, --steps, --slow-items, --parallelism, --workers, --repeat must be at least 1")
    if options.item_s < 0:
        parser.error("--item-s must not be negative")
    return options


# -- measuring a phase ------------------------------------------------------------------------


class Phase:
    """One measured phase: Redis' command counts (from a ``CONFIG RESETSTAT``) and CPU, and the
    fleet's CPU; the benchmark's own polls are counted so they can be taken out."""

    def __init__(self, admin: redis.Redis, fleet: Fleet) -> None:
        self.admin, self.fleet = admin, fleet
        self.polls: Counter[str] = Counter()
        self.started = time.perf_counter()
        admin.config_resetstat()
        self.redis_cpu = redis_cpu_s(admin)
        self.fleet_cpu = fleet.cpu_s()

    def wait(self, check: Callable[[], bool], what: str) -> None:
        wait_until(check, TIMEOUT_S, what, self.fleet)

    def end(self, keys: Keys) -> dict[str, Any]:
        """Commands (polls taken out), Redis CPU and fleet CPU since the start, once the
        supervisor has relayed every ``finished`` notice (a map item's; part of what it costs)."""
        done = time.perf_counter()
        self.wait(lambda: unrelayed(self.admin, keys, self.polls) == 0, "the supervisor relaying every notice")
        relayed_s = time.perf_counter() - done
        calls = command_calls(self.admin)
        redis_cpu = redis_cpu_s(self.admin) - self.redis_cpu
        fleet_cpu = self.fleet.cpu_s()
        calls.subtract(self.polls)
        calls = +calls  # drop what the polls alone made
        return {
            "commands": sum(calls.values()),
            "calls": dict(calls.most_common()),
            "polls_removed": dict(self.polls),
            "relay_wait_s": relayed_s,
            "window_s": time.perf_counter() - self.started,
            "redis_cpu_s": redis_cpu,
            "fleet_cpu_s": None if fleet_cpu is None or self.fleet_cpu is None else fleet_cpu - self.fleet_cpu,
        }


def unrelayed(admin: redis.Redis, keys: Keys, polls: Counter[str]) -> int:
    """Notices on the partitions' ``finished`` streams the supervisor has not relayed (and deleted) yet."""
    polls["xlen"] += len(keys.parts)
    pipe = admin.pipeline(transaction=False)
    for part in keys.parts:
        pipe.xlen(part.finished)
    return sum(int(n) for n in pipe.execute())


def done_count(admin: redis.Redis, keys: Keys, polls: Counter[str]) -> int:
    polls["zcard"] += len(keys.parts)
    return finished_runs(admin, keys)


def status_is(admin: redis.Redis, keys: Keys, run_id: str, polls: Counter[str], *wanted: str) -> bool:
    polls["hget"] += 1
    value: Any = admin.hget(keys.run(run_id).run, "status")
    if value in ("failed", "cancelled") and value not in wanted:
        raise RuntimeError(f"run {run_id} {value}")
    return value in wanted


def histories(admin: redis.Redis, keys: Keys, run_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Every event of each run, in one pipelined round trip per 1,000 runs."""
    out: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(run_ids), 1000):
        chunk = run_ids[i : i + 1000]
        pipe = admin.pipeline(transaction=False)
        for run_id in chunk:
            pipe.lrange(keys.run(run_id).history, 0, -1)
        for run_id, raw in zip(chunk, pipe.execute(), strict=True):
            out[run_id] = [json.loads(line) for line in raw]
    return out


def only(events: list[dict[str, Any]], kind: str, run_id: str, step: str | None = None) -> dict[str, Any]:
    """The run's one event of ``kind`` (of ``step``): more than one would be a re-execution."""
    found = [e for e in events if e["type"] == kind and (step is None or e.get("step") == step)]
    if len(found) != 1:
        raise RuntimeError(f"run {run_id}: {len(found)} {kind!r} events{f' of {step!r}' if step else ''}, expected 1")
    return found[0]


def most_at_once(intervals: Sequence[tuple[int, int]]) -> int:
    """The most intervals open at one time; one that ends at the ms another starts does not overlap it."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = running = 0
    for _, delta in edges:  # at equal times the end (-1) sorts first
        running += delta
        most = max(most, running)
    return most


# -- the phases -------------------------------------------------------------------------------


def chains(
    client: Client, admin: redis.Redis, keys: Keys, fleet: Fleet, options: Options, label: str
) -> dict[str, Any]:
    """``--chains`` no-op chains submitted back to back; steps/s from the first submit to the last ``completed``."""
    flow = make_noop(options.steps)
    run_ids = [f"{label}-{i:05d}" for i in range(options.chains)]
    phase = Phase(admin, fleet)
    before = done_count(admin, keys, Counter())
    t0 = time.time()
    for run_id in run_ids:
        client.submit(flow, run_id=run_id)
    phase.wait(lambda: done_count(admin, keys, phase.polls) >= before + options.chains, f"{label}: every chain")
    out = phase.end(keys)
    events = histories(admin, keys, run_ids)
    ends = [only(events[r], "completed", r)["at"] for r in run_ids]
    for r in run_ids:
        if len([e for e in events[r] if e["type"] == "ok"]) != options.steps:
            raise RuntimeError(f"run {r}: not exactly one commit per step")
    steps = options.chains * options.steps
    wall_s = (max(ends) - t0 * 1000) / 1000
    out |= {"label": label, "chains": options.chains, "steps": steps, "wall_s": wall_s, "steps_per_s": steps / wall_s}
    out |= per_unit(out, steps)
    print(
        f"  {label}: {steps:,} steps in {wall_s:.2f} s, {out['steps_per_s']:,.0f} steps/s, "
        f"{out['commands_per_unit']:.1f} commands and {fmt(out['redis_cpu_us_per_unit'], 1)} µs Redis CPU per step",
        flush=True,
    )
    return out


def per_unit(out: dict[str, Any], units: int) -> dict[str, Any]:
    fleet = out["fleet_cpu_s"]
    return {
        "commands_per_unit": out["commands"] / units,
        "redis_cpu_us_per_unit": out["redis_cpu_s"] / units * 1e6,
        "fleet_cpu_us_per_unit": None if fleet is None else fleet / units * 1e6,
    }


def mapped(client: Client, admin: redis.Redis, keys: Keys, fleet: Fleet, run_id: str, state: Fan) -> dict[str, Any]:
    """One ``fanout`` run through to ``completed``: the figures from its history and its items'."""
    phase = Phase(admin, fleet)
    t0 = time.time()
    client.submit(fanout, state, run_id=run_id)
    phase.wait(lambda: status_is(admin, keys, run_id, phase.polls, "completed"), f"map run {run_id} completing")
    out = phase.end(keys)
    n = len(state.items)
    final = client.state(run_id, fanout)
    if final.values != state.items:
        raise RuntimeError(f"run {run_id}: the values did not come back in item order")
    items = children_of(admin, keys, run_id)
    if len(items) != n:
        raise RuntimeError(f"run {run_id}: {len(items)} items listed, expected {n}")
    events = histories(admin, keys, [run_id, *items])
    parent = events.pop(run_id)
    committed = sum(
        1 for r in items if [e["type"] for e in events[r]].count("ok") == 1 and events[r][-1]["type"] == "completed"
    )
    if committed != n:
        raise RuntimeError(f"run {run_id}: {n - committed} of its {n} items did not commit exactly once")
    oks = {r: only(events[r], "ok", r) for r in items}
    attempts = [(e["start_ms"], e["end_ms"]) for r in items for e in events[r] if e.get("start_ms") is not None]
    lives = [(only(events[r], "submitted", r)["at"], oks[r]["at"]) for r in items]
    t0_ms = t0 * 1000
    spread, gather = only(parent, "ok", run_id, "spread"), only(parent, "ok", run_id, "gather")
    last_commit = max(e["at"] for e in oks.values())
    first_start = min(e["start_ms"] for e in oks.values())
    wall_s = (only(parent, "completed", run_id)["at"] - t0_ms) / 1000
    out |= {
        "items": n,
        "committed": committed,
        "attempts": len(attempts),
        "wall_s": wall_s,
        "items_per_s": n / wall_s,
        "submit_to_spread_start_ms": spread["start_ms"] - t0_ms,
        "spread_start_to_commit_ms": spread["at"] - spread["start_ms"],
        "spread_commit_to_first_item_start_ms": first_start - spread["at"],
        "submit_to_first_item_start_ms": first_start - t0_ms,
        "first_item_start_to_last_item_commit_ms": last_commit - first_start,
        "last_commit_to_children_done_ms": only(parent, "children_done", run_id)["at"] - last_commit,
        "fan_in_ms": gather["start_ms"] - last_commit,
        "most_running": most_at_once(attempts),
        "most_started_uncommitted": most_at_once(lives),
    }
    out |= per_unit(out, n)
    return out


def fan(client: Client, admin: redis.Redis, keys: Keys, fleet: Fleet, options: Options, label: str) -> dict[str, Any]:
    """A map of ``--items`` no-op items, all at once."""
    state = Fan(items=list(range(options.items)), each="noop_item")
    out = mapped(client, admin, keys, fleet, label, state)
    out["label"] = label
    print(
        f"  {label}: {out['items']:,} items in {out['wall_s']:.2f} s, {out['items_per_s']:,.0f} items/s, "
        f"{out['commands_per_unit']:.1f} commands and {fmt(out['redis_cpu_us_per_unit'], 1)} µs Redis CPU per item; "
        f"first item {fmt(out['submit_to_first_item_start_ms'])} ms after the submit, fan-in "
        f"{fmt(out['fan_in_ms'])} ms",
        flush=True,
    )
    return out


def slow(
    client: Client, admin: redis.Redis, keys: Keys, fleet: Fleet, options: Options, *, limited: bool = False
) -> dict[str, Any]:
    """The slow map: ``--slow-items`` items that each await ``--item-s``, ``--parallelism`` at a
    time: the map's own ``parallelism``, or (``limited``) every item at once under a fleet-wide
    concurrency limit of that many permits (the items that find none free wait in line)."""
    each, parallelism = ("gated_item", None) if limited else ("llm_item", options.parallelism)
    state = Fan(items=list(range(options.slow_items)), each=each, parallelism=parallelism)
    label = "limited" if limited else "slow"
    out = mapped(client, admin, keys, fleet, label, state)
    if limited:  # every item is started at once: only the ones holding a permit may run
        waits = histories(admin, keys, children_of(admin, keys, label))
        out["permit_waits"] = sum(e["type"] == "permit_wait" for events in waits.values() for e in events)
    rounds = math.ceil(options.slow_items / options.parallelism)
    ideal_s = rounds * options.item_s
    out |= {
        "parallelism": options.parallelism,
        "item_s": options.item_s,
        "rounds": rounds,
        "ideal_s": ideal_s,
        "ratio_to_ideal": ratio(out["wall_s"], ideal_s),
        "overhead_per_round_ms": (out["wall_s"] - ideal_s) / rounds * 1000,
        # under a concurrency limit every item is started at once: only the running ones count
        "parallelism_held": out["most_running"] <= options.parallelism
        and (limited or out["most_started_uncommitted"] <= options.parallelism),
        "limited_by": "concurrency limit" if limited else "parallelism",
    }
    print(
        f"  {label} map: {out['items']} items of {options.item_s:g} s, {options.parallelism} at a time, in "
        f"{out['wall_s']:.2f} s (ideal {ideal_s:.2f} s, {fmt_ratio(out['ratio_to_ideal'])}); most running at once "
        f"{out['most_running']}, most started and uncommitted {out['most_started_uncommitted']}",
        flush=True,
    )
    if not out["parallelism_held"]:
        print(f"  PARALLELISM VIOLATED: more than {options.parallelism} items at once", file=sys.stderr, flush=True)
    return out


def idle(admin: redis.Redis, keys: Keys, fleet: Fleet, seconds: float) -> dict[str, Any]:
    """The fleet's background (heartbeats, supervisor ticks, blocked reads) with nothing to do."""
    phase = Phase(admin, fleet)
    started = time.perf_counter()
    time.sleep(seconds)
    out = phase.end(keys)
    elapsed = time.perf_counter() - started
    fleet_cpu = out["fleet_cpu_s"]
    return out | {
        "seconds": elapsed,
        "commands_per_s": out["commands"] / elapsed,
        "redis_cpu_ms_per_s": out["redis_cpu_s"] / elapsed * 1000,
        "fleet_cpu_ms_per_s": None if fleet_cpu is None else fleet_cpu / elapsed * 1000,
    }


def background(phase: dict[str, Any], idle_: dict[str, Any]) -> None:
    """What the idle fleet's rate would have sent and cost over the phase's window, per unit: an
    estimate of how much of the per-unit figures is background (the rate is not constant)."""
    units = phase.get("items") or phase["steps"]
    phase["background_commands_per_unit_est"] = idle_["commands_per_s"] * phase["window_s"] / units
    phase["background_redis_cpu_us_per_unit_est"] = idle_["redis_cpu_ms_per_s"] * phase["window_s"] / units * 1000


def measure(server: Server, options: Options) -> dict[str, Any]:
    """Every phase on one fleet: warm-up, idle, then chains and a map ``--repeat`` times, chains, the slow map."""
    admin = server.admin
    settings = Settings(redis_url=server.url, namespace=f"fan-{uuid.uuid4().hex[:10]}")
    keys = Keys(settings.namespace, settings.partitions)
    extra = {STEPS_ENV: str(options.steps), ITEM_S_ENV: repr(options.item_s), PERMITS_ENV: str(options.parallelism)}
    if max(options.items, options.slow_items) > DEFAULTS["max_map_items"].default:
        extra["ORCHESTRATOR_MAX_MAP_ITEMS"] = str(max(options.items, options.slow_items))
    env = child_env(settings, server.url, extra)
    out: dict[str, Any] = {"namespace": settings.namespace, "max_map_items": extra.get("ORCHESTRATOR_MAX_MAP_ITEMS")}
    with Fleet(server.log_dir) as fleet, Client(settings) as client:
        for i in range(options.workers):
            fleet.spawn_module(f"fanout-w{i}", [*worker_args("bench.flows:noop"), "bench.flows:fanout"], env)
        fleet.spawn_module("fanout-sup", ["orchestrator", "supervisor"], env)
        wait_registered(admin, keys, options.workers, fleet)
        wait_until(lambda: bool(admin.exists(keys.leader)), 30, "the supervisor leading", fleet)
        warm = client.submit(make_noop(options.steps), run_id="warm-chain")
        client.submit(fanout, Fan(items=[0, 1]), run_id="warm-map")
        wait_until(lambda: status_is(admin, keys, "warm-map", Counter(), "completed"), 30, "the warm-up map", fleet)
        warm.wait(timeout_s=30, poll_s=POLL_S)
        wait_until(lambda: unrelayed(admin, keys, Counter()) == 0, 30, "the warm-up's notices relayed", fleet)
        out["idle"] = idle(admin, keys, fleet, IDLE_S / 2 if options.quick else IDLE_S)
        print(f"  idle fleet: {out['idle']['commands_per_s']:,.0f} commands/s", flush=True)
        out["chains"], out["maps"] = [], []
        for k in range(options.repeat):
            out["chains"].append(chains(client, admin, keys, fleet, options, f"chains-{k + 1}"))
            out["maps"].append(fan(client, admin, keys, fleet, options, f"map-{k + 1}"))
        out["chains"].append(chains(client, admin, keys, fleet, options, f"chains-{options.repeat + 1}"))
        for phase in (*out["chains"], *out["maps"]):
            background(phase, out["idle"])
        out["slow"] = slow(client, admin, keys, fleet, options)
        out["limited"] = slow(client, admin, keys, fleet, options, limited=True)
        out["counters"] = client.stats()
    return out


# -- summary and tables -----------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: the medians of the maps against the medians of the baselines, and their ratios."""
    maps, base, s = res["maps"], res["chains"], res["slow"]

    def both(key: str) -> tuple[float | None, float | None]:
        return median([m.get(key) for m in maps]), median([b.get(key) for b in base])

    items_per_s, steps_per_s = both("items_per_s")[0], both("steps_per_s")[1]
    commands = both("commands_per_unit")
    redis_us = both("redis_cpu_us_per_unit")
    fleet_us = both("fleet_cpu_us_per_unit")
    return {
        "items": maps[0]["items"],
        "maps": len(maps),
        "items_committed": [m["committed"] for m in maps],
        "items_per_s": items_per_s,
        "items_per_s_each": [m["items_per_s"] for m in maps],
        "steps_per_s": steps_per_s,
        "steps_per_s_each": [b["steps_per_s"] for b in base],
        "steps_per_s_first": base[0]["steps_per_s"],
        "steps_per_s_last": base[-1]["steps_per_s"],
        "ratio_items_to_steps": ratio(items_per_s, steps_per_s),
        "commands_per_item": commands[0],
        "commands_per_step": commands[1],
        "ratio_commands": ratio(*commands),
        "redis_cpu_us_per_item": redis_us[0],
        "redis_cpu_us_per_step": redis_us[1],
        "ratio_redis_cpu": ratio(*redis_us),
        "fleet_cpu_us_per_item": fleet_us[0],
        "fleet_cpu_us_per_step": fleet_us[1],
        "ratio_fleet_cpu": ratio(*fleet_us),
        "submit_to_first_item_start_ms": both("submit_to_first_item_start_ms")[0],
        "fan_in_ms": both("fan_in_ms")[0],
        "last_commit_to_children_done_ms": both("last_commit_to_children_done_ms")[0],
        "slow": {key: s[key] for key in (*SLOW_KEYS, "most_started_uncommitted")},
        "limited": {key: res["limited"][key] for key in (*SLOW_KEYS, "permit_waits")},
    }


def phase_row(p: dict[str, Any]) -> list[str]:
    is_map = "items" in p
    unit = "item" if is_map else "step"
    return [
        p["label"],
        f"{p['items']:,} items" if is_map else f"{p['chains']:,} x {p['steps'] // p['chains']} steps",
        f"{p['wall_s']:.2f}",
        fmt(p["items_per_s"] if is_map else p["steps_per_s"]),
        f"{p['commands_per_unit']:.1f} / {unit}",
        f"{fmt(p['redis_cpu_us_per_unit'], 1)} / {unit}",
        f"{fmt(p['fleet_cpu_us_per_unit'])} / {unit}",
    ]


def throughput_table(res: dict[str, Any], summary: dict[str, Any]) -> str:
    """Every phase in the order run (a baseline before and after each map), then the medians' ratios."""
    rows = []
    for k, base in enumerate(res["chains"]):
        rows.append(phase_row(base))
        if k < len(res["maps"]):
            rows.append(phase_row(res["maps"][k]))
    rows.append(
        [
            "**median map item / median chain step**",
            "",
            "",
            f"**{fmt_ratio(summary['ratio_items_to_steps'])}**",
            fmt_ratio(summary["ratio_commands"]),
            fmt_ratio(summary["ratio_redis_cpu"]),
            fmt_ratio(summary["ratio_fleet_cpu"]),
        ]
    )
    headers = ["phase", "size", "wall s", "per s", "Redis commands", "Redis CPU µs", "workers + supervisor CPU µs"]
    return markdown(headers, rows, right=(2, 3, 4, 5, 6))


def latency_table(maps: list[dict[str, Any]]) -> str:
    """Where the time of each map went, from the histories."""
    figures = (
        ("submit_to_spread_start_ms", "submit -> the mapping step (`spread`) starts"),
        ("spread_start_to_commit_ms", "`spread` starts -> it commits (the items' specs stored)"),
        ("spread_commit_to_first_item_start_ms", "`spread` committed -> the first item starts"),
        ("submit_to_first_item_start_ms", "**submit -> the first item starts**"),
        ("first_item_start_to_last_item_commit_ms", "the first item starts -> the last item commits"),
        ("last_commit_to_children_done_ms", "the last item commits -> `children_done` (the next step queued)"),
        ("fan_in_ms", "**the last item commits -> `gather` starts (fan-in)**"),
    )
    rows = [[what, *(fmt(m[key]) for m in maps)] for key, what in figures]
    return markdown(["ms", *(m["label"] for m in maps)], rows, right=tuple(range(1, len(maps) + 1)))


def slow_table(*maps: dict[str, Any]) -> str:
    def check(value: int, limit: int, checked: bool = True) -> str:
        if not checked:
            return f"{value} (all started; not a limit)"
        return str(value) if value <= limit else f"**{value}: VIOLATION, over {limit}**"

    rows = [
        [
            f"{s['items']:,} x {s['item_s']:g} s",
            f"{s['parallelism']} ({'Map parallelism' if s['limited_by'] == 'parallelism' else 'concurrency limit'})",
            f"{s['wall_s']:.2f}",
            f"{s['ideal_s']:.2f}",
            fmt_ratio(s["ratio_to_ideal"]),
            fmt(s["overhead_per_round_ms"]),
            check(s["most_running"], s["parallelism"]),
            check(s["most_started_uncommitted"], s["parallelism"], s["limited_by"] == "parallelism"),
        ]
        for s in maps
    ]
    headers = [
        "items",
        "at once (by)",
        "wall s",
        "ideal s",
        "measured / ideal",
        "ms over ideal per round",
        "most running at once",
        "most started, uncommitted",
    ]
    return markdown(headers, rows, right=(1, 2, 3, 4, 5, 6, 7))


def calls_per_unit(phases: Sequence[dict[str, Any]], units: int) -> Counter[str]:
    total: Counter[str] = Counter()
    for p in phases:
        total.update(Counter(p["calls"]))
    return Counter({name: n / (units * len(phases)) for name, n in total.items()})


def calls_table(res: dict[str, Any], top: int = 12) -> str:
    """Redis commands per map item and per chain step, by command (every map, every baseline)."""
    per_item = calls_per_unit(res["maps"], res["maps"][0]["items"])
    per_step = calls_per_unit(res["chains"], res["chains"][0]["steps"])
    names = [name for name, _ in per_item.most_common(top)]
    rows = [[f"`{name}`", f"{per_item[name]:.2f}", f"{per_step.get(name, 0):.2f}"] for name in names]
    rest = set(per_item) | set(per_step)
    rows.append(
        [
            "the others",
            f"{sum(per_item[n] for n in rest - set(names)):.2f}",
            f"{sum(per_step.get(n, 0) for n in rest - set(names)):.2f}",
        ]
    )
    rows.append(["**all**", f"**{sum(per_item.values()):.2f}**", f"**{sum(per_step.values()):.2f}**"])
    return markdown(["command (INFO commandstats)", "per map item", "per chain step"], rows, right=(1, 2))


def tables(res: dict[str, Any], summary: dict[str, Any], options: Options) -> str:
    idle_ = res["idle"]
    bg_item = median([m["background_commands_per_unit_est"] for m in res["maps"]])
    bg_step = median([c["background_commands_per_unit_est"] for c in res["chains"]])
    relay = median([m["relay_wait_s"] for m in res["maps"]])
    head = (
        f"Map vs chain: {options.workers} workers (default settings: concurrency "
        f"{DEFAULTS['concurrency'].default}) and 1 supervisor on one redis-server (persistence off), one fleet for "
        f"every phase, in the order shown. Wall: `time.time()` before the first submit to the last `completed` event. "
        f"The ratios are of the medians ({len(res['maps'])} maps, {len(res['chains'])} baselines). "
        f"Per item: the map's commands and CPU over its items (the parent's submit and two steps included, and the "
        f"supervisor's relay of every item's `finished` notice: the window closes once it is done, a median "
        f"{relay:.2f} s after the run completed); per step: the chains' over their steps (submits included); the "
        f"benchmark's end polls taken out. The fleet's background is included: alone it sends "
        f"{idle_['commands_per_s']:,.0f} commands/s ({idle_['redis_cpu_ms_per_s']:.1f} ms Redis CPU/s), at that "
        f"rate ~{fmt(bg_item, 1)} commands per item and ~{fmt(bg_step, 1)} per step of the figures below"
    )
    slow_head = (
        f"Bounded parallelism: {options.slow_items:,} `async` items that each await {options.item_s:g} s, "
        f"`parallelism={options.parallelism}`, same fleet; ideal = ceil({options.slow_items} / {options.parallelism}) "
        f"x {options.item_s:g} s. Most running at once: a sweep of the items' attempts (`start_ms`..`end_ms`, "
        "user code); most started and uncommitted: of the items' `submitted`..`ok` `at` (Redis clock). Both must "
        f"be <= {options.parallelism}. The second row maps the same items all at once under a fleet-wide concurrency "
        f"limit of {options.parallelism} permits (`@item(concurrency=...)`): the items that find no permit free wait "
        f"in line holding no worker slot ({res['limited'].get('permit_waits', 0)} waits) and are woken as permits "
        "are given back; only the running ones are bounded"
    )
    return "\n\n".join(
        [
            head,
            throughput_table(res, summary),
            "Where each map's time went, from the histories (ms; whole-ms clocks)",
            latency_table(res["maps"]),
            "Redis commands by name, over every map and every baseline (a script call counts as `evalsha` plus "
            "each command it runs)",
            calls_table(res),
            slow_head,
            slow_table(res["slow"], res["limited"]),
        ]
    )


def without_calls(part: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if k not in ("calls", "polls_removed")}


def run(options: Options) -> dict[str, Any]:
    """Every phase on one private server; the JSON document of the results."""
    with bench_server("fanout", options.redis_server) as server:
        res = measure(server, options)
    summary = summarize(res)
    settings = {k: v for k, v in asdict(options).items() if k != "json_path"}
    settings |= {
        "concurrency": DEFAULTS["concurrency"].default,
        "reclaim_interval_s": DEFAULTS["reclaim_interval_s"].default,
        "redis_persistence": "off (appendonly no, save '')",
        "order": [
            "warm-up",
            "idle",
            *(f"chains-{k + 1}, map-{k + 1}" for k in range(options.repeat)),
            "chains",
            "slow",
            "limited",
        ],
    }
    return {
        "benchmark": "fanout",
        "environment": server.env,
        "settings": settings,
        "summary": summary,
        "markdown": tables(res, summary, options),
        "phases": {
            "idle": without_calls(res["idle"]),
            "chains": [without_calls(p) for p in res["chains"]],
            "maps": [without_calls(p) for p in res["maps"]],
            "slow": without_calls(res["slow"]),
            "limited": without_calls(res["limited"]),
        },
        "calls": {p["label"]: p["calls"] for p in (*res["chains"], *res["maps"])}
        | {"idle": res["idle"]["calls"], "slow": res["slow"]["calls"], "limited": res["limited"]["calls"]},
        "counters": res["counters"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the phases, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
