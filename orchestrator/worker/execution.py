"""The step path of one claimed step: run user code -> interpret -> persist -> ack.

Each stage is its own function. The ack always comes after the outcome is durable in Redis
(commit, fail or release); when the outcome write itself fails, the entry is left pending so
the supervisor re-dispatches it, and the next claim finds out what did or did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aredis

from orchestrator import scripts
from orchestrator.codec import Dispatch, ErrorInfo, StepRecord, dumps, encode_fields, loads
from orchestrator.context import ClaimLost, StepContext
from orchestrator.errors import DefinitionError, OrchestratorError
from orchestrator.faults import Faults
from orchestrator.settings import Settings
from orchestrator.store import Claimed, Outcome, Store
from orchestrator.worker.batcher import Batcher
from orchestrator.worker.heartbeat import InFlight, InFlightTable
from orchestrator.workflow import StepDef, Workflow

log = logging.getLogger("orchestrator.worker")


class StepTimeout(Exception):
    """An attempt ran past its step's ``timeout_s`` or stopped heartbeating."""


class Shutdown(BaseException):
    """The worker is stopping at once; leave the step for the supervisor."""


class Released(BaseException):
    """Graceful shutdown ran out of grace; give the step back."""


@dataclass
class Runtime:
    """What every step execution of one worker shares."""

    worker_id: str
    served: tuple[str, ...]
    settings: Settings
    store: Store
    batcher: Batcher
    sync_redis: redis.Redis
    async_redis: aredis.Redis
    table: InFlightTable
    faults: Faults
    loop: asyncio.AbstractEventLoop
    counts: Counter[str] = field(default_factory=Counter)

    def count(self, name: str, amount: int = 1) -> None:
        """Local tally plus the fleet-wide stats hash (sent in the next batch)."""
        self.counts[name] += amount
        self.batcher.send([self.store.count(name, amount)])

    def ack(self, queue: str, entry_id: str) -> None:
        self.batcher.send(self.store.ack(queue, [entry_id]))


def claim_token(worker_id: str, entry_id: str) -> str:
    return f"{worker_id}:{entry_id}"


def now_ms() -> int:
    return int(time.time() * 1000)


