"""``runs why``: one paragraph on what an unfinished run is waiting for right now, or how it ended.

Read-only and best effort: it reads the run's record, the last of its history, and, for the
case it finds, its worker's liveness or its queue entry, in a few round trips (the server's
clock, then pipelines), with no script (the reader's ACL suffices). A run can move on between
the reads; the answer then describes the moment of the first one, as any status display does.
"""

from __future__ import annotations

import time
from typing import Any, Literal, cast

import redis
from pydantic import BaseModel

from orchestrator.bridge.executor import SERIALIZER, job_id
from orchestrator.codec import HistoryEvent
from orchestrator.connection import server_ms
from orchestrator.keys import GROUP, Keys, idempotency_key
from orchestrator.runs import TERMINAL, RunInfo
from orchestrator.runs import Waiting as SignalWait

Waiting = Literal[
    "queue",
    "worker",
    "claim",
    "recovery",
    "sleep",
    "signal",
    "children",
    "permit",
    "rate_limit",
    "backoff",
    "repair",
    "nothing",
]
Answer = tuple[Waiting, str, dict[str, Any]]  # what it waits for, the paragraph, the figures
LOOK_BACK = 50  # history events read for the last error or cancel reason
MAX_AHEAD = 10_000  # queued entries counted ahead of the run's own, at most


class Why(BaseModel):
    """What a run waits for: a code for programs, a paragraph for people, and the figures."""

    run_id: str
    status: str
    waiting_for: Waiting
    text: str
    server_ms: int
    details: dict[str, Any] = {}


def stamp(ms: int | None) -> str:
    """A server time for people (UTC)."""
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def span(ms: int) -> str:
    """A duration for people: ms, s, min or h."""
    ms = max(0, ms)
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.0f} min"
    return f"{ms / 3_600_000:.1f} h"


def explain(client: redis.Redis, keys: Keys, run_id: str, reclaim_interval_s: float) -> Why | None:
    """Why run ``run_id`` is where it is; None when there is no such run."""
    rk = keys.run(run_id)
    now = server_ms(client)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(rk.run)
    pipe.lrange(rk.history, -LOOK_BACK, -1)
    pipe.hgetall(rk.signals)
    pipe.hgetall(rk.children)
    record, raw_events, signals, children = pipe.execute()
    if not record:
        return None
    events = [HistoryEvent.model_validate_json(e) for e in raw_events]
    info = RunInfo.from_hash(run_id, record, signals, children)
    waiting_for, text, details = _answer(client, keys, info, record, events, now, reclaim_interval_s)
    if info.signals_pending and waiting_for != "nothing":
        names = ", ".join(sorted({p.name for p in info.signals_pending}))
        text += (
            f" {len(info.signals_pending)} signal(s) sent to it wait for a step that waits for them ({names}); "
            "each is delivered when a step returns WaitFor(name)."
        )
        details = {**details, "signals_pending": [p.model_dump() for p in info.signals_pending]}
    if info.deadline_ms is not None and waiting_for != "nothing":
        left = info.deadline_ms - now
        when = f"in {span(left)}" if left > 0 else f"passed {span(-left)} ago; the supervisor fails it at its next look"
        text += f" Its deadline is {stamp(info.deadline_ms)} ({when})."
        details = {**details, "deadline_ms": info.deadline_ms}
    if info.step_deadline_ms is not None and waiting_for != "nothing":
        left = info.step_deadline_ms - now
        when = f"in {span(left)}" if left > 0 else f"passed {span(-left)} ago; the supervisor fails it at its next look"
        text += f" Step {info.step} must commit by {stamp(info.step_deadline_ms)} ({when}: its deadline_s)."
        details = {**details, "step_deadline_ms": info.step_deadline_ms}
    return Why(run_id=run_id, status=info.status, waiting_for=waiting_for, text=text, server_ms=now, details=details)


