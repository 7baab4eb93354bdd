"""The raw limit: a plain redis-py loop that issues exactly the Redis calls our worker issues per step.

``python -m bench.raw batched|unbatched`` is a consumer child of the benchmarks (like a worker,
a separate process from the submitter). It sends the very calls the worker builds
(``Store.claim``, ``Store.commit``, ``Store.ack_owned``, run by ``scripts.execute``) with the
arguments the worker would pass, and nothing else: no asyncio, no threads, no pydantic
validation, no heartbeats. So the gap between it and our worker is what our Python side costs.

- ``batched``: XREADGROUP COUNT 100, one pipeline with the claim of every entry, one pipeline
  with every commit plus the ack of the batch. The Redis-side limit of our protocol from one
  Python client.
- ``unbatched``: COUNT 1 and one round trip per call: read, claim, commit, ack.

Like the worker, every commit asks to chain the run's next step to this consumer; a step the
commit claimed (nothing else was waiting) is committed next without a read or a claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from types import FrameType
from typing import Any

import redis

from bench.flows import Empty, make_noop, steps_from_env
from orchestrator import Settings, Workflow, scripts
from orchestrator.codec import Dispatch
from orchestrator.connection import connect
from orchestrator.keys import GROUP, Keys
from orchestrator.scripts import Call
from orchestrator.store import Claimed, Committed, Outcome, Store, new_claim_token

RAW_BATCH = 100
RAW_MODES = ("batched", "unbatched")
StreamReply = list[tuple[str, list[tuple[str, dict[str, str]]]]]  # XREADGROUP with decode_responses
Ready = tuple[str, Dispatch, Claimed]  # a claimed entry: id, dispatch, claim


def now_ms() -> int:
    """Wall-clock ms, as the worker stamps ``start_ms``/``end_ms`` into records and events."""
    return int(time.time() * 1000)


def consumer_args(mode: str) -> list[str]:
    """The ``python -m`` arguments of a raw consumer child in ``mode``."""
    return ["bench.raw", mode]


class RawConsumer:
    """The worker's Redis traffic per step, and nothing else."""

    def __init__(self, settings: Settings, flow: Workflow[Empty], batch: int) -> None:
        self.settings = settings
        self.flow = flow
        self.batch = batch
        self.keys = Keys(settings.namespace, settings.partitions)
        self.redis = connect(settings.plain_url(), probe=self.keys.cluster_probe)
        self.store = Store(self.keys)
        self.queue = flow.queue
        self.streams = self.keys.streams(flow.queue)  # one per partition, all read at once, as the worker does
        self.id = f"raw-{socket.gethostname()}-{os.getpid()}"
        self.counts: Counter[str] = Counter()
        # (run id, entry id) -> the token it was claimed with / its commit chains with (entry ids
        # repeat across the partitions' streams; a run's entries are all in its partition's)
        self.tokens: dict[tuple[str, str], str] = {}
        self.chain_tokens: dict[tuple[str, str], str] = {}
        self.stopping = False

    def register(self) -> None:
        """Create the consumer group like the worker does, beat once in every partition (for
        the whole benchmark: no heartbeat thread here), then appear in the workers zset (the
        readiness signal)."""
        for stream in self.streams:
            with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists already
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        beats = [
            self.store.alive(partition=p, worker=self.id, lease_ms=3_600_000, cancels_seen="")
            for p in range(self.keys.partitions)
        ]
        scripts.execute(self.redis, beats)
        self.redis.zadd(self.keys.workers, {self.id: now_ms()})

    def read(self) -> list[tuple[str, Dispatch]]:
        """XREADGROUP as the worker issues it; entries are trusted (``model_construct``: no validation)."""
        block = self.settings.block_ms
        reply: StreamReply | None = self.redis.xreadgroup(  # type: ignore[assignment]
            GROUP, self.id, dict.fromkeys(self.streams, ">"), count=self.batch, block=block
        )
        out = []
        for _stream, entries in reply or []:
            for entry_id, f in entries:
                d = Dispatch.model_construct(run=f["run"], wf=f["wf"], step=f["step"], visit=int(f["visit"]))
                out.append((entry_id, d))
        return out

    def claim(self, entry_id: str, d: Dispatch) -> Call:
        """The claim the worker builds in ``Worker._claim``: same token scheme, lease and limits."""
        self.tokens[d.run, entry_id] = new_claim_token(self.id)
        return self.store.claim(
            dispatch=d,
            queue=self.queue,
            entry_id=entry_id,
            token=self.tokens[d.run, entry_id],
            worker=self.id,
            max_crashes=self.settings.max_crashes,
            max_steps=self.settings.max_run_steps,
        )

    def commit(self, entry_id: str, d: Dispatch, claimed: Claimed, start_ms: int) -> Call:
        """The commit the worker would send for a step that returned None: next step in order, empty update."""
        end_ms = now_ms()
        next_step = self.flow.step_after(d.step)
        meta = {"step": d.step, "visit": d.visit, "attempt": claimed.attempt, "fence": claimed.fence}
        meta |= {"worker": self.id, "start_ms": start_ms, "end_ms": end_ms}
        record = json.dumps({**meta, "update": {}, "next": next_step, "cost": {}}, separators=(",", ":"))
        self.chain_tokens[d.run, entry_id] = new_claim_token(self.id)
        return self.store.commit(
            dispatch=d,
            queue=self.queue,
            token=self.tokens.pop((d.run, entry_id)),
            record=record,
            event=json.dumps(meta, separators=(",", ":")),
            next_step=next_step,
            duration_ms=end_ms - start_ms,
            cost={},
            state={},
            max_steps=self.settings.max_run_steps,
            chain_to=self.id,
            chain_token=self.chain_tokens[d.run, entry_id],
        )

    def ack(self, entries: Sequence[tuple[str, Dispatch]]) -> list[Call]:
        """The worker's ack of its own entries (ack.lua: XACK+XDEL of entries still pending for
        this consumer), one call per stream, as the worker batches them."""
        by_stream: dict[str, list[str]] = {}
        for entry_id, d in entries:
            by_stream.setdefault(self.keys.queue_of(self.queue, d.run).stream, []).append(entry_id)
        return [self.store.ack_owned(stream, self.id, ids) for stream, ids in by_stream.items()]

    def chained(self, ready: Sequence[Ready], replies: Sequence[Any]) -> list[Ready]:
        """Count commit outcomes (a log shows whether anything but OK happened); the steps they chained."""
        out = []
        for (eid, d, _), reply in zip(ready, replies, strict=True):
            chain_token = self.chain_tokens.pop((d.run, eid))
            outcome = Outcome.parse(reply)
            self.counts[f"commit_{outcome.code}"] += 1
            committed = Committed.parse(outcome.detail) if outcome.code == "OK" else None
            if committed is not None and committed.chained is not None:
                self.counts["chained"] += 1
                nxt = Dispatch.model_construct(run=d.run, wf=d.wf, step=committed.next_step, visit=committed.visit)
                self.tokens[d.run, committed.entry_id] = chain_token
                out.append((committed.entry_id, nxt, committed.chained))
        return out

    def claim_all(self, batch: Sequence[tuple[str, Dispatch]], replies: Sequence[Any]) -> list[Ready]:
        """The entries this consumer may run (claim said RUN); the others are counted."""
        ready = []
        for (eid, d), reply in zip(batch, replies, strict=True):
            claimed = Claimed.parse(reply)
            if claimed.code == "RUN":
                ready.append((eid, d, claimed))
            else:
                self.tokens.pop((d.run, eid), None)
                self.counts[f"claim_{claimed.code}"] += 1
        return ready

    def run_batched(self, batch: list[tuple[str, Dispatch]]) -> None:
        """Two round trips for the whole batch: all claims, then all commits with the ack of the batch;
        then one per round of chained steps (commits plus the acks of the steps they follow)."""
        ready = self.claim_all(batch, scripts.execute(self.redis, [self.claim(eid, d) for eid, d in batch]))
        acks = list(batch)
        while ready or acks:
            start = now_ms()
            commits = [self.commit(eid, d, claimed, start) for eid, d, claimed in ready]
            replies = scripts.execute(self.redis, [*commits, *(self.ack(acks) if acks else [])])
            acks = [(eid, d) for eid, d, _ in ready]
            ready = self.chained(ready, replies[: len(commits)])

    def run_unbatched(self, batch: list[tuple[str, Dispatch]]) -> None:
        """One round trip per call: claim, commit, then the ack; a chained step goes on with its commit."""
        for eid, d in batch:
            ready = self.claim_all([(eid, d)], scripts.execute(self.redis, [self.claim(eid, d)]))
            if not ready:
                scripts.execute(self.redis, self.ack([(eid, d)]))
            while ready:
                step_id, step, claimed = ready[0]
                replies = scripts.execute(self.redis, [self.commit(step_id, step, claimed, now_ms())])
                scripts.execute(self.redis, self.ack([(step_id, step)]))
                ready = self.chained(ready, replies)

    def serve(self) -> None:
        """Consume until SIGTERM; the flag is checked between reads (at most ``block_ms`` late)."""
        handle = self.run_batched if self.batch > 1 else self.run_unbatched
        while not self.stopping:
            batch = self.read()
            if batch:
                handle(batch)
                self.counts["batches"] += 1

    def close(self) -> None:
        """Deregister and leave the tallies in the log, so an odd outcome can be checked afterwards."""
        self.redis.zrem(self.keys.workers, self.id)
        self.redis.close()
        print(json.dumps({"consumer": self.id, **self.counts}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the child: settings from ORCHESTRATOR_* like a worker, stop on SIGTERM."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] not in RAW_MODES:
        print(f"usage: python -m bench.raw {{{','.join(RAW_MODES)}}}", file=sys.stderr)
        return 2
    consumer = RawConsumer(Settings(), make_noop(steps_from_env()), RAW_BATCH if args[0] == "batched" else 1)

    def stop(signum: int, frame: FrameType | None) -> None:
        consumer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer.register()
    try:
        consumer.serve()
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
