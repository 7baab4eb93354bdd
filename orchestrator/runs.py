"""Read models of a run: its record (``RunInfo``) and its history, grouped per step attempt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel

from orchestrator.codec import ErrorInfo, HistoryEvent, loads
from orchestrator.keys import idempotency_key
from orchestrator.priority import split

Status = Literal["pending", "running", "retrying", "sleeping", "waiting", "completed", "failed", "cancelled"]
STATUSES: tuple[str, ...] = (
    "pending",
    "running",
    "retrying",
    "sleeping",
    "waiting",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
ATTEMPT_OUTCOMES = frozenset({"ok", "error", "timeout", "crashed", "fenced", "released"})


class PendingSignal(BaseModel):
    """A signal sent to a run that no step has received yet (none waited for it so far)."""

    name: str
    signal_id: str
    sent_ms: int


class SignalSent(BaseModel):
    """What became of a signal sent with ``Client.signal``."""

    run_id: str
    signal_id: str
    name: str
    # delivered: the run was waiting for it and goes on at ``step``; buffered: kept until a step
    # waits for it; duplicate: this signal id was sent before (``step`` set once delivered)
    outcome: Literal["delivered", "buffered", "duplicate"]
    step: str | None = None
    visit: int | None = None


class Waiting(BaseModel):
    """What a waiting run waits for."""

    signal: str
    since_ms: int
    timeout_ms: int | None = None  # when the wait ends without the signal (Redis clock)
    on_timeout: str  # the step it then goes on at


class ChildWait(BaseModel):
    """A run waiting for the child runs (or the map items) a step started."""

    total: int
    done: int
    children: list[str]
    map: bool = False  # map items (Map), not child runs (StartChildren)
    started: int = 0  # how many have been started (a map starts ``parallelism`` at a time)
    parallelism: int = 0

    def describe(self) -> str:
        """``child runs (1 of 3 done)``, or ``map items (3 of 10 done, 2 running, 2 at a time)``."""
        if not self.map:
            return f"child runs ({self.done} of {self.total} done)"
        limit = f", {self.parallelism} at a time" if self.parallelism < self.total else ""
        return f"map items ({self.done} of {self.total} done, {self.started - self.done} running{limit})"


def child_wait(children: Mapping[str, str]) -> ChildWait | None:
    if "n" not in children:
        return None
    total = int(children["n"])
    ids = [children.get(f"c:{i}", "") for i in range(total)]
    return ChildWait(
        total=total,
        done=int(children.get("done", 0)),
        children=ids,
        map=children.get("map") == "1",
        started=int(children.get("started", total)),
        parallelism=int(children.get("window", total)),
    )


def pending_signals(signals: Mapping[str, str]) -> list[PendingSignal]:
    """The signals of a run's signals hash (keys.py) not delivered yet, oldest first."""
    out = []
    for field, ids in signals.items():
        if field.startswith("q:"):
            for signal_id in ids.split():
                record = loads(signals.get(f"s:{signal_id}", "{}"), what=f"signal {signal_id!r}")
                out.append(PendingSignal(name=field[2:], signal_id=signal_id, sent_ms=int(record.get("at", 0))))
    return sorted(out, key=lambda p: p.sent_ms)


