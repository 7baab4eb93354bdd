"""The synthetic workflow mix that ``orchestrator chaos`` runs: every step records itself in the ledger.

Eight shapes cover the step path: a chain (each step must see the state its predecessor
committed), a stashing step (resumes from its checkpoint), a side effect sent to the ledger's
two fake receivers (one dedupes by idempotency key, one keeps the highest fencing token), an
agent-style loop (``Goto``, so idempotency keys carry visit numbers), a nap (``Sleep``
until a time its first step picks, which the step after it must not start before), and an
approval (``WaitFor`` a signal the driver sends, and sends again, under one signal id), a
parent (``StartChildren`` of 1-3 two-step children; the driver cancels some parents), and a
map (``Map`` over 2-6 items, 1-3 at a time; the driver cancels some of those too), and, when the
run has RQ workers, a side effect sent from an RQ work-horse (``executor=RQ(...)``, whose RQ
workers and work-horses the driver kills too).
Steps sleep a little, heartbeat, and fail transiently now and then, so kills land in every
phase of the step path and the retry path runs too. They all use the ``chaos`` queue.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import zlib
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from orchestrator.bridge.executor import RQ
from orchestrator.chaos import ledger
from orchestrator.children import ChildResult
from orchestrator.context import StepContext
from orchestrator.faults import point
from orchestrator.retry import Retry
from orchestrator.workflow import Child, Goto, Map, Sleep, StartChildren, WaitFor, Workflow

QUEUE = "chaos"
RQ_QUEUE = "chaos-tools"  # the RQ queue of the bridged step
CHAIN_STEPS = 8
RETRY = Retry(max_attempts=8, backoff_s=0.05, backoff_max_s=1.0)


class Transient(Exception):
    """A made-up transient failure (a rate limit, a flaky tool): retried by the step's policy."""


class Knobs(BaseModel):
    """How long steps work and how often they fail; every flow's state has these."""

    work_s: float = 0.05
    fail_rate: float = 0.05
    hold_s: float = 0.0  # how long ``send`` keeps working after sending (outliving a rollback)


def _work(ctx: StepContext, knobs: Knobs) -> None:
    """Sleep ``work_s`` in small slices, heartbeating, then maybe fail transiently."""
    _busy(ctx, knobs.work_s * random.uniform(0.5, 1.5))
    point("mid_step", ctx.step)
    if random.random() < knobs.fail_rate:
        raise Transient(f"transient failure in {ctx.step} (attempt {ctx.attempt})")


def _busy(ctx: StepContext, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.02, seconds))
        ctx.heartbeat()


class ChainState(Knobs):
    i: int = 0


chain = Workflow("chaos_chain", state=ChainState, queue=QUEUE)


def _chain_step(index: int) -> Any:
    def step(ctx: StepContext, state: ChainState) -> dict[str, int]:
        ledger.current().record(ctx, saw=state.i)  # the checker expects saw == index (I8)
        _work(ctx, state)
        return {"i": state.i + 1}

    step.__name__ = f"c{index}"
    return step


# one chain step starts under a fleet-wide rate limit near the load's own rate, so that some
# starts are deferred (given back to wait for their reserved moment) while workers are killed
chain.rate_limit("chaos_api", 10, per_s=1.0, burst=3)
RATE_LIMITED_STEP = "c3"
# another chain step and every map item hold a permit of one fleet-wide concurrency limit while
# they work (the ledger counts the holders alive at once: I15)
PERMIT, PERMITS = "chaos_llm", 3
PERMIT_STEP = "c5"
chain.concurrency_limit(PERMIT, PERMITS)


def _held_step(index: int) -> Any:
    def step(ctx: StepContext, state: ChainState) -> dict[str, int]:
        ledger.current().record(ctx, saw=state.i)
        ledger.current().hold(ctx, PERMIT, state.work_s * random.uniform(0.5, 1.5))
        _work(ctx, Knobs(work_s=0.0, fail_rate=state.fail_rate))
        return {"i": state.i + 1}

    step.__name__ = f"c{index}"
    return step


for _index in range(CHAIN_STEPS):
    name = f"c{_index}"
    if name == PERMIT_STEP:
        chain.step(_held_step(_index), retry=RETRY, concurrency=PERMIT)
    else:
        chain.step(_chain_step(_index), retry=RETRY, rate_limit="chaos_api" if name == RATE_LIMITED_STEP else None)


class StashState(Knobs):
    items: list[str] = ["a", "b", "c", "d", "e"]
    done: list[str] = []


stashing = Workflow("chaos_stash", state=StashState, queue=QUEUE)


@stashing.step(retry=RETRY)
def gather(ctx: StepContext, state: StashState) -> dict[str, list[str]]:
    """Items one by one, a stash after each: after a crash only the item in flight is redone."""
    ledger.current().record(ctx)
    done = list(ctx.snapshot or [])
    for item in state.items:
        if item in done:
            continue
        ledger.current().item_done(ctx.run_id, item)
        _work(ctx, state.model_copy(update={"fail_rate": state.fail_rate / len(state.items)}))
        done.append(item)
        ctx.stash(done)
    return {"done": done}


