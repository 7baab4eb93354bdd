"""The worker side of a bridged step: enqueue its RQ job, then watch it to a durable outcome.

The worker keeps the claim (its heartbeat keeps the lease, as for any step it runs) and hands
the step to RQ as a job whose id is derived from the idempotency key and the fence, so a second
enqueue of the same claim is a no-op. The work-horse writes the outcome itself
(orchestrator.bridge.horse). The watch reads, every poll, RQ's job status and the horse's beat
key, and decides what an outcome-less end means:

- the horse stopped beating while RQ says the job runs (kill -9 of the horse or of the machine),
  RQ lost the job after it started, or someone stopped it: a **crash** of the step. The worker gives the claim up
  with redispatch.lua, so the next claim counts the crash (and quarantines the step after
  ``max_crashes``), as if the worker itself had died.
- RQ lost the job before it started (a restore of an older copy): nothing ran, so the claim is
  handed back (``release``), not counted as a crash.
- the job ended without an outcome after running ``timeout_s`` or more: a **timeout**, retried
  per the step's policy. A horse that outlives RQ's alarm (a hang in C code, a blocked signal)
  is sent RQ's stop command a lease past its timeout (RQ's own backstop waits a minute).
- the job failed before the step ran (the horse could not start: an RQ worker without our
  package, say): an **error** of the step carrying RQ's reason.

Whatever the watch decides, a late write of the horse is refused: its token no longer holds
the claim.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import redis

from orchestrator import scripts
from orchestrator.bridge.executor import JOB_FUNCTION, RQ, BridgedTask, job_id
from orchestrator.errors import DefinitionError
from orchestrator.store import Outcome
from orchestrator.worker.runtime import Shutdown, StepTimeout

if TYPE_CHECKING:
    from orchestrator.worker.execution import StepExecution
    from orchestrator.workflow import StepDef

log = logging.getLogger("orchestrator.worker")

POLL_MIN_S, POLL_MAX_S = 0.02, 0.25  # the watch polls fast at first, then settles
WAITING = frozenset({"queued", "deferred", "scheduled", "created"})
ENDED = frozenset({"finished", "failed", "stopped", "canceled"})


class RQJobFailed(Exception):
    """The RQ job of a bridged step failed before the step could record an outcome."""


class Watch:
    """One bridged attempt, from enqueue to outcome."""

    def __init__(self, ex: StepExecution, step: StepDef, executor: RQ) -> None:
        self.ex = ex
        self.step = step
        self.executor = executor
        rt = ex.rt
        assert rt.rq_redis is not None, "the worker makes RQ's client when it serves a bridged step"
        self.conn: redis.Redis = rt.rq_redis
        self.job_id = job_id(rt.settings.namespace, ex.ctx.idempotency_key, ex.claimed.fence)
        self.horse_key = rt.store.keys.horse(ex.dispatch.run, self.job_id)
        self.fields = {**ex.log_fields, "rq_queue": executor.queue, "rq_job": self.job_id}
        ex.event_extra = {"executor": "rq", "rq_job": self.job_id}  # an outcome the worker writes says so too
        self.started = False  # RQ said the job started, or its horse beat: some code of the step may have run
        self.horse_seen = False
        self.alive_s = 0.0  # how long after RQ started the job its horse was last seen beating
        self.stop_sent_at: float | None = None  # when the watch sent RQ's stop for a horse past its time

    async def run(self) -> None:
        await asyncio.to_thread(self._enqueue)
        await self._watch()

    # -- enqueue --------------------------------------------------------------------------

    def _task(self) -> BridgedTask:
        ex, rt, d = self.ex, self.ex.rt, self.ex.dispatch
        module = self.step.fn.__module__
        if module == "__main__":
            raise DefinitionError(
                f"step {d.step!r} of workflow {d.wf!r} runs on RQ but is defined in __main__, which an RQ "
                "worker cannot import: define the workflow in a module"
            )
        s = rt.settings
        return BridgedTask(
            namespace=s.namespace, partitions=s.partitions, module=module, run=d.run, wf=d.wf, step=d.step,
            visit=d.visit, queue=ex.queue, entry_id="" if ex.superseded else ex.entry_id, token=ex.token,
            fence=ex.claimed.fence, attempt=ex.claimed.attempt, errors=ex.claimed.errors, worker=rt.worker_id,
            start_ms=ex.start_ms, lease_ms=s.lease_ms, result_ttl_ms=self.executor.result_ttl_s * 1000,
            max_payload_bytes=s.max_payload_bytes, max_run_steps=s.max_run_steps, max_map_items=s.max_map_items,
        )  # fmt: skip

    def _enqueue(self) -> None:
        d, fence = self.ex.dispatch, self.ex.claimed.fence
        enqueued = enqueue(
            self.conn,
            self.executor,
            self.job_id,
            self._task(),
            description=f"orchestrator {d.wf}.{d.step} of run {d.run} (attempt {self.ex.claimed.attempt})",
            meta={"run": d.run, "workflow": d.wf, "step": d.step, "fence": fence},
            # a step whose last attempt crashed waited a lease already: it goes ahead of the jobs waiting
            at_front=self.ex.claimed.crashed_now,
        )
        log.info("bridged step enqueued on RQ" if enqueued else "bridged step's RQ job was there", extra=self.fields)

    # -- watch ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        ex = self.ex
        lease_s = ex.rt.settings.lease_s
        delay = POLL_MIN_S
        started_at: float | None = None
        while True:
            read = await self._read()
            if read is None:  # no news this time: wait, the claim's lease is the worker's
                await asyncio.sleep(POLL_MAX_S)
                continue
            status, rq_worker, horse = read
            if horse is not None and "outcome" in horse:
                self._written(horse)
                return
            now = time.monotonic()
            if rq_worker:
                self.fields["rq_worker"] = self.ex.event_extra["rq_worker"] = rq_worker
            if status == "started" and started_at is None:
                started_at = now
            ran_s = 0.0 if started_at is None else now - started_at
            self.started = self.started or started_at is not None or horse is not None
            if horse is not None:
                self.horse_seen, self.alive_s = True, ran_s
            if status is None or status in ENDED:
                await self._ended(status)
                return
            if status == "started" and horse is None and (self.horse_seen or ran_s > lease_s):
                await self._no_outcome(f"its RQ work-horse stopped beating (RQ worker {rq_worker or '?'})")
                return
            await self._overrun(ran_s, now)
            done, _ = await asyncio.wait({ex.abort}, timeout=delay)
            if done:
                await self._aborted()
            delay = min(POLL_MAX_S, delay * 1.5)

    async def _overrun(self, ran_s: float, now: float) -> None:
        """A horse that outlived RQ's alarm (a hang in C code, a blocked signal) is sent RQ's
        stop a lease past its time, not at RQ's own backstop a minute later; raises a timeout
        when RQ does not act on it within two leases."""
        lease_s = self.ex.rt.settings.lease_s
        if ran_s > self.executor.timeout_s + max(1.0, lease_s) and self.stop_sent_at is None:
            log.warning("bridged step past its RQ timeout; stopping its work-horse", extra=self.fields)
            await asyncio.to_thread(self._stop_job)
            self.stop_sent_at = now
        if self.stop_sent_at is not None and now - self.stop_sent_at > 2 * lease_s:
            raise StepTimeout(f"step {self.ex.dispatch.step!r} ran past its RQ job timeout and RQ did not stop it")

    async def _read(self) -> tuple[str | None, str, dict[str, Any] | None] | None:
        """RQ's status of the job, the RQ worker running it, the horse's beat (or outcome);
        None when Redis did not answer."""
        from rq.job import Job

        job, beat = await self.ex.rt.batcher.call_many(
            [
                scripts.command("HMGET", Job.key_for(self.job_id), "status", "worker_name"),
                scripts.command("GET", self.horse_key),
            ]
        )
        for reply in (job, beat):
            if isinstance(reply, BaseException):
                log.warning("bridged step: RQ job not read", extra={**self.fields, "error": str(reply)})
                return None
        return job[0], job[1] or "", json.loads(beat) if beat is not None else None

    async def _aborted(self) -> None:
        """The attempt is given up (cancel, deadline, lost claim, shutdown): stop the horse
        unless the worker is only stopping (the supervisor re-dispatches; a horse that commits
        first saves the work), then raise the reason."""
        reason = self.ex.abort.exception()
        if not isinstance(reason, Shutdown):
            await asyncio.to_thread(self._stop_job)
        self.ex.abort.result()

    # -- outcomes -------------------------------------------------------------------------

    def _written(self, horse: dict[str, Any]) -> None:
        """The horse wrote the outcome (commit or failure): count it, ack what is ours to ack."""
        ex = self.ex
        code = str(horse["outcome"])
        ex.ctx.cost = dict(horse.get("cost") or {})
        result = Outcome(code)
        what = "commit" if code in ("OK", "REPLAY") else "failure"
        ex._report(what, result, {**self.fields, "outcome": code, "kind": horse.get("kind", "error")})
        if code not in ("OK", "REPLAY"):  # a commit acked its entry itself
            ex._ack(result)

    async def _ended(self, status: str | None) -> None:
        """RQ's job ended (or vanished) without an outcome in the horse's key."""
        await asyncio.sleep(POLL_MIN_S)  # the horse writes its outcome before RQ files the job
        read = await self._read()
        horse = read[2] if read is not None else None
        if horse is not None and "outcome" in horse:
            self._written(horse)
            return
        if status is None and not self.started:
            # lost from RQ's queue before any RQ worker took it (a restore of an older copy, a
            # flush): nothing of the step ran, so it is handed back, not counted as a crash
            if not await self._settled():
                await self.ex.release("RQ lost its job before an RQ worker took it")
            return
        if status is None:
            await self._no_outcome("RQ lost its job")
            return
        reason = await asyncio.to_thread(self._failure)
        if status in ("stopped", "canceled") or "terminated unexpectedly" in reason:
            await self._no_outcome(f"its RQ job was {status}: {reason}".rstrip(": "))
            return
        if await self._settled():
            return
        raise RQJobFailed(f"RQ job {self.job_id} {status} before the step recorded an outcome: {reason}")

    async def _settled(self) -> bool:
        """Whether the horse wrote an outcome that its key does not show (it died between the
        two writes), or the claim is not this attempt's any more; acks what is ours to ack."""
        ex, rt = self.ex, self.ex.rt
        rk = rt.store.keys.run(ex.dispatch.run)
        run, record = await rt.batcher.call_many(
            [
                scripts.command("HMGET", rk.run, "claim", "done_claim"),
                scripts.command("HGET", rk.results, ex.ctx.idempotency_key),
            ]
        )
        for reply in (run, record):
            if isinstance(reply, BaseException):
                raise reply
        claim, done_claim = run
        if record is not None and json.loads(record).get("fence") == ex.claimed.fence:
            log.info("bridged step committed; its work-horse stopped before it said so", extra=self.fields)
            return True  # the commit acked the entry
        if done_claim == ex.token:
            log.info("bridged step's failure recorded; its work-horse stopped before it said so", extra=self.fields)
            ex._ack(Outcome("RETRY"))
            return True
        if claim != ex.token:
            log.info("bridged step's claim was taken over meanwhile", extra=self.fields)
            return True  # the entry is the supervisor's (or the new claim's) now
        return False

    async def _no_outcome(self, why: str) -> None:
        """The horse stopped without an outcome: a timeout when it was stopped for its time (by
        the watch, or by RQ after the horse had beaten for its whole ``timeout_s``), else a
        crash: the claim is given up, the next claim counts the crash (quarantine after
        ``max_crashes``) and runs the step again from its last stash."""
        ex, rt = self.ex, self.ex.rt
        if await self._settled():
            return
        if timed_out(self.alive_s, self.stop_sent_at is not None, self.executor.timeout_s):
            limit = self.executor.timeout_s
            raise StepTimeout(f"step {ex.dispatch.step!r} exceeded its RQ job timeout (timeout_s={limit}): {why}")
        call = rt.store.redispatch(
            queue=ex.queue, entry_id=ex.entry_id, consumer=rt.worker_id, dispatch=ex.dispatch, giver=rt.worker_id,
            why=f"RQ job {self.job_id} stopped without an outcome: {why}",
        )  # fmt: skip
        reply = await ex._send(call, "re-dispatch", quiet=True)
        log.warning(
            f"bridged step crashed: {why}; re-dispatched",
            extra={**self.fields, "outcome": reply.code if reply else "unknown"},
        )

    def _failure(self) -> str:
        """RQ's last line about the job's failure ('' when it kept none)."""
        from rq.job import Job

        try:
            result = Job.fetch(self.job_id, connection=self.conn, serializer=_serializer()).latest_result()
        except Exception:  # a reason is a nicety; the outcome does not depend on it
            return ""
        lines = (result.exc_string or "").strip().splitlines() if result is not None else []
        return lines[-1] if lines else ""

    def _stop_job(self) -> None:
        """Best effort: stop the horse (or drop the job from RQ's queue) of an attempt given up."""
        from rq.command import send_stop_job_command
        from rq.job import Job

        try:
            job = Job.fetch(self.job_id, connection=self.conn, serializer=_serializer())
            if job.get_status() == "started":
                send_stop_job_command(self.conn, self.job_id, serializer=_serializer())
            elif job.get_status() in WAITING:
                job.cancel()
        except Exception as exc:  # the horse's late writes are refused anyway
            log.info("RQ job not stopped", extra={**self.fields, "error": str(exc)})


