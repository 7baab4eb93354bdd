"""Text rendering for people: a run's status, its history as a timeline, tables of runs."""

from __future__ import annotations

import json
import time

from orchestrator.codec import HistoryEvent
from orchestrator.output import OutputEvent
from orchestrator.runs import TERMINAL, RunHistory, RunInfo
from orchestrator.why import stamp


def clock(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}"


def seconds(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.2f} s" if ms < 60_000 else f"{ms / 60_000:.1f} min"


def status_text(info: RunInfo) -> str:
    lines = [
        f"run       {info.run_id}",
        f"workflow  {info.workflow}  (queue {info.queue}"
        + (f", priority {info.priority})" if info.priority != "normal" else ")"),
        f"status    {_status(info)}",
    ]
    if info.waiting and info.waiting.timeout_ms:
        lines.append(f"timeout   {stamp(info.waiting.timeout_ms)}, then step {info.waiting.on_timeout}")
    if info.status in ("pending", "running", "retrying", "failed"):
        where = f"step {info.step}" + (f" (visit {info.visit})" if info.visit > 1 else "")
        lines.append(f"at        {where}, attempt {info.attempt}, fencing token {info.fence}")
        lines.append(f"key       {info.idempotency_key}")
    if info.worker:
        lines.append(f"worker    {info.worker}")
    if info.parent:
        lines.append(f"parent    {info.parent}")
    if info.permit:
        lines.append(f"permit    waiting in line for concurrency limit {info.permit} (no worker slot held)")
    elif info.due_ms and info.status == "retrying":
        lines.append(f"retry at  {stamp(info.due_ms)}")
    lines.append(f"progress  {info.steps_done} steps committed, {seconds(info.work_ms)} of step work persisted")
    if info.crashes or info.errors or info.fenced:
        lines.append(
            f"trouble   {info.errors} errors, {info.crashes} crashes on this step; {info.fenced} stale commits refused"
        )
    lines.append(f"created   {stamp(info.created_ms)}")
    lines += _ends(info)
    for pending in info.signals_pending:  # sent, but no step has waited for it (yet)
        lines.append(f"signal    {pending.name} ({pending.signal_id}) sent {stamp(pending.sent_ms)}, not received yet")
    return "\n".join(lines)


def _status(info: RunInfo) -> str:
    if info.status == "sleeping" and info.due_ms:
        return f"sleeping until {stamp(info.due_ms)}, then step {info.step}"
    if info.status == "waiting" and info.waiting:
        return f"waiting for signal {info.waiting.signal} since {stamp(info.waiting.since_ms)}, then step {info.step}"
    if info.status == "waiting" and info.children:
        return f"waiting for {info.children.describe()}, then step {info.step}"
    return info.status


def _ends(info: RunInfo) -> list[str]:
    """The deadlines still ahead, or how the run finished."""
    lines = []
    if info.deadline_ms and info.status not in TERMINAL:
        lines.append(f"deadline  {stamp(info.deadline_ms)}")
    if info.step_deadline_ms:
        lines.append(f"step due  {stamp(info.step_deadline_ms)} (step {info.step}'s deadline_s)")
    if info.finished_ms:
        lines.append(f"finished  {stamp(info.finished_ms)}  (took {seconds(info.finished_ms - info.created_ms)})")
    if info.error:
        lines.append(f"error     {info.error.type}: {info.error.message}")
    return lines


OUTCOME_NOTE = {
    "crashed": "attempt lost (its worker or RQ work-horse died); the next resumes from the last persisted step",
    "fenced": "late result of a replaced attempt, refused",
    "released": "given back at shutdown",
    "timeout": "timed out",
}


