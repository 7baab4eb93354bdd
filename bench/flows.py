"""The workflows our worker processes run in the benchmarks (``python -m orchestrator worker bench.flows:...``).

``noop`` is the throughput workflow: steps that do nothing, so only our overhead is measured.

Every step is a plain (sync) function returning ``None``: no state change, so each step costs
exactly one claim, one commit and one ack, plus whatever the worker does around user code.
Sync, because a plain function is the ordinary way to write a step; the worker runs each one
on a thread of its own, and that cost belongs in the measurement.

The worker subprocesses import ``bench.flows:noop``; the benchmark passes a non-default step
count to them through ``BENCH_STEPS`` so both sides build the same workflow. ``noop_async`` is
the same chain of ``async def`` steps (the benchmark's ``--with-async``), to show what the
thread per sync step costs.

The other workflows: ``timed`` (recovery: the step body every system runs, from
:mod:`bench.marks`), ``loop`` (growth: one step that re-enters itself with ``Goto``, an agent
loop) and ``payload`` (growth: each step returns an update of a given size), ``hold`` (liveness:
one step that awaits for an hour) and ``agent`` (the agent-shaped capacity benchmark: ``BENCH_STEPS``
steps that each await ``BENCH_AWAIT_S`` seconds, a model call in flight), ``sleeper`` and
``approver`` (the parked-runs benchmark: a step that sleeps for an hour, or waits for the signal
``approval`` with an hour's timeout, then a no-op step), ``fanout`` (the fan-out benchmark: a step
that maps ``items`` with a no-op item or one that awaits ``BENCH_ITEM_S`` seconds, then a no-op step).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from bench.marks import step_body
from orchestrator import Goto, Map, Sleep, StepContext, WaitFor, Workflow

STEPS = 10
STEPS_ENV = "BENCH_STEPS"
HOLD_ENV = "BENCH_HOLD_S"
HOLD_S = 600.0
WORKFLOW = "noop"


class Empty(BaseModel):
    """A state with no fields: submit stores nothing, commits carry an empty update."""

    model_config = ConfigDict(extra="forbid")


def nothing(ctx: StepContext, state: Empty) -> None:
    """A step body that costs nothing, so the time measured is the orchestrator's alone."""
    return None


async def nothing_async(ctx: StepContext, state: Empty) -> None:
    """The same empty body as a coroutine: the worker awaits it on its loop, no thread per step."""
    return None


def step_names(steps: int = STEPS) -> list[str]:
    """``s0 .. s{n-1}``: the benchmark and the raw consumer derive the chain from these names."""
    return [f"s{i}" for i in range(steps)]


def make_noop(steps: int = STEPS, *, use_async: bool = False) -> Workflow[Empty]:
    """The ``noop`` workflow with ``steps`` steps run in order (built by a function so the count can vary).

    ``use_async`` builds the same chain from ``async def`` steps; it has the same name, so the
    runs submitted are identical and only the worker's way of running the step differs.
    """
    if steps < 1:
        raise ValueError(f"a workflow needs at least one step, got {steps}")
    flow: Workflow[Empty] = Workflow(WORKFLOW, state=Empty)
    body = nothing_async if use_async else nothing
    for name in step_names(steps):
        flow.step(name=name)(body)
    return flow


def steps_from_env() -> int:
    """The step count a child process should build: ``BENCH_STEPS`` if the benchmark set it."""
    return int(os.environ.get(STEPS_ENV, STEPS))


noop = make_noop(steps_from_env())
noop_async = make_noop(steps_from_env(), use_async=True)


class Work(BaseModel):
    """State of a ``timed`` run: how long each step works (the same for every system in the recovery benchmark)."""

    work_ms: float = 0.0


def make_timed(steps: int = STEPS) -> Workflow[Work]:
    """``t0 .. t{n-1}``: each step runs :func:`bench.marks.step_body` with ``record`` on, as RQ and Celery steps do."""
    flow: Workflow[Work] = Workflow("timed", state=Work)
    for k in range(steps):
        flow.step(name=f"t{k}")(timed_step(k, steps))
    return flow


