"""``StepContext``: what a running step knows about itself and how it talks back.

The idempotency key and the fencing token are the two values a step hands to the outside
world. The key is the same for every attempt of one step visit (retries, redeliveries,
recovery after a crash): a receiver that dedupes on it applies the effect once. The token
grows with every claim: a receiver that remembers the highest token it has seen can refuse a
late write from an attempt that was presumed dead and replaced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.codec import dumps
from orchestrator.errors import OrchestratorError
from orchestrator.keys import idempotency_key

STEP_LOG = logging.getLogger("orchestrator.step")


class ClaimLost(OrchestratorError):
    """This attempt no longer owns its step (run cancelled, step timed out or taken over).

    Raised by ``ctx.heartbeat()`` and ``ctx.stash()`` so that a step stops doing work whose
    result would be refused anyway.
    """


class StepContext:
    """Passed to every step as its first argument."""

    def __init__(
        self,
        *,
        run_id: str,
        workflow: str,
        step: str,
        visit: int,
        attempt: int,
        fencing_token: int,
        snapshot: Any,
        worker_id: str,
        max_payload_bytes: int,
        save_stash: Callable[[str], bool],
        save_stash_async: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.step = step
        self.visit = visit
        self.attempt = attempt
        self.fencing_token = fencing_token
        self.snapshot = snapshot
        self.worker_id = worker_id
        self.idempotency_key = idempotency_key(run_id, step, visit)
        self.cost: dict[str, float] = {}
        self._limit = max_payload_bytes
        self._save_stash = save_stash
        self._save_stash_async = save_stash_async
        self._lost = False  # set once, by the heartbeat thread or the event loop; read by the step
        self.last_progress = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"StepContext(run_id={self.run_id!r}, step={self.step!r}, visit={self.visit}, "
            f"attempt={self.attempt}, fencing_token={self.fencing_token})"
        )

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry the run id, step, attempt and fencing token."""
        return logging.LoggerAdapter(
            STEP_LOG, {"run_id": self.run_id, "step": self.step, "attempt": self.attempt, "fence": self.fencing_token}
        )

    @property
    def cancelled(self) -> bool:
        """True once this attempt has lost its claim; the step should stop."""
        return self._lost

    def heartbeat(self) -> None:
        """Report progress. Required at least every ``heartbeat_timeout_s`` when the step sets it.

        Costs no round trip (the worker's heartbeat thread renews the lease); raises
        :class:`ClaimLost` when the attempt should stop.
        """
        self.last_progress = time.monotonic()
        self._raise_if_lost()

    def stash(self, snapshot: Any) -> None:
        """Persist a checkpoint of this step; after a crash the next attempt gets it as ``snapshot``.

        Durable when it returns. Blocks for one Redis round trip; in an async step prefer
        ``await ctx.astash(...)``.
        """
        self._raise_if_lost()
        raw = self._encode(snapshot)
        self.last_progress = time.monotonic()
        if not self._save_stash(raw):
            self.mark_lost()
            self._raise_if_lost()
        self.snapshot = snapshot

    async def astash(self, snapshot: Any) -> None:
        """``stash`` for async steps: does not block the event loop."""
        self._raise_if_lost()
        raw = self._encode(snapshot)
        self.last_progress = time.monotonic()
        if not await self._save_stash_async(raw):
            self.mark_lost()
            self._raise_if_lost()
        self.snapshot = snapshot

    def record_cost(self, **amounts: float) -> None:
        """Attach costs to this step's result (e.g. ``tokens=1200, usd=0.004``); summed per name."""
        for name, amount in amounts.items():
            self.cost[name] = self.cost.get(name, 0.0) + float(amount)

    def mark_lost(self) -> None:
        self._lost = True

    def _encode(self, snapshot: Any) -> str:
        return dumps(snapshot, what=f"stash of step {self.step!r} (run {self.run_id!r})", limit=self._limit)

    def _raise_if_lost(self) -> None:
        if self._lost:
            raise ClaimLost(
                f"run {self.run_id!r} step {self.step!r}: attempt {self.attempt} (fence {self.fencing_token}) "
                "no longer owns the step (cancelled, timed out or taken over); stop work",
                run_id=self.run_id,
                step=self.step,
            )
