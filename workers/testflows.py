"""Deterministic workflows for tests, chaos runs and benchmarks (not shipped in the wheel).

Every step records that it ran in the ledger (``orchestrator.chaos.ledger``), so a test can
count executions even across a ``kill -9``: the ledger write happens before the step returns,
so it is never lost when the step's result is. The ledger's "receiver" is a fake downstream
service that dedupes effects by the idempotency key, as the article asks real receivers to do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from pydantic import BaseModel

from orchestrator import (
    Child,
    ChildResult,
    Goto,
    Map,
    NonRetryableError,
    Retry,
    Sleep,
    StartChildren,
    StepContext,
    WaitFor,
    Workflow,
)
from orchestrator.chaos import ledger
from orchestrator.faults import point


def record_execution(ctx: StepContext, saw: Any = None) -> None:
    ledger.current().record(ctx, saw)


def send_effect(ctx: StepContext, payload: str) -> bool:
    return ledger.current().send_effect(ctx, payload)


class Counter(BaseModel):
    """State of the chain: a counter, how long each step sleeps, optional failure plan."""

    i: int = 0
    sleep_s: float = 0.0
    steps: list[str] = []


chain = Workflow("chain", state=Counter)


def _chain_step(name: str) -> Any:
    def step(ctx: StepContext, state: Counter) -> dict[str, Any]:
        record_execution(ctx)
        point("mid_step", ctx.step)
        if state.sleep_s:
            deadline = time.monotonic() + state.sleep_s
            while time.monotonic() < deadline:
                time.sleep(min(0.05, state.sleep_s))
                ctx.heartbeat()
        return {"i": state.i + 1, "steps": [*state.steps, name]}

    step.__name__ = name
    return step


for _n in range(10):
    chain.step(_chain_step(f"s{_n}"), retry=Retry(max_attempts=5, backoff_s=0.05))


class Items(BaseModel):
    items: list[str] = []
    done: dict[str, str] = {}


stashing = Workflow("stashing", state=Items)


@stashing.step
def process(ctx: StepContext, state: Items) -> dict[str, Any]:
    """Handle items one by one, stashing after each: a crash resumes after the last stash."""
    done = dict(ctx.snapshot or {})
    for item in state.items:
        if item in done:
            continue
        ledger.current().item_done(ctx.run_id, item)
        done[item] = item.upper()
        ctx.stash(done)
        point("mid_step", ctx.step)
    return {"done": done}


class Mail(BaseModel):
    to: str = "ops@example.com"
    sent: bool = False
    retries_left: int = 0


effects = Workflow("effects", state=Mail)


@effects.step(retry=Retry(max_attempts=5, backoff_s=0.05))
def send(ctx: StepContext, state: Mail) -> dict[str, Any]:
    record_execution(ctx)
    send_effect(ctx, f"mail to {state.to}")
    point("mid_step", ctx.step)
    return {"sent": True}


@effects.step
def confirm(ctx: StepContext, state: Mail) -> None:
    record_execution(ctx)


poison = Workflow("poison", queue="poison")


@poison.step
def explode(ctx: StepContext, state: Any) -> None:
    """Kills the worker running it, every time: the supervisor must quarantine it."""
    record_execution(ctx)
    os.kill(os.getpid(), signal.SIGKILL)


class Loop(BaseModel):
    rounds: int = 3
    seen: list[str] = []


agent_loop = Workflow("agent_loop", state=Loop)


@agent_loop.step
def think(ctx: StepContext, state: Loop) -> dict[str, Any]:
    record_execution(ctx)
    return {"seen": [*state.seen, ctx.idempotency_key]}


@agent_loop.step
async def act(ctx: StepContext, state: Loop) -> Goto | dict[str, Any]:
    record_execution(ctx)
    await asyncio.sleep(0)
    if len(state.seen) < state.rounds:
        return Goto("think")
    return {}


@agent_loop.step
def finish(ctx: StepContext, state: Loop) -> None:
    if not state.seen:
        raise NonRetryableError("nothing seen")


class Slow(BaseModel):
    seconds: float = 2.0
    beat: bool = True


slow = Workflow("slow", state=Slow)


@slow.step(heartbeat_timeout_s=0.5, retry=Retry(max_attempts=3, backoff_s=0.05))
def crawl(ctx: StepContext, state: Slow) -> dict[str, Any]:
    """Runs for ``seconds``; heartbeats only when ``beat`` (else its lease is let go)."""
    record_execution(ctx)
    deadline = time.monotonic() + state.seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if state.beat:
            ctx.heartbeat()
    return {"beat": state.beat}


class Held(BaseModel):
    """State of ``held``: how long its first step works, and the fence of every attempt whose
    update was applied (exactly one, when fencing holds)."""

    seconds: float = 6.0
    applied_by: list[int] = []


held = Workflow("held", state=Held)


def stash_noted(ctx: StepContext, phase: str) -> None:
    """``ctx.stash`` and, once it is durable, a note in the ledger: the ledger counts the
    stashes that Redis accepted from each attempt (``stash@<fence>``)."""
    ctx.stash({"fence": ctx.fencing_token, "phase": phase})
    ledger.current().item_done(ctx.run_id, f"stash@{ctx.fencing_token}")


@held.step(retry=Retry(max_attempts=3, backoff_s=0.05))
def hold(ctx: StepContext, state: Held) -> dict[str, Any]:
    """Records itself, sends its effect to both receivers, stashes, then works ``seconds``
    heartbeating and stashes again before it returns: an attempt long enough for Redis to
    forget its claim while it runs, whose later writes must then be refused."""
    record_execution(ctx)
    send_effect(ctx, f"effect of {ctx.run_id}")
    ledger.current().send_fenced(ctx.idempotency_key, ctx.fencing_token)
    stash_noted(ctx, "started")
    deadline = time.monotonic() + state.seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        ctx.heartbeat()
    stash_noted(ctx, "finished")
    return {"applied_by": [*state.applied_by, ctx.fencing_token]}


@held.step
def after_hold(ctx: StepContext, state: Held) -> None:
    record_execution(ctx, saw=state.applied_by)


class Nap(BaseModel):
    """State of ``napping``: how long it sleeps between its two steps, and what each saw."""

    nap_s: float = 1.0
    naps: int = 0


napping = Workflow("napping", state=Nap)


@napping.step
def doze(ctx: StepContext, state: Nap) -> Sleep:
    """Records itself and sleeps ``nap_s`` (durably: no slot, no lease, no entry meanwhile)."""
    record_execution(ctx)
    return Sleep(seconds=state.nap_s, update={"naps": state.naps + 1})


@napping.step
def wake_up(ctx: StepContext, state: Nap) -> None:
    record_execution(ctx, saw=state.naps)


class Approval(BaseModel):
    """Payload of the ``approval`` signal."""

    approved: bool
    by: str


class Purchase(BaseModel):
    """State of ``approving``: the wait's timeout (0 = none), the approval it got, what it booked."""

    timeout_s: float = 0.0
    approval: Approval | None = None
    outcome: str = ""
    asks: int = 0


