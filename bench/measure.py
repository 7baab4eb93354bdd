"""One measurement of one configuration, the same recipe for ours, the raw loop and the peers.

Two shapes, each with a fresh keyspace (``FLUSHDB``) and freshly started consumers:

- **load**: submit ``runs`` chains of ``steps`` no-op steps back to back while the consumers
  run, then wait until every chain is done; steps/s = runs x steps / (first submit -> last
  chain done). Slow peers stop at a time cap; their rate is then the steps their own
  bookkeeping counts as finished by the cap, divided by the cap.
- **paced**: submit one chain every ``interval_s`` (low load); each chain's latency is its
  completion time minus the wall time just before its submit call. For our runs the
  completion time is when a client subscribed to the run's hash (keyspace notifications) saw
  its last write, to the microsecond: the run's own ``finished_ms`` is on the Redis clock in
  whole milliseconds, which understates a latency by half a millisecond on average.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis

from bench import marks
from bench.common import Server, finished_runs, per_step_us, percentile, redis_cpu_s
from bench.flows import STEPS_ENV, make_noop
from bench.peers.base import PeerSpec
from bench.procs import Fleet, child_env, wait_registered, wait_until
from orchestrator import Client, Settings
from orchestrator.counters import add_up
from orchestrator.keys import Keys


@dataclass(frozen=True)
class Shape:
    """What is submitted: ``runs`` chains of ``steps``; ``interval_s`` > 0 paces them (low load)."""

    runs: int
    steps: int
    interval_s: float = 0.0
    cap_s: float | None = None  # peers only

    @property
    def paced(self) -> bool:
        """Whether chains are spread out in time (low load) rather than submitted back to back."""
        return self.interval_s > 0


@dataclass
class Sample:
    """One measurement of one configuration."""

    config: str
    mode: str  # "load" | "paced"
    repeat: int
    runs: int
    steps: int
    completed_runs: int
    capped: bool
    submit_s: float
    elapsed_s: float
    steps_per_s: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    consumer_cpu_us_per_step: float | None
    redis_cpu_us_per_step: float | None
    latencies_ms: list[float] = field(default_factory=list)


def submit_all(shape: Shape, submit: Callable[[int], None]) -> tuple[list[float], float]:
    """Submit every chain (paced or back to back); the wall time before each submit, and the submit duration."""
    submitted: list[float] = []
    start = time.perf_counter()
    for i in range(shape.runs):
        if shape.paced:
            due = start + i * shape.interval_s
            time.sleep(max(0.0, due - time.perf_counter()))
        submitted.append(time.time())
        submit(i)
    return submitted, time.perf_counter() - start


def finish(
    config: str,
    repeat: int,
    shape: Shape,
    timing: tuple[float, float, float],
    done_steps: int,
    latencies_ms: list[float],
    cpu: tuple[float | None, float | None, float | None, float | None],
    capped: bool = False,
) -> Sample:
    """Assemble a sample from what a measurement observed; (start, submitted, end) perf_counter times."""
    start, submit_s, end = timing
    elapsed = end - start
    return Sample(
        config=config,
        mode="paced" if shape.paced else "load",
        repeat=repeat,
        runs=shape.runs,
        steps=shape.steps,
        completed_runs=len(latencies_ms),
        capped=capped,
        submit_s=submit_s,
        elapsed_s=elapsed,
        steps_per_s=None if shape.paced else done_steps / elapsed,
        latency_p50_ms=percentile(latencies_ms, 0.5) if latencies_ms else None,
        latency_p99_ms=percentile(latencies_ms, 0.99) if latencies_ms else None,
        consumer_cpu_us_per_step=per_step_us(cpu[0], cpu[1], done_steps),
        redis_cpu_us_per_step=per_step_us(cpu[2], cpu[3], done_steps),
        latencies_ms=latencies_ms,
    )


# -- ours and the raw loop --------------------------------------------------------------------


def run_finish_ms(admin: redis.Redis, keys: Keys, run_ids: Sequence[str], steps: int) -> list[int]:
    """``finished_ms`` of every run, after checking each completed with exactly ``steps`` commits
    and that no attempt failed.

    A benchmark that silently lost or duplicated steps would report a meaningless number.
    """
    pipe = admin.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hmget(keys.run(run_id).run, "status", "seq", "finished_ms")
    out = []
    for run_id, (status, seq, finished) in zip(run_ids, pipe.execute(), strict=True):
        if status != "completed" or int(seq) != steps:
            raise RuntimeError(f"run {run_id} ended {status} after {seq} committed steps, expected {steps}")
        out.append(int(finished))
    # a no-op step never fails: a failed attempt (retried, so every run still completes) is a
    # bug of ours, and the figures would be those of the bug
    pipe = admin.pipeline(transaction=False)
    for detail in keys.all_stats_detail:
        pipe.hgetall(detail)
    failed = sum(
        int(value)
        for field, value in add_up(pipe.execute()).items()
        if field.startswith("steps|") and field.endswith(("|error", "|timeout"))
    )
    if failed:
        raise RuntimeError(f"{failed} attempts of no-op steps failed; see the runs' history (orchestrator history RUN)")
    return out


@contextmanager
def run_writes_seen(admin: redis.Redis, run_keys: Sequence[str]) -> Iterator[dict[str, float]]:
    """Wall time at which a subscribed client last saw an HSET of each of ``run_keys``.

    Turns on keyspace notifications for hashes for as long as it lasts (the server's setting is
    put back after): each write of a run's hash, inside a script too, reaches the subscriber
    when its reply reaches the worker.
    """
    if not run_keys:
        yield {}
        return
    before = admin.config_get("notify-keyspace-events")["notify-keyspace-events"]
    admin.config_set("notify-keyspace-events", "Kh")
    db = admin.connection_pool.connection_kwargs.get("db", 0)
    prefix = f"__keyspace@{db}__:"
    seen: dict[str, float] = {}
    lock = threading.Lock()

    def on_write(message: dict[str, str]) -> None:
        at = time.time()
        if message["data"] == "hset":
            with lock:
                seen[message["channel"].removeprefix(prefix)] = at

    pubsub = admin.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(**{prefix + key: on_write for key in run_keys})
    reader = pubsub.run_in_thread(sleep_time=0.5, daemon=True)
    try:
        yield seen
    finally:
        reader.stop()
        reader.join(timeout=5)
        pubsub.close()
        admin.config_set("notify-keyspace-events", before)


def seen_finish_ms(
    seen: dict[str, float], keys: Keys, run_ids: Sequence[str], finished_ms: Sequence[int]
) -> list[float]:
    """Each run's completion in ms to the µs: its hash's last write as the subscriber saw it,
    checked against the run's own ``finished_ms`` (a later write would have shown up there)."""
    out = []
    for run_id, finished in zip(run_ids, finished_ms, strict=True):
        at = seen.get(keys.run(run_id).run)
        if at is None or not finished <= at * 1000 < finished + 20:
            raise RuntimeError(
                f"run {run_id}: its last write was seen at {at} s, its finished_ms is {finished}: "
                "something else wrote the run's hash, or a notification was lost"
            )
        out.append(at * 1000)
    return out


