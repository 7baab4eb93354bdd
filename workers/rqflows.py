"""Workflows whose middle step runs on an RQ fleet (orchestrator.bridge), for tests and benchmarks.

``bridged``: ``prepare`` (our worker) -> ``tool`` (an RQ work-horse, RQ queue ``orch-tools``)
-> ``finish`` (our worker). Every step records its execution in the ledger (with the pid that
ran it), so a test counts executions across ``kill -9`` of a horse, an RQ worker or ours; the
tool sends one effect keyed by its idempotency key. The state says how long the tool works and
whether it hangs past its RQ timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from pydantic import BaseModel

from orchestrator import Retry, StepContext, Workflow
from orchestrator.bridge import RQ
from orchestrator.chaos import ledger
from orchestrator.faults import point

TOOLS = "orch-tools"  # the RQ queue the tool step runs on


class Job(BaseModel):
    n: int = 0
    work_s: float = 0.0  # how long the tool works (heartbeating through ctx.stash)
    hang_s: float = 0.0  # the first attempt sleeps this long, past its RQ timeout
    block_alarm: bool = False  # ... with SIGALRM blocked, as a hang in C code would (RQ's alarm cannot end it)
    die: bool = False  # every attempt kills its own work-horse (kill -9) before it works
    pids: list[int] = []  # who ran each step: [prepare, tool, finish]
    resumed_from: float = 0.0  # the work the committed tool attempt found stashed when it started
    effect: bool = False


bridged = Workflow("bridged", state=Job)


def _record(ctx: StepContext) -> None:
    ledger.current().record(ctx, saw=os.getpid())


@bridged.step
def prepare(ctx: StepContext, state: Job) -> dict[str, Any]:
    _record(ctx)
    return {"n": state.n + 1, "pids": [os.getpid()]}


@bridged.step(executor=RQ(TOOLS, timeout_s=3), retry=Retry(max_attempts=3, backoff_s=0.1))
def tool(ctx: StepContext, state: Job) -> dict[str, Any]:
    _record(ctx)
    if state.die:
        os.kill(os.getpid(), signal.SIGKILL)
    if state.hang_s and ctx.attempt == 1:
        if state.block_alarm:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(state.hang_s)  # RQ's alarm ends it, unless blocked
    point("mid_step", ctx.step)
    done_s = resumed_from = float((ctx.snapshot or {}).get("done_s", 0.0))
    while done_s < state.work_s:
        time.sleep(0.05)
        done_s += 0.05
        ctx.stash({"done_s": done_s})
    sent = ledger.current().send_effect(ctx, f"tool {state.n}")
    return {"n": state.n * 10, "pids": [*state.pids, os.getpid()], "effect": sent, "resumed_from": resumed_from}


@bridged.step
async def finish(ctx: StepContext, state: Job) -> dict[str, Any]:
    _record(ctx)
    await asyncio.sleep(0)
    return {"n": state.n + 1, "pids": [*state.pids, os.getpid()]}


ALL = [bridged]
