"""Typed builders for every Redis operation of the protocol, and parsers of their replies.

Nothing here does I/O: a builder returns a :class:`~orchestrator.scripts.Call` that the
client, worker or supervisor sends (sync or asyncio, alone or batched in a pipeline), and a
parser turns the raw reply into a small dataclass. Keeping both in one place means the
argument order of each script is written down exactly once on the Python side.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator import scripts
from orchestrator.codec import Dispatch
from orchestrator.keys import GROUP, Keys, PartitionKeys, QueueKeys, RunKeys, idempotency_key
from orchestrator.ratelimit import RateLimit
from orchestrator.scripts import Call

Reply = list[Any]
# What purge.lua may delete from each finished-run index, and what belongs in it.
FINISHED_IN = {"done": ("completed", "cancelled"), "dead": ("failed",)}


# A random prefix per process and a counter: unique per claim, including across restarts of a
# worker that keeps its id (``--worker-id``), without a system call per claim (uuid4 read
# /dev/urandom for every step).
_TOKEN_PREFIX = uuid.uuid4().hex[:8]
_token_numbers = itertools.count(1)


def new_claim_token(worker_id: str) -> str:
    """A claim token unique per claim: the worker's id, a per-process nonce and a counter.

    Unique per claim, not per (worker, entry): after Redis loses writes the same worker can read
    the same entry again, and the attempt Redis forgot must not pass for the one that replaced it.
    A claim resent after a lost reply is the same call with the same token, so it is recognised.
    """
    return f"{worker_id}:{_TOKEN_PREFIX}{next(_token_numbers):x}"


def _pairs(fields: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += (name, value)
    return out


@dataclass(frozen=True)
class Claimed:
    """Reply of ``claim.lua``. ``code`` is ``RUN`` when this worker should run the step."""

    code: str
    fence: int = 0
    attempt: int = 0
    errors: int = 0
    crashes: int = 0
    crashed_now: bool = False
    snapshot: str | None = None
    server_ms: int = 0
    steps_done: int = 0
    work_ms: int = 0
    state: dict[str, str] = field(default_factory=dict)
    detail: str = ""

    @classmethod
    def parse(cls, reply: Reply) -> Claimed:
        code = reply[0]
        if code != "RUN":
            return cls(code=code, detail=" ".join(str(x) for x in reply[1:]))
        flat = reply[11:]
        return cls(
            code=code,
            fence=int(reply[1]),
            attempt=int(reply[2]),
            errors=int(reply[3]),
            crashes=int(reply[4]),
            crashed_now=bool(int(reply[5])),
            snapshot=reply[7] if int(reply[6]) else None,
            server_ms=int(reply[8]),
            steps_done=int(reply[9]),
            work_ms=int(reply[10]),
            state={flat[i]: flat[i + 1] for i in range(0, len(flat), 2)},
        )


@dataclass(frozen=True)
class Outcome:
    """Reply of commit, fail, release, redispatch, sweep, cancel and retry: a code and details."""

    code: str
    detail: tuple[Any, ...] = ()

    @classmethod
    def parse(cls, reply: Reply | str) -> Outcome:
        if isinstance(reply, str):
            return cls(code=reply)
        return cls(code=str(reply[0]), detail=tuple(reply[1:]))


@dataclass(frozen=True)
class Committed:
    """Reply of ``commit.lua`` when it applied: the next dispatch, and its claim when chained
    (without the state: the committing worker has it, its update merged)."""

    next_step: str  # '' when the run completed
    visit: int
    entry_id: str
    chained: Claimed | None

    @classmethod
    def parse(cls, detail: Sequence[Any]) -> Committed:
        chained = Claimed.parse(list(detail[3:])) if len(detail) > 3 and detail[3] == "RUN" else None
        return cls(str(detail[0]), int(detail[1]), str(detail[2]), chained)


@dataclass(frozen=True)
class Store:
    """Call builders for one namespace."""

    keys: Keys

    def _run(self, run_id: str) -> RunKeys:
        return self.keys.run(run_id)

    def _at(self, run_id: str, queue: str) -> tuple[RunKeys, QueueKeys, PartitionKeys]:
        """A run's keys, its queue's in its partition, and its partition's indexes and counters."""
        return self.keys.run(run_id), self.keys.queue_of(queue, run_id), self.keys.part_of(run_id)

    def submit(
        self,
        *,
        run_id: str,
        workflow: str,
        queue: str,
        first_step: str,
        input_sha: str,
        event: str,
        request_id: str,
        state: Mapping[str, str],
        deadline_ms: int | None = None,
        step_deadlines: Mapping[str, int] | None = None,
        parent: tuple[str, str, int] | None = None,
        on_finish: str | None = None,
    ) -> Call:
        """``deadline_ms``: how long the run may take, from its creation (server clock);
        ``step_deadlines``: each step's ``deadline_s`` in ms, by name (``Workflow.step_deadlines_ms``);
        ``parent``: a child run's parent (run id, queue, the child's index); ``on_finish``: the
        run's RQ callback, JSON (``OnFinish.to_json``)."""
        rk, qk, pk = self._run(run_id), self.keys.queue_of(queue, run_id), self.keys.part_of(run_id)
        return scripts.load("submit").call(
            [rk.run, rk.state, rk.history, qk.stream, qk.queued, pk.stats_detail, pk.deadlines],
            [
                run_id,
                workflow,
                queue,
                first_step,
                input_sha,
                event,
                request_id,
                "" if deadline_ms is None else deadline_ms,
                json.dumps(dict(step_deadlines)) if step_deadlines else "",
                "|".join(map(str, parent)) if parent else "",
                on_finish or "",
                *_pairs(state),
            ],
        )

    def expired(self, *, partition: int, limit: int) -> Call:
        """Runs of ``partition`` whose deadline has passed on the server's clock, earliest first."""
        return scripts.load("due").call([self.keys.part(partition).deadlines], [limit])

    def expire(self, *, run_id: str, queue: str) -> Call:
        """Fail the run if its deadline has passed (``expire.lua``)."""
        rk, qk, k = self._at(run_id, queue)
        return scripts.load("expire").call(
            [
                rk.run,
                k.cancels,
                rk.history,
                qk.delayed,
                qk.queued,
                k.active,
                k.dead,
                k.stats,
                k.stats_detail,
                k.deadlines,
                k.finished,
            ],
            [run_id],
        )

    def claim(
        self,
        *,
        dispatch: Dispatch,
        queue: str,
        entry_id: str,
        token: str,
        worker: str,
        max_crashes: int,
        max_steps: int,
    ) -> Call:
        """``token`` comes from :func:`new_claim_token`; resend the same call after a lost reply."""
        rk, qk, pk = self._at(dispatch.run, queue)
        return scripts.load("claim").call(
            [
                rk.run,
                rk.state,
                rk.results,
                rk.stash,
                rk.history,
                pk.alive,
                qk.stream,
                qk.queued,
                pk.active,
                pk.done,
                pk.dead,
                pk.stats,
                pk.stats_detail,
                qk.delayed,
                rk.signals,
                pk.deadlines,
                rk.children,
                pk.finished,
            ],
            [
                dispatch.step,
                dispatch.visit,
                idempotency_key(dispatch.run, dispatch.step, dispatch.visit, dispatch.wf),
                token,
                worker,
                max_crashes,
                entry_id,
                dispatch.wf,
                dispatch.run,
                max_steps,
            ],
        )

    def commit(
        self,
        *,
        dispatch: Dispatch,
        queue: str,
        token: str,
        record: str,
        event: str,
        next_step: str | None,
        duration_ms: int,
        cost: Mapping[str, float],
        state: Mapping[str, str],
        max_steps: int,
        chain_to: str | None = None,
        chain_token: str = "",
        entry_id: str = "",
        wake: str = "",
        wait: str = "",
        children: str = "",
    ) -> Call:
        """``chain_to``: the consumer that takes the next step at once when nothing else waits,
        under ``chain_token`` (a new claim token); ``max_steps`` = 0 puts no limit on the run;
        ``entry_id``: the stream entry the claim was made from, acked by the commit when it
        applies ('' leaves the ack to the caller); ``wake``: a Sleep's wake-up (``Sleep.wake``):
        the run sleeps until then instead of going on at once; ``wait``: a WaitFor (the JSON of
        ``StepOutcome.wait``): the run waits for that signal before it goes on; ``children``: a
        StartChildren (``{"into", "collect", "runs": [ids]}``): the run waits for those child runs,
        which the caller starts after the commit."""
        rk, qk, k = self._at(dispatch.run, queue)
        return scripts.load("commit").call(
            [
                rk.run,
                rk.state,
                rk.results,
                rk.stash,
                rk.history,
                k.alive,
                qk.stream,
                qk.queued,
                k.active,
                k.done,
                k.dead,
                k.stats,
                k.stats_detail,
                qk.delayed,
                rk.signals,
                k.deadlines,
                rk.children,
                k.finished,
            ],
            [
                dispatch.run,
                dispatch.wf,
                idempotency_key(dispatch.run, dispatch.step, dispatch.visit, dispatch.wf),
                token,
                record,
                event,
                next_step or "",
                duration_ms,
                dispatch.step,
                json.dumps(dict(cost)) if cost else "",
                chain_to or "",
                chain_token if chain_to else "",
                GROUP,
                max_steps,
                entry_id,
                wake,
                wait,
                children,
                *_pairs(state),
            ],
        )

    def fail(
        self,
        *,
        dispatch: Dispatch,
        queue: str,
        token: str,
        event: str,
        kind: str,
        retry_delay_ms: int | None,
        error: str,
    ) -> Call:
        rk, qk, k = self._at(dispatch.run, queue)
        return scripts.load("fail").call(
            [rk.run, rk.history, qk.delayed, qk.queued, k.active, k.done, k.dead, k.stats, k.stats_detail, k.finished],
            [dispatch.run, token, event, kind, "" if retry_delay_ms is None else retry_delay_ms, error],
        )

    def release(self, *, run_id: str, queue: str, token: str, event: str) -> Call:
        rk, qk, pk = self._at(run_id, queue)
        return scripts.load("release").call(
            [rk.run, rk.history, qk.stream, qk.queued, pk.active, pk.stats],
            [run_id, token, event],
        )

    def defer(
        self, *, run_id: str, queue: str, token: str, wait_ms: int, limit: str, kind: str = "rate", detail: str = ""
    ) -> Call:
        """Give a claimed step back until ``wait_ms`` from now (``defer.lua``): its rate limit
        ``limit`` said wait (``kind`` 'rate'), or its concurrency limit has no permit for it yet
        ('permit': woken earlier when one is free); no user code ran."""
        rk, qk, pk = self._at(run_id, queue)
        return scripts.load("defer").call(
            [rk.run, rk.history, qk.delayed, qk.queued, pk.active, pk.stats],
            [run_id, token, wait_ms, limit, kind, detail or f"rate limit {limit}: starts in {wait_ms} ms"],
        )

    def permit(self, name: str, limit: int | str, mode: str, *args: str | int) -> Call:
        """A call of ``permit.lua`` on concurrency limit ``name`` (``limit``: the code's), in its
        own slot: ``mode`` acquire, release, renew, sweep or forget, with that mode's arguments."""
        return scripts.load("permit").call(self.keys.permit(name).all, [mode, limit, *args])

    def rate(self, *, limit: RateLimit, mode: str, run_id: str = "", cost: float = 1.0) -> Call:
        """Admit a step under ``limit`` (``mode`` 'admit': now, or after a reserved wait) or
        charge units a step used (``mode`` 'spend'), on the limit's own slot (``rate.lua``)."""
        state, reserved = self.keys.rate_limit(limit.name)
        return scripts.load("rate").call(
            [state, reserved], [mode, run_id, repr(float(cost)), repr(limit.rate), limit.per_ms, repr(limit.burst)]
        )

    def alive(self, *, partition: int, worker: str, lease_ms: int, cancels_seen: str) -> Call:
        """A worker's beat in one partition: its claims there stay live for ``lease_ms`` more.
        Reply: was it live before (0/1), the last cancels entry, the runs cancelled since
        ``cancels_seen`` ('' at the first beat: only the last entry)."""
        pk = self.keys.part(partition)
        return scripts.load("alive").call([pk.alive, pk.cancels], [worker, lease_ms, cancels_seen])

    def own_pending(self, *, stream: str, consumer: str, known: int, idle_ms: int, limit: int) -> Call:
        """Entries of ``stream`` pending for ``consumer`` and idle for ``idle_ms``, listed only when
        it holds more than the ``known`` it is handling (reply: entry ids)."""
        return scripts.load("own_pending").call([stream], [GROUP, consumer, known, idle_ms, limit])

    def dead_pending(self, *, queue: str, partition: int, limit: int) -> Call:
        """Entries of ``queue``'s stream in ``partition`` pending for workers whose deadline
        passed (reply: entry id, consumer, ...)."""
        qk, pk = self.keys.queue(queue, partition), self.keys.part(partition)
        return scripts.load("dead_pending").call([qk.stream, pk.alive], [GROUP, limit])

    def stash(self, *, run_id: str, token: str, idem_key: str, snapshot: str) -> Call:
        rk = self._run(run_id)
        return scripts.load("stash").call([rk.run, rk.stash], [token, idem_key, snapshot])

    def ack(self, queue: str, partition: int, entry_ids: Sequence[str]) -> list[Call]:
        """XACK then XDEL, whoever holds the entries (the supervisor dropping dead entries)."""
        stream = self.keys.queue(queue, partition).stream
        return [scripts.command("XACK", stream, GROUP, *entry_ids), scripts.command("XDEL", stream, *entry_ids)]

    def ack_owned(self, stream: str, consumer: str, entry_ids: Sequence[str]) -> Call:
        """XACK and XDEL of the entries of ``stream`` still pending for ``consumer`` (a worker's own acks)."""
        return scripts.load("ack").call([stream], [GROUP, consumer, *entry_ids])

    def trim(self, *, queue: str, partition: int) -> Call:
        """Drop the entries of ``queue``'s stream in ``partition`` that were delivered and acked
        (reply: how many)."""
        return scripts.load("trim").call([self.keys.queue(queue, partition).stream], [GROUP])

    def reap_consumer(self, *, stream: str, consumer: str) -> Call:
        """Delete a dead worker's consumer from ``stream``'s group if it has nothing pending
        there (the caller has checked that the worker is gone from the fleet)."""
        return scripts.load("reap_consumer").call([stream], [GROUP, consumer])

    def heartbeat(self, *, worker: str, ttl_ms: int, queues: Sequence[str], info: Mapping[str, str]) -> Call:
        return scripts.load("heartbeat").call(
            [self.keys.workers, self.keys.worker(worker), self.keys.queues],
            [worker, ttl_ms, ",".join(queues), *_pairs(info)],
        )

    def redispatch(
        self, *, queue: str, entry_id: str, consumer: str, dispatch: Dispatch, giver: str = "", why: str = ""
    ) -> Call:
        """Re-enqueue an entry whose claim is not live. ``giver``: the worker giving up an entry
        of its own that it is not running ('' from the supervisor); ``why``: the event's words
        for it, when not the usual ones."""
        rk, qk, pk = self._at(dispatch.run, queue)
        return scripts.load("redispatch").call(
            [rk.run, pk.alive, rk.results, qk.stream, rk.history, pk.stats, qk.queued, pk.active],
            [
                GROUP,
                entry_id,
                dispatch.run,
                dispatch.step,
                dispatch.visit,
                idempotency_key(dispatch.run, dispatch.step, dispatch.visit, dispatch.wf),
                consumer,
                giver,
                why,
            ],
        )

    def due(self, *, queue: str, partition: int, limit: int) -> Call:
        """Run ids whose retry is due (the delayed set's members are run ids)."""
        return scripts.load("due").call([self.keys.queue(queue, partition).delayed], [limit])

    def promote(self, *, queue: str, run_id: str, permit: str | None = None) -> Call:
        """Queue ``run_id``'s step when its delayed time is due; with ``permit`` (a concurrency
        limit's name), now if the run waits for a permit of it (a wake: reply 'GONE' when the
        run ended)."""
        rk, qk, pk = self._at(run_id, queue)
        return scripts.load("promote").call(
            [qk.delayed, qk.stream, rk.run, pk.stats, qk.queued, pk.active, rk.history, rk.state, pk.deadlines],
            [run_id] if permit is None else [run_id, permit],
        )

    def passed(self, *, queue: str, partition: int, cursor: str, limit: int, deleted_seen: str = "") -> Call:
        """Runs of ``queue`` whose entry the group has passed, or that was trimmed or deleted.

        Scans at most ``limit`` index entries after ``cursor`` (``-inf`` to start). Reply:
        horizon, the stream's highest deleted id, the cursor of the next page ('' when the scan
        is complete), then run ids. ``deleted_seen`` is the highest deleted id whose runs were
        already looked at (so one foreign XDEL costs one scan, not one per sweep).
        """
        qk = self.keys.queue(queue, partition)
        return scripts.load("passed").call([qk.stream, qk.queued], [GROUP, cursor, limit, deleted_seen])

    def sweep(self, *, run_id: str, queue: str, after_ms: int = 10_000, live_claim_max_ms: int = 300_000) -> Call:
        """Check that a run has work somewhere. ``after_ms``: how long a run is left before a look
        (the sweep's age threshold); a live claim is looked at again after as long as it has run,
        between ``after_ms`` and ``live_claim_max_ms`` (the defaults: the supervisor's with
        default settings)."""
        rk, qk, pk = self._at(run_id, queue)
        return scripts.load("sweep").call(
            [rk.run, pk.alive, qk.stream, qk.delayed, qk.queued, pk.active, rk.history, pk.stats],
            [run_id, GROUP, after_ms, live_claim_max_ms],
        )

    def cancel(self, *, run_id: str, queue: str, reason: str, request_id: str) -> Call:
        rk, qk, k = self._at(run_id, queue)
        return scripts.load("cancel").call(
            [
                rk.run,
                k.cancels,
                rk.history,
                qk.delayed,
                qk.queued,
                k.active,
                k.done,
                k.stats,
                k.stats_detail,
                k.finished,
            ],
            [run_id, reason, request_id],
        )

    def retry(self, *, run_id: str, queue: str, reason: str, request_id: str, cancelled_too: bool = False) -> Call:
        """Re-drive a failed run (``retry_run.lua``); with ``cancelled_too`` a cancelled one as well
        (a retried parent's children: a map's failed item cancelled the others)."""
        rk, qk, k = self._at(run_id, queue)
        return scripts.load("retry_run").call(
            [
                rk.run,
                rk.history,
                qk.stream,
                qk.queued,
                k.active,
                k.dead,
                k.stats,
                k.stats_detail,
                qk.delayed,
                k.deadlines,
                rk.children,
                k.done,
            ],
            [run_id, reason, request_id, "1" if cancelled_too else "0"],
        )

    def signal(
        self, *, run_id: str, queue: str, signal_id: str, name: str, payload: str, digest: str, max_signals: int
    ) -> Call:
        """Send signal ``name`` with ``payload`` (JSON, validated) to a run; resend the same call
        (same ``signal_id``) after a lost reply."""
        rk, qk, k = self._at(run_id, queue)
        return scripts.load("signal").call(
            [
                rk.run,
                rk.state,
                rk.signals,
                rk.history,
                qk.stream,
                qk.queued,
                k.active,
                qk.delayed,
                k.stats,
                k.deadlines,
            ],
            [run_id, signal_id, name, payload, digest, max_signals],
        )

    def child_done(
        self, *, parent: str, queue: str, index: int, child: str, status: str, result: str, value: str = ""
    ) -> Call:
        """Record how child run ``child`` (index ``index`` of ``parent``) ended (``child_done.lua``);
        ``value``: a completed map item's value (JSON)."""
        rk, qk, k = self._at(parent, queue)
        return scripts.load("child_done").call(
            [
                rk.run,
                rk.state,
                rk.children,
                rk.history,
                qk.stream,
                qk.queued,
                k.active,
                k.dead,
                k.stats,
                k.stats_detail,
                k.deadlines,
                k.finished,
            ],
            [parent, index, child, status, result, value],
        )

    def purge(self, *, run_id: str, index: str, cutoff_ms: int, statuses: Sequence[str]) -> Call:
        """Delete a finished run of ``index`` (``done`` or ``dead``) in ``statuses`` finished by ``cutoff_ms``."""
        rk = self._run(run_id)
        return scripts.load("purge").call(
            [
                rk.run,
                rk.state,
                rk.results,
                rk.stash,
                rk.history,
                rk.signals,
                rk.children,
                self.finished_index(run_id, index),
                rk.output,
            ],
            [run_id, cutoff_ms, ",".join(statuses), ",".join(FINISHED_IN[index])],
        )

    def finished_index(self, run_id: str, index: str) -> str:
        """The key of the finished-run index ``index`` (``done`` or ``dead``) of ``run_id``'s partition."""
        part = self.keys.part_of(run_id)
        return part.done if index == "done" else part.dead

    def layout(self) -> Call:
        """Record this namespace's partition count if it has none; reply: the recorded count."""
        return scripts.load("layout").call([self.keys.config], [self.keys.partitions])

    def leader(self, *, candidate: str, lease_ms: int) -> Call:
        return scripts.load("leader").call([self.keys.leader], [candidate, lease_ms])

    def resign(self, *, candidate: str) -> Call:
        return scripts.load("resign").call([self.keys.leader], [candidate])

    def reap_workers(self, *, age_ms: int, limit: int) -> Call:
        """Remove workers silent for ``age_ms`` (reply: now, then worker id / last beat pairs)."""
        return scripts.load("reap_workers").call([self.keys.workers], [age_ms, limit])

    def stale(self, *, key: str, age_ms: int, limit: int) -> Call:
        """Members of a server-time-scored zset older than ``age_ms`` (reply: now, then pairs)."""
        return scripts.load("stale").call([key], [age_ms, limit])

    def count(self, counter: str, amount: int = 1) -> Call:
        """Add to a fleet-wide counter in the stats hash (not atomic with what it counts)."""
        return scripts.command("HINCRBY", self.keys.stats, counter, amount)
