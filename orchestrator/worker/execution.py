"""The step path of one claimed step: run user code -> interpret -> persist -> ack.

Each stage is its own function; writing the outcome (commit, fail, release) and the ack that
follows it are in ``outcomes``. The ack always comes after the outcome is durable in Redis;
when the outcome write itself gets no answer, the entry is left pending so the supervisor
re-dispatches it, and the next claim finds out what did or did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from orchestrator import scripts
from orchestrator.bridge.watch import run_on_rq
from orchestrator.codec import Dispatch, loads
from orchestrator.connection import REDIS_FAILURES
from orchestrator.context import ClaimLost, StepContext
from orchestrator.errors import DefinitionError, OrchestratorError, ValidationError
from orchestrator.permits import ConcurrencyLimit, forget_gone, stale_ms, wake_calls
from orchestrator.ratelimit import RateLimit
from orchestrator.store import Claimed
from orchestrator.worker.heartbeat import InFlight
from orchestrator.worker.outcomes import Outcomes
from orchestrator.worker.runtime import Released, Runtime, Shutdown, StepTimeout, Superseded, now_ms
from orchestrator.worker.usercode import StepThread, as_step_error, guarded
from orchestrator.workflow import StepDef, Workflow

log = logging.getLogger("orchestrator.worker")


async def invoke(step: StepDef, ctx: StepContext, state: Any, abort: asyncio.Future[None], rt: Runtime) -> Any:
    """Run the user function until it returns, times out, or ``abort`` is set.

    On a timeout or an abort the attempt is given up: the context is marked lost (so the
    step's own ``heartbeat()``/``stash()`` raise and its stash writes are refused), an async
    step is cancelled, and a sync step's thread is abandoned (still counted as busy).
    """
    thread = None
    if step.is_async:
        running: asyncio.Future[Any] = asyncio.ensure_future(guarded(step.fn(ctx, state)))
    else:
        thread = rt.threads.start(step.fn, ctx, state)
        running = thread.future
    try:
        done, _ = await asyncio.wait({running, abort}, timeout=step.timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        _give_up(ctx, running, thread, rt)
        raise
    if running in done:
        error = running.exception()
        if error is not None:
            raise as_step_error(error)
        return running.result()
    _give_up(ctx, running, thread, rt)
    if abort in done:
        abort.result()  # raises the abort reason
    raise StepTimeout(f"step {step.name!r} exceeded timeout_s={step.timeout_s}")


def _give_up(ctx: StepContext, running: asyncio.Future[Any], thread: StepThread | None, rt: Runtime) -> None:
    ctx.mark_lost()
    running.cancel()
    if thread is not None:
        rt.threads.abandon(thread)


class StepExecution(Outcomes):
    """Runs one claimed step to a durable outcome, then acks its stream entry.

    Registered with the heartbeat as soon as it exists (at claim time), so its lease is
    renewed even before its task first gets the event loop. ``token`` is the claim token the
    claim was made with (unique per claim).
    """

    def __init__(
        self,
        rt: Runtime,
        queue: str,
        entry_id: str,
        dispatch: Dispatch,
        claimed: Claimed,
        workflow: Workflow[Any] | None,
        token: str,
        chained: int = 0,
    ) -> None:
        self.rt = rt
        self.chained = chained  # steps of this run this worker took in a row from commits, without the queue
        self.queue = queue
        self.entry_id = entry_id
        self.dispatch = dispatch
        self.claimed = claimed
        self.workflow = workflow
        self.token = token
        self.abort: asyncio.Future[None] = rt.loop.create_future()
        self.finished = False
        self.superseded = False
        self.event_extra: dict[str, Any] = {}
        self.start_ms = now_ms()
        self.log_fields = {
            "run_id": dispatch.run,
            "step": dispatch.step,
            "attempt": claimed.attempt,
            "fence": claimed.fence,
        }
        self.step = self._lookup_step()
        self.ctx = self._context()
        self.item = InFlight(
            self.token,
            self.queue,
            self.entry_id,
            dispatch.run,
            claimed.fence,
            self.ctx,
            self.step.heartbeat_timeout_s if isinstance(self.step, StepDef) else None,
            on_lost=self._on_lost,
        )
        rt.table.add(self.item)

    def _lookup_step(self) -> StepDef | Exception:
        """The step to run, or the error that fails this attempt (code changed under the run)."""
        if self.workflow is None:
            return DefinitionError(
                f"workflow {self.dispatch.wf!r} is not served by worker {self.rt.worker_id} (it serves: "
                f"{', '.join(self.rt.served)}); every worker reading a queue must serve all workflows "
                "submitted to it"
            )
        try:
            return self.workflow.get_step(self.dispatch.step)
        except DefinitionError as exc:
            return exc

    async def run(self) -> None:
        try:
            await self._load_and_run()
        except Exception as exc:  # a bug of ours must fail the attempt, not strand its claim
            log.exception("step execution failed inside the worker", extra=self.log_fields)
            await self.fail(exc, step=self.step if isinstance(self.step, StepDef) else None)
        finally:
            self._done()

    async def _load_and_run(self) -> None:
        if isinstance(self.step, Exception):
            await self.fail(self.step, step=None)
            return
        assert self.workflow is not None
        try:
            state = self.workflow.load_state(
                {k: loads(v, what=f"state field {k!r}") for k, v in self.claimed.state.items()}
            )
            if self.claimed.snapshot is not None:
                self.ctx.snapshot = loads(self.claimed.snapshot, what="stash")
        except OrchestratorError as exc:  # stored state no longer fits the model, or cannot be decoded
            await self.fail(exc, step=None)
            return
        await self._run_step(self.step, state)

    def _done(self) -> None:
        self.finished = True
        self.rt.table.remove(self.token)
        if self.abort.done() and not self.abort.cancelled():
            self.abort.exception()  # retrieved: an abort that came too late is not an error

    async def hand_back(self, reason: str) -> None:
        """Give the claimed step back without running it."""
        try:
            await self.release(reason)
        finally:
            self._done()

    async def _run_step(self, step: StepDef, state: Any) -> None:
        try:
            await self._attempt(step, state)
        except Shutdown:
            # its code may still run on an abandoned thread: its permit lapses with its lease
            log.info("step abandoned at shutdown; the supervisor will re-dispatch it", extra=self.log_fields)
            return
        except Superseded:
            log.warning(
                "attempt stopped: this worker claimed the same entry again (Redis lost writes); "
                "the new claim carries on",
                extra=self.log_fields,
            )
        except (ClaimLost, Released) as exc:
            await self.release(str(exc) or "released")
        except Exception as exc:
            await self.fail(exc, step=step)
        if self.item.permit is not None:  # the outcome is written (or left to the supervisor)
            await self._release_permit(self.item.permit)

    async def _attempt(self, step: StepDef, state: Any) -> None:
        """Admit, run and commit the step (an outcome other than the commit is raised)."""
        self.rt.faults.hit("after_claim", step.name)
        if step.concurrency is not None and not await self._permitted(step.concurrency):
            return
        if step.rate_limit is not None and not await self._admitted(step.rate_limit):
            return
        if step.executor is not None:
            await run_on_rq(self, step, step.executor)  # the RQ work-horse writes the outcome
            return
        returned = await invoke(step, self.ctx, state, self.abort, self.rt)
        self.item.heartbeat_timeout_s = None  # done running: only the commit is left
        await self.commit(step, self.ctx, state, returned)

    async def _permitted(self, limit: ConcurrencyLimit) -> bool:
        """Take a permit of the step's concurrency limit, or give the step back to wait in the
        limit's line (no user code runs; the worker slot is free at once). False when given back."""
        rt, d = self.rt, self.dispatch
        acquire = rt.store.permit(
            limit.name, limit.limit, "acquire", d.run, self.token, self.claimed.fence, rt.settings.lease_ms,
            self.queue, stale_ms(rt.settings.permit_poll_s),
        )  # fmt: skip
        reply = await self._send(acquire, "permit", quiet=True)
        if reply is None:
            return False  # no answer: the entry stays pending for the worker's audit, as for an outcome
        if reply.code == "OK":
            self.item.permit = limit
            rt.metrics.permit_wait.labels(limit.name).observe(int(reply.detail[0]) / 1000)
            rt.faults.hit("after_permit", d.step)
            return True
        if reply.code == "FENCED":
            raise ClaimLost("a newer claim of the run holds its permit")
        if reply.code != "WAIT":
            raise ValidationError(f"concurrency limit {limit.name!r} refused the step: {reply.code} {reply.detail}")
        ahead, held, allowed = (int(x) for x in reply.detail[:3])
        said = f"concurrency limit {limit.name}: {held} of {allowed} permits in use, {ahead} waiting ahead"
        await self._defer(limit.name, int(rt.settings.permit_poll_s * 1000), "permit", said)
        return False

    async def _release_permit(self, limit: ConcurrencyLimit) -> None:
        """Give the permit back and wake the waiters it lets in (a failure here only delays
        them: the lease ends and the supervisor's sweep wakes them)."""
        rt = self.rt
        rt.faults.hit("before_permit_release", self.dispatch.step)
        self.item.permit = None
        try:
            release = rt.store.permit(limit.name, limit.limit, "release", self.dispatch.run, self.token)
            reply = await rt.batcher.call(release)
            calls = wake_calls(rt.store, limit.name, reply[1:])
            if calls:
                replies = await rt.batcher.call_many([call for _, call in calls])
                woken = list(zip((run_id for run_id, _ in calls), replies, strict=True))
                forget = forget_gone(rt.store, limit.name, limit.limit, woken)
                if forget:
                    await rt.batcher.call_many(forget)
        except REDIS_FAILURES as exc:
            log.warning(
                "permit release failed; it returns when its lease ends",
                extra={**self.log_fields, "concurrency_limit": limit.name, "error": str(exc)},
            )

    async def _admitted(self, limit: RateLimit) -> bool:
        """Admit this start under its step's rate limit, or give the step back until its reserved
        moment (no user code runs; the worker slot is free at once). False when given back."""
        admit = self.rt.store.rate(limit=limit, mode="admit", run_id=self.dispatch.run, cost=limit.cost)
        reply = await self._send(admit, "admission", quiet=True)  # resent while its fate is unknown
        if reply is None:
            return False  # no answer: the entry stays pending for the worker's audit, as for an outcome
        if reply.code == "OK":
            return True
        if reply.code != "WAIT":
            raise ValidationError(f"rate limit {limit.name!r} cannot admit the step: {reply.code} {reply.detail}")
        await self._defer(limit.name, int(reply.detail[0]), "rate")
        return False

    async def _defer(self, limit: str, wait_ms: int, kind: str, detail: str = "") -> None:
        """Give the step back to wait ``wait_ms`` for its rate limit (``kind`` 'rate') or for a
        permit of its concurrency limit ('permit')."""
        rt, d = self.rt, self.dispatch
        call = rt.store.defer(
            run_id=d.run, queue=self.queue, token=self.token, wait_ms=wait_ms, limit=limit, kind=kind, detail=detail
        )
        fields = {"limit": limit, "kind": kind, "wait_ms": wait_ms}
        written = await self._send(call, "deferral", fields, quiet=True)
        if written is None:
            return
        if kind == "rate":
            rt.count("rate_limited")
            rt.metrics.rate_limited.labels(d.wf, d.step, limit).inc()
        else:
            rt.count("permit_waits")
            rt.metrics.permit_waits.labels(d.wf, d.step, limit).inc()
        log.debug("step waits for its limit", extra={**self.log_fields, **fields, "outcome": written.code})
        self._ack(written)

    def _context(self) -> StepContext:
        rt, d = self.rt, self.dispatch

        def count_stash(raw: str) -> None:
            rt.metrics.stash_writes.labels(d.wf, d.step).inc()
            rt.metrics.stash_bytes.labels(d.wf, d.step).inc(len(raw))

        def save(raw: str) -> bool:
            call = rt.store.stash(run_id=d.run, token=self.token, idem_key=ctx.idempotency_key, snapshot=raw)
            saved: bool = scripts.execute(rt.sync_redis, [call])[0] == 1
            count_stash(raw)
            rt.faults.hit("after_stash", d.step)
            return saved

        async def save_async(raw: str) -> bool:
            call = rt.store.stash(run_id=d.run, token=self.token, idem_key=ctx.idempotency_key, snapshot=raw)
            saved = bool(await rt.batcher.call(call) == 1)
            count_stash(raw)
            rt.faults.hit("after_stash", d.step)
            return saved

        ctx = StepContext(
            run_id=d.run,
            workflow=d.wf,
            step=d.step,
            visit=d.visit,
            attempt=self.claimed.attempt,
            fencing_token=self.claimed.fence,
            snapshot=None,
            worker_id=rt.worker_id,
            max_payload_bytes=rt.settings.max_payload_bytes,
            save_stash=save,
            save_stash_async=save_async,
            spender=rt.spender,
            emitter=rt.emitter,
        )
        return ctx

    def _on_lost(self, reason: str) -> None:
        """Called from the heartbeat thread: stop the step, say why."""
        self.ctx.mark_lost()
        if reason == "stalled":
            exc: BaseException = StepTimeout(
                f"step {self.dispatch.step!r} did not call ctx.heartbeat() within heartbeat_timeout_s"
            )
        else:
            exc = ClaimLost(f"claim lost ({reason})")
        self.abort_with(exc)

    def abort_with(self, exc: BaseException) -> None:
        """Thread-safe: end the wait on the user function with ``exc``."""

        def settle() -> None:
            if not self.abort.done() and not self.finished:
                self.abort.set_exception(exc)

        with contextlib.suppress(RuntimeError):
            self.rt.loop.call_soon_threadsafe(settle)

    def supersede(self) -> None:
        """A new claim of this entry replaced this attempt: stop it, renew nothing, ack nothing."""
        self.superseded = True
        self.ctx.mark_lost()
        self.rt.table.remove(self.token)
        self.abort_with(Superseded())
