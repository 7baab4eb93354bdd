"""The compound table's workflow: 17 steps, each execution failing with probability p from a seeded plan.

An execution of step k (attempt a, counted by the orchestrator across errors and crashes) of
run r draws u = H(seed, r, k, a) in [0, 1): u < p/2 raises (a transient error: rate limit,
tool timeout), p/2 <= u < p kills its own worker process with SIGKILL (a rescheduled
container), otherwise it succeeds. The failure comes after the step's work (``work_ms``), so a
failed execution wastes a whole step, as a timed-out model call does.

Every execution appends ``run|k|attempt|outcome|pid|start|end`` to ``bench:compound`` before
it fails or returns, so a ``kill -9`` cannot hide it: the benchmark counts executions,
faults and re-executions from this list. The same :func:`draw` and :func:`outcome` compute the
"naive" columns from the very plan the real runs met.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from bench.marks import client
from orchestrator import Retry, StepContext, Workflow

STEPS = 17
EXECUTIONS = "bench:compound"
RETRY = Retry(max_attempts=20, backoff_s=0.05, backoff_max_s=0.05, jitter=0.0)


class Transient(Exception):
    """The injected step error; retried by the step's policy."""


class Plan(BaseModel):
    """A run's input: failure probability per execution, the plan's seed, and how long each step works."""

    p: float
    seed: int
    work_ms: float = 20.0


def draw(seed: int, run_id: str, k: int, attempt: int) -> float:
    """The plan's uniform number for execution ``attempt`` of step ``k`` of ``run_id`` (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}|{run_id}|{k}|{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def outcome(u: float, p: float) -> str:
    """``error`` (half of the failures), ``kill`` (the other half) or ``ok``."""
    if u < p / 2:
        return "error"
    return "kill" if u < p else "ok"


def faulty_step(k: int) -> Callable[[StepContext, Plan], None]:
    """Step ``k``: work, note the execution and its planned outcome, then fail or return as planned."""

    def body(ctx: StepContext, state: Plan) -> None:
        start = time.time()
        time.sleep(state.work_ms / 1000)
        what = outcome(draw(state.seed, ctx.run_id, k, ctx.attempt), state.p)
        line = f"{ctx.run_id}|{k}|{ctx.attempt}|{what}|{os.getpid()}|{start:.6f}|{time.time():.6f}"
        client().rpush(EXECUTIONS, line)
        if what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "error":
            raise Transient(f"planned failure of step f{k}, attempt {ctx.attempt}")

    return body


compound: Workflow[Plan] = Workflow("compound", state=Plan)
for _k in range(STEPS):
    compound.step(name=f"f{_k}", retry=RETRY)(faulty_step(_k))


# -- the naive columns of the table, computed from the same plan ------------------------------


def naive_first_failure(seed: int, run_ids: Sequence[str], p: float) -> float:
    """Share of runs whose first execution of every step succeeds under the plan (computed)."""
    ok = sum(all(outcome(draw(seed, rid, k, 1), p) == "ok" for k in range(STEPS)) for rid in run_ids)
    return ok / len(run_ids)


@dataclass(frozen=True)
class Costs:
    """The cost model of the naive simulation: seconds per execution, extra per kill, extra per error."""

    step_s: float
    kill_s: float
    error_s: float

    def of(self, executions: int, kills: int, errors: int) -> float:
        """Seconds that many executions, kills and errors cost under this model."""
        return executions * self.step_s + kills * self.kill_s + errors * self.error_s


def naive_restart(seed: int, run_id: str, p: float, budget_s: float, costs: Costs) -> tuple[bool, int]:
    """Simulate restart-from-scratch for one run within ``budget_s``: (completed, step executions used)."""
    executions: dict[int, int] = defaultdict(int)
    t, k, used = 0.0, 0, 0
    while k < STEPS:
        executions[k] += 1
        what = outcome(draw(seed, run_id, k, executions[k]), p)
        t += costs.of(1, what == "kill", what == "error")
        if t > budget_s + 1e-9:
            return False, used
        used += 1
        k = k + 1 if what == "ok" else 0
    return True, used