def _answer(
    client: redis.Redis,
    keys: Keys,
    info: RunInfo,
    record: dict[str, str],
    events: list[HistoryEvent],
    now: int,
    reclaim_interval_s: float,
) -> Answer:
    where = f"step {info.step}" + (f" (visit {info.visit})" if info.visit > 1 else "")

    if info.status in TERMINAL:
        return "nothing", _finished(info, events), {"finished_ms": info.finished_ms}
    if info.status == "sleeping" and info.due_ms is not None:
        if info.due_ms > now:
            text = f"sleeping until {stamp(info.due_ms)} (in {span(info.due_ms - now)}), then {where}."
        else:
            text = (
                f"due since {stamp(info.due_ms)} ({span(now - info.due_ms)} ago) to go on at {where}; the next "
                "worker or supervisor that looks for due runs wakes it (every promote_interval_s, or "
                "reclaim_interval_s for the supervisor)."
            )
        return "sleep", text, {"due_ms": info.due_ms, "step": info.step}
    if info.status == "waiting" and info.waiting is not None:
        return _waiting(info.waiting, now, where)
    if info.status == "waiting" and info.children is not None:
        kids = info.children
        text = (
            f"waiting for {kids.describe()}, then {where}: "
            + ", ".join(kids.children[:10])
            + (f" and {kids.total - 10} more" if kids.total > 10 else "")
            + "."
        )
        return "children", text, kids.model_dump()
    limited = next((e for e in reversed(events) if e.type in ("rate_limited", "permit_wait", "error", "timeout")), None)
    if info.status == "retrying" and info.due_ms is not None and limited is not None and limited.type == "permit_wait":
        text = (
            f"waiting in line for a permit of its concurrency limit ({limited.detail}): it is woken as soon as "
            f"one is free for it (it asks again by {stamp(info.due_ms)} in any case), then {where}; it holds "
            "no worker slot meanwhile."
        )
        return "permit", text, {"due_ms": info.due_ms}
    if info.status == "retrying" and info.due_ms is not None and limited is not None and limited.type == "rate_limited":
        text = (
            f"waiting for its rate limit ({limited.detail}): its start is reserved for {stamp(info.due_ms)} "
            f"(in {span(info.due_ms - now)}), then {where}; it holds no worker slot meanwhile."
        )
        return "rate_limit", text, {"due_ms": info.due_ms}
    if info.status == "retrying" and info.due_ms is not None:
        error = next((e for e in reversed(events) if e.type in ("error", "timeout") and e.error), None)
        cause = f" after {error.error.type}: {error.error.message}" if error and error.error else ""
        text = (
            f"backing off until {stamp(info.due_ms)} (in {span(info.due_ms - now)}){cause}; {where} will be "
            f"attempt {info.attempt + 1} ({info.errors} errors so far)."
        )
        return "backoff", text, {"due_ms": info.due_ms, "errors": info.errors}
    if record.get("claim"):
        return _claimed(client, keys, info, record, now, where, reclaim_interval_s)
    return _queued(client, keys, info, record.get("dispatch", ""), now, where)


def _waiting(wait: SignalWait, now: int, where: str) -> Answer:
    text = (
        f"waiting for signal {wait.signal} since {stamp(wait.since_ms)} ({span(now - wait.since_ms)} ago), then {where}"
    )
    if wait.timeout_ms is None:
        text += "; no timeout (`orchestrator signal` sends it)."
    elif wait.timeout_ms > now:
        text += (
            f"; times out at {stamp(wait.timeout_ms)} (in {span(wait.timeout_ms - now)}), then step {wait.on_timeout}."
        )
    else:
        text += (
            f"; timed out at {stamp(wait.timeout_ms)} ({span(now - wait.timeout_ms)} ago): the next look for due runs "
            f"moves it on to step {wait.on_timeout}."
        )
    return "signal", text, wait.model_dump()


def _finished(info: RunInfo, events: list[HistoryEvent]) -> str:
    at = stamp(info.finished_ms) if info.finished_ms else "an unknown time"
    took = f" (took {span(info.finished_ms - info.created_ms)})" if info.finished_ms else ""
    if info.status == "completed":
        return f"finished: completed at {at}{took} after {info.steps_done} committed steps."
    if info.status == "cancelled":
        cancel = next((e for e in reversed(events) if e.type == "cancelled"), None)
        reason = f": {cancel.detail}" if cancel and cancel.detail else ""
        return f"finished: cancelled at {at}{reason}."
    error = info.error
    if error is not None and error.type == "Quarantined":
        return f"finished: failed at {at}, quarantined because {error.message}"
    cause = f": {error.type}: {error.message}" if error else ""
    return f"finished: failed at {at} at step {info.step}{cause}"


