"""Parked runs: what a run that sleeps or waits for a signal costs Redis, how late the due ones
wake up, and how fast a signal resumes one.

``python -m bench.parked [--runs 100000] [--window-s 60] [--signals 200] [--workers 2]
[--quick] [--json [PATH]] [--redis-server BIN]``

Issue 12, part 7. A parked run holds no worker slot, no lease and no stream entry, only its keys:
the claim to check is that parking costs memory and nothing else, that a crowd of runs due in
the same minute wakes on time, and that a signal resumes a run about as fast as a submit starts
one. One private redis-server (persistence off), three measurements:

1. **Memory per parked run.** For each kind, on a flushed database in the default namespace
   (realistic key lengths; run ids are uuid4 hex, as ``client.submit`` makes them), N runs built
   by the real scripts, 1,000 calls per pipelined round trip, as a client and a worker would
   (``tests/ops.py`` drives the same calls one run at a time): ``Store.submit`` (the input encoded
   as the client does), XREADGROUP, ``Store.claim``, then ``Store.commit`` of the first step with
   a worker's record and event and what the workflow makes of the step's return value
   (``Workflow.interpret``): ``Sleep(seconds=3600)`` (``bench.flows:sleeper``),
   ``WaitFor("approval", timeout_s=3600)`` and ``WaitFor("approval")`` (``bench.flows:approver``),
   and, as each workflow's baseline, ``None``: the run went on, its next step a queued entry.
   Then the supervisor's trim (``Store.trim`` of every lane: it drops the acked entries of the
   first steps, as the supervisor does every tick). Bytes per run: ``INFO memory`` used_memory
   after the trim minus before the first submit, over N (the partitions' counters, created by
   the first submits, included). Also the keys of one run of each kind and their ``MEMORY USAGE``.
2. **Wake-up lateness.** N sleepers parked the same way (``bench.flows:sleeper``), with absolute
   wake-ups (``@<epoch ms>``, what ``Sleep(until=...)`` commits) spread evenly over ``--window-s``
   seconds. The window opens after the parking and the fleet's start: its start is picked when
   every run is claimed, the commit phase estimated as long as the claim phase, plus 10 s for the
   fleet to start and 3 s of margin; the output says by how much parking and the fleet's start
   beat it (negative: they overran it). Then ``--workers`` worker processes and one supervisor,
   default settings (16 steps per worker, promote every 0.2 s in each worker, the supervisor's
   every 0.5 s), wake the runs and run the no-op step after the sleep. From every run's history:
   ``woke``'s ``at`` minus ``sleeping``'s ``until_ms`` (both the Redis clock), the next step's
   start (its ``ok`` event's ``start_ms``, the worker's clock on the same machine) and commit
   (that event's ``at``) minus ``until_ms``, and how many woke early (must be none).
3. **Signal to resumed step.** One worker process (``bench.flows:approver`` and a one-step
   ``bench.flows:noop``), default settings, runs one after another: an approver run submitted and
   ``waiting``, then t0 = ``time.time()`` just before ``client.signal``; latency = the ``approved``
   step's ``start_ms`` minus t0. Interleaved with the baseline (run for run, so both see the same
   machine): t0 just before ``client.submit`` of a one-step no-op run, latency = its step's
   ``start_ms`` minus t0. ``start_ms`` is whole ms (floored) and t0 is not, so start_ms - t0 reads
   up to 1 ms low, below zero for a step that started within the ms: the tables add half a ms
   (the middle of the step's ms; each latency is then within 0.5 ms, and the ratio means
   something below a ms); the JSON also has the raw start_ms - t0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    Server,
    add_common_args,
    bench_server,
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
from bench.flows import PARK_S, STEPS_ENV, approver, make_noop, sleeper
from bench.procs import Fleet, child_env, wait_registered, wait_until, worker_args
from orchestrator import Client, Settings, Sleep, WaitFor, Workflow, scripts
from orchestrator.codec import Dispatch, StepRecord, dumps, encode_fields
from orchestrator.keys import GROUP, Keys, RunKeys
from orchestrator.scripts import Call
from orchestrator.store import Claimed, Outcome, Store, new_claim_token
from orchestrator.worker.runner import new_worker_id
from orchestrator.workflow import StepOutcome

CHUNK = 1000  # calls per pipelined round trip while parking
PARKER_LEASE_MS = 3_600_000  # the parking "worker" stays live while it holds its claims
FLEET_START_S = 10.0  # allowance for the workers and the supervisor to start before the window opens
MARGIN_S = 3.0
SETTLE_S, SETTLE_READS = 0.25, 12  # used_memory is read until two reads 0.25 s apart agree (3 s at most)
POLL_S = 0.2  # the end poll of the lateness window: one ZCARD per partition
EARLY = ("woke", "start", "commit")  # the lateness figures, as named in the JSON's "early"
WOKEN = "woken"  # the sleeper's step after the sleep
RESUMED = "approved"  # the approver's step after the wait
MID_MS = 0.5  # start_ms is floored to the ms: its middle is 0.5 ms later
DEFAULTS = Settings.model_fields


@dataclass(frozen=True)
class Options:
    """What one invocation measures; recorded in the JSON next to the results."""

    runs: int
    window_s: float
    signals: int
    workers: int
    quick: bool
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    """Command line -> options (``--quick`` only changes the defaults of sizes not given)."""
    parser = argparse.ArgumentParser(prog="python -m bench.parked", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="parked runs per measurement [100000; 2000 quick]")
    parser.add_argument("--window-s", type=float, default=None, help="the sleepers' wake-ups span this [60; 10 quick]")
    parser.add_argument("--signals", type=int, default=None, help="signalled runs, and as many submits [200; 20 quick]")
    parser.add_argument("--workers", type=int, default=2, help="worker processes waking the sleepers [2]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    options = Options(
        runs=ns.runs if ns.runs is not None else (2000 if ns.quick else 100_000),
        window_s=ns.window_s if ns.window_s is not None else (10.0 if ns.quick else 60.0),
        signals=ns.signals if ns.signals is not None else (20 if ns.quick else 200),
        workers=ns.workers,
        quick=ns.quick,
        json_path=json_path(ns.json, "parked") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )
    if options.runs < 1 or options.signals < 1 or options.workers < 1 or options.window_s <= 0:
        parser.error("--runs, --signals and --workers must be at least 1, --window-s above 0")
    return options


# -- parking runs through the scripts ---------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """The first step of one run, claimed by the parker as a worker claims it."""

    entry_id: str
    dispatch: Dispatch
    token: str
    claimed: Claimed
    start_ms: int


def now_ms() -> int:
    """The wall clock in whole ms, as a worker stamps a step's start and end."""
    return int(time.time() * 1000)


