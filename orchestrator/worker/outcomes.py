"""How an attempt's outcome reaches Redis: commit, fail or release, each followed by the ack.

The ack comes only after the outcome script answered that it applied (or had already applied)
the outcome. An outcome whose reply is lost is sent again: every outcome script recognises its
own earlier run (``REPLAY``), so a resend either does the work or reports it done, and a lost
reply costs neither a re-execution nor a crash count. An attempt that was replaced
(``FENCED``, ``NOT_OWNER``) does not ack: the entry is not its to drop (after Redis lost
writes it may be the run's only dispatch); the supervisor drops or re-dispatches it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import redis

from orchestrator import scripts
from orchestrator.children import cancel_call, report, submit_calls
from orchestrator.codec import Dispatch, ErrorInfo
from orchestrator.connection import REDIS_FAILURES, outcome_unknown_or_passing
from orchestrator.context import StepContext
from orchestrator.errors import ValidationError
from orchestrator.keys import ITEM_MARK
from orchestrator.store import Claimed, Committed, Outcome, new_claim_token
from orchestrator.worker.plan import Attempt, plan_commit
from orchestrator.worker.runtime import Runtime, StepTimeout, now_ms
from orchestrator.workflow import StepDef, Workflow

log = logging.getLogger("orchestrator.worker")

RESEND_FOR_S = 30.0  # beyond redis-py's own retries (~3 s): how long an outcome is resent
APPLIED = frozenset({"OK", "REPLAY", "RETRY", "FAILED", "RELEASED", "DEFERRED", "TERMINAL", "MISSING"})
# steps a worker takes in a row from its own commits before the next goes through the queue
MAX_CHAINED_STEPS = 16


class CommitRefused(ValidationError):
    """Redis refused a commit for a reason that would not go away (an invalid cost, a key of
    the wrong type): the step fails with the reason instead of leaving its run stuck."""


class Outcomes:
    """The outcome half of :class:`~orchestrator.worker.execution.StepExecution`."""

    rt: Runtime
    queue: str
    entry_id: str
    dispatch: Dispatch
    claimed: Claimed
    workflow: Workflow[Any] | None
    token: str
    chained: int
    ctx: StepContext
    start_ms: int
    log_fields: dict[str, Any]
    superseded: bool
    step: StepDef | Exception
    event_extra: dict[str, Any]  # what this attempt's events say besides (a bridged step's RQ job)

    # -- commit ---------------------------------------------------------------------------

    async def commit(self, step: StepDef, ctx: StepContext, state: Any, returned: Any) -> None:
        wf, d = self.workflow, self.dispatch
        assert wf is not None
        where = f"step {d.step!r} of workflow {wf.name!r}"
        settings = self.rt.settings
        plan = plan_commit(
            wf, step, state, returned, ctx, self._attempt_of(), end_ms=now_ms(),
            max_payload_bytes=settings.max_payload_bytes, max_map_items=settings.max_map_items,
        )  # fmt: skip
        outcome, spec, fields = plan.outcome, plan.spec, plan.fields
        self.rt.faults.hit("before_commit", d.step)
        # Chain (take the next step at once, without a trip through the queue) at most
        # MAX_CHAINED_STEPS times in a row: a chained step goes ahead of the runs waiting in the
        # queue, and the bound keeps one run (a long Goto loop) from doing that for ever;
        # may_chain() also stops it while an entry this worker read waits long for a slot.
        chain = (
            outcome.next_step is not None
            and not outcome.wake
            and outcome.wait is None
            and spec is None
            and self.chained < MAX_CHAINED_STEPS
            and self.rt.may_chain()
        )
        chain_token = new_claim_token(self.rt.worker_id) if chain else ""
        call = plan.call(
            self.rt.store, d, queue=self.queue, token=self.token, event=self._event(),
            max_steps=self.rt.settings.max_run_steps, entry_id="" if self.superseded else self.entry_id,
            chain_to=self.rt.worker_id if chain else None, chain_token=chain_token,
        )  # fmt: skip
        try:
            result = await self._send(call, "commit")
        except redis.ResponseError as exc:  # a script error: it would fail the same way again
            await self.fail(CommitRefused(f"Redis refused the commit of {where}: {exc}"), step=None)
            return
        if result is None:
            return
        if result.code == "INVALID":
            await self.fail(CommitRefused(f"the commit of {where} was refused: {result.detail[0]}"), step=None)
            return
        self.rt.faults.hit("after_persist_before_ack", d.step)
        if spec and result.code in ("OK", "REPLAY"):
            await self._start_children(plan.first_children)
        if result.code in ("OK", "REPLAY") and result.detail and result.detail[0] == "":
            await self._report_item()  # a map item's run completed
        if result.code not in ("OK", "REPLAY"):  # REPLAY: resent after a lost reply
            self._ack(result)  # an applied commit acked its entry itself
        elif result.detail:
            committed = Committed.parse(result.detail)
            if committed.chained is not None:
                # the state Redis holds now: the one this step was given, its update merged
                chained = dataclasses.replace(committed.chained, state={**self.claimed.state, **fields})
                successor = Dispatch.model_construct(
                    run=d.run, wf=d.wf, step=committed.next_step, visit=committed.visit
                )
                self.rt.start_chained(self.queue, committed.entry_id, successor, chained, chain_token, self.chained + 1)

    async def _report_item(self) -> None:
        """Hand a finished map item's result to its parent at once (the supervisor would relay
        it within a tick; the next item of a limited map starts only then). Best effort: the
        relay and the sweep do it when this does not get through."""
        if ITEM_MARK not in self.dispatch.wf:
            return
        self.rt.faults.hit("before_fan_in", self.dispatch.step)
        try:
            await asyncio.to_thread(report, self.rt.sync_redis, self.rt.store, self.dispatch.run)
        except REDIS_FAILURES as exc:
            log.warning(
                "map item result not handed on; the supervisor relays it", extra={**self.log_fields, "error": str(exc)}
            )

    async def _start_children(self, specs: list[dict[str, Any]]) -> None:
        """Submit the children the commit parked this run for (each idempotent by its run id);
        one that does not get through is submitted by the supervisor's next look at this run."""
        self.rt.faults.hit("before_children", self.dispatch.step)
        calls = submit_calls(self.rt.store, specs, self.dispatch.run, self.queue)
        replies = await self.rt.batcher.call_many(calls)
        failed = [spec["run"] for spec, reply in zip(specs, replies, strict=True) if isinstance(reply, BaseException)]
        fields = {**self.log_fields, "children": len(specs)}
        if failed:
            log.warning("child runs not started; the supervisor starts them", extra={**fields, "failed": failed[:5]})
        else:
            log.info("child runs started; run waiting for them", extra=fields)
        # a cancel of this run that landed before the children existed could not reach them
        run_key = self.rt.store.keys.run(self.dispatch.run).run
        (status,) = await self.rt.batcher.call_many([scripts.command("HGET", run_key, "status")])
        if status == "cancelled":
            await self.rt.batcher.call_many(
                [cancel_call(self.rt.store, s["run"], s["queue"], self.dispatch.run) for s in specs]
            )
            log.info("run was cancelled meanwhile; its children cancelled", extra=fields)

    # -- fail and release -----------------------------------------------------------------

    async def fail(self, exc: BaseException, *, step: StepDef | None) -> None:
        failures = self.claimed.errors + 1
        delay_s = step.retry.decide(exc, failures) if step else None
        error = ErrorInfo.from_exception(exc, retryable=delay_s is not None)
        kind = "timeout" if isinstance(exc, StepTimeout) else "error"
        call = self.rt.store.fail(
            dispatch=self.dispatch,
            queue=self.queue,
            token=self.token,
            event=self._event(error=error.model_dump()),
            kind=kind,
            retry_delay_ms=None if delay_s is None else int(delay_s * 1000),
            error=error.model_dump_json(),
        )
        retry_in = {"retry_in_s": round(delay_s, 2)} if delay_s is not None else {}
        try:
            written = await self._send(
                call, "failure", {"error": f"{error.type}: {error.message}", "kind": kind, **retry_in}
            )
        except redis.ResponseError as refused:
            log.error("Redis refused to record the failure", extra={**self.log_fields, "error": str(refused)})
            return
        if written is not None:
            self._ack(written)
            if written.code == "FAILED":
                await self._report_item()  # a map item's run failed

    async def release(self, reason: str) -> None:
        call = self.rt.store.release(
            run_id=self.dispatch.run, queue=self.queue, token=self.token, event=self._event(detail=reason)
        )
        try:
            result = await self._send(call, "release", quiet=True)
        except redis.ResponseError as refused:
            log.error("Redis refused to take the step back", extra={**self.log_fields, "error": str(refused)})
            return
        if result is None:
            return  # the lease lapses; the supervisor re-dispatches
        if result.code == "RELEASED":
            self.rt.count("released")
            self._observe("released")
        log.info("step given back", extra={**self.log_fields, "reason": reason, "outcome": result.code})
        self._ack(result)

    # -- sending --------------------------------------------------------------------------

    async def _send(
        self, call: scripts.Call, what: str, fields: dict[str, Any] | None = None, *, quiet: bool = False
    ) -> Outcome | None:
        """Send an outcome; resend it while its fate is unknown, for up to :data:`RESEND_FOR_S`.

        Returns None when no answer came (the entry stays pending: the lease lapses and the
        supervisor re-dispatches it; the next claim finds out what did or did not happen).
        Raises :class:`redis.ResponseError` for an error that a resend would only repeat.
        """
        deadline = time.monotonic() + RESEND_FOR_S
        delay_s = 0.05
        while True:
            try:
                result = Outcome.parse(await self.rt.batcher.call(call))
                break
            except REDIS_FAILURES as exc:
                if not outcome_unknown_or_passing(exc):
                    raise
                if time.monotonic() + delay_s > deadline or self.rt.stopping_now():
                    log.error(
                        f"{what} failed; the step stays pending for the supervisor",
                        extra={**self.log_fields, "error": str(exc)},
                    )
                    return None
                log.warning(f"{what} got no answer; sending it again", extra={**self.log_fields, "error": str(exc)})
                await asyncio.sleep(delay_s)
                delay_s = min(2.0, delay_s * 2)
        if not quiet:
            self._report(what, result, {**self.log_fields, **(fields or {}), "outcome": result.code})
        return result

    def _ack(self, result: Outcome) -> None:
        """Ack the entry once the outcome is durable, unless this attempt was replaced."""
        if result.code in APPLIED and not self.superseded:
            self.rt.ack(self.queue, self.dispatch.run, self.entry_id)

    # -- reporting ------------------------------------------------------------------------

    def _attempt_of(self) -> Attempt:
        return Attempt(self.dispatch, self.claimed.attempt, self.claimed.fence, self.rt.worker_id, self.start_ms)

    def _event(self, **extra: Any) -> str:
        return self._attempt_of().event(now_ms(), **self.event_extra, **extra)

    def _observe(self, outcome: str, *, ran: bool = True) -> None:
        """This attempt's outcome in the worker's metrics (and how long it ran user code)."""
        d, m = self.dispatch, self.rt.metrics
        executor = self.step.runs_on if isinstance(self.step, StepDef) else "worker"
        m.attempts.labels(d.wf, d.step, outcome, executor).inc()
        if ran:
            m.duration.labels(d.wf, d.step).observe(max(0, now_ms() - self.start_ms) / 1000)

    def _report(self, what: str, result: Outcome, fields: dict[str, Any]) -> None:
        if result.code in ("OK", "REPLAY") and what == "commit":
            self._report_commit(result, fields)
        elif result.code == "FENCED":
            self.rt.count("fenced")
            self._observe("fenced")
            log.warning(
                f"{what} refused: this claim was replaced while it ran (stale fencing token)",
                extra={**fields, "live_fence": result.detail[0]},
            )
        elif result.code == "RETRY":
            self.rt.count("steps_retried")
            self._observe(fields.get("kind", "error"))
            self.rt.metrics.retries.labels(self.dispatch.wf, self.dispatch.step).inc()
            log.warning("step failed; retry scheduled", extra=fields)
        elif result.code == "FAILED":
            self.rt.count("steps_failed")
            self._observe(fields.get("kind", "error"))
            log.error("step failed; run failed and dead-lettered", extra=fields)
        elif result.code == "INVALID":
            log.error(f"{what} refused by Redis: {result.detail[0]}", extra=fields)
        else:
            log.info(f"{what} not applied: run is {result.code.lower()}", extra=fields)

    def _report_commit(self, result: Outcome, fields: dict[str, Any]) -> None:
        self.rt.count("steps_ok")
        self._observe("ok")
        for unit, amount in self.ctx.cost.items():
            self.rt.metrics.cost.labels(self.dispatch.wf, self.dispatch.step, unit).inc(amount)
        if len(result.detail) >= 4 and result.detail[2] == "delayed":  # a Sleep
            log.info("step committed; run sleeping", extra={**fields, "until_ms": int(result.detail[3])})
            return
        if len(result.detail) >= 4 and result.detail[2] == "waiting":  # a WaitFor
            log.info("step committed; run waiting for a signal", extra={**fields, "timeout_ms": int(result.detail[3])})
            return
        finished = bool(result.detail) and result.detail[0] == ""
        if finished and len(result.detail) >= 6:
            log.error(
                "run failed: it reached max_run_steps (a Goto loop that never ends?)",
                extra={**fields, "max_run_steps": self.rt.settings.max_run_steps},
            )
            return
        if finished and len(result.detail) >= 5:  # (created ms, finished ms) on the Redis clock
            seconds = max(0, int(result.detail[4]) - int(result.detail[3])) / 1000
            self.rt.metrics.run_duration.labels(self.dispatch.wf).observe(seconds)
        level = logging.INFO if finished else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "run completed" if finished else "step committed", extra=fields)
