"""The workflow the throughput benchmark runs: steps that do nothing, so only our overhead is measured.

Every step is a plain (sync) function returning ``None``: no state change, so each step costs
exactly one claim, one commit and one ack, plus whatever the worker does around user code.
Sync, because a plain function is the ordinary way to write a step; the worker runs each one
on a thread of its own, and that cost belongs in the measurement.

The worker subprocesses import ``bench.flows:noop``; the benchmark passes a non-default step
count to them through ``BENCH_STEPS`` so both sides build the same workflow. ``noop_async`` is
the same chain of ``async def`` steps (the benchmark's ``--with-async``), to show what the
thread per sync step costs.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict

from orchestrator import StepContext, Workflow

STEPS = 10
STEPS_ENV = "BENCH_STEPS"
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