def server_ms(admin: redis.Redis) -> int:
    """The Redis server's clock in ms (``TIME``): the clock the scripts stamp and wake by."""
    seconds, micros = admin.time()
    return int(seconds) * 1000 + int(micros) // 1000


def used_memory(admin: redis.Redis) -> int:
    """``INFO memory`` used_memory once it holds still: the bytes the server's allocator has
    handed out, without the transient ones (a client's query buffer grown by a pipeline of
    1,000 calls is shrunk by the server's cron a moment later: it is not the runs')."""
    last = int(admin.info("memory")["used_memory"])
    for _ in range(SETTLE_READS):
        time.sleep(SETTLE_S)
        now = int(admin.info("memory")["used_memory"])
        if now == last:
            break
        last = now
    return last


class Parker:
    """Runs of one workflow built by the real scripts, pipelined: submitted as a client submits
    them, their first step claimed and committed as a worker does (its id, claim tokens, record
    and event), so the keys left behind are a real run's."""

    def __init__(self, admin: redis.Redis, keys: Keys, flow: Workflow[Any]) -> None:
        self.admin, self.keys, self.flow = admin, keys, flow
        self.store = Store(keys)
        self.worker = new_worker_id()  # a real worker's id: it is in every record and event
        self.fields, self.digest = self.input_fields()

    def input_fields(self) -> tuple[dict[str, str], str]:
        """The default input's state fields and digest, encoded as ``client.submit`` encodes them."""
        flow = self.flow
        state = flow.validate_input({})
        what = f"input of workflow {flow.name!r}"
        names = type(state).model_fields.keys() | (state.model_extra or {}).keys()
        limit = DEFAULTS["max_payload_bytes"].default
        fields = encode_fields(flow.json_fields(state, names, what=what), what=what, limit=limit)
        digest = hashlib.sha256(dumps(dict(sorted(fields.items())), what="input").encode()).hexdigest()[:32]
        return fields, digest

    def prepare(self) -> None:
        """What a namespace's first submit and a starting worker set up: the partition count, the
        queue, the consumer groups, and the parker's beat in every partition."""
        for stream in self.keys.streams(self.flow.queue):
            try:
                self.admin.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        calls = [self.store.layout(), scripts.command("SADD", self.keys.queues, self.flow.queue)]
        calls += [
            self.store.alive(partition=p, worker=self.worker, lease_ms=PARKER_LEASE_MS, cancels_seen="")
            for p in range(self.keys.partitions)
        ]
        scripts.execute(self.admin, calls)

    def claim_all(self, run_ids: Sequence[str]) -> list[Claim]:
        """Submit every run and claim its first step, ``CHUNK`` runs per round of round trips; the
        claims in the order the steps were read (partition by partition), not in that of ``run_ids``."""
        out: list[Claim] = []
        for start in range(0, len(run_ids), CHUNK):
            chunk = run_ids[start : start + CHUNK]
            scripts.execute(self.admin, [self.submit_call(run_id) for run_id in chunk])
            out += self.claim(self.deliver(len(chunk)))
        return out

    def submit_call(self, run_id: str) -> Call:
        return self.store.submit(
            run_id=run_id,
            workflow=self.flow.name,
            queue=self.flow.queue,
            first_step=self.flow.first_step,
            input_sha=self.digest,
            event=dumps({"detail": f"workflow {self.flow.name}"}, what="event"),
            request_id=uuid.uuid4().hex,
            state=self.fields,
        )

    def deliver(self, count: int) -> list[tuple[str, Dispatch]]:
        """XREADGROUP of the ``count`` entries just added, from every partition's stream."""
        streams = dict.fromkeys(self.keys.streams(self.flow.queue), ">")
        out: list[tuple[str, Dispatch]] = []
        while len(out) < count:
            reply: Any = self.admin.xreadgroup(GROUP, self.worker, streams, count=count)  # type: ignore[arg-type]
            rows = [(eid, Dispatch.model_validate(f)) for _, entries in reply or [] for eid, f in entries]
            if not rows:
                raise RuntimeError(f"{count - len(out)} submitted entries are missing from the streams")
            out += rows
        return out

    def claim(self, delivered: Sequence[tuple[str, Dispatch]]) -> list[Claim]:
        """``Store.claim`` of every delivered entry, one round trip; each must be ``RUN``."""
        tokens = [new_claim_token(self.worker) for _ in delivered]
        calls = [
            self.store.claim(
                dispatch=d,
                queue=self.flow.queue,
                entry_id=eid,
                token=token,
                worker=self.worker,
                max_crashes=DEFAULTS["max_crashes"].default,
                max_steps=DEFAULTS["max_run_steps"].default,
            )
            for (eid, d), token in zip(delivered, tokens, strict=True)
        ]
        started = now_ms()
        claims = [Claimed.parse(reply) for reply in scripts.execute(self.admin, calls)]
        refused = Counter(c.code for c in claims if c.code != "RUN")
        if refused:
            raise RuntimeError(f"claims refused: {dict(refused)}")
        return [
            Claim(eid, d, token, claimed, started)
            for (eid, d), token, claimed in zip(delivered, tokens, claims, strict=True)
        ]

    def commit_all(self, claims: Sequence[Claim], outcomes: Sequence[StepOutcome]) -> Counter[str]:
        """Commit every claimed step with its outcome, acking its entry; how many runs ended up
        sleeping, waiting or queued (every commit must apply)."""
        parked: Counter[str] = Counter()
        for start in range(0, len(claims), CHUNK):
            batch = zip(claims[start : start + CHUNK], outcomes[start : start + CHUNK], strict=True)
            replies = scripts.execute(self.admin, [self.commit_call(c, o) for c, o in batch])
            for reply in replies:
                outcome = Outcome.parse(reply)
                if outcome.code != "OK":
                    raise RuntimeError(f"a commit was refused: {outcome}")
                where = str(outcome.detail[2])
                parked[where if where in ("delayed", "waiting") else "queued"] += 1
        return parked

    def commit_call(self, c: Claim, outcome: StepOutcome) -> Call:
        """``Store.commit`` as a worker builds it (``orchestrator/worker/outcomes.py``): its record,
        its event, no update, no chaining (a parked run is never chained; nor is the baseline's
        next step, which stays a queued entry)."""
        d, end_ms = c.dispatch, now_ms()
        record = StepRecord(
            step=d.step,
            visit=d.visit,
            attempt=c.claimed.attempt,
            fence=c.claimed.fence,
            worker=self.worker,
            start_ms=c.start_ms,
            end_ms=end_ms,
            update={},
            next=outcome.next_step,
            cost={},
            wake=outcome.wake or None,
            wait=outcome.wait,
        ).model_dump_json(exclude={name for name in ("wake", "wait") if not getattr(outcome, name)})
        event = {"step": d.step, "visit": d.visit, "attempt": c.claimed.attempt, "fence": c.claimed.fence}
        event |= {"worker": self.worker, "start_ms": c.start_ms, "end_ms": end_ms}
        return self.store.commit(
            dispatch=d,
            queue=self.flow.queue,
            token=c.token,
            record=record,
            event=dumps(event, what="history event"),
            next_step=outcome.next_step,
            duration_ms=end_ms - c.start_ms,
            cost={},
            state={},
            max_steps=DEFAULTS["max_run_steps"].default,
            entry_id=c.entry_id,
            wake=outcome.wake,
            wait=json.dumps(outcome.wait) if outcome.wait else "",
        )

    def trim(self) -> int:
        """The supervisor's trim of every lane of the queue: the acked entries go; how many."""
        lanes = range(self.keys.partitions)
        calls = [self.store.trim(queue=self.flow.queue, partition=p) for p in lanes]
        return sum(int(n) for n in scripts.execute(self.admin, calls))

    def sample(self, run_id: str) -> list[dict[str, Any]]:
        """The keys of one run: type, length and ``MEMORY USAGE`` (exact: SAMPLES 0); and the
        indexes and stream it is a member of (their share of memory is in the per-run figure)."""
        rk = self.keys.run(run_id)
        names = list(RunKeys.__dataclass_fields__)
        pipe = self.admin.pipeline(transaction=False)
        for name in names:
            pipe.type(getattr(rk, name))
        types = pipe.execute()
        rows = []
        for name, kind in zip(names, types, strict=True):
            if kind == "none":
                continue
            key = getattr(rk, name)
            length = {"hash": self.admin.hlen, "list": self.admin.llen, "string": self.admin.strlen}[kind](key)
            rows.append({"key": name, "type": kind, "length": int(length), "bytes": self.admin.memory_usage(key, 0)})
        rows.append({"key": "member of", "type": ", ".join(self.memberships(run_id)), "length": None, "bytes": None})
        return rows

    def memberships(self, run_id: str) -> Iterator[str]:
        """The per-partition sets (and stream) that hold an entry for the run."""
        qk, pk = self.keys.queue_of(self.flow.queue, run_id), self.keys.part_of(run_id)
        for name, key in (("active", pk.active), ("queued", qk.queued), ("delayed", qk.delayed)):
            if self.admin.zscore(key, run_id) is not None:
                yield name
        entry = self.admin.hget(self.keys.run(run_id).run, "dispatch")
        if entry and "-" in str(entry) and self.admin.xrange(qk.stream, entry, entry):
            yield "stream (its next step's entry)"


