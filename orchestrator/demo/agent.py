"""The article's agent: find competitors, research them in parallel (a map, one item per
competitor, at most two calling the model at once fleet-wide), synthesize, ask a person to
approve (when the input asks for it), book a meeting.

The "LLM" is simulated (seeded latency and transient failures, no network) so the demo runs
anywhere. Every simulated call and the meeting booking are written to a small SQLite file
that plays the outside world: it lets the demo count how much work a crash cost, and the
calendar deduplicates bookings by the step's idempotency key, as a real receiver should.
The file's path comes from ``ORCHESTRATOR_DEMO_DB`` (set by ``orchestrator demo``).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel

from orchestrator import End, Map, Retry, StepContext, WaitFor, Workflow

COMPANIES = ["Initech", "Globex", "Umbrella", "Hooli", "Vandelay", "Soylent", "Wonka", "Cyberdyne"]
SCHEMA = """
create table if not exists llm_calls (run text, step text, item text, attempt int, fence int,
                                      started real, seconds real);
create table if not exists meetings (idempotency_key text primary key, run text, title text, booked real);
create table if not exists booking_requests (idempotency_key text, fence int, at real);
"""


class RateLimited(Exception):
    """A transient provider error (HTTP 429); retried with backoff."""


class Approval(BaseModel):
    """A person's answer to "book the review meeting?" (the ``approval`` signal's payload)."""

    approved: bool
    by: str


class Research(BaseModel):
    company: str
    how_many: int = 4
    needs_approval: bool = False  # wait for a person's approval before booking the meeting
    competitors: list[str] = []
    findings: list[str] = []  # one per competitor, in the same order
    summary: str = ""
    approval: Approval | None = None
    meeting: str = ""


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(os.environ.get("ORCHESTRATOR_DEMO_DB", "demo-world.sqlite3"), timeout=10)
    conn.executescript(SCHEMA)
    return conn


def ask_llm(ctx: StepContext, item: str, seconds: float) -> None:
    """Pretend to call a model for ``seconds``. The call is logged when it starts and when it
    ends, so a call cut short by a crash shows up as started but never finished."""
    started = time.time()
    with closing(_db()) as db, db:
        row = db.execute(
            "insert into llm_calls values (?, ?, ?, ?, ?, ?, null)",
            (ctx.run_id, ctx.step, item, ctx.attempt, ctx.fencing_token, started),
        ).lastrowid
    time.sleep(seconds)
    with closing(_db()) as db, db:
        db.execute("update llm_calls set seconds = ? where rowid = ?", (time.time() - started, row))


class Call(NamedTuple):
    """One row of the call log; ``seconds`` is None for a call that never finished (its
    process was killed in the middle of it)."""

    rowid: int
    run: str
    step: str
    item: str
    attempt: int
    fence: int
    started: float
    seconds: float | None


def read_calls(world: Path, run_id: str, after_rowid: int = 0) -> list[Call]:
    """The model calls of ``run_id`` and of its map items (run ids ``run_id:...``) logged in
    ``world`` after the row ``after_rowid``, oldest first."""
    with closing(sqlite3.connect(world, timeout=10)) as db:
        rows = db.execute(
            "select rowid, run, step, item, attempt, fence, started, seconds from llm_calls "
            "where rowid > ? and (run = ? or substr(run, 1, ?) = ?) order by rowid",
            (after_rowid, run_id, len(run_id) + 1, f"{run_id}:"),
        ).fetchall()
    return [Call(*row) for row in rows]


def _rng(ctx: StepContext, salt: str = "") -> random.Random:
    return random.Random(f"{ctx.run_id}:{ctx.step}:{ctx.attempt}:{salt}")


research = Workflow("research", state=Research)
research.signal("approval", Approval)
APPROVAL_TIMEOUT_S = 3600.0
LLM = "llm"  # the simulated model's fleet-wide concurrency limit: two calls at once
research.concurrency_limit(LLM, 2)


@research.step(retry=Retry(max_attempts=5, backoff_s=0.5, jitter=0.2))
def find_competitors(ctx: StepContext, state: Research) -> dict[str, list[str]]:
    """One model call that lists competitors; the first attempt is rate limited half the time."""
    ask_llm(ctx, "list", 0.8)
    if ctx.attempt == 1 and _rng(ctx).random() < 0.5:
        raise RateLimited("429 Too Many Requests from the model provider")
    pool = [c for c in COMPANIES if c != state.company]
    return {"competitors": random.Random(state.company).sample(pool, min(state.how_many, len(pool)))}


@research.step()
def study(ctx: StepContext, state: Research) -> Map:
    """Research every competitor at once, each a map item (a run of its own), so a crash costs
    only the items that had not committed. The model's concurrency limit, not the map, decides
    how many call it at a time."""
    return Map(study_one, over="competitors", into="findings", parallelism=None)


@research.item(retry=Retry(max_attempts=5, backoff_s=0.5), concurrency=LLM)
def study_one(ctx: StepContext, company: str) -> str:
    """One slow model call about one competitor. It holds one of the fleet's ``llm`` permits
    while it runs; items that find none free wait in line without a worker slot."""
    ask_llm(ctx, company, 1.2)
    return f"{company}: {_rng(ctx).choice(['cheaper', 'faster', 'bigger', 'newer'])}"


@research.step(retry=Retry(max_attempts=5, backoff_s=0.5))
async def synthesize(ctx: StepContext, state: Research) -> dict[str, str]:
    """An async step: the summary the agent built from everything it learned."""
    import asyncio

    await asyncio.to_thread(ask_llm, ctx, "summary", 0.8)
    lines = "; ".join(f"{finding} than {state.company}" for finding in state.findings)
    return {"summary": f"{state.company} competes with {len(state.competitors)} companies. {lines}"}


@research.step()
def ask_approval(ctx: StepContext, state: Research) -> WaitFor | None:
    """A person approves the meeting before it is booked, when the input asks for it: the run
    waits for the ``approval`` signal with no worker slot, no lease and no queue entry, and
    survives anything that happens to the workers meanwhile."""
    if not state.needs_approval:
        return None
    return WaitFor("approval", timeout_s=APPROVAL_TIMEOUT_S)


@research.step(retry=Retry(max_attempts=5, backoff_s=0.5))
def schedule_meeting(ctx: StepContext, state: Research) -> dict[str, str] | End:
    """The side effect: book a meeting. The calendar dedupes on the idempotency key."""
    if state.needs_approval and not (state.approval and state.approval.approved):
        why = f"declined by {state.approval.by}" if state.approval else "no approval within an hour"
        return End({"meeting": f"not booked: {why}"})
    title = f"Competitive review: {state.company}"
    with closing(_db()) as db, db:
        db.execute(
            "insert into booking_requests values (?, ?, ?)", (ctx.idempotency_key, ctx.fencing_token, time.time())
        )
        db.execute(
            "insert or ignore into meetings values (?, ?, ?, ?)", (ctx.idempotency_key, ctx.run_id, title, time.time())
        )
    return {"meeting": f"{title} (booking key {ctx.idempotency_key})"}