def run_in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run a sync step on a daemon thread of its own; the future resolves on the loop.

    Daemon, so a step stuck forever cannot keep a stopping worker alive; a fresh thread per
    step costs tens of microseconds, far below one Redis round trip.
    """
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(value)

    def target() -> None:
        try:
            value, exc = fn(*args), None
        except BaseException as error:
            value, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop is gone: the worker stopped meanwhile
            loop.call_soon_threadsafe(settle, value, exc)

    threading.Thread(target=target, name="orchestrator-step", daemon=True).start()
    return future


async def invoke(
    step: StepDef, ctx: StepContext, state: Any, abort: asyncio.Future[None], loop: asyncio.AbstractEventLoop
) -> Any:
    """Run the user function until it returns, times out, or ``abort`` is set."""
    if step.is_async:
        running: asyncio.Future[Any] = asyncio.ensure_future(step.fn(ctx, state))
    else:
        running = run_in_thread(loop, step.fn, ctx, state)
    try:
        done, _ = await asyncio.wait({running, abort}, timeout=step.timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        running.cancel()
        raise
    if running in done:
        result = running.result()
        return await result if inspect.isawaitable(result) else result
    running.cancel()
    if abort in done:
        abort.result()  # raises the abort reason
    raise StepTimeout(f"step {step.name!r} exceeded timeout_s={step.timeout_s}")


class StepExecution:
    """Runs one claimed step to a durable outcome, then acks its stream entry."""

    def __init__(
        self,
        rt: Runtime,
        queue: str,
        entry_id: str,
        dispatch: Dispatch,
        claimed: Claimed,
        workflow: Workflow[Any] | None,
    ) -> None:
        self.rt = rt
        self.queue = queue
        self.entry_id = entry_id
        self.dispatch = dispatch
        self.claimed = claimed
        self.workflow = workflow
        self.token = claim_token(rt.worker_id, entry_id)
        self.abort: asyncio.Future[None] = rt.loop.create_future()
        self.start_ms = now_ms()
        self.log_fields = {
            "run_id": dispatch.run,
            "step": dispatch.step,
            "attempt": claimed.attempt,
            "fence": claimed.fence,
        }

    async def run(self) -> None:
        if self.workflow is None:
            await self.fail(
                DefinitionError(
                    f"workflow {self.dispatch.wf!r} is not served by worker {self.rt.worker_id} (it serves: "
                    f"{', '.join(self.rt.served)}); every worker reading a queue must serve all workflows "
                    "submitted to it"
                ),
                step=None,
            )
            return
        try:
            step = self.workflow.get_step(self.dispatch.step)
            state = self.workflow.load_state(
                {k: loads(v, what=f"state field {k!r}") for k, v in self.claimed.state.items()}
            )
        except OrchestratorError as exc:  # code changed under a live run, or stored state no longer fits
            await self.fail(exc, step=None)
            return
        ctx = self._context()
        item = InFlight(
            self.token,
            self.queue,
            self.entry_id,
            self.dispatch.run,
            self.claimed.fence,
            ctx,
            step,
            on_lost=lambda reason: self._on_lost(ctx, reason),
        )
        self.rt.table.add(item)
        try:
            await self._run_step(step, ctx, state)
        finally:
            self.rt.table.remove(self.token)

    async def _run_step(self, step: StepDef, ctx: StepContext, state: Any) -> None:
        try:
            self.rt.faults.hit("after_claim", step.name)
            returned = await invoke(step, ctx, state, self.abort, self.rt.loop)
            await self.commit(step, ctx, state, returned)
        except Shutdown:
            log.info("step abandoned at shutdown; the supervisor will re-dispatch it", extra=self.log_fields)
        except (ClaimLost, Released) as exc:
            await self.release(str(exc) or "released")
        except asyncio.CancelledError:
            if not self.abort.done():
                raise
            await self.release("cancelled")
        except Exception as exc:
            await self.fail(exc, step=step)

    def _context(self) -> StepContext:
        rt, d = self.rt, self.dispatch
        snapshot = loads(self.claimed.snapshot, what="stash") if self.claimed.snapshot is not None else None

        def save(raw: str) -> bool:
            call = rt.store.stash(run_id=d.run, token=self.token, idem_key=ctx.idempotency_key, snapshot=raw)
            saved: bool = scripts.execute(rt.sync_redis, [call])[0] == 1
            rt.faults.hit("after_stash", d.step)
            return saved

        async def save_async(raw: str) -> bool:
            call = rt.store.stash(run_id=d.run, token=self.token, idem_key=ctx.idempotency_key, snapshot=raw)
            saved = bool(await rt.batcher.call(call) == 1)
            rt.faults.hit("after_stash", d.step)
            return saved

        ctx = StepContext(
            run_id=d.run,
            workflow=d.wf,
            step=d.step,
            visit=d.visit,
            attempt=self.claimed.attempt,
            fencing_token=self.claimed.fence,
            snapshot=snapshot,
            worker_id=rt.worker_id,
            max_payload_bytes=rt.settings.max_payload_bytes,
            save_stash=save,
            save_stash_async=save_async,
        )
        return ctx

    def _on_lost(self, ctx: StepContext, reason: str) -> None:
        """Called from the heartbeat thread: stop the step, say why."""
        ctx.mark_lost()
        if reason == "stalled":
            exc: BaseException = StepTimeout(
                f"step {self.dispatch.step!r} did not call ctx.heartbeat() within heartbeat_timeout_s"
            )
        else:
            exc = ClaimLost(f"lease lost ({reason})")
        self.abort_with(exc)

    def abort_with(self, exc: BaseException) -> None:
        """Thread-safe: end the wait on the user function with ``exc``."""

        def settle() -> None:
            if not self.abort.done():
                self.abort.set_exception(exc)

        with contextlib.suppress(RuntimeError):
            self.rt.loop.call_soon_threadsafe(settle)

    # -- outcomes -------------------------------------------------------------------------

    def _event(self, **extra: Any) -> str:
        body = {
            "step": self.dispatch.step,
            "visit": self.dispatch.visit,
            "attempt": self.claimed.attempt,
            "fence": self.claimed.fence,
            "worker": self.rt.worker_id,
            "start_ms": self.start_ms,
            "end_ms": now_ms(),
            **extra,
        }
        return dumps(body, what="history event")

    async def commit(self, step: StepDef, ctx: StepContext, state: Any, returned: Any) -> None:
        wf, d = self.workflow, self.dispatch
        assert wf is not None
        where = f"step {d.step!r} of workflow {wf.name!r}"
        outcome = wf.interpret(step, returned)
        merged = wf.merge(state, outcome.update, where=where)
        values = wf.json_fields(merged, outcome.update.keys(), what=f"update from {where}")
        fields = encode_fields(values, what=f"update from {where}", limit=self.rt.settings.max_payload_bytes)
        end_ms = now_ms()
        record = StepRecord(
            step=d.step,
            visit=d.visit,
            attempt=self.claimed.attempt,
            fence=self.claimed.fence,
            worker=self.rt.worker_id,
            start_ms=self.start_ms,
            end_ms=end_ms,
            update=values,
            next=outcome.next_step,
            cost=ctx.cost,
        ).model_dump_json()
        self.rt.faults.hit("before_commit", d.step)
        call = self.rt.store.commit(
            dispatch=d,
            queue=self.queue,
            token=self.token,
            record=record,
            event=self._event(),
            next_step=outcome.next_step,
            duration_ms=end_ms - self.start_ms,
            state=fields,
        )
        if not await self._write(call, "commit"):
            return
        self.rt.faults.hit("after_persist_before_ack", d.step)
        self.rt.ack(self.queue, self.entry_id)

    async def _write(self, call: scripts.Call, what: str) -> bool:
        """Send an outcome; on failure leave the entry pending (the supervisor re-dispatches it)."""
        try:
            result = Outcome.parse(await self.rt.batcher.call(call))
        except (redis.RedisError, OSError) as exc:
            log.error(
                f"{what} failed; the step stays pending for the supervisor",
                extra={**self.log_fields, "error": str(exc)},
            )
            return False
        self._report(what, result)
        return True

    def _report(self, what: str, result: Outcome) -> None:
        fields = {**self.log_fields, "outcome": result.code}
        if result.code in ("OK", "REPLAY") and what == "commit":
            self.rt.count("steps_ok")
            if what == "commit" and result.detail and result.detail[0] == "":
                log.info("run completed", extra=fields)
            else:
                log.debug("step committed", extra=fields)
        elif result.code == "FENCED":
            self.rt.count("fenced")
            log.warning(
                f"{what} refused: this claim was replaced (stale fencing token)",
                extra={**fields, "live_fence": result.detail[0]},
            )
        elif result.code in ("RETRY", "FAILED"):
            self.rt.count("steps_failed" if result.code == "FAILED" else "steps_retried")
            log.log(
                logging.ERROR if result.code == "FAILED" else logging.WARNING,
                "run failed" if result.code == "FAILED" else "step failed; retry scheduled",
                extra=fields,
            )
        else:
            log.info(f"{what} not applied: run is {result.code.lower()}", extra=fields)

    async def fail(self, exc: BaseException, *, step: StepDef | None) -> None:
        failures = self.claimed.errors + 1
        delay_s = step.retry.decide(exc, failures) if step else None
        error = ErrorInfo.from_exception(exc, retryable=delay_s is not None)
        kind = "timeout" if isinstance(exc, StepTimeout) else "error"
        log.log(
            logging.WARNING if delay_s is not None else logging.ERROR,
            "step raised",
            extra={**self.log_fields, "error": f"{error.type}: {error.message}"},
        )
        call = self.rt.store.fail(
            dispatch=self.dispatch,
            queue=self.queue,
            token=self.token,
            event=self._event(error=error.model_dump()),
            kind=kind,
            retry_delay_ms=None if delay_s is None else int(delay_s * 1000),
            error=error.model_dump_json(),
        )
        if await self._write(call, "failure"):
            self.rt.ack(self.queue, self.entry_id)

    async def release(self, reason: str) -> None:
        call = self.rt.store.release(
            run_id=self.dispatch.run, queue=self.queue, token=self.token, event=self._event(detail=reason)
        )
        try:
            result = Outcome.parse(await self.rt.batcher.call(call))
        except (redis.RedisError, OSError):
            return  # the lease lapses; the supervisor re-dispatches
        if result.code == "RELEASED":
            self.rt.count("released")
        log.info("step given back", extra={**self.log_fields, "reason": reason, "outcome": result.code})
        self.rt.ack(self.queue, self.entry_id)