def measure_ours(server: Server, config: str, repeat: int, consumers: Sequence[Sequence[str]], shape: Shape) -> Sample:
    """Our workers (or the raw loop): start them, submit, wait for every run, check every run, stop them."""
    server.admin.flushdb()  # every measurement starts on an empty keyspace
    settings = Settings(redis_url=server.url, namespace=f"bench-{uuid.uuid4().hex[:12]}")
    keys = Keys(settings.namespace, settings.partitions)
    env = child_env(settings, server.url, {STEPS_ENV: str(shape.steps)})
    flow = make_noop(shape.steps)
    total = shape.runs * shape.steps
    run_ids = [f"r{i:05d}" for i in range(shape.runs)]
    watch = [keys.run(run_id).run for run_id in run_ids] if shape.paced else []
    with Fleet(server.log_dir) as fleet, Client(settings) as client, run_writes_seen(server.admin, watch) as seen:

        def submit(i: int) -> None:
            client.submit(flow, run_id=run_ids[i])

        for i, args in enumerate(consumers):
            fleet.spawn_module(f"r{repeat}-{config.replace(' ', '_')}-{i}", args, env)
        wait_registered(server.admin, keys, len(consumers), fleet)
        cpu_before = (fleet.cpu_s(), redis_cpu_s(server.admin))
        start = time.perf_counter()
        submitted, submit_s = submit_all(shape, submit)
        timeout_s = 60 + total / 50 + shape.runs * shape.interval_s
        end = wait_until(
            lambda: finished_runs(server.admin, keys) >= shape.runs, timeout_s, "every run completing", fleet
        )
        cpu_after = (fleet.cpu_s(), redis_cpu_s(server.admin))
    finished: Sequence[float] = run_finish_ms(server.admin, keys, run_ids, shape.steps)
    if shape.paced:
        finished = seen_finish_ms(seen, keys, run_ids, finished)
    latencies = [f - s * 1000 for f, s in zip(finished, submitted, strict=True)]
    cpu = (cpu_before[0], cpu_after[0], cpu_before[1], cpu_after[1])
    return finish(config, repeat, shape, (start, submit_s, end), total, latencies, cpu)


# -- peers ------------------------------------------------------------------------------------


def measure_peer(server: Server, spec: PeerSpec, workers: int, repeat: int, shape: Shape) -> Sample:
    """A peer's workers: start and warm them, submit its chains, wait (up to the cap), stop them."""
    server.admin.flushdb()
    env = child_env(None, server.url, {marks.URL_ENV: server.url})
    config = f"{spec.name} x{workers}"
    peer = spec.factory(server.url)
    try:
        with Fleet(server.log_dir) as fleet:
            peer.start(fleet, workers, env)
            cpu_before = (fleet.cpu_s(), redis_cpu_s(server.admin))
            start = time.perf_counter()
            submitted, submit_s = submit_all(shape, lambda i: peer.submit(f"c{i:05d}", shape.steps))
            end, capped = wait_chains(peer.conn, shape, start, fleet)
            done_steps = shape.runs * shape.steps if not capped else peer.progress()
            cpu_after = (fleet.cpu_s(), redis_cpu_s(server.admin))
            ends = marks.ends(peer.conn)
    finally:
        peer.close()
    latencies = [(ends[f"c{i:05d}"] - t) * 1000 for i, t in enumerate(submitted) if f"c{i:05d}" in ends]
    cpu = (cpu_before[0], cpu_after[0], cpu_before[1], cpu_after[1])
    return finish(config, repeat, shape, (start, submit_s, end), done_steps, latencies, cpu, capped)


def wait_chains(conn: redis.Redis, shape: Shape, start: float, fleet: Fleet) -> tuple[float, bool]:
    """Poll the end marks every 10 ms until all chains are done or the cap; (end time, capped)."""
    limit = shape.cap_s if shape.cap_s is not None else 60 + shape.runs * shape.steps / 10
    limit += shape.runs * shape.interval_s
    while True:
        if conn.hlen(marks.ENDS) >= shape.runs:
            return time.perf_counter(), False
        fleet.check_alive()
        if time.perf_counter() - start >= limit:
            return time.perf_counter(), True
        time.sleep(0.01)