class MailState(Knobs):
    to: str = "ops@example.com"
    sent: bool = False


effects = Workflow("chaos_effect", state=MailState, queue=QUEUE)


@effects.step(retry=RETRY)
def prepare(ctx: StepContext, state: MailState) -> None:
    ledger.current().record(ctx)
    _work(ctx, state)


@effects.step(retry=RETRY)
def send(ctx: StepContext, state: MailState) -> dict[str, bool]:
    """The side effect, sent to both receivers: the deduping one applies it once per idempotency
    key; the fenced one keeps the highest fencing token, which must be the committed attempt's."""
    ledger.current().record(ctx)
    ledger.current().send_effect(ctx, f"mail to {state.to}")
    ledger.current().send_fenced(ctx.idempotency_key, ctx.fencing_token)
    _busy(ctx, state.hold_s)  # an attempt long enough for Redis to forget it while it runs
    _work(ctx, state)
    return {"sent": True}


@effects.step(retry=RETRY)
def confirm(ctx: StepContext, state: MailState) -> None:
    ledger.current().record(ctx)


class LoopState(Knobs):
    rounds: int = 3
    seen: list[str] = []


loop = Workflow("chaos_loop", state=LoopState, queue=QUEUE)


@loop.step(retry=RETRY)
async def think(ctx: StepContext, state: LoopState) -> dict[str, list[str]]:
    ledger.current().record(ctx, saw=len(state.seen))
    await asyncio.sleep(state.work_s)
    return {"seen": [*state.seen, ctx.idempotency_key]}


@loop.step(retry=RETRY)
def act(ctx: StepContext, state: LoopState) -> Goto | None:
    ledger.current().record(ctx, saw=len(state.seen))
    _work(ctx, state)
    return Goto("think") if len(state.seen) < state.rounds else None


class NapState(Knobs):
    wake_at_ms: int = 0  # the wake-up ``doze`` asked for (epoch ms): ``rise`` records it


naps = Workflow("chaos_nap", state=NapState, queue=QUEUE)
NAP_S = (0.05, 1.5)


@naps.step(retry=RETRY)
def doze(ctx: StepContext, state: NapState) -> Sleep:
    """Sleeps until a time it picks (an absolute time: Redis holds the run to it on its own
    clock); a re-execution after a lost commit picks, and records, a new one."""
    ledger.current().record(ctx)
    _work(ctx, state)
    wake_at = time.time() + random.uniform(*NAP_S)
    return Sleep(until=datetime.fromtimestamp(wake_at, UTC), update={"wake_at_ms": math.ceil(wake_at * 1000)})


@naps.step(retry=RETRY)
def rise(ctx: StepContext, state: NapState) -> None:
    """``saw`` is the wake-up it came after: its fencing token, at least the server's clock at
    its claim, must not be below it (I10)."""
    ledger.current().record(ctx, saw=state.wake_at_ms)
    _work(ctx, state)


class Go(BaseModel):
    """Payload of the ``go`` signal: a token only the driver's signal to this run carries."""

    token: int


class ApprovalState(Knobs):
    go: Go | None = None  # the signal's payload; None after a timeout


approvals = Workflow("chaos_signal", state=ApprovalState, queue=QUEUE)
approvals.signal("go", Go)
SIGNAL_TIMEOUT_S = 30.0  # far beyond the driver's first send: a timeout means a signal went missing


def signal_token(run_id: str) -> int:
    """The token the driver sends to ``run_id`` (the same in every resend)."""
    return zlib.crc32(run_id.encode()) & 0x7FFFFFFF


@approvals.step(retry=RETRY)
def ask(ctx: StepContext, state: ApprovalState) -> WaitFor:
    ledger.current().record(ctx)
    _work(ctx, state)
    return WaitFor("go", timeout_s=SIGNAL_TIMEOUT_S, on_timeout="proceed")


@approvals.step(retry=RETRY)
def proceed(ctx: StepContext, state: ApprovalState) -> None:
    """``saw`` is the token it got (-1: none, the wait timed out): the run's own, or I12 breaks."""
    ledger.current().record(ctx, saw=state.go.token if state.go else -1)
    _work(ctx, state)


kids = Workflow("chaos_kid", state=Knobs, queue=QUEUE)


@kids.step(retry=RETRY)
def play(ctx: StepContext, state: Knobs) -> None:
    ledger.current().record(ctx)
    _work(ctx, state)


@kids.step(retry=RETRY)
def rest(ctx: StepContext, state: Knobs) -> None:
    ledger.current().record(ctx)
    _work(ctx, state)


class ParentState(Knobs):
    results: list[ChildResult] = []  # the children's outcomes


