"""``StepContext``: what a running step knows about itself and how it talks back.

The idempotency key and the fencing token are the two values a step hands to the outside
world. The key is the same for every attempt of one step visit (retries, redeliveries,
recovery after a crash): a receiver that dedupes on it applies the effect once. The token
grows with every claim: a receiver that remembers the highest token it has seen can refuse a
late write from an attempt that was presumed dead and replaced.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from orchestrator.codec import abbreviate, dumps
from orchestrator.errors import OrchestratorError, ValidationError
from orchestrator.keys import idempotency_key

if TYPE_CHECKING:
    from orchestrator.output import Emitter
    from orchestrator.ratelimit import Spender

STEP_LOG = logging.getLogger("orchestrator.step")
# a cost unit ends up in a Redis hash field joined with '|' and as a Prometheus label value
COST_UNIT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


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
        emitter: Emitter | None = None,
        spender: Spender | None = None,
    ) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self.step = step
        self.visit = visit
        self.attempt = attempt
        self.fencing_token = fencing_token
        self.snapshot = snapshot
        self.worker_id = worker_id
        self.idempotency_key = idempotency_key(run_id, step, visit, workflow)
        self.cost: dict[str, float] = {}
        self._limit = max_payload_bytes
        self._save_stash = save_stash
        self._save_stash_async = save_stash_async
        self._emitter = emitter
        self._spender = spender
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

        Costs no round trip (the worker's heartbeat thread keeps its claims live); raises
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

    def emit(self, data: Any) -> bool:
        """Show ``data`` (JSON-serializable) to clients following the run's live output now,
        e.g. an LLM's tokens as they arrive (``Run.follow_output``, ``orchestrator history RUN
        -f``). Not state and not durable: it never changes the run's state, an attempt that
        crashes keeps what it emitted and the next attempt emits again. One Redis round trip;
        in an async step prefer ``await ctx.aemit(...)``. Returns False when Redis did not take it
        (logged; the step goes on). Raises :class:`ValidationError` when ``data`` is not JSON.
        """
        raw = self._encode_output(data)
        return self._emitter.send(self, raw) if self._emitter else False

    async def aemit(self, data: Any) -> bool:
        """``emit`` for async steps: does not block the event loop."""
        raw = self._encode_output(data)
        return await self._emitter.asend(self, raw) if self._emitter else False

    def spend(self, limit: str, units: float) -> None:
        """Charge ``units`` this step used (e.g. the tokens a model call took) to the rate limit
        ``limit`` its workflow declared (usually with ``cost=0``): later steps under it start
        that much later, fleet-wide. One Redis round trip; ``await ctx.aspend(...)`` in an async
        step. Raises :class:`ValidationError` for an undeclared limit or a bad amount."""
        if self._spender is None:
            raise ValidationError(f"ctx.spend({limit!r}, ...): this context has no rate limits (a test's?)")
        self._spender.spend(self.workflow, limit, units)

    async def aspend(self, limit: str, units: float) -> None:
        """``spend`` for async steps: does not block the event loop."""
        if self._spender is None:
            raise ValidationError(f"ctx.aspend({limit!r}, ...): this context has no rate limits (a test's?)")
        await self._spender.aspend(self.workflow, limit, units)

    def _encode_output(self, data: Any) -> str:
        return dumps(data, what=f"output of step {self.step!r} (run {self.run_id!r})", limit=self._limit)

    def record_cost(self, **amounts: float | Decimal) -> None:
        """Attach costs to this step's result (e.g. ``tokens=1200, usd=0.004``); summed per unit as floats.

        All or nothing: raises :class:`ValidationError` naming the unit, and records none of
        the amounts, when a unit name is not an identifier of at most 64 characters or an
        amount is not a finite number >= 0 (totals go into Redis with HINCRBYFLOAT, which
        refuses NaN and Infinity, and into a Prometheus counter, which only goes up), or when
        the running total would overflow.
        """
        totals = {unit: self._checked_total(unit, amount) for unit, amount in amounts.items()}
        self.cost.update(totals)

    def _checked_total(self, unit: str, amount: object) -> float:
        """This step's running total of ``unit`` with ``amount`` added, or a ValidationError."""
        where = f"record_cost() in step {self.step!r} (run {self.run_id!r})"
        if not COST_UNIT.match(unit):
            raise ValidationError(
                f"{where}: unit {abbreviate(unit)} is invalid: expected a name of 1-64 characters of "
                "A-Z a-z 0-9 _, not starting with a digit (it becomes a Redis hash field and a metric label)",
                run_id=self.run_id,
                step=self.step,
            )
        value = _as_amount(amount)
        total = self.cost.get(unit, 0.0) + value if value >= 0 else math.nan  # nan >= 0 is False
        if not math.isfinite(total):
            raise ValidationError(
                f"{where}: {unit}={abbreviate(amount)} is refused: expected a finite number >= 0 "
                f"(int or float; the total so far is {self.cost.get(unit, 0.0)!r} and must stay finite)",
                run_id=self.run_id,
                step=self.step,
            )
        return total

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


def _as_amount(amount: object) -> float:
    """``amount`` as a float, NaN for anything that is not a finite real number (bool included)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real | Decimal):
        return math.nan
    try:
        value = float(amount)
    except (OverflowError, ValueError):  # an int beyond float range, Decimal('sNaN')
        return math.nan
    return value if math.isfinite(value) else math.nan
