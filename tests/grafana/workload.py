"""The workload behind the dashboard tests, run on real supervisors and two real workers.

- ``chain17``: the article's chain, 17 steps. Each attempt of each step raises with a given
  probability, decided by a hash of (seed, run, step, attempt), so which attempts fail does not
  depend on scheduling and :func:`expected_attempts` can say beforehand exactly what the fleet
  will count. Warm-up runs instead fail exactly once per step (run ``warm-k`` fails step k once).
- ``recovery`` (its own queue): a step that fails once with an error, a step that times out once,
  a stash and a cost, then ``poisoned``, whose every attempt freezes its worker before the commit
  (the fault below, armed on both workers) until its lease lapses: the supervisor declares the
  worker dead and re-dispatches, the other worker's claim counts a crash (and the work resuming
  saved), the frozen worker's late commit is fenced, and the third crash quarantines the step and
  dead-letters the run. A run started with ``park`` waits in ``gather`` until it is cancelled,
  so the fleet has a run, a step and a pending entry in flight when it is scraped.
"""

from __future__ import annotations

import hashlib
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from orchestrator import Client, Retry, Settings, StepContext, Supervisor, Worker, Workflow
from tests.harness import supervisor_thread, worker_thread
from tests.helpers import wait_until

SEED = 20261127
FAIL_P = 0.05
CHAIN = "chain17"
CHAIN_STEPS = [f"s{i:02d}" for i in range(1, 18)]
RECOVERY = "recovery"
RECOVERY_QUEUE = "recovery"
CHAIN_RETRY = Retry(max_attempts=20, backoff_s=0.01, multiplier=1.0, jitter=0.0)
# every attempt of `poisoned` freezes its worker (no heartbeats, event loop blocked) for longer
# than the lease (fast_settings: 0.8 s), right before it would commit
FREEZE_S = 1.5
RECOVERY_FAULTS = f"before_commit=freeze:{FREEZE_S}@poisoned"


class InjectedFailure(Exception):
    """What a step raises when the plan says this attempt fails."""


class ChainState(BaseModel):
    done: int = 0
    fail_p: float = 0.0  # each attempt fails with this probability...
    fail_once_at: int = -1  # ...or: this step index fails its first attempt, and nothing else


