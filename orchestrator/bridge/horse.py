"""The RQ side of a bridged step: what an RQ work-horse runs for it (``run_step``).

The horse runs the step's code and writes its outcome itself, through the same scripts as our
workers (commit.lua, fail.lua) under the claim's token: the token is the only thing that lets
its writes in, so a horse whose claim was replaced (its run re-dispatched, cancelled, timed
out) is refused (``FENCED``) like any stale attempt, and a commit happens at most once per
step visit. While it runs, the horse beats on its own key (``Keys.horse``); the worker that
holds the claim watches that beat and RQ's job status, and turns a horse that stopped without
an outcome into a crash or a timeout of the step (orchestrator.bridge.watch).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any, cast

import redis
import rq
from rq.timeouts import JobTimeoutException

from orchestrator import scripts
from orchestrator.bridge.connection import decoded_client
from orchestrator.bridge.executor import BridgedTask
from orchestrator.children import submit_calls
from orchestrator.codec import Dispatch, ErrorInfo, loads
from orchestrator.connection import REDIS_FAILURES, outcome_unknown_or_passing
from orchestrator.context import StepContext
from orchestrator.errors import DefinitionError, OrchestratorError, ValidationError
from orchestrator.faults import Faults, arm
from orchestrator.keys import Keys
from orchestrator.output import Emitter
from orchestrator.ratelimit import Spender
from orchestrator.settings import Settings
from orchestrator.store import Outcome, Store
from orchestrator.worker.plan import Attempt, plan_commit
from orchestrator.worker.runtime import StepTimeout, now_ms
from orchestrator.worker.usercode import as_step_error, guarded
from orchestrator.workflow import StepDef, Workflow, defined

log = logging.getLogger("orchestrator.bridge")

RESEND_FOR_S = 30.0  # as a worker resends an outcome whose reply was lost


class StepFailedOnRQ(Exception):
    """Raised to RQ after the step's failure is recorded on the run, so that RQ files the job
    as failed (``rq info``, the failed registry) like any job that raised."""


class Horse:
    """One bridged step in one RQ work-horse."""

    def __init__(self, task: BridgedTask, client: redis.Redis, job: rq.job.Job | None) -> None:
        self.task = task
        self.client = client
        self.job_id = job.id if job is not None else ""
        self.rq_worker = (job.worker_name or "") if job is not None else ""
        self.keys = Keys(task.namespace, task.partitions)
        self.store = Store(self.keys)
        self.key = self.keys.horse(task.run, self.job_id)
        self.dispatch = Dispatch.model_construct(run=task.run, wf=task.wf, step=task.step, visit=task.visit)
        self.who = Attempt(self.dispatch, task.attempt, task.fence, task.worker, task.start_ms)
        self.settings = Settings()  # the RQ worker's environment: its fault points, the output cap
        self.faults = Faults(self.settings.faults)
        arm(self.faults)
        self.stop_beating = threading.Event()
        self.kind = "ok"  # of the outcome: ok, error, timeout (the worker's metrics label it)
        self.cost: dict[str, float] = {}  # what the step reported with ctx.cost
        self.seen = {"pid": os.getpid(), "host": socket.gethostname(), "rq_worker": self.rq_worker, "job": self.job_id}

    # -- the horse's beat -----------------------------------------------------------------

    def _beat(self, extra: dict[str, Any] | None = None, ttl_ms: int | None = None) -> None:
        body = json.dumps({**self.seen, "beat_ms": now_ms(), **(extra or {})})
        self.client.set(self.key, body, px=ttl_ms or self.task.lease_ms)  # 3 beats: gone a lease after the last

    def _keep_beating(self) -> None:
        interval = self.task.lease_ms / 3000
        while not self.stop_beating.wait(interval):
            try:
                self._beat()
            except REDIS_FAILURES as exc:  # the watcher waits a whole lease before it gives up
                log.warning("work-horse beat failed", extra={"run_id": self.task.run, "error": str(exc)})

    # -- the step -------------------------------------------------------------------------

    def run(self) -> str:
        """Run the step and write its outcome; returns the outcome's code."""
        self._beat()
        beat = threading.Thread(target=self._keep_beating, name="orchestrator-horse-beat", daemon=True)
        beat.start()
        try:
            code, raise_after = self._run()
        finally:
            self.stop_beating.set()
            beat.join()  # no beat may land after the outcome below
        self._beat({"outcome": code, "kind": self.kind, "cost": self.cost}, ttl_ms=self.task.result_ttl_ms)
        if raise_after is not None:
            raise raise_after
        return code

    def _run(self) -> tuple[str, BaseException | None]:
        t = self.task
        claim = self.client.hget(self.keys.run(t.run).run, "claim")
        if claim != t.token:  # the claim was replaced while the job waited in RQ's queue
            log.warning("bridged step not run: its claim was replaced", extra={"run_id": t.run, "step": t.step})
            return "FENCED", None
        try:
            wf, step = self._lookup()
            state, ctx = self._load(wf)
        except OrchestratorError as exc:  # code the RQ worker cannot import, or state it cannot load
            return self._fail(exc, None)
        self.faults.hit("after_claim", t.step)
        try:
            returned = asyncio.run(guarded(step.fn(ctx, state))) if step.is_async else step.fn(ctx, state)
        except JobTimeoutException as exc:  # RQ's alarm: the step ran past RQ(timeout_s=...)
            ctx.mark_lost()
            timeout = StepTimeout(f"step {t.step!r} exceeded its RQ job timeout ({exc})")
            code, _ = self._fail(timeout, step)
            return code, exc
        except BaseException as exc:  # every outcome of user code is recorded
            return self._fail(as_step_error(exc), step)
        finally:
            self.cost = dict(ctx.cost)
        return self._commit(wf, step, state, ctx, returned), None

    def _lookup(self) -> tuple[Workflow[Any], StepDef]:
        t = self.task
        try:
            importlib.import_module(t.module)
        except Exception as exc:
            raise DefinitionError(
                f"RQ worker {self.rq_worker or '?'} cannot import module {t.module!r} of workflow {t.wf!r} "
                f"({type(exc).__name__}: {exc}): start it where that module is importable"
            ) from exc
        wf = defined(t.wf)
        if wf is None:
            raise DefinitionError(f"module {t.module!r} does not define workflow {t.wf!r}")
        return wf, wf.get_step(t.step)

    def _load(self, wf: Workflow[Any]) -> tuple[Any, StepContext]:
        t, rk = self.task, self.keys.run(self.task.run)
        raw_state = cast(dict[str, str], self.client.hgetall(rk.state))
        state = wf.load_state({k: loads(v, what=f"state field {k!r}") for k, v in raw_state.items()})
        direct = cast(Any, _Direct(self.client))

        def save(raw: str) -> bool:
            call = self.store.stash(run_id=t.run, token=t.token, idem_key=ctx.idempotency_key, snapshot=raw)
            saved = bool(scripts.execute(self.client, [call])[0] == 1)
            self.faults.hit("after_stash", t.step)
            return saved

        async def save_async(raw: str) -> bool:
            return save(raw)

        ctx = StepContext(
            run_id=t.run,
            workflow=t.wf,
            step=t.step,
            visit=t.visit,
            attempt=t.attempt,
            fencing_token=t.fence,
            snapshot=None,
            worker_id=t.worker,
            max_payload_bytes=t.max_payload_bytes,
            save_stash=save,
            save_stash_async=save_async,
            emitter=Emitter(self.client, direct, self.keys, self.settings.max_output_entries),
            spender=Spender(self.client, direct, self.store, {wf.name: wf.rate_limits}),
        )
        snapshot = cast(str | None, self.client.hget(rk.stash, ctx.idempotency_key))
        if snapshot is not None:
            ctx.snapshot = loads(snapshot, what="stash")
        return state, ctx

    # -- outcomes -------------------------------------------------------------------------

    def _event(self, **extra: Any) -> str:
        return self.who.event(now_ms(), executor="rq", rq_job=self.job_id, rq_worker=self.rq_worker, **extra)

    def _commit(self, wf: Workflow[Any], step: StepDef, state: Any, ctx: StepContext, returned: Any) -> str:
        t = self.task
        try:
            plan = plan_commit(
                wf, step, state, returned, ctx, self.who, end_ms=now_ms(),
                max_payload_bytes=t.max_payload_bytes, max_map_items=t.max_map_items,
            )  # fmt: skip
        except OrchestratorError as exc:  # a return value the workflow cannot take
            return self._fail(exc, step)[0]
        self.faults.hit("before_commit", t.step)
        call = plan.call(
            self.store, self.dispatch, queue=t.queue, token=t.token, event=self._event(),
            max_steps=t.max_run_steps, entry_id=t.entry_id,
        )  # fmt: skip
        try:
            result = self._send(call)
        except redis.ResponseError as exc:
            return self._fail(ValidationError(f"Redis refused the commit of step {t.step!r}: {exc}"), None)[0]
        if result.code == "INVALID":
            return self._fail(ValidationError(f"the commit of step {t.step!r} was refused: {result.detail}"), None)[0]
        self.faults.hit("after_persist_before_ack", t.step)
        if plan.spec is not None and result.code in ("OK", "REPLAY"):
            self._start_children(plan.first_children)
        log.info("bridged step committed", extra={"run_id": t.run, "step": t.step, "outcome": result.code})
        return result.code

    def _start_children(self, specs: list[dict[str, Any]]) -> None:
        """Submit the children the commit parked the run for; the supervisor submits the ones
        this does not get through (as for a worker's commit)."""
        self.faults.hit("before_children", self.task.step)
        calls = submit_calls(self.store, specs, self.task.run, self.task.queue)
        try:
            scripts.execute(self.client, calls)
        except REDIS_FAILURES as exc:
            log.warning("child runs not started; the supervisor starts them", extra={"error": str(exc)})

    def _fail(self, exc: BaseException, step: StepDef | None) -> tuple[str, BaseException | None]:
        t = self.task
        delay_s = step.retry.decide(exc, t.errors + 1) if step else None
        error = ErrorInfo.from_exception(exc, retryable=delay_s is not None)
        kind = self.kind = "timeout" if isinstance(exc, StepTimeout) else "error"
        call = self.store.fail(
            dispatch=self.dispatch,
            queue=t.queue,
            token=t.token,
            event=self._event(error=error.model_dump()),
            kind=kind,
            retry_delay_ms=None if delay_s is None else int(delay_s * 1000),
            error=error.model_dump_json(),
        )
        result = self._send(call)
        log.warning("bridged step failed", extra={"run_id": t.run, "step": t.step, "outcome": result.code})
        return result.code, StepFailedOnRQ(f"{error.type}: {error.message} (run {t.run}: {result.code})")

    def _send(self, call: scripts.Call) -> Outcome:
        """Send an outcome, again while its fate is unknown (every outcome script recognises
        its own earlier run: ``REPLAY``)."""
        deadline = time.monotonic() + RESEND_FOR_S
        delay_s = 0.05
        while True:
            try:
                return Outcome.parse(scripts.execute(self.client, [call])[0])
            except REDIS_FAILURES as exc:
                if not outcome_unknown_or_passing(exc) or time.monotonic() + delay_s > deadline:
                    raise
                time.sleep(delay_s)
                delay_s = min(2.0, delay_s * 2)


class _Direct:
    """What a work-horse gives ``ctx.emit``/``ctx.spend`` of an async step instead of a worker's
    batcher: one step, one process, so each call goes straight to Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    async def call(self, call: scripts.Call) -> Any:
        return scripts.execute(self.client, [call])[0]


def run_step(task: dict[str, Any]) -> str:
    """The function an RQ job of a bridged step calls (``orchestrator.bridge.horse.run_step``),
    with the task as JSON. Returns the outcome's code: ``OK`` (committed), ``RETRY``/``FAILED``
    (raised instead, after the failure is recorded), ``FENCED`` (the claim was replaced)."""
    try:
        bridged = BridgedTask.model_validate(task)
    except Exception as exc:
        raise ValidationError(f"RQ job argument is not a bridged step's task: {exc}") from exc
    job = rq.get_current_job()
    client = decoded_client(job.connection) if job is not None else _settings_client()
    try:
        return Horse(bridged, client, job).run()
    finally:  # a SimpleWorker runs every job in one process: a pool per job must not pile up
        client.close()
        client.connection_pool.disconnect()


def _settings_client() -> redis.Redis:
    from orchestrator.connection import connect

    return connect(Settings().plain_url())