parents = Workflow("chaos_parent", state=ParentState, queue=QUEUE)
MAX_KIDS = 3


@parents.step(retry=RETRY)
def spawn(ctx: StepContext, state: ParentState) -> StartChildren:
    """Starts 1-3 children (a re-execution may pick another count: only the committed one's
    children start); failures are collected, so a quarantined child does not fail its parent."""
    ledger.current().record(ctx)
    _work(ctx, state)
    knobs = {"work_s": state.work_s, "fail_rate": state.fail_rate}
    children = [Child(kids, knobs) for _ in range(random.randint(1, MAX_KIDS))]
    return StartChildren(children, into="results", collect_failures=True)


@parents.step(retry=RETRY)
def tally(ctx: StepContext, state: ParentState) -> None:
    """``saw``: how many outcomes it got (I13: one per child the parent listed)."""
    ledger.current().record(ctx, saw=len(state.results))
    _work(ctx, state)


class Probe(Knobs):
    """One map item: a value to work on, and the knobs of its run's steps."""

    v: int = 0


class MapState(Knobs):
    items: list[Probe] = []  # what ``scatter`` maps over (it picks them: a re-execution may pick others)
    found: list[int] = []  # the items' values, in item order


mappers = Workflow("chaos_map", state=MapState, queue=QUEUE)
mappers.concurrency_limit(PERMIT, PERMITS)
MAX_ITEMS = 6
MAX_PARALLELISM = 3


@mappers.step(retry=RETRY)
def scatter(ctx: StepContext, state: MapState) -> Map:
    """Maps ``probe`` over 2-6 new items, 1-3 at a time; without collect_failures, so an item
    quarantined fails its run at once and the items still running are cancelled."""
    ledger.current().record(ctx)
    _work(ctx, state)
    knobs = {"work_s": state.work_s, "fail_rate": state.fail_rate}
    items = [Probe(v=random.randint(0, 9999), **knobs) for _ in range(random.randint(2, MAX_ITEMS))]
    parallelism = random.randint(1, MAX_PARALLELISM)
    return Map(each=probe, over="items", into="found", parallelism=parallelism, update={"items": items})


@mappers.item(retry=RETRY, concurrency=PERMIT)
def probe(ctx: StepContext, item: dict[str, Any]) -> int:
    """``saw``: its item's value; returns ten times it (the fan-in must hand these on in order).
    Works holding a permit of the chaos concurrency limit (shared with the chain's PERMIT_STEP)."""
    probe_item = Probe.model_validate(item)
    ledger.current().record(ctx, saw=probe_item.v)
    ledger.current().hold(ctx, PERMIT, probe_item.work_s * random.uniform(0.5, 1.5))
    _work(ctx, Knobs(work_s=0.0, fail_rate=probe_item.fail_rate))
    return probe_item.v * 10


@mappers.step(retry=RETRY)
def total(ctx: StepContext, state: MapState) -> None:
    """``saw``: the values it got (I14: its items' values times ten, in item order)."""
    ledger.current().record(ctx, saw=state.found)
    _work(ctx, state)


class ToolState(MailState):
    pass


tools = Workflow("chaos_tool", state=ToolState, queue=QUEUE)


@tools.step(retry=RETRY)
def draft(ctx: StepContext, state: ToolState) -> None:
    ledger.current().record(ctx)
    _work(ctx, state)


@tools.step(executor=RQ(RQ_QUEUE, timeout_s=30), retry=RETRY)
def deliver(ctx: StepContext, state: ToolState) -> dict[str, bool]:
    """``send``'s side effect, from an RQ work-horse: the same two receivers, the same checks."""
    ledger.current().record(ctx)
    ledger.current().send_effect(ctx, f"tool mail to {state.to}")
    ledger.current().send_fenced(ctx.idempotency_key, ctx.fencing_token)
    _busy(ctx, state.hold_s)
    _work(ctx, state)
    return {"sent": True}


@tools.step(retry=RETRY)
def file(ctx: StepContext, state: ToolState) -> None:
    ledger.current().record(ctx)


ALL: list[Workflow[Any]] = [chain, stashing, effects, loop, naps, approvals, kids, parents, mappers]
WITH_RQ: list[Workflow[Any]] = [*ALL, tools]  # what workers serve when the run has RQ workers
PARENTS = (parents.name, mappers.name)  # runs that wait for runs of their own (children, map items)
MIX = {
    chain.name: 0.25,
    stashing.name: 0.2,
    effects.name: 0.2,
    loop.name: 0.1,
    naps.name: 0.1,
    approvals.name: 0.1,
    parents.name: 0.05,
    mappers.name: 0.05,
}
RQ_SHARE = 0.1  # of the runs, when the run has RQ workers
EFFECT_STEPS = {effects.name: "send", tools.name: "deliver"}  # the step of each workflow that sends an effect
