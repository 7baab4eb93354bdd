"""``Client``: submit runs and inspect, wait for, cancel or retry them.

Submitting is idempotent by run id: the submit script creates the run only if the id is
free, in one atomic step, so concurrent submits of one id (threads, processes, a retry after
a lost reply) all end up with the same single run.

Every method raises errors of the ``OrchestratorError`` tree only: a Redis that cannot be
reached is :class:`~orchestrator.errors.RedisUnavailable` (retryable: every call is safe to
repeat), a refused password or permission :class:`~orchestrator.errors.RedisRefused`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

import pydantic
import redis
from pydantic import BaseModel

from orchestrator import scripts
from orchestrator.children import cancel_children, unfinished_children
from orchestrator.codec import HistoryEvent, StepRecord, describe_validation_error, dumps, encode_fields, loads
from orchestrator.connection import REDIS_FAILURES, close, connect, redis_failure
from orchestrator.counters import read_counters
from orchestrator.errors import (
    InvalidTransition,
    OrchestratorError,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunNotFound,
    ValidationError,
)
from orchestrator.keys import RUN_ID_PATTERN, Keys
from orchestrator.layout import check_layout
from orchestrator.output import OutputEvent, follow_output, read_output
from orchestrator.priority import Priority, lane
from orchestrator.retention import Purged, purge_finished
from orchestrator.runs import STATUSES, TERMINAL, RunHistory, RunInfo, SignalSent, group_attempts
from orchestrator.settings import Settings
from orchestrator.store import FINISHED_IN, Outcome, Store
from orchestrator.why import Why, explain
from orchestrator.workflow import FreeState, Workflow, defined

if TYPE_CHECKING:
    from orchestrator.bridge.callback import OnFinish

S = TypeVar("S", bound=BaseModel)
P = ParamSpec("P")
R = TypeVar("R")
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled", "quarantined"})
MAX_REASON_CHARS = 1000


class _HasSettings(Protocol):
    @property
    def settings(self) -> Settings: ...

    def _check_layout(self, *, record: bool) -> None: ...


H = TypeVar("H", bound=_HasSettings)


def translate(exc: Exception, settings: Settings) -> Exception:
    """The error of our tree for what redis-py or pydantic raised inside a client call."""
    if isinstance(exc, pydantic.ValidationError):  # a stored record that does not parse
        return ValidationError(describe_validation_error(exc, what="a record read from Redis"))
    if isinstance(exc, REDIS_FAILURES):
        return redis_failure(exc, settings.plain_url() if settings.redis_url else "")
    return exc


def _tree_errors(method: Callable[Concatenate[H, P], R]) -> Callable[Concatenate[H, P], R]:
    """Raise only errors of the ``OrchestratorError`` tree from ``method``."""

    @functools.wraps(method)
    def wrapper(self: H, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            self._check_layout(record=False)
            return method(self, *args, **kwargs)
        except OrchestratorError:
            raise  # ours already (WaitTimeout is also a TimeoutError, hence an OSError)
        except (*REDIS_FAILURES, pydantic.ValidationError) as exc:
            raise translate(exc, self.settings) from exc

    return wrapper


MAX_DEADLINE_S = 10 * 366 * 24 * 3600.0


def deadline_to_ms(deadline_s: float | None) -> int | None:
    """A submit's ``deadline_s`` in whole ms (rounded up), checked: a positive finite number of
    seconds, ten years at most."""
    if deadline_s is None:
        return None
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, int | float) or not 0 < deadline_s <= MAX_DEADLINE_S:
        raise ValidationError(
            f"deadline_s {deadline_s!r} is invalid: expected a number of seconds above 0 and at most "
            f"{MAX_DEADLINE_S:.0f} (ten years)"
        )
    return math.ceil(deadline_s * 1000)


class Client:
    """Synchronous client for one Redis deployment and namespace. Thread-safe.

    Raises only errors of the ``OrchestratorError`` tree (see the module docstring).
    """

    def __init__(self, settings: Settings | None = None, *, redis_client: redis.Redis | None = None) -> None:
        self.settings = settings or Settings()
        self.keys = Keys(self.settings.namespace, self.settings.partitions)
        if redis_client is None:
            redis_client = connect(self.settings.plain_url(), probe=self.keys.cluster_probe)
        self.redis = redis_client
        self.store = Store(self.keys)
        self._layout_checked = False

    def _check_layout(self, *, record: bool) -> None:
        """Once per client: the namespace's partition count must be ours (``layout``)."""
        if not self._layout_checked:
            self._layout_checked = check_layout(self.redis, self.store, record=record) is not None

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> Client:
        return cls(Settings(redis_url=url, **settings))

    def close(self) -> None:
        close(self.redis)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.settings.redacted_url!r}, namespace={self.settings.namespace!r})"

    # -- submit ---------------------------------------------------------------------------

    @_tree_errors
    def submit(
        self,
        workflow: Workflow[S],
        input: Any = None,
        *,
        run_id: str | None = None,
        deadline_s: float | None = None,
        priority: Priority = "normal",
        on_finish: OnFinish | Mapping[str, object] | None = None,
    ) -> Run[S]:
        """Start a run of ``workflow`` with ``input``, or return the existing run with this id.

        ``deadline_s``: the run fails with ``DeadlineExceeded`` if it has not finished that long
        after this submit (on the Redis clock; a running step is stopped at its next heartbeat,
        a sleeping or backing-off run at once). Kept from the first submit of a run id.
        ``priority`` (``high``, ``normal``, ``low``): workers start higher levels first, each level
        its share (orchestrator.priority); the run's map items and its children on its queue
        run at its level. Kept from the first submit of a run id.
        ``on_finish`` (an ``orchestrator.bridge.callback.OnFinish``, or a dict of its fields):
        an RQ job to enqueue once the run finishes, whatever its status (the supervisor's relay
        does). Kept from the first submit of a run id; refused on a Redis Cluster (RQ does not
        support it).
        Raises :class:`ValidationError` (naming the field) for invalid input, run id, deadline
        or callback, and :class:`RunConflict` when the id belongs to a run of another workflow
        or input.
        """
        deadline_ms = deadline_to_ms(deadline_s)
        callback = None
        if on_finish is not None:
            from orchestrator.bridge.callback import stored  # here: the bridge imports this module

            callback = stored(on_finish, self.redis)
        queue = lane(workflow.queue, priority)
        self._check_layout(record=True)  # the namespace's first submit records its partition count
        run_id = run_id or uuid.uuid4().hex
        if not RUN_ID_PATTERN.match(run_id):
            raise ValidationError(
                f"run_id {run_id!r} is invalid: expected 1-200 characters of A-Z a-z 0-9 _ . : @ + = / -"
            )
        fields, digest = workflow.encode_input(input, limit=self.settings.max_payload_bytes)
        call = self.store.submit(
            run_id=run_id,
            workflow=workflow.name,
            queue=queue,
            first_step=workflow.first_step,
            input_sha=digest,
            event=dumps({"detail": f"workflow {workflow.name}"}, what="event"),
            request_id=uuid.uuid4().hex,
            state=fields,
            deadline_ms=deadline_ms,
            step_deadlines=workflow.step_deadlines_ms(),
            on_finish=callback,
        )
        created, *rest = scripts.execute(self.redis, [call, scripts.command("SADD", self.keys.queues, queue)])[0]
        if not created:
            existing_wf, existing_digest, _status = rest
            if existing_wf != workflow.name or existing_digest != digest:
                raise RunConflict(
                    f"run {run_id!r} already exists with workflow {existing_wf!r} and a "
                    f"{'different' if existing_digest != digest else 'matching'} input; "
                    "use another run_id or fetch the existing run with client.run()",
                    run_id=run_id,
                )
        return Run(self, run_id, workflow, created=bool(created))

    # -- reading --------------------------------------------------------------------------

    @_tree_errors
    def run(self, run_id: str, workflow: Workflow[S] | None = None) -> Run[Any]:
        """A handle on an existing run (``workflow`` lets ``wait()`` return its state model)."""
        self.get(run_id)
        return Run(self, run_id, workflow, created=False)

    @_tree_errors
    def get(self, run_id: str) -> RunInfo:
        keys = self.keys.run(run_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.run)
        pipe.hgetall(keys.signals)
        pipe.hgetall(keys.children)
        h, signals, children = pipe.execute()
        if not h:
            raise self._not_found(run_id)
        return RunInfo.from_hash(run_id, h, signals, children)

    def _not_found(self, run_id: str) -> RunNotFound:
        return RunNotFound(f"no run {run_id!r} in namespace {self.settings.namespace!r}", run_id=run_id)

    @_tree_errors
    def why(self, run_id: str) -> Why:
        """What the run waits for right now (queue, worker, recovery, sleep, backoff), or how
        it ended, as one paragraph (``Why.text``) with a code and figures."""
        found = explain(self.redis, self.keys, run_id, self.settings.reclaim_interval_s)
        if found is None:
            raise self._not_found(run_id)
        return found

    @_tree_errors
    def state(self, run_id: str, workflow: Workflow[S] | None = None) -> Any:
        """The run's current state: a model instance with ``workflow``, else a plain dict.

        A workflow declared without a state model also gets a plain dict.
        """
        raw: dict[str, str] = self.redis.hgetall(self.keys.run(run_id).state)  # type: ignore[assignment]
        fields = {k: loads(v, what=f"state field {k!r} of run {run_id!r}") for k, v in raw.items()}
        if workflow is None or workflow.state is FreeState:
            return fields
        return workflow.load_state(fields)

    @_tree_errors
    def results(self, run_id: str) -> dict[str, StepRecord]:
        """Persisted step records by idempotency key."""
        raw: dict[str, str] = self.redis.hgetall(self.keys.run(run_id).results)  # type: ignore[assignment]
        return {k: StepRecord.model_validate_json(v) for k, v in raw.items()}

    @_tree_errors
    def history(self, run_id: str) -> RunHistory:
        info = self.get(run_id)
        events = self.events(run_id)
        return RunHistory(run=info, steps=group_attempts(info, events), events=events)

    @_tree_errors
    def events(self, run_id: str, start: int = 0) -> list[HistoryEvent]:
        """The run's history events from index ``start`` on (cheap to poll for new ones)."""
        raw: list[str] = self.redis.lrange(self.keys.run(run_id).history, start, -1)  # type: ignore[assignment]
        return [HistoryEvent.model_validate_json(item) for item in raw]

    @_tree_errors
    def output(self, run_id: str, after: str = "0-0", count: int = 1000) -> list[OutputEvent]:
        """The run's live output (``ctx.emit``) after the entry id ``after``, oldest first: at most
        ``count`` entries; pass the last one's ``id`` to read on. Not durable (see ``output.py``)."""
        return read_output(self.redis, self.keys, run_id, _entry_id(after), count)

    @_tree_errors
    def list_runs(self, status: str | None = None, limit: int = 50) -> list[RunInfo]:
        """Most recently active first. ``status`` filters (one of ``STATUSES``)."""
        if status is not None and status not in STATUSES:
            raise ValidationError(f"status {status!r} is invalid: expected one of {', '.join(STATUSES)}")
        parts = self.keys.parts
        unfinished = [*(p.active for p in parts), *self._queued_indexes()]
        done, dead = [p.done for p in parts], [p.dead for p in parts]
        sources = {
            None: [*unfinished, *done, *dead],
            "failed": dead,
            "completed": done,
            "cancelled": done,
        }.get(status, unfinished)
        ids: list[tuple[float, str]] = []
        each = max(limit, 10_000 // len(sources))  # the most recent of each index, ~10,000 in all
        pipe = self.redis.pipeline(transaction=False)
        for key in sources:
            pipe.zrevrange(key, 0, each, withscores=True)
        for rows in pipe.execute():
            ids += [(score, rid) for rid, score in rows]
        ids.sort(reverse=True)
        out: list[RunInfo] = []
        for start in range(0, len(ids), 200):
            chunk = [rid for _, rid in ids[start : start + 200]]
            pipe = self.redis.pipeline(transaction=False)
            for rid in chunk:
                pipe.hgetall(self.keys.run(rid).run)
            for rid, h in zip(chunk, pipe.execute(), strict=True):
                if h and (status is None or h.get("status") == status):
                    out.append(RunInfo.from_hash(rid, h))
                    if len(out) >= limit:
                        return out
        return out

    def _queued_indexes(self) -> list[str]:
        queues: set[str] = self.redis.smembers(self.keys.queues)  # type: ignore[assignment]
        return [self.keys.queue(q, p).queued for q in sorted(queues) for p in range(self.keys.partitions)]

    @_tree_errors
    def stats(self) -> dict[str, int]:
        """Fleet-wide counters (crashes detected, fenced commits, redispatches, ...)."""
        counters = read_counters(self.redis, self.keys.all_stats, self.keys.all_stats_detail)
        return {k: int(float(v)) for k, v in counters.items()}

    # -- control --------------------------------------------------------------------------

    @_tree_errors
    def signal(
        self,
        run_id: str,
        name: str,
        payload: Any = None,
        *,
        signal_id: str | None = None,
        workflow: Workflow[Any] | None = None,
    ) -> SignalSent:
        """Send the signal ``name`` with ``payload`` to a run: delivered at once if the run waits
        for it (``WaitFor``), else kept until a step waits for it.

        ``payload`` is validated against the model the run's workflow declared for ``name``
        (``flow.signal(name, Model)``); ``workflow`` is that workflow, found by the run's
        workflow name among those defined in this process when not given. ``signal_id`` makes
        the send idempotent: a signal id already sent to this run changes nothing (random when
        not given; a resent call after a lost reply reuses it). Raises :class:`ValidationError`
        (naming the field) for a bad payload or an undeclared signal, :class:`RunNotFound`,
        :class:`InvalidTransition` for a finished run, :class:`RunConflict` for a signal id
        already sent with another name or payload.
        """
        signal_id = signal_id or uuid.uuid4().hex
        if not isinstance(signal_id, str) or not RUN_ID_PATTERN.match(signal_id):
            raise ValidationError(
                f"signal_id {signal_id!r} is invalid: expected 1-200 characters of A-Z a-z 0-9 _ . : @ + = / -"
            )
        # the run's workflow (for the payload's model) and queue (for the keys): not the whole record
        found: list[str | None] = self.redis.hmget(self.keys.run(run_id).run, "wf", "queue")  # type: ignore[assignment]
        wf_name, queue = found
        if wf_name is None or queue is None:
            raise self._not_found(run_id)
        flow = workflow or defined(wf_name)
        if flow is None:
            raise ValidationError(
                f"cannot check the payload of signal {name!r}: workflow {wf_name!r} of run {run_id!r} is not "
                "defined in this process; import the module that defines it, or pass workflow="
            )
        if flow.name != wf_name:
            raise ValidationError(f"run {run_id!r} is a run of workflow {wf_name!r}, not {flow.name!r}")
        what = f"payload of signal {name!r}"
        data = flow.signal_payload(name, {} if payload is None else payload)
        raw = encode_fields({"payload": data}, what=what, limit=self.settings.max_payload_bytes)["payload"]
        digest = hashlib.sha256(f"{name}\n{raw}".encode()).hexdigest()[:32]
        call = self.store.signal(
            run_id=run_id,
            queue=queue,
            signal_id=signal_id,
            name=name,
            payload=raw,
            digest=digest,
            max_signals=self.settings.max_signals_per_run,
        )
        outcome = Outcome.parse(scripts.execute(self.redis, [call])[0])
        code, detail = outcome.code, outcome.detail
        sent = SignalSent(run_id=run_id, signal_id=signal_id, name=name, outcome="buffered")
        if code == "DELIVERED":
            return sent.model_copy(update={"outcome": "delivered", "step": str(detail[0]), "visit": int(detail[1])})
        if code == "BUFFERED":
            return sent
        if code == "DUP":
            step, _, visit = str(detail[0]).rpartition(":")
            return sent.model_copy(
                update={"outcome": "duplicate", "step": step or None, "visit": int(visit) if step else None}
            )
        if code == "MISSING":
            raise self._not_found(run_id)
        if code == "TERMINAL":
            raise InvalidTransition(
                f"run {run_id!r} is already {detail[0]}; no step will ever receive signal {name!r}", run_id=run_id
            )
        if code == "CONFLICT":
            raise RunConflict(
                f"signal id {signal_id!r} was already sent to run {run_id!r} as signal {detail[0]!r} with "
                "another payload; use a new signal_id for a new signal",
                run_id=run_id,
            )
        if code == "FULL":
            raise InvalidTransition(
                f"run {run_id!r} was sent {detail[0]} signals, the limit (max_signals_per_run); this one was not kept",
                run_id=run_id,
            )
        raise ValidationError(f"signal {name!r} to run {run_id!r} was refused: {' '.join(map(str, detail))}")

    @_tree_errors
    def cancel(self, run_id: str, reason: str = "cancelled by request") -> RunInfo:
        """End an unfinished run now. A running step is told at its next heartbeat."""
        if len(reason) > MAX_REASON_CHARS:
            raise ValidationError(
                f"reason is {len(reason)} characters long; expected at most {MAX_REASON_CHARS} (it is kept in history)"
            )
        info = self.get(run_id)
        call = self.store.cancel(run_id=run_id, queue=info.queue, reason=reason, request_id=uuid.uuid4().hex)
        outcome = Outcome.parse(scripts.execute(self.redis, [call])[0])
        if outcome.code == "TERMINAL":
            raise InvalidTransition(f"run {run_id!r} is already {outcome.detail[0]}; nothing to cancel", run_id=run_id)
        # its children at once (the supervisor also does it, from the run's finished notice)
        cancel_children(self.redis, self.store, run_id, f"parent {run_id} cancelled: {reason}")
        return self.get(run_id)

    @_tree_errors
    def retry(self, run_id: str, reason: str = "retried by request") -> Run[Any]:
        """Re-drive a failed run from its failed step (same idempotency key as before).

        A run that failed while it waited for child runs or map items waits for them again, and
        those that failed or were cancelled run again (the completed ones are kept)."""
        self._retry(run_id, reason, cancelled_too=False)
        return Run(self, run_id, None, created=False)

    def _retry(self, run_id: str, reason: str, *, cancelled_too: bool) -> None:
        info = self.get(run_id)
        call = self.store.retry(
            run_id=run_id, queue=info.queue, reason=reason, request_id=uuid.uuid4().hex, cancelled_too=cancelled_too
        )
        outcome = Outcome.parse(scripts.execute(self.redis, [call])[0])
        if outcome.code == "NOT_FAILED":
            raise InvalidTransition(
                f"run {run_id!r} is {outcome.detail[0]}, not failed; only failed runs can be retried", run_id=run_id
            )
        if outcome.detail and outcome.detail[0] == "children":  # it waits for its children again
            for child in unfinished_children(self.redis, self.store.keys, run_id, outcome.detail[3:]):
                self._retry(child, f"parent {run_id} retried: {reason}", cancelled_too=True)

    @_tree_errors
    def purge(
        self,
        statuses: Iterable[str] = ("completed", "cancelled", "failed"),
        *,
        older_than_s: float,
        dry_run: bool = False,
        on_page: Callable[[Purged], None] | None = None,
    ) -> Purged:
        """Delete finished runs in ``statuses`` that finished at least ``older_than_s`` ago.

        Everything a run stored goes (record, state, results, history); a purged run id can be
        submitted again as a new run. ``dry_run`` only counts. ``on_page`` sees the running
        totals after each page (for progress on long purges).
        """
        wanted = set(statuses)
        unknown = sorted(wanted - set(TERMINAL))
        if unknown:
            raise ValidationError(
                f"status {unknown[0]!r} cannot be purged: expected any of completed, cancelled, failed"
            )
        if older_than_s < 0:
            raise ValidationError(f"older_than_s={older_than_s} is negative: expected an age in seconds, >= 0")
        total = Purged()
        for index, belongs in FINISHED_IN.items():
            chosen = [s for s in belongs if s in wanted]
            if not chosen:
                continue
            done = purge_finished(
                self.redis, self.store, index, chosen, age_ms=int(older_than_s * 1000), dry_run=dry_run, on_page=on_page
            )
            total = Purged(total.purged + done.purged, total.kept + done.kept, total.dropped + done.dropped)
        return total


class Run(Generic[S]):
    """A handle on one run. Cheap; holds no state beyond the id."""

    def __init__(self, client: Client, run_id: str, workflow: Workflow[S] | None, *, created: bool) -> None:
        self.client = client
        self.run_id = run_id
        self.workflow = workflow
        self.created = created

    @property
    def settings(self) -> Settings:
        return self.client.settings

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    def _check_layout(self, *, record: bool) -> None:
        self.client._check_layout(record=record)

    def info(self) -> RunInfo:
        return self.client.get(self.run_id)

    def status(self) -> str:
        return self.info().status

    def history(self) -> RunHistory:
        return self.client.history(self.run_id)

    def state(self) -> S | dict[str, Any]:
        result: S | dict[str, Any] = self.client.state(self.run_id, self.workflow)
        return result

    def cancel(self, reason: str = "cancelled by request") -> RunInfo:
        return self.client.cancel(self.run_id, reason)

    def retry(self) -> Run[S]:
        self.client.retry(self.run_id)
        return self

    def signal(self, name: str, payload: Any = None, *, signal_id: str | None = None) -> SignalSent:
        """Send the signal ``name`` to this run (see :meth:`Client.signal`)."""
        return self.client.signal(self.run_id, name, payload, signal_id=signal_id, workflow=self.workflow)

    def follow(
        self, timeout_s: float = 60.0, poll_s: float = 0.2, *, output: bool = False, after: str = "0-0"
    ) -> Iterator[HistoryEvent | OutputEvent]:
        """Yield the run's history events as they happen, from the first, until it finishes;
        with ``output``, also its live output (``ctx.emit``) after the entry id ``after``, in
        time order with the events (for tokens alone, :meth:`follow_output` reads without polling).

        Raises :class:`~orchestrator.errors.WaitTimeout` after ``timeout_s``; the run goes on.
        """
        from orchestrator.errors import WaitTimeout

        deadline = time.monotonic() + timeout_s
        seen, last = 0, _entry_id(after)
        while True:
            events = self.client.events(self.run_id, seen)
            seen += len(events)
            emitted = self.client.output(self.run_id, last) if output else []
            last = emitted[-1].id if emitted else last
            # in the same ms an emit goes first: a step emits before the commit that logs its event
            both: list[HistoryEvent | OutputEvent] = [*events, *emitted]
            yield from sorted(both, key=lambda item: (item.at, isinstance(item, HistoryEvent)))
            if any(ev.type in TERMINAL_EVENTS for ev in events):
                return
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"run {self.run_id!r} did not finish within {timeout_s} s; it goes on", run_id=self.run_id
                )
            time.sleep(poll_s)

    def output(self, after: str = "0-0", count: int = 1000) -> list[OutputEvent]:
        """This run's live output so far (see :meth:`Client.output`)."""
        return self.client.output(self.run_id, after, count)

    def follow_output(
        self, after: str = "0-0", timeout_s: float = 3600.0, block_ms: int = 1000
    ) -> Iterator[OutputEvent]:
        """Yield what the run's steps emit (``ctx.emit``) as it is written, after the entry id
        ``after`` (all of it from ``0-0``), until the run has finished and everything it emitted
        was yielded. A client that reconnects passes the last ``id`` it saw and misses nothing
        that is still kept (``max_output_entries`` per run). Each wait is one blocking read
        (XREAD BLOCK ``block_ms``), no polling. Raises :class:`~orchestrator.errors.WaitTimeout`
        after ``timeout_s``; the run goes on."""
        yield from follow_output(
            self.client.redis, self.client.keys, self.run_id, _entry_id(after), timeout_s, block_ms
        )

    @_tree_errors
    def wait(self, timeout_s: float = 60.0, poll_s: float = 0.25) -> S:
        """Block until the run finishes; return its final state (a dict without a workflow).

        Raises :class:`RunFailed` (with the recorded step error), :class:`RunCancelled`, or
        :class:`~orchestrator.errors.WaitTimeout` after ``timeout_s`` (the run goes on).
        """
        from orchestrator.errors import WaitTimeout

        deadline = time.monotonic() + timeout_s
        delay = 0.01
        key = self.client.keys.run(self.run_id).run
        while True:
            status: str | None = self.client.redis.hget(key, "status")  # type: ignore[assignment]
            if status is None:
                raise RunNotFound(f"no run {self.run_id!r}", run_id=self.run_id)
            if status == "completed":
                return self.client.state(self.run_id, self.workflow)  # type: ignore[no-any-return]
            if status == "failed":
                info = self.info()
                error = info.error.model_dump() if info.error else {}
                raise RunFailed(
                    f"run {self.run_id!r} failed at step {info.step!r}: "
                    f"{error.get('type', '?')}: {error.get('message', '')}",
                    run_id=self.run_id,
                    step=info.step,
                    error=error,
                )
            if status == "cancelled":
                raise RunCancelled(f"run {self.run_id!r} was cancelled", run_id=self.run_id)
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"run {self.run_id!r} is still {status} after {timeout_s} s; it goes on, wait again or check "
                    "`orchestrator status`",
                    run_id=self.run_id,
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(poll_s, delay * 2)


def _entry_id(after: str) -> str:
    """``after`` checked as a stream entry id (``<ms>-<seq>``, or ``<ms>``)."""
    if not isinstance(after, str) or not re.match(r"^\d{1,20}(-\d{1,20})?$", after):
        raise ValidationError(f"after={after!r} is invalid: expected an output entry id such as '1733580000000-0'")
    return after