def _event_line(ev: HistoryEvent) -> str:
    where = ""
    if ev.step:
        where = ev.step + (f"#{ev.visit}" if ev.visit and ev.visit > 1 else "")
    attempt = f"try {ev.attempt}" if ev.attempt else ""
    duration = seconds(ev.end_ms - ev.start_ms) if ev.start_ms is not None and ev.end_ms is not None else ""
    note = ev.detail or OUTCOME_NOTE.get(ev.type, "")
    if ev.error:
        note = f"{ev.error.type}: {ev.error.message}"
    if ev.signal:
        note = f"signal {ev.signal}" + (f" ({ev.signal_id})" if ev.signal_id else "")
        note += f", times out {stamp(ev.until_ms)}" if ev.until_ms else ""
    if ev.rq_job:
        note = f"{note} [RQ job {ev.rq_job} on {ev.rq_worker or '?'}]".lstrip()
    worker = ev.worker or ""
    return f"{clock(ev.at)}  {ev.type:<12} {where:<22} {attempt:<6} {duration:>9}  {worker:<24} {note}".rstrip()


def history_text(history: RunHistory) -> str:
    run = history.run
    attempts = sum(len(s.attempts) for s in history.steps)
    head = (
        f"run {run.run_id} ({run.workflow}): {run.status}, {run.steps_done} steps committed, "
        f"{attempts} attempts, {seconds(run.work_ms)} of step work persisted"
    )
    header = f"{'time':<12}  {'event':<12} {'step':<22} {'':<6} {'duration':>9}  {'worker':<24} note"
    return "\n".join([head, "", header, *(_event_line(ev) for ev in history.events)])


def runs_table(runs: list[RunInfo]) -> str:
    if not runs:
        return "no runs"
    header = f"{'RUN':<36} {'WORKFLOW':<16} {'STATUS':<10} {'STEP':<20} {'DONE':>5}  UPDATED"
    rows = [
        f"{r.run_id:<36} {r.workflow:<16} {r.status:<10} {r.step:<20} {r.steps_done:>5}  {stamp(r.updated_ms)}"
        for r in runs
    ]
    return "\n".join([header, *rows])


def output_line(ev: OutputEvent, t0: int) -> str:
    """One line per live output entry, under the events: its id (to resume with --after) and data."""
    at = f"+{(ev.at - t0) / 1000:5.1f}s"
    data = ev.data if isinstance(ev.data, str) else json.dumps(ev.data)
    return f"  {at}  {ev.step:<17} > {data}  [{ev.id}]"


def live_line(ev: HistoryEvent | OutputEvent, t0: int) -> str:
    """One line per history event (or live output entry) as it happens, timed from ``t0`` (server ms)."""
    if isinstance(ev, OutputEvent):
        return output_line(ev, t0)
    at = f"+{(ev.at - t0) / 1000:5.1f}s"
    step = f"{ev.step:<17}" if ev.step else " " * 17
    where = f" on {ev.worker}" if ev.worker else ""
    if ev.rq_job:
        where = f" on RQ worker {ev.rq_worker or '?'} (job {ev.rq_job}, for {ev.worker})"
    took = f" ({seconds(ev.end_ms - ev.start_ms)})" if ev.start_ms is not None and ev.end_ms is not None else ""
    text = {
        "submitted": "run submitted",
        "ok": f"done{took}{where}",
        "error": f"failed{took}{where}: {ev.error.message if ev.error else ''}",
        "timeout": f"timed out{took}{where}",
        "crashed": f"attempt {ev.attempt} lost: {ev.worker} (or its RQ work-horse) died mid-step; resuming from "
        "what was persisted",
        "redispatched": "supervisor: lease expired, step handed to another worker",
        "fenced": f"late result of a replaced attempt refused{where}",
        "released": f"handed back at shutdown{where}",
        "completed": "run completed",
        "failed": "run failed",
        "signal": f"signal {ev.signal} sent",
        "waiting": f"waiting for signal {ev.signal}",
        "signalled": f"signal {ev.signal} received",
        "timed_out": f"no signal {ev.signal} in time",
    }.get(ev.type, f"{ev.type}{where} {ev.detail or ''}".rstrip())
    return f"  {at}  {step} {text}"
