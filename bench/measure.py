"""One measurement of one configuration, the same recipe for ours, the raw loop and the peers.

Two shapes, each with a fresh keyspace (``FLUSHDB``) and freshly started consumers:

- **load**: submit ``runs`` chains of ``steps`` no-op steps back to back while the consumers
  run, then wait until every chain is done; steps/s = runs x steps / (first submit -> last
  chain done). Slow peers stop at a time cap; their rate is then the steps their own
  bookkeeping counts as finished by the cap, divided by the cap.
- **paced**: submit one chain every ``interval_s`` (low load); each chain's latency is its
  completion time minus the wall time just before its submit call.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
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


def measure_ours(server: Server, config: str, repeat: int, consumers: Sequence[Sequence[str]], shape: Shape) -> Sample:
    """Our workers (or the raw loop): start them, submit, wait for every run, check every run, stop them."""
    server.admin.flushdb()  # every measurement starts on an empty keyspace
    settings = Settings(redis_url=server.url, namespace=f"bench-{uuid.uuid4().hex[:12]}")
    keys = Keys(settings.namespace, settings.partitions)
    env = child_env(settings, server.url, {STEPS_ENV: str(shape.steps)})
    flow = make_noop(shape.steps)
    total = shape.runs * shape.steps
    run_ids = [f"r{i:05d}" for i in range(shape.runs)]
    with Fleet(server.log_dir) as fleet, Client(settings) as client:

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
    finished = run_finish_ms(server.admin, keys, run_ids, shape.steps)
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