approving = Workflow("approving", state=Purchase)
approving.signal("approval", Approval)


@approving.step
def ask(ctx: StepContext, state: Purchase) -> WaitFor:
    """Records itself and waits for ``approval`` (no slot, no lease, no entry meanwhile)."""
    record_execution(ctx)
    timeout = state.timeout_s or None
    return WaitFor("approval", timeout_s=timeout, on_timeout="give_up" if timeout else None, update={"asks": 1})


@approving.step
def book(ctx: StepContext, state: Purchase) -> Goto:
    """Runs once per signal received: ``saw`` 1 when it got the payload, 0 when it got None."""
    record_execution(ctx, saw=int(state.approval is not None))
    assert state.approval is not None
    return Goto("done", {"outcome": f"booked, approved by {state.approval.by}"})


@approving.step
def give_up(ctx: StepContext, state: Purchase) -> Goto:
    record_execution(ctx, saw=int(state.approval is not None))
    return Goto("done", {"outcome": "no approval in time"})


@approving.step
def done(ctx: StepContext, state: Purchase) -> None:
    record_execution(ctx)


ALL = [chain, stashing, effects, agent_loop, slow, held, napping, approving]


class Kid(BaseModel):
    """State of ``kid``: its name, and what it answered."""

    name: str = ""
    fail: bool = False
    answer: str = ""


kid = Workflow("kid", state=Kid, queue="kids")  # its own queue: a test can leave kids unserved
BROKEN: set[str] = set()  # kids named here fail (a test flips it to make a retry succeed)


@kid.step(retry=Retry(max_attempts=2, backoff_s=0.05))
def answer(ctx: StepContext, state: Kid) -> dict[str, str]:
    record_execution(ctx)
    if state.fail or state.name in BROKEN:
        raise NonRetryableError(f"kid {state.name} cannot answer")
    return {"answer": f"hello from {state.name}"}


class Family(BaseModel):
    """State of ``parenting``: the kids to start, their results, and what the parent made of them."""

    names: list[str] = []
    fail: list[str] = []
    collect: bool = False
    kids: list[ChildResult] = []
    summary: str = ""


parenting = Workflow("parenting", state=Family)


@parenting.step
def start_kids(ctx: StepContext, state: Family) -> StartChildren:
    record_execution(ctx)
    kids = [Child(kid, {"name": n, "fail": n in state.fail}, key=n) for n in state.names]
    return StartChildren(kids, into="kids", collect_failures=state.collect)