# -- 1. memory --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One way a run's first step ends: what it returned, and what the run holds afterwards."""

    name: str
    flow: Workflow[Any]
    returned: Any
    parked: str  # where commit.lua says the run went: queued, delayed or waiting

    @property
    def baseline(self) -> bool:
        """The run went on: the kind the same workflow's parked kinds are compared to."""
        return self.returned is None


WENT_ON = "went on"
KINDS = (
    Kind(WENT_ON, sleeper, None, "queued"),
    Kind(f"sleeping, Sleep(seconds={PARK_S})", sleeper, Sleep(seconds=PARK_S), "delayed"),
    Kind(WENT_ON, approver, None, "queued"),
    Kind(f"waiting, timeout {PARK_S} s", approver, WaitFor("approval", timeout_s=PARK_S), "waiting"),
    Kind("waiting, no timeout", approver, WaitFor("approval"), "waiting"),
)


def memory_of(server: Server, kind: Kind, n: int) -> dict[str, Any]:
    """N runs of ``kind`` on a flushed database: used_memory per run, and one run's keys."""
    admin = server.admin
    admin.flushall()  # the scripts stay loaded
    parker = Parker(admin, Keys(), kind.flow)  # the default namespace and partitions
    parker.prepare()
    run_ids = [uuid.uuid4().hex for _ in range(n)]
    step = kind.flow.get_step(kind.flow.first_step)
    outcome = kind.flow.interpret(step, kind.returned)
    before, started = used_memory(admin), time.perf_counter()
    parked = parker.commit_all(parker.claim_all(run_ids), [outcome] * n)
    park_s = time.perf_counter() - started
    if parked != Counter({kind.parked: n}):
        raise RuntimeError(f"{kind.name}: expected {n} runs {kind.parked}, got {dict(parked)}")
    untrimmed = used_memory(admin)
    trimmed = parker.trim()
    after = used_memory(admin)
    out: dict[str, Any] = {
        "kind": kind.name,
        "workflow": kind.flow.name,
        "baseline": kind.baseline,
        "returned": repr(kind.returned),
        "parked": kind.parked,
        "runs": n,
        "park_s": park_s,
        "used_memory_before": before,
        "used_memory_untrimmed": untrimmed,
        "used_memory_after": after,
        "entries_trimmed": trimmed,
        "bytes_per_run": (after - before) / n,
        "bytes_per_run_untrimmed": (untrimmed - before) / n,
        "sample_run": run_ids[0],
        "sample_keys": parker.sample(run_ids[0]),
    }
    print(
        f"  {out['kind']:<34} {kind.flow.name:<9} {n:,} runs in {park_s:.1f} s: "
        f"{fmt(out['bytes_per_run'])} bytes per run ({trimmed:,} acked entries trimmed)",
        flush=True,
    )
    return out