def _claimed(
    client: redis.Redis,
    keys: Keys,
    info: RunInfo,
    record: dict[str, str],
    now: int,
    where: str,
    reclaim_interval_s: float,
) -> Answer:
    worker = record.get("claim_worker", "")
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.part_of(info.run_id).alive, worker)
    pipe.hget(keys.worker(worker), "last_ms")
    deadline_raw, beat_raw = pipe.execute()
    deadline = int(deadline_raw) if deadline_raw else None
    since = int(record.get("claim_ms") or now)
    details = {"worker": worker, "claimed_ms": since, "lease_until_ms": deadline, "attempt": info.attempt}
    if deadline is not None and deadline > now:
        beat = f"last heartbeat {span(now - int(beat_raw))} ago" if beat_raw else "no heartbeat on record"
        text = (
            f"running {where} (attempt {info.attempt}) on worker {worker} (alive, {beat}) since "
            f"{stamp(since)} ({span(now - since)})."
        )
        on_rq, rq_details = _on_rq(client, keys, info, record)
        return "worker", text + on_rq, {**details, **rq_details}
    lapsed = f"at {stamp(deadline)}" if deadline is not None else "(its worker left the fleet)"
    expected = max(now, deadline or now) + int(reclaim_interval_s * 1000)
    text = (
        f"the claim of {where} by worker {worker} lapsed {lapsed}: the worker stopped renewing it. The "
        f"supervisor re-dispatches the step, expected by {stamp(expected)}; the next attempt counts a crash."
    )
    return "recovery", text, {**details, "expected_ms": expected}


def _on_rq(client: redis.Redis, keys: Keys, info: RunInfo, record: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Where a claimed step that runs on RQ (orchestrator.bridge) is in RQ: its job of this
    claim, and the RQ workers listening on its queue when it waits there ('' for other steps,
    and when RQ's keys cannot be read: a reader's ACL may cover only ours)."""
    rq_job = job_id(keys.namespace, idempotency_key(info.run_id, info.step, info.visit, info.workflow),
                    int(record.get("claim_fence") or 0))  # fmt: skip
    try:
        status, rq_worker, queue = cast(
            list[str | None], client.hmget(f"rq:job:{rq_job}", "status", "worker_name", "origin")
        )
        if status is None:
            return "", {}
        details = {"rq_job": rq_job, "rq_status": status, "rq_queue": queue, "rq_worker": rq_worker or None}
        if status == "started":
            return f" Its code runs on RQ: job {rq_job} on RQ worker {rq_worker} (queue {queue}).", details
        members = list(cast(set[str], client.smembers(f"rq:workers:{queue}")))
        live = client.exists(*members) if members else 0
        listening = f"{live} RQ worker(s) listen on it" if live else (
            f"no RQ worker listens on it: start one (rq worker {queue} -S {SERIALIZER})"
        )  # fmt: skip
        return f" Its code waits on RQ: job {rq_job} is {status} on RQ queue {queue}; {listening}.", {
            **details, "rq_workers": live,
        }  # fmt: skip
    except redis.RedisError:
        return "", {}


def _queued(client: redis.Redis, keys: Keys, info: RunInfo, dispatch: str, now: int, where: str) -> Answer:
    stream = keys.queue_of(info.queue, info.run_id).stream
    if not dispatch or dispatch == "delayed":
        text = f"no queued work found for {where}; the supervisor's sweep re-enqueues it at its next pass."
        return "repair", text, {}
    pipe = client.pipeline(transaction=False)
    pipe.xrange(stream, dispatch, dispatch)
    pipe.xpending_range(stream, GROUP, min=dispatch, max=dispatch, count=1)
    pipe.xinfo_groups(stream)
    # a missing stream or group (no worker or supervisor made it yet, an operator's DEL) answers
    # with an error: nothing pending, nothing read
    entry, pending, groups = (
        [] if isinstance(reply, Exception) else reply for reply in pipe.execute(raise_on_error=False)
    )
    details: dict[str, Any] = {"queue": info.queue, "stream": stream, "entry": dispatch}
    if not entry:
        text = f"the queued entry of {where} is gone; the supervisor's sweep re-enqueues it at its next pass."
        return "repair", text, details
    if pending:
        consumer, idle = pending[0]["consumer"], int(pending[0]["time_since_delivered"])
        text = (
            f"{where} was delivered to worker {consumer} {span(idle)} ago and waits there for a free slot "
            "(entries read ahead are claimed in order; after a lease they go back to the queue)."
        )
        return "claim", text, {**details, "worker": consumer, "idle_ms": idle}
    group = next((g for g in groups if g.get("name") == GROUP), None)
    last = group.get("last-delivered-id") if group else "0-0"
    ahead = len(client.xrange(stream, f"({last}", f"({dispatch}", count=MAX_AHEAD) or []) if last != dispatch else 0
    count = f"{ahead:,}" if ahead < MAX_AHEAD else f"more than {MAX_AHEAD - 1:,}"
    waited = now - int(dispatch.split("-")[0])
    text = (
        f"queued in queue {info.queue} for {span(waited)}, behind {count} entries of its partition "
        f"not yet read by a worker; {where} runs when a worker with a free slot reads it."
    )
    return "queue", text, {**details, "ahead": ahead, "waited_ms": waited}
