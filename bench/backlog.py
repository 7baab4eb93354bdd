"""Backlog: do the supervisor's sweep, reclaim and purge cost the work to do, or the backlog?

``python -m bench.backlog [--sizes 1000,10000,100000] [--lost 10] [--lapsed 5] [--max-passes 20] [--json [PATH]]``

At each backlog size N, on a private redis-server (persistence off), with a real
:class:`~orchestrator.Supervisor` (``Settings(redis_url=..., namespace=...)``, defaults otherwise)
and the runs built by the real scripts (``Store.submit``, ``claim``, ``commit``, ``fail``,
pipelined), nothing else connected:

1. **Sweep.** N one-step runs queued in one stream, nobody consuming; then ``--lost`` of them
   lose their entry, three ways: ``trim`` (``XTRIM MAXLEN N-K``, exact: the K oldest entries
   go), ``xdel`` (K entries deleted at the middle of the backlog, ahead of the group) and
   ``drop`` (the whole stream deleted: every run lost). ``Supervisor.sweep_queue`` is called
   pass after pass until every lost run's dispatch is an entry of the stream again (at most
   ``--max-passes``); per pass: wall time, Redis CPU (``INFO cpu`` delta), runs looked at
   (``swept``) and repaired; then passes with nothing to repair. "Needed a look" is what the
   design says a pass must check: the runs whose entry is before the stream's first one (trim),
   at or before the highest deleted id (xdel, Redis >= 7.0), every queued run (drop).
2. **Reclaim.** N runs queued; ``--lapsed`` entries delivered to a consumer and claimed with a
   50 ms lease (its worker "died") and as many claimed with a 10 min lease (alive); once both
   are idle past the supervisor's lease (0.25 s here), one ``Supervisor.reclaim`` call.
3. **Purge.** N one-step runs completed (claim + commit) and N/10 failed (claim + fail), then
   ``Supervisor.purge()`` with ``retention_s`` (then ``failed_retention_s``) of 1 ms, call after
   call until the index is empty. The raw limit: the same N completed runs built again and
   deleted by a plain redis-py loop (index page, then DEL of the run's keys and ZREM,
   pipelined per page of 500), what purge.lua deletes without its checks.

The old sweep (500 idle runs per pass, oldest first, healthy ones re-scored to the back) is not
re-run: its passes are derived (it cycled through every idle run, so ceil(N / 500) at worst) and
labelled so; so is the old purge's ceiling (500 runs per 60 s).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

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
    redis_cpu_s,
    run_main,
)
from orchestrator import Settings, Supervisor, scripts
from orchestrator.codec import Dispatch
from orchestrator.connection import close
from orchestrator.keys import GROUP, Keys
from orchestrator.retention import PAGE
from orchestrator.scripts import Call
from orchestrator.store import Claimed, Outcome, Store
from orchestrator.supervisor import BUDGET_S, PASSED_PAGE, SCAN_LIMIT

QUEUE = "backlog"
WORKFLOW = "backlog"
CHUNK = 1000  # calls per pipelined round trip while building a backlog
SCENARIOS = ("trim", "xdel", "drop")
OLD_PURGE_PER_S = 500 / 60  # the old purge: one page of 500 runs per 60 s
T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON."""

    sizes: tuple[int, ...]
    lost: int
    lapsed: int
    idle_passes: int
    max_passes: int
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick``: backlogs of 200 and 400 runs)."""
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="backlog sizes [1000,10000,100000; 200,400 with --quick]")
    parser.add_argument("--lost", type=int, default=None, help="runs that lose their entry [10; 5 with --quick]")
    parser.add_argument("--lapsed", type=int, default=None, help="claims whose lease lapses [5; 3 with --quick]")
    parser.add_argument("--idle-passes", type=int, default=5, help="passes with nothing to repair, median [5]")
    parser.add_argument("--max-passes", type=int, default=20, help="give up repairing after this many passes [20]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    sizes = ns.sizes or ("200,400" if ns.quick else "1000,10000,100000")
    options = Options(
        sizes=tuple(int(s) for s in sizes.split(",") if s),
        lost=ns.lost or (5 if ns.quick else 10),
        lapsed=ns.lapsed or (3 if ns.quick else 5),
        idle_passes=ns.idle_passes,
        max_passes=ns.max_passes,
        json_path=json_path(ns.json, "backlog") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )
    if any(n < 4 * options.lost or n < 2 * options.lapsed for n in options.sizes):
        parser.error("every size must be at least 4 x --lost and 2 x --lapsed")
    return options


# -- measuring --------------------------------------------------------------------------------


def timed(admin: redis.Redis, work: Callable[[], T]) -> tuple[T, float, float]:
    """(what ``work`` returned, wall seconds, Redis CPU seconds) of one call."""
    cpu = redis_cpu_s(admin)
    started = time.perf_counter()
    out = work()
    wall = time.perf_counter() - started
    return out, wall, redis_cpu_s(admin) - cpu


class CountedLogs(logging.Handler):
    """Counts the library's log records instead of printing them: a pass repairing 100,000 runs
    logs 100,000 warnings. The records are still made (their cost is in the pass's time)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: Counter[str] = Counter()
        self.logger = logging.getLogger("orchestrator")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages[record.getMessage()] += 1

    def __enter__(self) -> CountedLogs:
        self.logger.addHandler(self)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.propagate = True


# -- a backlog of runs, built through the scripts ---------------------------------------------


class Backlog:
    """One namespace on the server (the database is flushed first) and the scripts' calls for its runs."""

    def __init__(self, server: Server, **settings: Any) -> None:
        server.admin.flushall()  # the scripts stay loaded; nothing of a previous scenario remains
        self.admin = server.admin
        # one partition: the whole backlog in one stream and one index, the worst case for a pass
        namespace = f"bl-{uuid.uuid4().hex[:10]}"
        self.settings = Settings(redis_url=server.url, namespace=namespace, partitions=1, **settings)
        self.keys = Keys(self.settings.namespace, 1)
        self.store = Store(self.keys)
        self.lane = (QUEUE, 0)
        self.qk = self.keys.queue(*self.lane)
        self.admin.xgroup_create(self.qk.stream, GROUP, id="0", mkstream=True)

    def index(self, name: str) -> str:
        """The finished-run index ``done`` or ``dead`` of the one partition."""
        part = self.keys.part(0)
        return part.done if name == "done" else part.dead

    def run_ids(self, prefix: str, n: int) -> list[str]:
        """Run ids in submit order (so in stream order)."""
        return [f"{prefix}{i:07d}" for i in range(n)]

    def submit(self, run_ids: Sequence[str]) -> None:
        """One-step runs, ``CHUNK`` submits per round trip."""
        calls = [
            self.store.submit(
                run_id=run_id,
                workflow=WORKFLOW,
                queue=QUEUE,
                first_step="a",
                input_sha="0" * 32,
                event='{"detail":"bench"}',
                request_id=run_id,
                state={},
            )
            for run_id in run_ids
        ]
        self.execute(calls)

    def execute(self, calls: Sequence[Call]) -> list[Any]:
        """Every call, ``CHUNK`` per pipelined round trip."""
        out: list[Any] = []
        for start in range(0, len(calls), CHUNK):
            out += scripts.execute(self.admin, calls[start : start + CHUNK])
        return out

    def deliver(self, consumer: str, count: int) -> list[tuple[str, Dispatch]]:
        """XREADGROUP of up to ``count`` undelivered entries for ``consumer``."""
        reply: Any = self.admin.xreadgroup(GROUP, consumer, {self.qk.stream: ">"}, count=count)
        return [(eid, Dispatch.model_validate(f)) for _, rows in reply or [] for eid, f in rows]

    def beat(self, worker: str, lease_ms: int = 3_600_000) -> None:
        """``worker``'s heartbeat in partition 0: its claims there are live for ``lease_ms``."""
        scripts.execute(self.admin, [self.store.alive(partition=0, worker=worker, lease_ms=lease_ms, cancels_seen="")])

    def claim(self, eid: str, d: Dispatch, worker: str = "bench") -> Call:
        return self.store.claim(
            dispatch=d,
            queue=QUEUE,
            entry_id=eid,
            token=f"{worker}:{eid}",
            worker=worker,
            max_crashes=3,
            max_steps=0,
        )

    def finish(self, run_ids: Sequence[str], *, fail: bool) -> None:
        """Submit, claim and complete (or fail) every run, ``CHUNK`` at a time, acking as a worker does."""
        self.submit(run_ids)
        self.beat("bench")
        while batch := self.deliver("bench", CHUNK):
            claims = scripts.execute(self.admin, [self.claim(eid, d) for eid, d in batch])
            assert all(Claimed.parse(c).code == "RUN" for c in claims)
            ends = [self.fail_call(eid, d) if fail else self.commit_call(eid, d) for eid, d in batch]
            replies = scripts.execute(self.admin, [*ends, *self.store.ack(QUEUE, 0, [eid for eid, _ in batch])])
            assert all(Outcome.parse(r).code == ("FAILED" if fail else "OK") for r in replies[: len(ends)])

    def commit_call(self, eid: str, d: Dispatch) -> Call:
        return self.store.commit(
            dispatch=d,
            queue=QUEUE,
            token=f"bench:{eid}",
            record='{"by":"bench"}',
            event='{"step":"a"}',
            next_step=None,
            duration_ms=0,
            cost={},
            state={},
            max_steps=0,
        )

    def fail_call(self, eid: str, d: Dispatch) -> Call:
        return self.store.fail(
            dispatch=d,
            queue=QUEUE,
            token=f"bench:{eid}",
            event='{"step":"a"}',
            kind="error",
            retry_delay_ms=None,
            error='{"type":"Bench","message":"failed on purpose"}',
        )

    def lost(self, run_ids: Sequence[str]) -> list[str]:
        """The runs among ``run_ids`` whose dispatch is not an entry of the stream."""
        pipe = self.admin.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hget(self.keys.run(run_id).run, "dispatch")
        entries = pipe.execute()
        pipe = self.admin.pipeline(transaction=False)
        for entry in entries:
            pipe.xrange(self.qk.stream, entry or "0-1", entry or "0-1")
        return [run_id for run_id, rows in zip(run_ids, pipe.execute(), strict=True) if not rows]

    def supervisor(self, **changes: Any) -> Supervisor:
        """A supervisor of this namespace, its connection open (a first pass must not pay for the connect)."""
        supervisor = Supervisor(self.settings.model_copy(update=changes), supervisor_id=f"bench-{uuid.uuid4().hex[:6]}")
        supervisor.redis.ping()
        return supervisor


# -- 1. sweep ---------------------------------------------------------------------------------


def entry_score(entry_id: str) -> int:
    """The queued index's score of an entry id (``entry_score`` in the scripts' prelude)."""
    ms_part, seq = entry_id.split("-")
    return int(ms_part) * 2048 + min(int(seq), 2047)


def lose(backlog: Backlog, scenario: str, run_ids: list[str], k: int) -> list[str]:
    """Trim the ``k`` oldest entries, XDEL ``k`` in the middle, or delete the stream; the runs that lost their entry."""
    n, stream, admin = len(run_ids), backlog.qk.stream, backlog.admin
    if scenario == "trim":
        admin.xtrim(stream, maxlen=n - k, approximate=False)
        return run_ids[:k]
    if scenario == "xdel":
        middle = run_ids[n // 2 : n // 2 + k]
        pipe = admin.pipeline(transaction=False)
        for run_id in middle:
            pipe.hget(backlog.keys.run(run_id).run, "dispatch")
        admin.xdel(stream, *pipe.execute())
        return middle
    admin.delete(stream)
    return list(run_ids)


def needed(backlog: Backlog) -> int:
    """The queued runs the design says a pass must look at (nothing was delivered): those whose
    entry is before the stream's first one, every one when the stream is gone, and, up to the
    highest deleted id (Redis >= 7.0 reports it, 6.2 does not), those whose entry is gone."""
    admin, qk = backlog.admin, backlog.qk
    if not admin.exists(qk.stream):
        return int(admin.zcard(qk.queued))
    info: dict[str, Any] = admin.xinfo_stream(qk.stream)
    first = entry_score(info["first-entry"][0])
    trimmed = int(admin.zcount(qk.queued, "-inf", f"({first!r}"))
    deleted = info.get("max-deleted-entry-id")
    if not deleted or entry_score(deleted) < first:
        return trimmed
    between: list[str] = admin.zrangebyscore(qk.queued, first, repr(entry_score(deleted)))  # type: ignore[assignment]
    pipe = admin.pipeline(transaction=False)
    for run_id in between:
        pipe.hget(backlog.keys.run(run_id).run, "dispatch")
    dispatches = pipe.execute()
    for entry_id in dispatches:
        pipe.xrange(qk.stream, entry_id, entry_id, count=1)
    return trimmed + sum(1 for rows in pipe.execute() if not rows)


def passes(backlog: Backlog, supervisor: Supervisor, lost: list[str], most: int) -> list[dict[str, Any]]:
    """``sweep_queue`` pass after pass while a lost run is left unrepaired (``most`` passes at
    most); with nothing lost, ``most`` passes with nothing to repair."""
    out: list[dict[str, Any]] = []
    left = list(lost)
    while (left or not lost) and len(out) < most:
        counts, wall, cpu = timed(backlog.admin, lambda: supervisor.sweep_queue(backlog.lane))
        left = backlog.lost(left)
        out.append({"wall_s": wall, "redis_cpu_s": cpu, "swept": counts.get("swept", 0), "counts": counts})
        out[-1]["left"] = len(left)
    return out


def old_pass(backlog: Backlog, run_ids: list[str]) -> dict[str, Any]:
    """What a pass of the old sweep did when nothing needed repair: sweep.lua on the 500 runs
    idle longest. A proxy, labelled: today's sweep.lua on 500 healthy queued runs."""
    calls = [backlog.store.sweep(run_id=rid, queue=QUEUE) for rid in run_ids[-SCAN_LIMIT:]]
    replies, wall, cpu = timed(backlog.admin, lambda: scripts.execute(backlog.admin, calls))
    codes = Counter(Outcome.parse(r).code for r in replies)
    return {"runs": len(calls), "wall_s": wall, "redis_cpu_s": cpu, "codes": dict(codes)}


def sweep_case(server: Server, n: int, scenario: str, options: Options) -> dict[str, Any]:
    """One backlog of ``n`` runs, one way of losing entries, the passes that repair them, the idle passes after."""
    backlog = Backlog(server)
    run_ids = backlog.run_ids("q", n)
    _, build_s, _ = timed(server.admin, lambda: backlog.submit(run_ids))
    memory = int(server.admin.info("memory")["used_memory"])
    lost = lose(backlog, scenario, run_ids, options.lost)
    row: dict[str, Any] = {"n": n, "scenario": scenario, "lost": len(lost), "needed": needed(backlog)}
    supervisor = backlog.supervisor()
    try:
        with CountedLogs() as logs:
            repair = passes(backlog, supervisor, lost, options.max_passes)
            idle = passes(backlog, supervisor, [], options.idle_passes)
            server.admin.sadd(backlog.keys.queues, QUEUE)
            _, tick_s, _ = timed(server.admin, lambda: supervisor.tick(sweep=True, purge=True))
        row["old_pass"] = old_pass(backlog, run_ids) if scenario == "trim" else None
    finally:
        close(supervisor.redis)
    row |= {"looked_at": repair[0]["swept"], "repaired": sum(p["counts"].get("repaired", 0) for p in repair)}
    row |= {"left": repair[-1]["left"], "max_passes": options.max_passes, "pass_s": repair[0]["wall_s"]}
    row |= {"passes": None if repair[-1]["left"] else len(repair), "pass_cpu_s": repair[0]["redis_cpu_s"]}
    row |= {"idle_looked_at": max(p["swept"] for p in idle), "idle_s": statistics.median(p["wall_s"] for p in idle)}
    row |= {"idle_cpu_s": statistics.median(p["redis_cpu_s"] for p in idle), "tick_s": tick_s}
    row |= {"build_s": build_s, "used_memory": memory, "warnings": dict(logs.messages), "samples": repair + idle}
    print(
        f"  sweep {scenario} N={n:,}: lost {len(lost):,}, needed {row['needed']:,}, looked at {row['looked_at']:,},"
        f" repaired {row['repaired']:,} in {row['passes'] or f'>{options.max_passes}'} pass(es), pass 1"
        f" {row['pass_s'] * 1000:.1f} ms; idle pass {row['idle_s'] * 1000:.2f} ms; tick {tick_s * 1000:.1f} ms"
        f" (backlog built in {build_s:.1f} s)",
        flush=True,
    )
    return row


# -- 2. reclaim -------------------------------------------------------------------------------

RECLAIM_SETTINGS = {"heartbeat_interval_s": 0.05, "lease_s": 0.25, "reclaim_interval_s": 0.1, "sweep_after_s": 1.0}


def reclaim_case(server: Server, n: int, options: Options) -> dict[str, Any]:
    """``lapsed`` dead claims and as many live ones among ``n`` queued runs; one reclaim call."""
    backlog = Backlog(server, **RECLAIM_SETTINGS)
    backlog.submit(backlog.run_ids("q", n))
    delivered = backlog.deliver("dead-worker", 2 * options.lapsed)
    dead, live = delivered[: options.lapsed], delivered[options.lapsed :]
    backlog.beat("dead-worker")
    backlog.beat("live-worker")
    claims = [backlog.claim(eid, d, "dead-worker") for eid, d in dead]
    claims += [backlog.claim(eid, d, "live-worker") for eid, d in live]
    assert all(Claimed.parse(c).code == "RUN" for c in scripts.execute(server.admin, claims))
    backlog.admin.hdel(backlog.keys.part(0).alive, "dead-worker")  # its deadline passed
    supervisor = backlog.supervisor()
    try:
        with CountedLogs():
            counts, wall, cpu = timed(server.admin, lambda: supervisor.reclaim(backlog.lane))
            idle = [timed(server.admin, lambda: supervisor.reclaim(backlog.lane)) for _ in range(options.idle_passes)]
    finally:
        close(supervisor.redis)
    moved = [d.run for _, d in dead if not backlog.lost([d.run]) and redispatched(backlog, d.run)]
    untouched = [d.run for _, d in live if not redispatched(backlog, d.run)]
    row: dict[str, Any] = {"n": n, "lapsed": len(dead), "live": len(live), "counts": counts}
    row |= {"redispatched": counts.get("redispatched", 0), "verified": len(moved), "live_untouched": len(untouched)}
    row["reclaim_s"] = wall
    row |= {"reclaim_cpu_s": cpu, "idle_s": statistics.median(w for _, w, _ in idle)}
    row |= {"idle_cpu_s": statistics.median(c for _, _, c in idle), "idle_counts": [c for c, _, _ in idle]}
    print(
        f"  reclaim N={n:,}: {row['redispatched']} of {len(dead)} lapsed re-dispatched ({len(live)} live left)"
        f" in {wall * 1000:.2f} ms; idle call {row['idle_s'] * 1000:.2f} ms",
        flush=True,
    )
    return row


def redispatched(backlog: Backlog, run_id: str) -> bool:
    """The run's history ends with a re-dispatch."""
    last = backlog.admin.lindex(backlog.keys.run(run_id).history, -1)
    return bool(last) and '"redispatched"' in str(last)


# -- 3. purge ---------------------------------------------------------------------------------


def purge_passes(backlog: Backlog, supervisor: Supervisor, index: str) -> list[dict[str, Any]]:
    """``Supervisor.purge()`` call after call until the index is empty."""
    key = backlog.index(index)
    passes: list[dict[str, Any]] = []
    while backlog.admin.zcard(key):
        counts, wall, cpu = timed(backlog.admin, supervisor.purge)
        purged = counts.get("purged", 0)
        passes.append({"purged": purged, "wall_s": wall, "redis_cpu_s": cpu})
        if not purged:
            break  # nothing due: reported as such, never an endless loop
    return passes


def raw_purge(backlog: Backlog, cutoff_ms: int) -> int:
    """The raw limit: a page of the index (as large as purge's), then DEL of each run's keys and one
    ZREM, pipelined: what purge.lua deletes, without its checks."""
    purged = 0
    key = backlog.keys.part(0).done
    while True:
        page: list[str] = backlog.admin.zrangebyscore(key, "-inf", cutoff_ms, start=0, num=PAGE)  # type: ignore[assignment]
        if not page:
            return purged
        pipe = backlog.admin.pipeline(transaction=False)
        for run_id in page:
            rk = backlog.keys.run(run_id)
            pipe.delete(rk.run, rk.state, rk.results, rk.stash, rk.history)
        pipe.zrem(key, *page)
        pipe.execute()
        purged += len(page)


def purge_rates(rows: list[dict[str, Any]], total: int, wall_s: float, cpu_s: float) -> dict[str, Any]:
    """Rates of a purge: runs per wall second, per Redis CPU second, per budget-limited pass."""
    full = [p["purged"] for p in rows[:-1]]  # every pass but the last stopped at the budget
    out: dict[str, Any] = {"runs": total, "passes": len(rows), "wall_s": wall_s, "redis_cpu_s": cpu_s}
    out |= {"per_s": ratio(total, wall_s), "per_cpu_s": ratio(total, cpu_s)}
    out |= {"per_full_pass": statistics.median(full) if full else None}
    return out


def purge_case(server: Server, n: int) -> dict[str, Any]:
    """N completed and N/10 failed runs purged by the supervisor; N completed deleted by the raw loop."""
    backlog = Backlog(server)
    failed = max(1, n // 10)
    _, build_s, _ = timed(server.admin, lambda: backlog.finish(backlog.run_ids("c", n), fail=False))
    backlog.finish(backlog.run_ids("f", failed), fail=True)
    time.sleep(0.01)  # past the 1 ms retention
    out: dict[str, Any] = {"n": n, "failed": failed, "build_s": build_s}
    for index, changes in (
        ("done", {"retention_s": 0.001, "failed_retention_s": 0}),
        ("dead", {"retention_s": 0, "failed_retention_s": 0.001}),
    ):
        supervisor = backlog.supervisor(**changes)
        try:
            passes = purge_passes(backlog, supervisor, index)
        finally:
            close(supervisor.redis)
        total = sum(p["purged"] for p in passes)
        out[index] = purge_rates(passes, total, sum(p["wall_s"] for p in passes), sum(p["redis_cpu_s"] for p in passes))
        out[index] |= {"left": backlog.admin.zcard(backlog.index(index)), "samples": passes}
    out["keys_left"] = backlog.admin.dbsize()  # the stream, the group's queue set, stats: no run keys
    out["run_keys_left"] = sum(1 for _ in backlog.admin.scan_iter(f"{backlog.keys.namespace}:run:*", count=1000))
    backlog.finish(backlog.run_ids("r", n), fail=False)
    time.sleep(0.01)
    sec, usec = server.admin.time()
    cutoff = int(sec) * 1000 + int(usec) // 1000 - 1
    purged, wall, cpu = timed(server.admin, lambda: raw_purge(backlog, cutoff))
    out["raw"] = purge_rates([{"purged": purged}], purged, wall, cpu)
    out["ours_over_raw"] = ratio(out["done"]["per_s"], out["raw"]["per_s"])
    print(
        f"  purge N={n:,}: ours {fmt(out['done']['per_s'])} runs/s ({out['done']['passes']} passes),"
        f" failed {fmt(out['dead']['per_s'])} runs/s, raw {fmt(out['raw']['per_s'])} runs/s"
        f" (built in {build_s:.1f} s)",
        flush=True,
    )
    return out


# -- summary and tables -----------------------------------------------------------------------


def default(name: str) -> float:
    """A setting's shipped default (not the environment's value): the figures derived here are for defaults."""
    return float(Settings.model_fields[name].default)


def repair_within_s(row: dict[str, Any]) -> float | None:
    """Derived: a queued run's repair (no idle age: ``passed.lua`` looks at it at once) comes with
    the first pass after the loss (within one sweep interval); a pass that runs out of its budget
    goes on at the next tick, a reclaim interval later, so each extra pass adds that plus a budget."""
    if row["passes"] is None:
        return None
    extra = (row["passes"] - 1) * (default("reclaim_interval_s") + BUDGET_S)
    return float(default("sweep_interval_s") + extra + row["pass_s"])


def sustained(rates: dict[str, Any]) -> float | None:
    """Derived: runs per second one index is purged at on the default schedule while it is behind:
    a budget of deleting, then (the pass unfinished) again at the next tick, a reclaim interval later."""
    per_pass = rates["per_full_pass"] or (rates["per_s"] and rates["per_s"] * BUDGET_S)
    return None if per_pass is None else float(per_pass) / (BUDGET_S + default("reclaim_interval_s"))


def summarize(
    sweeps: list[dict[str, Any]], reclaims: list[dict[str, Any]], purges: list[dict[str, Any]]
) -> dict[str, Any]:
    """The rows of every table and the issue's targets, each with the measured (or derived) value."""
    bound_s = default("sweep_after_s") + default("sweep_interval_s")
    targets: list[dict[str, Any]] = []
    for scenario in SCENARIOS:
        rows = [r for r in sweeps if r["scenario"] == scenario]
        worst = [repair_within_s(r) for r in rows]
        value = None if None in worst else max(w for w in worst if w is not None)
        goal: dict[str, Any] = {
            "target": f"{scenario}: lost runs repaired within sweep_after_s + one sweep interval, any N"
        }
        met = value is not None and value <= bound_s
        targets.append(goal | {"value": value, "unit": "s", "bound": f"<= {bound_s:g} s", "met": met})
    largest = max(purges, key=lambda p: p["n"]) if purges else None
    capacity = None if largest is None else sustained(largest["done"])
    size = fmt(largest["n"]) if largest else "-"
    goal = {"target": f"purge keeps up with finished runs (default schedule, N = {size})"}
    targets.append(goal | {"value": capacity, "unit": "runs/s", "bound": ">= 2,000 runs/s"})
    targets[-1]["met"] = None if capacity is None else capacity >= 2000
    defaults = {"sweep_after_s": default("sweep_after_s"), "sweep_interval_s": default("sweep_interval_s")}
    defaults |= {"reclaim_interval_s": default("reclaim_interval_s")}
    defaults |= {
        "budget_s": BUDGET_S,
        "page": PASSED_PAGE,
        "repair_bound_s": bound_s,
        "old_purge_per_s": OLD_PURGE_PER_S,
    }
    return {"sweep": sweeps, "reclaim": reclaims, "purge": purges, "targets": targets, "defaults": defaults}


def ms(seconds: float | None, digits: int = 1) -> str:
    return fmt(None if seconds is None else seconds * 1000, digits)


SWEEP_HEADERS = (
    "N queued",
    "lost how",
    "lost",
    "needed a look",
    "looked at (pass 1)",
    "repaired",
    "passes",
    "repaired within s (derived)",
    "pass 1 ms / Redis CPU ms",
    "idle pass: looked at / ms / Redis CPU ms",
    "tick ms",
)


def sweep_row(r: dict[str, Any]) -> list[str]:
    passes = str(r["passes"]) if r["passes"] is not None else f"**not in {r['max_passes']}** ({r['left']:,} left)"
    idle = f"{fmt(r['idle_looked_at'])} / {ms(r['idle_s'], 2)} / {ms(r['idle_cpu_s'], 2)}"
    counts = [fmt(r[k]) for k in ("lost", "needed", "looked_at", "repaired")]
    pass1 = f"{ms(r['pass_s'])} / {ms(r['pass_cpu_s'])}"
    return [fmt(r["n"]), r["scenario"], *counts, passes, fmt(repair_within_s(r), 1), pass1, idle, ms(r["tick_s"])]


def old_row(r: dict[str, Any]) -> list[str]:
    worst = math.ceil(r["n"] / SCAN_LIMIT)
    old = r["old_pass"]
    within = fmt(default("sweep_after_s") + worst * default("sweep_interval_s"))
    cost = f"{ms(old['wall_s'])} / {ms(old['redis_cpu_s'])} ({old['runs']} runs)"
    return [fmt(r["n"]), fmt(worst), within, cost, f"{ms(r['idle_s'], 2)} / {ms(r['idle_cpu_s'], 2)}"]


OLD_HEADERS = (
    "N queued",
    "old: passes to reach a lost run, worst (derived)",
    "old: repaired within s (derived)",
    "old: idle pass ms / Redis CPU ms (proxy)",
    "now: idle pass ms / Redis CPU ms",
)
RECLAIM_HEADERS = (
    "N queued",
    "lapsed claims",
    "live claims",
    "re-dispatched",
    "reclaim ms",
    "Redis CPU ms",
    "idle call ms",
)


def reclaim_row(r: dict[str, Any]) -> list[str]:
    counts = [fmt(r[k]) for k in ("n", "lapsed", "live", "redispatched")]
    return [*counts, ms(r["reclaim_s"], 2), ms(r["reclaim_cpu_s"], 2), ms(r["idle_s"], 2)]


PURGE_HEADERS = (
    "runs",
    "purged by",
    "purge() calls",
    "s",
    "runs/s",
    "runs per Redis CPU s",
    "default schedule runs/s (derived)",
    "ours ÷ raw",
)
PURGE_RIGHT = (0, 2, 3, 4, 5, 6, 7)
PURGED_BY = (("completed, ours", "done"), ("failed, ours", "dead"), ("completed, raw DEL loop", "raw"))


def purge_row(r: dict[str, Any], label: str, key: str) -> list[str]:
    p, ours = r[key], key != "raw"
    rates = [fmt(p["wall_s"], 2), fmt(p["per_s"]), fmt(p["per_cpu_s"]), fmt(sustained(p)) if ours else "-"]
    over = fmt_ratio(r["ours_over_raw"]) if key == "done" else "-"
    return [fmt(p["runs"]), label, str(p["passes"]) if ours else "-", *rates, over]


def tables(summary: dict[str, Any], options: Options) -> str:
    d = summary["defaults"]
    lines = [
        f"Sweep: one queue of N one-step runs, nobody consuming; runs lose their entry (trim: the {options.lost} "
        f"oldest, XTRIM MAXLEN exact; xdel: {options.lost} in the middle, ahead of the group; drop: the stream "
        f"deleted). A pass = one `Supervisor.sweep_queue` call (pages of {d['page']} until done or "
        f"{d['budget_s']:g} s spent); tick = one `Supervisor.tick(sweep=True, purge=True)` after the repair. "
        f"Redis CPU = `INFO cpu` delta around the call (two INFO calls alone: {ms(d['info_floor_cpu_s'], 2)} ms).",
        "",
        markdown(SWEEP_HEADERS, [sweep_row(r) for r in summary["sweep"]], right=(0, 2, 3, 4, 5, 7, 8, 9, 10)),
        "",
        "The old sweep (500 idle runs per pass, oldest first, healthy ones re-scored to the back): not run. "
        "Its passes are derived (it cycled through every idle run, so a lost run could wait behind all N); its "
        "idle pass is proxied by today's sweep.lua on 500 healthy queued runs.",
        "",
        markdown(OLD_HEADERS, [old_row(r) for r in summary["sweep"] if r["old_pass"]], right=(0, 1, 2, 3, 4)),
        "",
        f"Reclaim: N runs queued, {options.lapsed} claims whose lease lapsed and {options.lapsed} live ones, "
        "all idle past the supervisor's lease; one `Supervisor.reclaim` call, then idle calls (median).",
        "",
        markdown(RECLAIM_HEADERS, [reclaim_row(r) for r in summary["reclaim"]], right=(0, 1, 2, 3, 4, 5, 6)),
        "",
        "Purge: `Supervisor.purge()` with a 1 ms retention, call after call until the index is empty; raw = a "
        "page of the index, DEL of each run's keys and one ZREM per page, pipelined. Default schedule = runs "
        f"per budget-limited call ÷ (the {d['budget_s']:g} s budget + the {d['reclaim_interval_s']:g} s reclaim "
        "interval after which an unfinished purge goes on) (derived); the old purge: "
        f"{d['old_purge_per_s']:.1f} runs/s at most (500 per 60 s, derived).",
        "",
        markdown(PURGE_HEADERS, [purge_row(r, *by) for r in summary["purge"] for by in PURGED_BY], right=PURGE_RIGHT),
        "",
    ]
    for goal in summary["targets"]:
        met = {True: "met", False: "**missed**"}.get(goal["met"], "not measured")
        digits = 1 if goal["unit"] == "s" else 0
        value = f"{fmt(goal['value'], digits)} {goal['unit']}" if goal["value"] is not None else "never (passes tried)"
        lines.append(f"- target {goal['target']} {goal['bound']}: {value}, {met}")
    return "\n".join(lines)


def run(options: Options) -> dict[str, Any]:
    """Every size, every part, on one private server (persistence off); the JSON document."""
    sweeps: list[dict[str, Any]] = []
    reclaims: list[dict[str, Any]] = []
    purges: list[dict[str, Any]] = []
    with bench_server("backlog", options.redis_server) as server:
        floor = statistics.median(timed(server.admin, lambda: None)[2] for _ in range(11))
        for n in options.sizes:
            sweeps += [sweep_case(server, n, scenario, options) for scenario in SCENARIOS]
            reclaims.append(reclaim_case(server, n, options))
            purges.append(purge_case(server, n))
    summary = summarize(sweeps, reclaims, purges)
    summary["defaults"]["info_floor_cpu_s"] = floor
    return {
        "benchmark": "backlog",
        "environment": server.env,
        "settings": {k: v for k, v in asdict(options).items() if k != "json_path"}
        | {"reclaim_settings": RECLAIM_SETTINGS, "defaults": summary["defaults"]},
        "summary": summary,
        "markdown": tables(summary, options),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run every part, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
