"""What a benchmark step records about itself: the same code, keys and round trips for every system.

RQ jobs and Celery tasks (and our workflows in the recovery benchmark) call :func:`step_body`,
so completion times and re-executions are observed identically, whatever runs the step.
Without ``record`` only a workflow's last step writes (one round trip per workflow); with it,
each step pays two pipelined round trips: one before its work, so an execution cut short by
``kill -9`` is still on record, and one after. The marks live under ``bench:``
keys on the benchmark's own server, written through a connection of their own (like a
downstream service would be), never through the system's connection.

- ``bench:steps`` (string): steps completed (``record``);
- ``bench:end`` (hash): workflow id -> wall time its last step finished (latency, completion);
- ``bench:cnt`` (hash): ``wf:k`` -> times step k finished its work (a step that finished
  twice ran twice: the peer-benchmarks' definition of a duplicate);
- ``bench:exec`` (list): ``start|wf|k|pid|t`` and ``end|wf|k|pid|t`` per execution (``record``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import redis

URL_ENV = "BENCH_REDIS_URL"
STEPS_DONE = "bench:steps"
ENDS = "bench:end"
COUNTS = "bench:cnt"
EXECUTIONS = "bench:exec"
KEYS = (STEPS_DONE, ENDS, COUNTS, EXECUTIONS)

_client: redis.Redis | None = None
_lock = threading.Lock()


def client() -> redis.Redis:
    """One connection pool per process, to the server named by ``BENCH_REDIS_URL``."""
    global _client
    with _lock:
        if _client is None:
            url = os.environ.get(URL_ENV) or os.environ.get("ORCHESTRATOR_REDIS_URL")
            if not url:
                raise RuntimeError(f"benchmark steps need {URL_ENV} in their environment")
            _client = redis.Redis.from_url(url, decode_responses=True)
        return _client


def step_body(wf: str, k: int, steps: int, work_ms: float = 0.0, record: bool = False) -> None:
    """Step ``k`` of workflow ``wf``: note the start (``record``), work ``work_ms``, then mark it done.

    Without ``record`` only the last step of a workflow writes anything (its end time): the
    steps of the throughput chains stay no-ops, one round trip per chain.
    """
    conn = client()
    if record:
        conn.rpush(EXECUTIONS, f"start|{wf}|{k}|{os.getpid()}|{time.time():.6f}")
    if work_ms > 0:
        time.sleep(work_ms / 1000)
    if not record:
        if k == steps - 1:
            conn.hset(ENDS, wf, f"{time.time():.6f}")
        return
    pipe = conn.pipeline(transaction=False)
    pipe.incr(STEPS_DONE)
    pipe.hincrby(COUNTS, f"{wf}:{k}", 1)
    pipe.rpush(EXECUTIONS, f"end|{wf}|{k}|{os.getpid()}|{time.time():.6f}")
    if k == steps - 1:
        pipe.hset(ENDS, wf, f"{time.time():.6f}")
    pipe.execute()


@dataclass(frozen=True)
class Execution:
    """One mark of ``bench:exec``: an execution of step ``k`` of ``wf`` starting or ending in ``pid`` at ``t``."""

    kind: str
    wf: str
    k: int
    pid: int
    t: float

    @classmethod
    def parse(cls, raw: str) -> Execution:
        kind, wf, k, pid, t = raw.split("|")
        return cls(kind, wf, int(k), int(pid), float(t))


def reset(conn: redis.Redis) -> None:
    """Forget the marks of a warm-up, so a measurement counts only its own steps."""
    conn.delete(*KEYS)


def steps_done(conn: redis.Redis) -> int:
    return int(conn.get(STEPS_DONE) or 0)


def ends(conn: redis.Redis) -> dict[str, float]:
    """Workflow id -> wall time its last step finished."""
    raw: dict[str, str] = conn.hgetall(ENDS)  # type: ignore[assignment]
    return {wf: float(t) for wf, t in raw.items()}


def executions(conn: redis.Redis) -> list[Execution]:
    raw: list[str] = conn.lrange(EXECUTIONS, 0, -1)  # type: ignore[assignment]
    return [Execution.parse(item) for item in raw]


def finish_counts(conn: redis.Redis) -> dict[str, int]:
    """``wf:k`` -> how often that step finished its work."""
    raw: dict[str, str] = conn.hgetall(COUNTS)  # type: ignore[assignment]
    return {key: int(n) for key, n in raw.items()}