def timed_step(k: int, steps: int) -> Callable[[StepContext, Work], None]:
    """The body of step ``k`` (a closure, since a step is a function of exactly (ctx, state))."""

    def body(ctx: StepContext, state: Work) -> None:
        step_body(ctx.run_id, k, steps, state.work_ms, record=True)

    return body


class Rounds(BaseModel):
    """State of a ``loop`` run: how many visits of its single step it makes."""

    rounds: int = 1


loop: Workflow[Rounds] = Workflow("loop", state=Rounds)


@loop.step
def again(ctx: StepContext, state: Rounds) -> Goto | None:
    """An agent's tool loop at its simplest: re-enter this step until ``rounds`` visits are done."""
    return Goto("again") if ctx.visit < state.rounds else None


class Payload(BaseModel):
    """State of a ``payload`` run: the update size, and whether updates add fields or replace one."""

    model_config = ConfigDict(extra="allow")

    size: int = 1024
    shape: str = "append"


def make_payload(steps: int = STEPS) -> Workflow[Payload]:
    """``p0 .. p{n-1}``: step k returns ``size`` bytes, as a new field ``f<k>`` (append) or as ``value`` (replace).

    "append" is an agent that accumulates findings (the state grows with every step);
    "replace" one that keeps rewriting a draft (the state stays one update big).
    """
    flow: Workflow[Payload] = Workflow("payload", state=Payload)
    for k in range(steps):
        flow.step(name=f"p{k}")(payload_step(k))
    return flow


def payload_step(k: int) -> Callable[[StepContext, Payload], dict[str, Any]]:
    """The body of step ``k`` of ``payload``: ``size`` bytes under ``f<k>`` or ``value``."""

    def body(ctx: StepContext, state: Payload) -> dict[str, Any]:
        field = f"f{k}" if state.shape == "append" else "value"
        return {field: "x" * state.size}

    return body


timed = make_timed(steps_from_env())
payload = make_payload(steps_from_env())


async def holding(ctx: StepContext, state: Empty) -> None:
    """A long step that only awaits (a model call in flight): the claim stays live, nothing else runs."""
    await asyncio.sleep(float(os.environ.get(HOLD_ENV, HOLD_S)))


hold: Workflow[Empty] = Workflow("hold", state=Empty)
hold.step(name="held")(holding)


AWAIT_ENV = "BENCH_AWAIT_S"
AWAIT_S = 1.0


async def thinking(ctx: StepContext, state: Empty) -> None:
    """A model call and nothing else: the step awaits ``BENCH_AWAIT_S`` seconds (simulated LLM latency)."""
    await asyncio.sleep(float(os.environ.get(AWAIT_ENV, AWAIT_S)))


def make_agent(steps: int = STEPS) -> Workflow[Empty]:
    """``a0 .. a{n-1}``: each step awaits (an agent calling its model ``steps`` times in a row)."""
    if steps < 1:
        raise ValueError(f"a workflow needs at least one step, got {steps}")
    flow: Workflow[Empty] = Workflow("agent", state=Empty)
    for k in range(steps):
        flow.step(name=f"a{k}")(thinking)
    return flow


agent = make_agent(steps_from_env())


PARK_S = 3600  # how long a sleeper sleeps, and an approver waits for its signal at most


def napping(ctx: StepContext, state: Empty) -> Sleep:
    """A run that sleeps for an hour: committed, then parked in its queue's delayed set."""
    return Sleep(seconds=PARK_S)


sleeper: Workflow[Empty] = Workflow("sleeper", state=Empty)
sleeper.step(name="nap")(napping)
sleeper.step(name="woken")(nothing)


class Approval(BaseModel):
    """The payload of the ``approval`` signal: a person's answer."""

    approved: bool
    by: str


class Awaiting(BaseModel):
    """State of an ``approver`` run: the signal's payload once it came (None until then, or on a timeout)."""

    approval: Approval | None = None