def memory(server: Server, options: Options) -> list[dict[str, Any]]:
    """Every kind, each on a flushed database; each parked kind compared to its workflow's baseline."""
    rows = [memory_of(server, kind, options.runs) for kind in KINDS]
    baselines = {row["workflow"]: row for row in rows if row["baseline"]}
    for row in rows:
        base = None if row["baseline"] else baselines.get(row["workflow"])
        row["vs_went_on"] = ratio(row["bytes_per_run"], base["bytes_per_run"]) if base else None
        row["extra_bytes_vs_went_on"] = row["bytes_per_run"] - base["bytes_per_run"] if base else None
    return rows


# -- 2. wake-up lateness ----------------------------------------------------------------------


def read_histories(admin: redis.Redis, keys: Keys, run_ids: Sequence[str]) -> list[list[dict[str, Any]]]:
    """Every run's history, ``CHUNK`` LRANGEs per round trip."""
    out: list[list[dict[str, Any]]] = []
    for start in range(0, len(run_ids), CHUNK):
        pipe = admin.pipeline(transaction=False)
        for run_id in run_ids[start : start + CHUNK]:
            pipe.lrange(keys.run(run_id).history, 0, -1)
        out += [[json.loads(raw) for raw in history] for history in pipe.execute()]
    return out