class RunInfo(BaseModel):
    """A run's record as stored in its hash, with counters decoded."""

    run_id: str
    workflow: str
    queue: str
    status: Status
    step: str
    visit: int
    attempt: int
    errors: int
    crashes: int
    fence: int
    steps_done: int
    work_ms: int
    fenced: int
    created_ms: int
    updated_ms: int
    finished_ms: int | None = None
    due_ms: int | None = None
    permit: str | None = None  # the concurrency limit whose permit the run waits for (in line)
    priority: str = "normal"  # its level (its queue is the level's lane: orchestrator.priority)
    deadline_ms: int | None = None
    step_deadline_ms: int | None = None  # when the current step's deadline_s passes (it is queued)
    worker: str | None = None
    error: ErrorInfo | None = None
    waiting: Waiting | None = None
    children: ChildWait | None = None  # waiting for child runs: how many are done
    parent: str | None = None  # the run that started this one (a child run)
    signals_pending: list[PendingSignal] = []

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.run_id, self.step, self.visit, self.workflow)

    @classmethod
    def from_hash(
        cls,
        run_id: str,
        h: Mapping[str, str],
        signals: Mapping[str, str] | None = None,
        children: Mapping[str, str] | None = None,
    ) -> RunInfo:
        def num(name: str) -> int:
            return int(h.get(name) or 0)

        def opt(name: str) -> int | None:
            return int(h[name]) if h.get(name) else None

        error = h.get("error")
        return cls(
            run_id=run_id,
            workflow=h["wf"],
            queue=h["queue"],
            status=h["status"],  # type: ignore[arg-type]
            step=h["step"],
            visit=num("visit"),
            attempt=num("attempt"),
            errors=num("errors"),
            crashes=num("crashes"),
            fence=num("fence"),
            steps_done=num("seq"),
            work_ms=num("work_ms"),
            fenced=num("fenced"),
            created_ms=num("created_ms"),
            updated_ms=num("updated_ms"),
            finished_ms=opt("finished_ms"),
            due_ms=opt("due_ms") if h.get("status") in ("retrying", "sleeping") else None,
            permit=h.get("wait_permit") or None if h.get("status") == "retrying" else None,
            priority=split(h.get("queue", ""))[1],
            deadline_ms=opt("deadline_ms"),
            step_deadline_ms=num("queued_ms") + num(f"sd:{h['step']}")
            if num("queued_ms") and num(f"sd:{h['step']}") and h.get("status") in ("pending", "running", "retrying")
            else None,
            worker=h.get("claim_worker") if h.get("claim") else None,
            error=ErrorInfo.model_validate(loads(error, what="run error")) if error else None,
            waiting=Waiting(
                signal=h["wait_signal"],
                since_ms=num("wait_ms"),
                timeout_ms=opt("due_ms") or None,
                on_timeout=h.get("wait_on_timeout") or h["step"],
            )
            if h.get("status") == "waiting" and h.get("wait_signal")
            else None,
            children=child_wait(children or {})
            if h.get("status") == "waiting" and h.get("dispatch") == "children"
            else None,
            parent=h.get("parent") or None,
            signals_pending=pending_signals(signals or {}),
        )


class StepAttempt(BaseModel):
    """One attempt of one step visit and how it ended."""

    attempt: int | None
    outcome: str
    worker: str | None
    fence: int | None
    start_ms: int | None
    end_ms: int | None
    error: ErrorInfo | None = None

    @property
    def duration_ms(self) -> int | None:
        if self.start_ms is None or self.end_ms is None:
            return None
        return self.end_ms - self.start_ms


class StepHistory(BaseModel):
    """All attempts of one visit of one step."""

    step: str
    visit: int
    idempotency_key: str
    attempts: list[StepAttempt]
    committed: bool


class RunHistory(BaseModel):
    """A run's record, its per-step attempts and the raw event list."""

    run: RunInfo
    steps: list[StepHistory]
    events: list[HistoryEvent]


def group_attempts(run: RunInfo, events: list[HistoryEvent]) -> list[StepHistory]:
    """Fold attempt events into one entry per step visit, in the order visits started."""
    steps: dict[tuple[str, int], StepHistory] = {}
    for ev in events:
        if ev.type not in ATTEMPT_OUTCOMES or ev.step is None or ev.visit is None:
            continue
        key = (ev.step, ev.visit)
        if key not in steps:
            steps[key] = StepHistory(
                step=ev.step,
                visit=ev.visit,
                idempotency_key=idempotency_key(run.run_id, ev.step, ev.visit, run.workflow),
                attempts=[],
                committed=False,
            )
        entry = steps[key]
        entry.attempts.append(
            StepAttempt(
                attempt=ev.attempt,
                outcome=ev.type,
                worker=ev.worker,
                fence=ev.fence,
                start_ms=ev.start_ms,
                end_ms=ev.end_ms,
                error=ev.error,
            )
        )
        entry.committed = entry.committed or ev.type == "ok"
    return list(steps.values())
