"""The minimal durable step: the least Redis work that still persists a step and moves its chain on.

``python -m bench.minimal`` is a consumer child of :mod:`bench.stepcost` (like :mod:`bench.raw`,
a separate process from the one that seeds the chains). One synchronous redis-py client:

- ``XREADGROUP ... COUNT 100 BLOCK 500`` from one stream (entries ``run``, ``step``);
- for the whole batch, one ``MULTI``/``EXEC`` with, for each entry: ``HSETNX`` of the step's
  result (``null``) under the field ``{run}:{step}`` of the run's results hash (a redelivered
  entry never overwrites it), ``XADD`` of the run's next step (unless it was the last one) and
  ``XACK`` of the entry.

That is a durable step in its barest form: the result and the next step's entry are written
atomically with the ack, so a crash loses or repeats nothing that was acknowledged. No leases,
fencing, history, state, indexes, counters or heartbeats: everything our protocol keeps per
step beyond this is what :mod:`bench.stepcost` measures as the ratio to it.

Settings come from the environment (``BENCH_MINIMAL_URL``, ``BENCH_MINIMAL_PREFIX``,
``BENCH_STEPS``); on SIGTERM it stops between reads and writes what it did (the wall time at
which each run's last step was written, and its tallies) to ``BENCH_MINIMAL_OUT`` as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from bench.flows import steps_from_env

BATCH = 100
BLOCK_MS = 500
GROUP = "minimal"
URL_ENV = "BENCH_MINIMAL_URL"
PREFIX_ENV = "BENCH_MINIMAL_PREFIX"
OUT_ENV = "BENCH_MINIMAL_OUT"
StreamReply = list[tuple[str, list[tuple[str, dict[str, str]]]]]  # XREADGROUP with decode_responses


def stream_key(prefix: str) -> str:
    """The one stream every step entry goes through."""
    return f"{prefix}:stream"


def results_key(prefix: str, run: str) -> str:
    """A run's results hash; each step's result is the field ``{run}:{step}`` (the idempotency key)."""
    return f"{prefix}:{run}:results"


def ready_key(prefix: str) -> str:
    """Set once the group exists and the consumer reads: the seeder waits for it."""
    return f"{prefix}:ready"


class MinimalConsumer:
    """Reads, persists, chains and acks; nothing else."""

    def __init__(self, url: str, prefix: str, steps: int) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix
        self.steps = steps
        self.stream = stream_key(prefix)
        self.name = f"minimal-{os.getpid()}"
        self.ends: dict[str, float] = {}  # run -> wall time just after the EXEC that wrote its last step
        self.counts: Counter[str] = Counter()
        self.stopping = False

    def register(self) -> None:
        """Create the group (the stream with it), then say so."""
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists already
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        self.redis.set(ready_key(self.prefix), self.name)

    def read(self) -> list[tuple[str, dict[str, str]]]:
        """One XREADGROUP of up to :data:`BATCH` new entries."""
        reply: StreamReply | None = self.redis.xreadgroup(  # type: ignore[assignment]
            GROUP, self.name, {self.stream: ">"}, count=BATCH, block=BLOCK_MS
        )
        return [entry for _stream, entries in reply or [] for entry in entries]

    def process(self, batch: Sequence[tuple[str, dict[str, str]]]) -> None:
        """One MULTI/EXEC for the batch: per entry HSETNX of the result, XADD of the next step, XACK."""
        pipe = self.redis.pipeline(transaction=True)
        last, results_at = [], []
        for entry_id, fields in batch:
            run, step = fields["run"], int(fields["step"])
            results_at.append(len(pipe.command_stack))
            pipe.hsetnx(results_key(self.prefix, run), f"{run}:{step}", "null")
            if step + 1 < self.steps:
                pipe.xadd(self.stream, {"run": run, "step": step + 1})
            else:
                last.append(run)
            pipe.xack(self.stream, GROUP, entry_id)
        replies = pipe.execute()
        done = time.time()
        for run in last:
            self.ends.setdefault(run, done)
        self.counts["batches"] += 1
        self.counts["entries"] += len(batch)
        self.counts["results_written"] += sum(1 for i in results_at if replies[i])  # 0: a redelivery

    def serve(self) -> None:
        """Consume until SIGTERM; the flag is checked between reads (at most ``BLOCK_MS`` late)."""
        while not self.stopping:
            batch = self.read()
            if batch:
                self.process(batch)

    def report(self, path: str | None) -> dict[str, Any]:
        """What it did, for the benchmark: end times of runs and tallies."""
        doc = {"consumer": self.name, "ends": self.ends, "counts": dict(self.counts)}
        if path:
            Path(path).write_text(json.dumps(doc))
        return doc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child: stop on SIGTERM, then write the report."""
    url, prefix = os.environ.get(URL_ENV), os.environ.get(PREFIX_ENV)
    if not url or not prefix:
        print(f"usage: {URL_ENV}=redis://... {PREFIX_ENV}=name python -m bench.minimal", file=sys.stderr)
        return 2
    consumer = MinimalConsumer(url, prefix, steps_from_env())

    def stop(signum: int, frame: FrameType | None) -> None:
        consumer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer.register()
    try:
        consumer.serve()
    finally:
        doc = consumer.report(os.environ.get(OUT_ENV))
        consumer.redis.close()
        print(json.dumps({"consumer": doc["consumer"], **doc["counts"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