def draw(run_id: str, step: str, attempt: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, run, step, attempt)."""
    digest = hashlib.blake2b(f"{SEED}|{run_id}|{step}|{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def attempt_fails(run_id: str, index: int, attempt: int, state: ChainState) -> bool:
    if state.fail_once_at >= 0:
        return index == state.fail_once_at and attempt == 1
    return draw(run_id, CHAIN_STEPS[index], attempt) < state.fail_p


def _chain_step(index: int) -> Any:
    def step(ctx: StepContext, state: ChainState) -> dict[str, Any]:
        if attempt_fails(ctx.run_id, index, ctx.attempt, state):
            raise InjectedFailure(f"injected failure: {ctx.step} attempt {ctx.attempt}")
        return {"done": state.done + 1}

    step.__name__ = CHAIN_STEPS[index]
    return step


def chain_workflow() -> Workflow[ChainState]:
    wf = Workflow(CHAIN, state=ChainState)
    for index in range(len(CHAIN_STEPS)):
        wf.step(_chain_step(index), retry=CHAIN_RETRY)
    return wf


def expected_attempts(runs: dict[str, ChainState]) -> dict[str, Counter[str]]:
    """Per step, the attempts the fleet will count by outcome (ok / error) for these runs."""
    out: dict[str, Counter[str]] = {step: Counter() for step in CHAIN_STEPS}
    for run_id, state in runs.items():
        for index, step in enumerate(CHAIN_STEPS):
            attempt = 1
            while attempt_fails(run_id, index, attempt, state):
                out[step]["error"] += 1
                attempt += 1
            assert attempt <= CHAIN_RETRY.max_attempts, f"{run_id} {step} would run out of retries"
            out[step]["ok"] += 1
    return out


def warmup_runs(n: int = 20) -> dict[str, ChainState]:
    """``n`` runs; step k fails its first attempt in run ``warm-k`` only (1 failure in n + 1 attempts)."""
    assert n >= len(CHAIN_STEPS)
    return {f"warm-{k:02d}": ChainState(fail_once_at=k) for k in range(n)}


def measured_runs(n: int = 60, fail_p: float = FAIL_P) -> dict[str, ChainState]:
    return {f"run-{k:03d}": ChainState(fail_p=fail_p) for k in range(n)}


class RecoveryState(BaseModel):
    park: bool = False
    found: int = 0


def recovery_workflow() -> Workflow[RecoveryState]:
    wf = Workflow(RECOVERY, state=RecoveryState, queue=RECOVERY_QUEUE)
    wf.concurrency_limit("recovery_llm", 1)  # so the limits' metrics have samples

    @wf.step(retry=Retry(max_attempts=5, backoff_s=0.01, jitter=0.0))
    def gather(ctx: StepContext, state: RecoveryState) -> dict[str, Any]:
        if state.park:  # stay in flight (heartbeating) until the run is cancelled
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ctx.heartbeat()
                time.sleep(0.02)
        ctx.stash({"attempt": ctx.attempt, "found": ["acme", "globex"]})
        if ctx.attempt == 1:
            raise InjectedFailure("injected failure: the search API timed out")
        ctx.record_cost(tokens=1200, usd=0.02)
        time.sleep(0.05)  # so the work that resuming saves has a duration
        return {"found": 2}

    @wf.step(retry=Retry(max_attempts=5, backoff_s=0.01, jitter=0.0), timeout_s=0.25, concurrency="recovery_llm")
    def summarize(ctx: StepContext, state: RecoveryState) -> None:
        if ctx.attempt == 1:
            time.sleep(0.5)  # longer than timeout_s: this attempt times out

    @wf.step
    def poisoned(ctx: StepContext, state: RecoveryState) -> None:
        return None  # the worker freezes before committing it (RECOVERY_FAULTS)

    return wf


@dataclass
class Fleet:
    settings: Settings
    client: Client
    supervisors: list[Supervisor]
    workers: list[Worker]
    chain: Workflow[ChainState]
    recovery: Workflow[RecoveryState]

    @property
    def ports(self) -> dict[str, list[int]]:
        return {
            "supervisor": [s.metrics_port or 0 for s in self.supervisors],
            "worker": [w.metrics_port or 0 for w in self.workers],
        }

    def scrape(self) -> dict[str, list[str]]:
        return {role: [scrape(port) for port in ports] for role, ports in self.ports.items()}

    def run_chain(self, runs: dict[str, ChainState], timeout_s: float = 60) -> None:
        handles = [self.client.submit(self.chain, state.model_dump(), run_id=rid) for rid, state in runs.items()]
        for run in handles:
            assert run.wait(timeout_s=timeout_s).done == len(CHAIN_STEPS)

    def run_recovery(self, run_id: str) -> None:
        """The quarantine scenario; returns once the run is failed and dead-lettered."""
        self.client.submit(self.recovery, {}, run_id=run_id)
        wait_until(lambda: self.client.get(run_id).status == "failed", timeout_s=30, what=f"{run_id} quarantined")
        info = self.client.get(run_id)
        assert info.error is not None and info.error.type == "Quarantined", info

    def park(self, run_id: str) -> None:
        """A run left in flight in ``gather`` (cancel it with :meth:`unpark`)."""
        self.client.submit(self.recovery, {"park": True}, run_id=run_id)
        wait_until(lambda: self.client.get(run_id).status == "running", timeout_s=10, what=f"{run_id} running")

    def unpark(self, run_id: str) -> None:
        self.client.cancel(run_id, reason="test over")
        wait_until(lambda: self.client.get(run_id).status == "cancelled", timeout_s=10, what=f"{run_id} cancelled")


@contextmanager
def fleet(settings: Settings, supervisors: int = 1) -> Iterator[Fleet]:
    """Supervisors and two workers in threads, each serving /metrics on a free loopback port."""
    metered = settings.model_copy(update={"metrics_port": 0})
    armed = metered.model_copy(update={"faults": RECOVERY_FAULTS})
    chain, recovery = chain_workflow(), recovery_workflow()
    with ExitStack() as stack:
        client = stack.enter_context(Client(metered))
        sups = [stack.enter_context(supervisor_thread(metered)) for _ in range(supervisors)]
        workers = [stack.enter_context(worker_thread([chain, recovery], armed)) for _ in range(2)]
        wait_until(lambda: all(s.metrics_port for s in sups), what="supervisor metrics served")
        assert all(w.metrics_port for w in workers)
        yield Fleet(metered, client, sups, workers, chain, recovery)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())