def asking(ctx: StepContext, state: Awaiting) -> WaitFor:
    """Ask a person, then wait for the answer at zero compute, an hour at most."""
    return WaitFor("approval", timeout_s=PARK_S)


def answered(ctx: StepContext, state: Awaiting) -> None:
    """The step after the wait: nothing to do, so its start time is the resume time alone."""
    return None


approver: Workflow[Awaiting] = Workflow("approver", state=Awaiting)
approver.signal("approval", Approval)
approver.step(name="ask")(asking)
approver.step(name="approved")(answered)


ITEM_S_ENV = "BENCH_ITEM_S"
ITEM_S = 1.0


class Fan(BaseModel):
    """State of a ``fanout`` run: the list mapped (item indexes), the values that come back in
    item order, which item function runs them and how many may run at once (None: all)."""

    items: list[int] = []
    values: list[int] = []
    each: str = "noop_item"
    parallelism: int | None = None


fanout: Workflow[Fan] = Workflow("fanout", state=Fan)


@fanout.step(name="spread")
def spread(ctx: StepContext, state: Fan) -> Map:
    """Fan out: one run per element of ``items``, at most ``parallelism`` at a time."""
    return Map(each=state.each, over="items", into="values", parallelism=state.parallelism)


@fanout.item()
def noop_item(ctx: StepContext, item: int) -> int:
    """An item that does nothing but hand its index back (plain function, like the no-op steps)."""
    return item


@fanout.item()
async def llm_item(ctx: StepContext, item: int) -> int:
    """An item that awaits ``BENCH_ITEM_S`` seconds (simulated LLM latency), then hands its index back."""
    await asyncio.sleep(float(os.environ.get(ITEM_S_ENV, ITEM_S)))
    return item


PERMITS_ENV = "BENCH_PERMITS"  # the concurrency limit of ``gated_item`` (in the worker processes)
LLM_LIMIT = "bench_llm"
fanout.concurrency_limit(LLM_LIMIT, int(os.environ.get(PERMITS_ENV, "8")))


@fanout.item(concurrency=LLM_LIMIT)
async def gated_item(ctx: StepContext, item: int) -> int:
    """``llm_item`` under the fleet-wide concurrency limit ``bench_llm`` (``BENCH_PERMITS`` at once)."""
    await asyncio.sleep(float(os.environ.get(ITEM_S_ENV, ITEM_S)))
    return item


fanout.step(name="gather")(nothing)  # fan-in: the step after the map, its values in `values`


RATE_ENV, PER_S_ENV, BURST_ENV = "BENCH_RATE", "BENCH_PER_S", "BENCH_BURST"
LIMIT = "bench_api"  # the rate limit of ``limited``'s one step


class Started(BaseModel):
    """State of a ``limited`` run: when its step's code started (ms since the epoch, the worker's clock)."""

    started_ms: float | None = None


async def started(ctx: StepContext, state: Started) -> dict[str, float]:
    """Note the moment user code runs, after the admission (``async``: no thread hop before it)."""
    import time  # here, so that nothing above the workflows appended last changes

    return {"started_ms": time.time() * 1000}


def make_limited(rate: float, per_s: float = 1.0, burst: float = 1.0) -> Workflow[Started]:
    """The rate-limit benchmark's workflow: one step under ``rate`` starts per ``per_s`` seconds,
    ``burst`` at once, fleet-wide (built by a function so the benchmark sets the limit; the workers
    get it through ``BENCH_RATE``, ``BENCH_PER_S`` and ``BENCH_BURST``)."""
    flow: Workflow[Started] = Workflow("limited", state=Started)
    flow.rate_limit(LIMIT, rate, per_s=per_s, burst=burst)
    flow.step(name="call", rate_limit=LIMIT)(started)
    return flow


limited = make_limited(
    float(os.environ.get(RATE_ENV, 50)), float(os.environ.get(PER_S_ENV, 1)), float(os.environ.get(BURST_ENV, 1))
)
