"""``Ops``: drives the Lua scripts for one run the way a worker would, for the script tests."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import redis

from orchestrator import scripts
from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP, Keys
from orchestrator.settings import Settings
from orchestrator.store import Claimed, Outcome, Store


def partition_mates(keys: Keys, run_id: str, prefix: str, count: int = 1) -> list[str]:
    """``count`` run ids ``<prefix>NNNNNN``, in order, in the same partition as ``run_id`` (so
    their dispatches share its stream)."""
    home = keys.partition_of(run_id)
    mates = (f"{prefix}{i:06d}" for i in range(1_000_000))
    return [rid for _, rid in zip(range(count), (r for r in mates if keys.partition_of(r) == home), strict=False)]


def in_another_partition(keys: Keys, run_id: str, prefix: str) -> str:
    """A run id starting with ``prefix`` in another partition than ``run_id``."""
    return next(
        f"{prefix}-{i}" for i in range(10_000) if keys.partition_of(f"{prefix}-{i}") != keys.partition_of(run_id)
    )


class Ops:
    """Drives the scripts for one run the way a worker would."""

    def __init__(self, r: redis.Redis, settings: Settings, run_id: str = "r1") -> None:
        self.r, self.keys = r, Keys(settings.namespace, settings.partitions)
        self.store = Store(self.keys)
        self.run_id = run_id
        self.partition = self.keys.partition_of(run_id)
        self.q = self.keys.queue_of("q", run_id)  # the run's queue keys, in its partition
        self.part = self.keys.part_of(run_id)  # its partition's indexes and counters
        self.stream = self.q.stream
        self.rk = self.keys.run(run_id)
        with contextlib.suppress(redis.ResponseError):
            r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)

    def x(self, *calls: Any) -> list[Any]:
        return scripts.execute(self.r, list(calls))

    def submit(self, digest: str = "d1", request_id: str = "req1") -> list[Any]:
        return self.x(self.submit_call(digest, request_id))[0]

    def submit_call(self, digest: str = "d1", request_id: str = "req1") -> scripts.Call:
        return self.store.submit(
            run_id=self.run_id,
            workflow="wf",
            queue="q",
            first_step="a",
            input_sha=digest,
            event='{"detail":"x"}',
            request_id=request_id,
            state={"n": "0"},
        )

    def read(self, consumer: str = "c1") -> list[tuple[str, Dispatch]]:
        reply = self.r.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=10)
        return [(eid, Dispatch.model_validate(f)) for _, entries in reply for eid, f in entries]

    def beat(self, worker: str = "w1", lease_ms: int = 5000) -> list[Any]:
        """``worker``'s heartbeat in the run's partition: its claims there are live for ``lease_ms``."""
        return self.x(self.store.alive(partition=self.partition, worker=worker, lease_ms=lease_ms, cancels_seen=""))[0]

    def kill(self, worker: str = "w1") -> None:
        """``worker``'s deadline passes (it died): every claim it holds in the partition lapses."""
        self.r.hdel(self.part.alive, worker)

    def claim(self, eid: str, d: Dispatch, worker: str = "w1", **options: Any) -> Claimed:
        """Claim as ``claim_call`` builds it, after a beat of ``worker``; the reply parsed."""
        self.beat(worker)
        return Claimed.parse(self.x(self.claim_call(eid, d, worker, **options))[0])

    def claim_call(
        self,
        eid: str,
        d: Dispatch,
        worker: str = "w1",
        max_crashes: int = 3,
        token: str | None = None,
        max_steps: int = 0,
    ) -> scripts.Call:
        """``token`` defaults to one per (worker, entry), which these tests use as "the" claim."""
        return self.store.claim(
            dispatch=d,
            queue="q",
            entry_id=eid,
            token=token or f"{worker}:{eid}",
            worker=worker,
            max_crashes=max_crashes,
            max_steps=max_steps,
        )

    def commit(self, eid: str, d: Dispatch, worker: str = "w1", **options: Any) -> Outcome:
        """Commit as ``commit_call`` builds it; the reply parsed."""
        return Outcome.parse(self.x(self.commit_call(eid, d, worker, **options))[0])

    def commit_call(
        self,
        eid: str,
        d: Dispatch,
        worker: str = "w1",
        next_step: str | None = "b",
        state: dict[str, str] | None = None,
        chain: bool = False,
        token: str | None = None,
        cost: dict[str, float] | None = None,
        max_steps: int = 0,
        record: str | None = None,
        ack: bool = True,
        wake: str = "",
        wait: str = "",
        children: str = "",
    ) -> scripts.Call:
        """``ack``: hand the commit the entry to ack, as workers do (False: the caller acks);
        ``chain``: ask to chain the next step to ``worker`` (claim token ``<worker>:chained``);
        ``wake``: the step returned a Sleep (``Sleep.wake``); ``wait``: a WaitFor (its JSON)."""
        return self.store.commit(
            dispatch=d,
            queue="q",
            token=token or f"{worker}:{eid}",
            record=record or f'{{"by":"{worker}"}}',
            event='{"step":"a"}',
            next_step=next_step,
            duration_ms=5,
            cost=cost or {},
            state=state or {"n": "1"},
            max_steps=max_steps,
            chain_to=worker if chain else None,
            chain_token=f"{worker}:chained",
            entry_id=eid if ack else "",
            wake=wake,
            wait=wait,
            children=children,
        )

    def fail(
        self, eid: str, d: Dispatch, delay_ms: int | None, worker: str = "w1", token: str | None = None
    ) -> Outcome:
        call = self.store.fail(
            dispatch=d,
            queue="q",
            token=token or f"{worker}:{eid}",
            event='{"step":"a"}',
            kind="error",
            retry_delay_ms=delay_ms,
            error='{"type":"E","message":"m"}',
        )
        return Outcome.parse(self.x(call)[0])

    def server_ms(self) -> int:
        """The Redis server's clock, in ms (the scripts' time)."""
        seconds, micros = self.r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def run(self) -> dict[str, str]:
        return self.r.hgetall(self.rk.run)

    def history_types(self) -> list[str]:
        return [json.loads(e)["type"] for e in self.r.lrange(self.rk.history, 0, -1)]
