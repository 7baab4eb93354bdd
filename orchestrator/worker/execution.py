"""The step path of one claimed step: run user code -> interpret -> persist -> ack.

Each stage is its own function. The ack always comes after the outcome is durable in Redis
(commit, fail or release); when the outcome write itself fails, the entry is left pending so
the supervisor re-dispatches it, and the next claim finds out what did or did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from orchestrator import scripts
from orchestrator.codec import Dispatch, ErrorInfo, StepRecord, dumps, encode_fields, loads
from orchestrator.context import ClaimLost, StepContext
from orchestrator.errors import DefinitionError, OrchestratorError
from orchestrator.faults import Faults
from orchestrator.metrics import WorkerMetrics
from orchestrator.settings import Settings
from orchestrator.store import Claimed, Committed, Outcome, Store
from orchestrator.worker.batcher import Batcher
from orchestrator.worker.heartbeat import InFlight, InFlightTable
from orchestrator.worker.usercode import StepThread, StepThreads, as_step_error, guarded
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
    table: InFlightTable
    faults: Faults
    loop: asyncio.AbstractEventLoop
    threads: StepThreads
    metrics: WorkerMetrics
    may_chain: Callable[[], bool]  # may a commit claim its run's next step for this worker?
    start_chained: Callable[[str, str, Dispatch, Claimed], None]  # run a step the commit claimed
    counts: Counter[str] = field(default_factory=Counter)
    acks: dict[str, list[str]] = field(default_factory=dict)

    def count(self, name: str, amount: int = 1) -> None:
        """This worker's own tally, for its logs; the fleet-wide counters are kept by the
        scripts themselves, in the same atomic step as what they count."""
        self.counts[name] += amount

    def ack(self, queue: str, entry_id: str) -> None:
        """Ack after the current loop iteration, together with every other step that finished in it."""
        if not self.acks:
            self.loop.call_soon(self._send_acks)
        self.acks.setdefault(queue, []).append(entry_id)

    def _send_acks(self) -> None:
        acks, self.acks = self.acks, {}
        self.batcher.send_riding([self.store.ack_owned(queue, self.worker_id, ids) for queue, ids in acks.items()])

    def flush(self) -> None:
        """Queue every pending ack now (at shutdown, before the batcher closes)."""
        self._send_acks()


def claim_token(worker_id: str, entry_id: str) -> str:
    return f"{worker_id}:{entry_id}"


def now_ms() -> int:
    return int(time.time() * 1000)


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


class StepExecution:
    """Runs one claimed step to a durable outcome, then acks its stream entry.

    Registered with the heartbeat as soon as it exists (at claim time), so its lease is
    renewed even before its task first gets the event loop.
    """

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
        self.finished = False
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
            except OrchestratorError as exc:  # stored state no longer fits the model
                await self.fail(exc, step=None)
                return
            await self._run_step(self.step, state)
        finally:
            self._done()

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
            self.rt.faults.hit("after_claim", step.name)
            returned = await invoke(step, self.ctx, state, self.abort, self.rt)
            self.item.heartbeat_timeout_s = None  # done running: only the commit is left
            await self.commit(step, self.ctx, state, returned)
        except Shutdown:
            log.info("step abandoned at shutdown; the supervisor will re-dispatch it", extra=self.log_fields)
        except (ClaimLost, Released) as exc:
            await self.release(str(exc) or "released")
        except Exception as exc:
            await self.fail(exc, step=step)

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
            exc = ClaimLost(f"lease lost ({reason})")
        self.abort_with(exc)

    def abort_with(self, exc: BaseException) -> None:
        """Thread-safe: end the wait on the user function with ``exc``."""

        def settle() -> None:
            if not self.abort.done() and not self.finished:
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
        chain = outcome.next_step is not None and self.rt.may_chain()
        call = self.rt.store.commit(
            dispatch=d,
            queue=self.queue,
            token=self.token,
            record=record,
            event=self._event(),
            next_step=outcome.next_step,
            duration_ms=end_ms - self.start_ms,
            cost=ctx.cost,
            state=fields,
            chain_to=self.rt.worker_id if chain else None,
            lease_ms=self.rt.settings.lease_ms,
        )
        result = await self._write(call, "commit")
        if result is None:
            return
        self.rt.faults.hit("after_persist_before_ack", d.step)
        self.rt.ack(self.queue, self.entry_id)
        if result.code in ("OK", "REPLAY") and result.detail:  # REPLAY: resent after a lost reply
            self._start_chained(Committed.parse(result.detail))

    def _start_chained(self, committed: Committed) -> None:
        """Run the next step at once when the commit claimed it for this worker."""
        if committed.chained is None:
            return
        d = self.dispatch
        successor = Dispatch.model_construct(run=d.run, wf=d.wf, step=committed.next_step, visit=committed.visit)
        self.rt.start_chained(self.queue, committed.entry_id, successor, committed.chained)

    async def _write(self, call: scripts.Call, what: str, **fields: Any) -> Outcome | None:
        """Send an outcome and log it; on failure leave the entry pending (the supervisor
        re-dispatches it, and the next claim finds out whether the write happened)."""
        try:
            result = Outcome.parse(await self.rt.batcher.call(call))
        except (redis.RedisError, OSError) as exc:
            log.error(
                f"{what} failed; the step stays pending for the supervisor",
                extra={**self.log_fields, "error": str(exc)},
            )
            return None
        self._report(what, result, {**self.log_fields, **fields, "outcome": result.code})
        return result

    def _observe(self, outcome: str, *, ran: bool = True) -> None:
        """This attempt's outcome in the worker's metrics (and how long it ran user code)."""
        d, m = self.dispatch, self.rt.metrics
        m.attempts.labels(d.wf, d.step, outcome).inc()
        if ran:
            m.duration.labels(d.wf, d.step).observe(max(0, now_ms() - self.start_ms) / 1000)

    def _report(self, what: str, result: Outcome, fields: dict[str, Any]) -> None:
        if result.code in ("OK", "REPLAY") and what == "commit":
            self.rt.count("steps_ok")
            self._observe("ok")
            for unit, amount in self.ctx.cost.items():
                self.rt.metrics.cost.labels(self.dispatch.wf, self.dispatch.step, unit).inc(amount)
            completed = bool(result.detail) and result.detail[0] == ""
            if completed and len(result.detail) >= 5:  # (created ms, finished ms) on the Redis clock
                seconds = max(0, int(result.detail[4]) - int(result.detail[3])) / 1000
                self.rt.metrics.run_duration.labels(self.dispatch.wf).observe(seconds)
            log.log(
                logging.INFO if completed else logging.DEBUG,
                "run completed" if completed else "step committed",
                extra=fields,
            )
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
        else:
            log.info(f"{what} not applied: run is {result.code.lower()}", extra=fields)

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
        written = await self._write(call, "failure", error=f"{error.type}: {error.message}", kind=kind, **retry_in)
        if written is not None:
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
            self._observe("released")
        log.info("step given back", extra={**self.log_fields, "reason": reason, "outcome": result.code})
        self.rt.ack(self.queue, self.entry_id)