def enqueue(
    conn: redis.Redis,
    executor: RQ,
    rq_job_id: str,
    task: BridgedTask,
    *,
    description: str,
    meta: dict[str, Any],
    at_front: bool = False,
) -> bool:
    """Enqueue the RQ job of one claim unless it exists (a resend after a lost reply, or the
    worker's own retry): one claim, one job (RQ's ``unique=True`` checks and saves in one Lua
    script). False when it was there already."""
    from rq import Queue
    from rq.exceptions import DuplicateJobError

    try:
        Queue(executor.queue, connection=conn, serializer=_serializer()).enqueue_call(
            JOB_FUNCTION,
            args=(task.model_dump(),),
            timeout=executor.job_timeout,
            result_ttl=executor.result_ttl_s,
            failure_ttl=executor.result_ttl_s,
            description=description,
            job_id=rq_job_id,
            meta={"orchestrator": meta},
            at_front=at_front,
            unique=True,
        )
    except DuplicateJobError:
        return False
    return True


def timed_out(alive_s: float, stopped_for_time: bool, timeout_s: float) -> bool:
    """Whether a horse that stopped without an outcome ran out of time (else it crashed): the
    watch stopped it for its time, or it was still beating ``timeout_s`` after RQ started it.
    How long after the start its end was *noticed* does not count: a horse killed a second
    before its timeout and noticed a lease later crashed."""
    return stopped_for_time or alive_s >= timeout_s


def _serializer() -> Any:
    from rq.serializers import JSONSerializer

    return JSONSerializer


async def run_on_rq(ex: StepExecution, step: StepDef, executor: RQ) -> None:
    """Run ``step`` of the claimed attempt ``ex`` on RQ; returns once its outcome is durable
    (or the claim given up), raises what the attempt should fail or stop with."""
    ex.item.heartbeat_timeout_s = None  # the horse's beat shows its progress
    await Watch(ex, step, executor).run()