@parenting.step
def sum_up(ctx: StepContext, state: Family) -> dict[str, str]:
    record_execution(ctx, saw=len(state.kids))
    return {"summary": "; ".join(f"{k.run_id}={k.status}" for k in state.kids)}


ALL.extend([kid, parenting])


class Survey(BaseModel):
    """State of ``survey``: the topics to study in parallel (a Map), the findings, a summary."""

    topics: list[str] = []
    fail: list[str] = []  # topics whose item fails (for good)
    slow_s: float = 0.0  # each item's time
    parallelism: int | None = None
    collect: bool = False
    findings: list[Any] = []
    summary: str = ""


survey = Workflow("survey", state=Survey)
FLAKY: set[str] = set()  # topics whose item fails until a test discards them


@survey.step
def plan(ctx: StepContext, state: Survey) -> Map:
    record_execution(ctx)
    return Map(study, over="topics", into="findings", parallelism=state.parallelism, collect_failures=state.collect)


@survey.item(retry=Retry(max_attempts=2, backoff_s=0.05))
def study(ctx: StepContext, topic: str) -> dict[str, Any]:
    """One topic. The execution's ``saw`` is how many items were running when it started (the
    ledger's ``study:running`` counter), so a test can check a Map's parallelism."""
    board = ledger.current()
    running = board.redis.hincrby(board.keys.items, "study:running", 1)
    try:
        record_execution(ctx, saw=running)
        point("mid_step", ctx.step)
        if ":fail" in topic or topic in FLAKY:
            raise NonRetryableError(f"cannot study {topic}")
        if ":slow" in topic:
            time.sleep(float(topic.rsplit(":slow", 1)[1] or 1))
        return {"topic": topic, "words": len(topic)}
    finally:
        board.redis.hincrby(board.keys.items, "study:running", -1)


@survey.step
def summarize(ctx: StepContext, state: Survey) -> dict[str, str]:
    record_execution(ctx, saw=len(state.findings))
    return {"summary": f"{len(state.findings)} findings"}


ALL.append(survey)


class Talk(BaseModel):
    """State of ``talker``: the words its steps emit one by one (live output), and the sentence."""

    words: list[str] = []
    said: str = ""


talker = Workflow("talker", state=Talk)


@talker.step
def speak(ctx: StepContext, state: Talk) -> dict[str, str]:
    record_execution(ctx)
    for word in state.words:
        ctx.emit({"token": word})
        point("mid_step", ctx.step)  # a kill here leaves some of the words emitted
    return {"said": " ".join(state.words)}


@talker.step
async def shout(ctx: StepContext, state: Talk) -> None:
    for word in state.words:
        await ctx.aemit(word.upper())


ALL.append(talker)


class Paced(BaseModel):
    """State of ``paced``: its steps start under fleet-wide rate limits."""

    tokens: int = 0  # what ``chat`` reports it used


paced = Workflow("paced", state=Paced)
paced.rate_limit("test_api", 5, per_s=1.0)  # 5 calls a second, one at a time
paced.rate_limit("test_tokens", 100, per_s=1.0, burst=100, cost=0)  # 100 tokens a second, reported


@paced.step(rate_limit="test_api")
def call_api(ctx: StepContext, state: Paced) -> None:
    """``saw``: when its code started (ms), to count the starts in any window."""
    record_execution(ctx, saw=int(time.time() * 1000))


@paced.step(rate_limit="test_tokens")
def chat(ctx: StepContext, state: Paced) -> dict[str, int]:
    record_execution(ctx, saw=int(time.time() * 1000))
    if state.tokens:
        ctx.spend("test_tokens", state.tokens)
    return {"tokens": state.tokens}


ALL.append(paced)


class Gated(BaseModel):
    """State of ``gated``: its step and its map's items hold permits of ``test_gate``."""

    hold_s: float = 0.3  # how long each holds its permit
    items: list[int] = []  # what ``fan`` maps over
    done: list[int] = []


gated = Workflow("gated", state=Gated)
gated.concurrency_limit("test_gate", 2)  # two at once, fleet-wide


@gated.step(concurrency="test_gate")
def gate(ctx: StepContext, state: Gated) -> None:
    """``saw``: when its code started (ms); holds its permit ``hold_s`` (the ledger counts holders)."""
    record_execution(ctx, saw=int(time.time() * 1000))
    ledger.current().hold(ctx, "test_gate", state.hold_s)


@gated.step
def fan(ctx: StepContext, state: Gated) -> Map | None:
    return Map(gate_item, over="items", into="done", parallelism=10) if state.items else None


@gated.step
def gated_done(ctx: StepContext, state: Gated) -> None:
    """The step after the map (a Map needs one to go on to)."""


@gated.item(concurrency="test_gate")
def gate_item(ctx: StepContext, item: int) -> int:
    record_execution(ctx, saw=int(time.time() * 1000))
    ledger.current().hold(ctx, "test_gate", 0.2)
    return item


ALL.append(gated)