def wake_figures(histories: Sequence[list[dict[str, Any]]], requested: Sequence[int]) -> dict[str, Any]:
    """Lateness after ``until_ms`` of the wake-up (``woke`` at), of the next step's start (its
    ``ok`` event's ``start_ms``) and commit (that event's ``at``); early ones; runs that did not
    wake and run ``woken`` exactly once, and wake-ups clamped because parking overran them."""
    woke: list[int] = []
    started: list[int] = []
    committed: list[int] = []
    broken = clamped = 0
    for events, want in zip(histories, requested, strict=True):
        sleeping = [e for e in events if e.get("type") == "sleeping"]
        woken = [e for e in events if e.get("type") == "woke"]
        ran = [e for e in events if e.get("type") == "ok" and e.get("step") == WOKEN]
        if len(sleeping) != 1 or len(woken) != 1 or len(ran) != 1:
            broken += 1
            continue
        until = int(sleeping[0]["until_ms"])
        clamped += until != want
        woke.append(int(woken[0]["at"]) - until)
        started.append(int(ran[0]["start_ms"]) - until)
        committed.append(int(ran[0]["at"]) - until)
    return {
        "woke_ms": spread(woke),
        "start_ms": spread(started),
        "commit_ms": spread(committed),
        "early": {
            name: sum(v < 0 for v in values) for name, values in zip(EARLY, (woke, started, committed), strict=True)
        },
        "not_once": broken,
        "clamped": clamped,
        "samples": {"woke_ms": woke, "start_ms": started, "commit_ms": committed},
    }


def wait_all_done(admin: redis.Redis, keys: Keys, n: int, timeout_s: float, fleet: Fleet) -> None:
    """Poll the finished-run indexes every ``POLL_S`` until ``n`` runs are done."""
    deadline = time.monotonic() + timeout_s
    while finished_runs(admin, keys) < n:
        fleet.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n - finished_runs(admin, keys)} of {n} sleepers not done after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def lateness(server: Server, options: Options) -> dict[str, Any]:
    """N sleepers due over the window, parked before it opens; a fleet wakes them; their histories read."""
    admin, n = server.admin, options.runs
    admin.flushall()
    settings = Settings(redis_url=server.url, namespace=f"park-{uuid.uuid4().hex[:10]}")
    keys = Keys(settings.namespace, settings.partitions)
    parker = Parker(admin, keys, sleeper)
    parker.prepare()
    run_ids = [uuid.uuid4().hex for _ in range(n)]
    started = time.perf_counter()
    claims = parker.claim_all(run_ids)
    claim_s = time.perf_counter() - started
    lead_s = claim_s + FLEET_START_S + MARGIN_S  # the commit phase estimated as long as the claim phase
    window_ms = round(options.window_s * 1000)
    start_ms = server_ms(admin) + math.ceil(lead_s * 1000)
    # evenly over the window, in the order the steps were claimed (partition by partition, chunk by chunk)
    wakes = {c.dispatch.run: start_ms + i * window_ms // n for i, c in enumerate(claims)}
    outcomes = [StepOutcome(update={}, next_step=WOKEN, wake=f"@{wakes[c.dispatch.run]}") for c in claims]
    parked = parker.commit_all(claims, outcomes)
    if parked != Counter({"delayed": n}):
        raise RuntimeError(f"expected {n} sleepers, got {dict(parked)}")
    out: dict[str, Any] = {"runs": n, "window_s": options.window_s, "claim_s": claim_s}
    out["park_s"] = time.perf_counter() - started
    out["parked_before_start_s"] = (start_ms - server_ms(admin)) / 1000
    print(
        f"  {n:,} sleepers parked in {out['park_s']:.1f} s, {out['parked_before_start_s']:.1f} s before the window",
        flush=True,
    )
    with Fleet(server.log_dir) as fleet, Client(settings) as client:
        env = child_env(settings, server.url)
        for i in range(options.workers):
            fleet.spawn_module(f"parked-w{i}", worker_args("bench.flows:sleeper"), env)
        fleet.spawn_module("parked-sup", ["orchestrator", "supervisor"], env)
        wait_registered(admin, keys, options.workers, fleet)
        wait_until(lambda: bool(admin.exists(keys.leader)), 30, "the supervisor leading", fleet)
        out["fleet_ready_before_start_s"] = (start_ms - server_ms(admin)) / 1000
        cpu = (redis_cpu_s(admin), fleet.cpu_s())
        wait_all_done(admin, keys, n, max(0.0, start_ms + window_ms - server_ms(admin)) / 1000 + 60 + n / 200, fleet)
        out["done_after_window_s"] = (server_ms(admin) - start_ms - window_ms) / 1000
        fleet_cpu = fleet.cpu_s()
        out["redis_cpu_s"] = redis_cpu_s(admin) - cpu[0]
        out["fleet_cpu_s"] = None if fleet_cpu is None or cpu[1] is None else fleet_cpu - cpu[1]
        out["counters"] = client.stats()
    out |= wake_figures(read_histories(admin, keys, run_ids), [wakes[run_id] for run_id in run_ids])
    print(
        f"  woke p50 {fmt(out['woke_ms']['p50'])} ms, p99 {fmt(out['woke_ms']['p99'])} ms, max "
        f"{fmt(out['woke_ms']['max'])} ms after until_ms; early {out['early']['woke']}",
        flush=True,
    )
    return out


# -- 3. signal to resumed step ----------------------------------------------------------------


def status(admin: redis.Redis, keys: Keys, run_id: str) -> str | None:
    value: Any = admin.hget(keys.run(run_id).run, "status")
    return None if value is None else str(value)


def step_start_ms(admin: redis.Redis, keys: Keys, run_id: str, step: str) -> int:
    """The worker's ``start_ms`` of the run's one ``ok`` commit of ``step``."""
    events = [json.loads(raw) for raw in admin.lrange(keys.run(run_id).history, 0, -1)]
    starts = [int(e["start_ms"]) for e in events if e.get("type") == "ok" and e.get("step") == step]
    if len(starts) != 1:
        raise RuntimeError(f"run {run_id}: {len(starts)} commits of {step!r}, expected one")
    return starts[0]


def finish(admin: redis.Redis, keys: Keys, run_id: str, fleet: Fleet) -> None:
    wait_until(lambda: status(admin, keys, run_id) == "completed", 30, f"run {run_id} completing", fleet)


def submit_latency(client: Client, keys: Keys, flow: Workflow[Any], run_id: str, fleet: Fleet) -> float:
    """ms from just before ``client.submit`` of a plain run to its first step's start."""
    t0 = time.time()
    client.submit(flow, run_id=run_id)
    finish(client.redis, keys, run_id, fleet)
    return step_start_ms(client.redis, keys, run_id, flow.first_step) - t0 * 1000 + MID_MS


def signal_latency(client: Client, keys: Keys, run_id: str, fleet: Fleet) -> float:
    """ms from just before ``client.signal`` to the start of the step after the wait."""
    admin = client.redis
    client.submit(approver, run_id=run_id)
    wait_until(lambda: status(admin, keys, run_id) == "waiting", 30, f"run {run_id} waiting", fleet)
    t0 = time.time()
    answer = {"approved": True, "by": "bench"}
    sent = client.signal(run_id, "approval", answer, signal_id=f"answer-{run_id}", workflow=approver)
    if sent.outcome != "delivered":
        raise RuntimeError(f"run {run_id}: the signal was {sent.outcome}, not delivered")
    finish(admin, keys, run_id, fleet)
    return step_start_ms(admin, keys, run_id, RESUMED) - t0 * 1000 + MID_MS


def signal_to_step(server: Server, options: Options) -> dict[str, Any]:
    """One worker; run after run, a plain submit and a signalled wait, interleaved (one warm-up each, not counted)."""
    admin = server.admin
    admin.flushall()
    settings = Settings(redis_url=server.url, namespace=f"sig-{uuid.uuid4().hex[:10]}")
    keys = Keys(settings.namespace, settings.partitions)
    plain = make_noop(1)
    env = child_env(settings, server.url, {STEPS_ENV: "1"})
    signalled: list[float] = []
    submitted: list[float] = []
    with Fleet(server.log_dir) as fleet, Client(settings) as client:
        fleet.spawn_module("signal-w0", [*worker_args("bench.flows:approver"), "bench.flows:noop"], env)
        wait_registered(admin, keys, 1, fleet)
        submit_latency(client, keys, plain, "plain-warm", fleet)
        signal_latency(client, keys, "wait-warm", fleet)
        for i in range(options.signals):
            submitted.append(submit_latency(client, keys, plain, f"plain-{i:05d}", fleet))
            signalled.append(signal_latency(client, keys, f"wait-{i:05d}", fleet))
        counters = client.stats()
    out: dict[str, Any] = {"signals": options.signals, "signal_ms": spread(signalled), "submit_ms": spread(submitted)}
    out["ratio_p50"] = ratio(out["signal_ms"]["p50"], out["submit_ms"]["p50"])
    out["ratio_p99"] = ratio(out["signal_ms"]["p99"], out["submit_ms"]["p99"])
    out["raw"] = {  # start_ms - t0, without the half ms
        "signal_ms": spread([v - MID_MS for v in signalled]),
        "submit_ms": spread([v - MID_MS for v in submitted]),
    }
    out |= {"counters": counters, "samples": {"signal_ms": signalled, "submit_ms": submitted, "mid_ms": MID_MS}}
    print(
        f"  signal -> step p50 {fmt(out['signal_ms']['p50'], 1)} ms, submit -> step p50 "
        f"{fmt(out['submit_ms']['p50'], 1)} ms ({fmt_ratio(out['ratio_p50'])})",
        flush=True,
    )
    return out


# -- tables -----------------------------------------------------------------------------------


def memory_table(rows: list[dict[str, Any]]) -> str:
    """Bytes per run of each kind, against the same workflow's run that went on."""
    body = [
        [
            row["kind"],
            f"`{row['workflow']}`",
            f"{row['runs']:,}",
            fmt(row["bytes_per_run"]),
            fmt(row["bytes_per_run_untrimmed"]),
            "(baseline)" if row["baseline"] else fmt_ratio(row["vs_went_on"]),
            "-" if row["extra_bytes_vs_went_on"] is None else f"{row['extra_bytes_vs_went_on']:+,.0f}",
        ]
        for row in rows
    ]
    headers = [
        "first step ended",
        "workflow",
        "runs",
        "bytes per run (used_memory)",
        "before the trim",
        "vs went on",
        "bytes vs went on",
    ]
    return markdown(headers, body, right=(2, 3, 4, 5, 6))


def keys_table(rows: list[dict[str, Any]]) -> str:
    """One run of each kind: its keys, their type, length and MEMORY USAGE."""
    body = []
    for row in rows:
        total = sum(k["bytes"] or 0 for k in row["sample_keys"])
        for k in row["sample_keys"]:
            length = "" if k["length"] is None else f"{k['length']:,}"
            body.append([row["kind"], f"`{row['workflow']}`", k["key"], k["type"], length, fmt(k["bytes"])])
        body.append([row["kind"], f"`{row['workflow']}`", "**keys total**", "", "", f"**{fmt(total)}**"])
    headers = ["first step ended", "workflow", "key", "type", "length", "MEMORY USAGE bytes"]
    return markdown(headers, body, right=(4, 5))


def lateness_table(late: dict[str, Any]) -> str:
    """How long after ``until_ms`` the sleepers woke, and their next step started and committed."""
    rows = []
    for key, what in (
        ("woke_ms", "woke (`woke` at, Redis clock)"),
        ("start_ms", f"`{WOKEN}` started (`ok` start_ms, worker clock)"),
        ("commit_ms", f"`{WOKEN}` committed (`ok` at, Redis clock)"),
    ):
        s = late[key]
        early = late["early"][key.removesuffix("_ms")]
        rows.append([what, f"{s['n']:,}", fmt(s["p50"]), fmt(s["p99"]), fmt(s["max"]), str(early)])
    headers = ["after until_ms", "runs", "p50 ms", "p99 ms", "max ms", "early (< 0)"]
    return markdown(headers, rows, right=(1, 2, 3, 4, 5))


def signal_table(sig: dict[str, Any]) -> str:
    """Signal -> resumed step against submit -> first step, and their ratio."""
    rows = []
    for key, what in (
        ("signal_ms", f"`client.signal` -> `{RESUMED}` starts"),
        ("submit_ms", "`client.submit` -> first step starts (baseline)"),
    ):
        s = sig[key]
        rows.append([what, f"{s['n']:,}", fmt(s["p50"], 1), fmt(s["p99"], 1), fmt(s["max"], 1)])
    rows.append(["ratio signal / submit", "", fmt_ratio(sig["ratio_p50"]), fmt_ratio(sig["ratio_p99"]), ""])
    return markdown(["latency", "runs", "p50 ms", "p99 ms", "max ms"], rows, right=(1, 2, 3, 4))


def tables(mem: list[dict[str, Any]], late: dict[str, Any], sig: dict[str, Any], options: Options) -> str:
    n, window = late["runs"], late["window_s"]
    memory_head = (
        f"Redis memory per run: used_memory (read once it holds still) after {options.runs:,} runs of each kind "
        "were built through the scripts (default namespace, 16 partitions) and the supervisor's trim dropped the "
        "acked entries, minus before, over the runs; baseline: the same workflow's first step committed with "
        "neither wake nor wait (its next step a queued entry, in a stream node that may still hold trimmed "
        "entries: Redis frees a node only when all of its entries are gone)"
    )
    check = "yes" if late["not_once"] == 0 else f"**no: {late['not_once']:,} runs not**"
    late_head = (
        f"Wake-up lateness: {n:,} sleepers due over {window:g} s ({n / window:,.0f}/s), woken by {options.workers} "
        f"workers (`bench.flows:sleeper`) and 1 supervisor, default settings (concurrency "
        f"{DEFAULTS['concurrency'].default}, promote every {DEFAULTS['promote_interval_s'].default} s per worker, "
        f"supervisor every {DEFAULTS['reclaim_interval_s'].default} s); set by the benchmark: namespace and Redis URL "
        f"only. Parking took {late['park_s']:.1f} s and ended {late['parked_before_start_s']:.1f} s before the "
        f"window opened; the fleet was ready {late['fleet_ready_before_start_s']:.1f} s before it (a negative "
        f"figure would mean it was late); wake-ups clamped by an overrun: {late['clamped']:,}; every run woke "
        f"once and ran "
        f"`{WOKEN}` once: {check}; last run done {late['done_after_window_s']:.1f} s after the window closed; "
        f"Redis CPU {late['redis_cpu_s']:.1f} s, workers + supervisor CPU {fmt(late['fleet_cpu_s'], 1)} s"
    )
    sig_head = (
        f"Signal to resumed step: {sig['signals']} runs one after another on 1 worker (default settings; "
        "`bench.flows:approver` and a one-step `bench.flows:noop`), interleaved with as many plain submits; "
        "latency = the step's `start_ms` + 0.5 ms minus `time.time()` just before the call (`start_ms` is the "
        "worker's clock in whole ms, floored: + 0.5 ms is the middle of its ms, so each latency is within 0.5 ms; "
        "the raw `start_ms` - t0 is in the JSON); the signal's time includes `client.signal`'s read of the run "
        "before its script"
    )
    return "\n\n".join(
        [
            memory_head,
            memory_table(mem),
            "The keys of one run of each kind (`MEMORY USAGE ... SAMPLES 0`; index entries not included)",
            keys_table(mem),
            late_head,
            lateness_table(late),
            sig_head,
            signal_table(sig),
        ]
    )


def bench_settings(options: Options) -> dict[str, Any]:
    return {
        **{k: v for k, v in asdict(options).items() if k != "json_path"},
        "chunk": CHUNK,
        "park_s": PARK_S,
        "fleet_start_allowance_s": FLEET_START_S,
        "margin_s": MARGIN_S,
        "concurrency": DEFAULTS["concurrency"].default,
        "promote_interval_s": DEFAULTS["promote_interval_s"].default,
        "reclaim_interval_s": DEFAULTS["reclaim_interval_s"].default,
        "block_ms": DEFAULTS["block_ms"].default,
        "redis_persistence": "off (appendonly no, save '')",
        "kinds": [{"name": k.name, "workflow": k.flow.name, "returned": repr(k.returned)} for k in KINDS],
    }


def without_samples(part: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if k not in ("samples", "counters")}


def run(options: Options) -> dict[str, Any]:
    """The three measurements on one private server; the JSON document of the results."""
    with bench_server("parked", options.redis_server) as server:
        print("memory per parked run:", flush=True)
        mem = memory(server, options)
        print("wake-up lateness:", flush=True)
        late = lateness(server, options)
        print("signal to resumed step:", flush=True)
        sig = signal_to_step(server, options)
    summary = {
        "memory": [{k: v for k, v in row.items() if k != "sample_keys"} for row in mem],
        "lateness": without_samples(late),
        "signal": without_samples(sig),
    }
    return {
        "benchmark": "parked",
        "environment": server.env,
        "settings": bench_settings(options),
        "summary": summary,
        "markdown": tables(mem, late, sig, options),
        "memory": mem,
        "lateness": late,
        "signal": sig,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three measurements, print the tables, optionally write JSON."""
    options = parse_args(argv)
    return print_and_save(run(options), options.json_path)


if __name__ == "__main__":
    run_main(main)
