"""Workflow definitions: named steps run in declaration order, with branches and loops by ``Goto``.

A step is a plain function ``(ctx, state) -> update``; sync or async, no determinism rules,
because the orchestrator restores persisted state and never replays user code. What a step
returns is merged into the run's state (shallow: top-level fields are replaced) and validated
against the workflow's pydantic state model before it is persisted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import pydantic
import pydantic_core
from pydantic import BaseModel, ConfigDict

from orchestrator.bridge.executor import RQ
from orchestrator.codec import (
    STEP_NAME,
    WORKFLOW_NAME,
    JsonValues,
    check_encoded,
    describe_serialization_error,
    describe_validation_error,
    dumps,
    encode_fields,
    to_json,
)
from orchestrator.errors import DefinitionError, StepResultError, ValidationError
from orchestrator.keys import ITEM_MARK, QUEUE_PATTERN
from orchestrator.permits import ConcurrencyLimit
from orchestrator.priority import LANE_MARK
from orchestrator.ratelimit import RateLimit
from orchestrator.retry import Retry

if TYPE_CHECKING:
    from orchestrator.context import StepContext

S = TypeVar("S", bound=BaseModel)
StepFn = Callable[["StepContext", Any], Any]
F = TypeVar("F", bound=Callable[..., Any])


class FreeState(BaseModel):
    """The state model of a workflow declared without one: any JSON object."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class Goto:
    """Return from a step to continue at ``step`` (any step, earlier ones included: a loop)."""

    step: str
    update: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class End:
    """Return from a step to finish the run now, after applying ``update``."""

    update: Mapping[str, Any] | None = None


MAX_SLEEP_S = 366 * 24 * 3600.0  # Sleep(seconds=...) at most: a year
MAX_CHILDREN = 1000  # child runs one StartChildren may start


@dataclass(frozen=True)
class Sleep:
    """Return from a step to sleep, then continue at ``step`` (default: the step after this one).

    Give ``seconds`` (measured on the Redis server's clock from the commit) or ``until`` (a
    timezone-aware datetime). ``update`` is applied when the step commits, before the sleep.
    While a run sleeps it holds no worker slot, no lease and no stream entry: it is a member of
    its queue's delayed set, and the first worker to look after the due time (every
    ``promote_interval_s``) puts its next step on the queue. The step that slept is committed:
    it never runs again.
    """

    seconds: float | None = None
    until: datetime | None = None
    step: str | None = None
    update: Mapping[str, Any] | None = None

    def wake(self) -> str:
        """The wake-up as ``commit.lua`` takes it: ``+<ms>`` from its clock, or ``@<epoch ms>``."""
        if (self.seconds is None) == (self.until is None):
            raise StepResultError(f"Sleep needs exactly one of seconds= or until=, got {self!r}")
        if self.seconds is not None:
            seconds = self.seconds
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
                raise StepResultError(f"Sleep(seconds={seconds!r}) is invalid: expected a finite number of seconds")
            if not 0 <= seconds <= MAX_SLEEP_S:
                raise StepResultError(
                    f"Sleep(seconds={seconds!r}) is invalid: expected 0 to {MAX_SLEEP_S:.0f} seconds (one year)"
                )
            return f"+{math.ceil(seconds * 1000)}"
        assert self.until is not None
        if not isinstance(self.until, datetime) or self.until.tzinfo is None:
            raise StepResultError(
                f"Sleep(until={self.until!r}) is invalid: expected a timezone-aware datetime "
                "(e.g. datetime.now(timezone.utc) + timedelta(hours=1))"
            )
        return f"@{math.ceil(self.until.timestamp() * 1000)}"


@dataclass(frozen=True)
class WaitFor:
    """Return from a step to wait for the signal ``signal``, then continue at ``step`` (default:
    the step after this one).

    The signal's payload (validated against the model the workflow declared for it with
    :meth:`Workflow.signal`) is written into the state field the declaration names, once, in
    the same atomic step that puts ``step`` on the queue. A signal sent before the run waits
    for it is kept and delivered at once when the run gets here. With ``timeout_s``, a run that
    gets no signal in that time continues at ``on_timeout`` (default: ``step``) with that state
    field set to ``None``. ``update`` is applied when this step commits, before the wait. While
    a run waits it holds no worker slot, no lease and no stream entry.
    """

    signal: str
    step: str | None = None
    timeout_s: float | None = None
    on_timeout: str | None = None
    update: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Child:
    """One child run for :class:`StartChildren`: a run of ``workflow`` with ``input``.

    Its run id is the starting step's idempotency key, ``/`` and ``key`` (default: its place in
    the list), so a step that runs again starts no second child: the first one's id is taken.
    """

    workflow: Workflow[Any]
    input: Any = None
    key: str | None = None


@dataclass(frozen=True)
class StartChildren:
    """Return from a step to start child runs, then continue at ``step`` (default: the step
    after this one) once every child has finished.

    Each child's outcome (a :class:`~orchestrator.children.ChildResult`: its final state, or
    its error) is written, in list order, into the state field ``into`` (a list), in the same
    atomic step that queues ``step``. A child that failed or was cancelled fails this run with
    ``ChildFailed`` (``orchestrator retry`` of it re-drives the failed children, never starts new
    ones), unless ``collect_failures``: then the next step gets them all and decides.
    ``update`` is applied when this step commits. While its children run, this run holds no
    worker slot, no lease and no stream entry; cancelling it cancels them.
    """

    children: Sequence[Child]
    into: str
    step: str | None = None
    collect_failures: bool = False
    update: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Map:
    """Return from a step to run the item function ``each`` (registered with
    :meth:`Workflow.item`) once per element of the state field ``over`` (a list), then continue
    at ``step`` (default: the step after this one) once every item has committed.

    Each item is its own run, ``{run_id}:{step}:{index}`` (also its idempotency key; with the
    visit before the index after a loop), taken by any worker, with its own claim, fence, lease,
    stash, retries and crash count. At most ``parallelism`` items run at a time (default: all).
    The results go into the state field ``into``, in item order, in the same atomic step that
    queues ``step``. An item that fails (after its retries) fails this run at once with
    ``ChildFailed`` and cancels the items still running; ``orchestrator retry`` of the run
    re-runs only the items that did not complete. With ``collect_failures``, every item runs
    and ``into`` gets an :class:`~orchestrator.children.ItemResult` per item (index, status,
    value, error) for the next step to decide. ``update`` is applied when this step commits,
    before the list is read, so a step can build the list and map it in one return. While the
    items run, this run holds no worker slot, no lease and no stream entry.
    """

    each: str | Callable[..., Any]
    over: str
    into: str
    step: str | None = None
    parallelism: int | None = None
    collect_failures: bool = False
    update: Mapping[str, Any] | None = None


class ItemState(BaseModel):
    """The state of one map item's run: the element it works on, its place, and what it returned."""

    item: Any = None
    index: int = 0
    result: Any = None


@dataclass(frozen=True)
class SignalDef:
    """A signal a workflow's steps can wait for: its payload model and the state field it fills."""

    name: str
    model: type[BaseModel]
    into: str


@dataclass(frozen=True)
class StepDef:
    """One registered step and its policies."""

    name: str
    fn: StepFn
    is_async: bool
    retry: Retry
    timeout_s: float | None
    heartbeat_timeout_s: float | None
    deadline_s: float | None = None
    rate_limit: RateLimit | None = None  # admitted under it before it runs (orchestrator.ratelimit)
    concurrency: ConcurrencyLimit | None = None  # holds a permit of it while it runs (orchestrator.permits)
    executor: RQ | None = None  # runs on an RQ fleet (orchestrator.bridge) instead of in the worker

    @property
    def runs_on(self) -> str:
        """The metrics' ``executor`` label: ``worker`` or ``rq``."""
        return "worker" if self.executor is None else "rq"


@dataclass(frozen=True)
class StepOutcome:
    """A step's return value, normalised: the update to merge and where to go next."""

    update: dict[str, Any]
    next_step: str | None  # None: the run is complete
    wake: str = ""  # a Sleep: when to go on to next_step (Sleep.wake); '' = at once
    wait: dict[str, Any] | None = None  # a WaitFor, as commit.lua takes it (Workflow.wait_spec)
    children: StartChildren | None = None  # child runs to start (orchestrator.children)
    map: Map | None = None  # map items to start (orchestrator.children.map_specs)


# Workflows defined in this process, by name (the last definition of a name wins), so that
# Client.signal can find the signal models of a run's workflow from the run's record.
_DEFINED: weakref.WeakValueDictionary[str, Workflow[Any]] = weakref.WeakValueDictionary()


def defined(name: str) -> Workflow[Any] | None:
    """The workflow called ``name`` defined in this process, if any."""
    return _DEFINED.get(name)


L = TypeVar("L", RateLimit, ConcurrencyLimit)


def _declared(given: str | L | None, declared: dict[str, L], where: str, declare: str) -> L | None:
    """The limit a step names: one given as an object (added to ``declared``), or a name that
    must be declared already (``where``: what the error names; ``declare``: how to declare it)."""
    if given is None:
        return None
    if not isinstance(given, str):  # a limit object: the step uses it; the first of a name is declared
        declared.setdefault(given.name, given)
        return given
    found = declared.get(given)
    if found is None:
        known = ", ".join(sorted(declared)) or "none"
        raise DefinitionError(
            f"{where}={given!r} is not declared (declared: {known}); declare it first with flow.{declare.format(given)}"
        )
    return found


@dataclass
class Workflow(Generic[S]):
    """A named sequence of steps over a state model.

    >>> flow = Workflow("research", state=Research)
    >>> @flow.step(retry=Retry(max_attempts=5))
    ... def find(ctx, state): return {"competitors": ["a"]}
    """

    name: str
    state: type[S] = FreeState  # type: ignore[assignment]
    queue: str = "default"
    steps: list[StepDef] = field(default_factory=list)
    signals: dict[str, SignalDef] = field(default_factory=dict)
    items: dict[str, Workflow[ItemState]] = field(default_factory=dict)  # a map's item workflows, by item name
    rate_limits: dict[str, RateLimit] = field(default_factory=dict)  # declared with rate_limit(), by name
    concurrency_limits: dict[str, ConcurrencyLimit] = field(default_factory=dict)  # concurrency_limit(), by name

    def __post_init__(self) -> None:
        if not re.match(WORKFLOW_NAME, self.name) or (ITEM_MARK in self.name and self.state is not ItemState):
            raise DefinitionError(
                f"workflow name {self.name!r} is invalid: expected 1-100 characters of A-Z a-z 0-9 _ . - "
                f"without {ITEM_MARK!r} (kept for map items)"
            )
        if not QUEUE_PATTERN.match(self.queue) or LANE_MARK in self.queue:
            raise DefinitionError(
                f"queue {self.queue!r} of workflow {self.name!r} is invalid: expected 1-100 of A-Z a-z 0-9 _ . : - "
                f"without {LANE_MARK!r} (kept for priority lanes)"
            )
        if not (isinstance(self.state, type) and issubclass(self.state, BaseModel)):
            raise DefinitionError(f"state of workflow {self.name!r} must be a pydantic BaseModel subclass")
        _DEFINED[self.name] = self

    def signal(self, name: str, model: type[BaseModel], *, into: str | None = None) -> None:
        """Declare the signal ``name``, whose payload is validated against ``model`` when it is
        sent and written into the state field ``into`` (default: ``name``) when a step that
        returned ``WaitFor(name, ...)`` receives it. The field must accept ``None``: a wait that
        times out sets it to ``None``."""
        where = f"signal {name!r} of workflow {self.name!r}"
        into = name if into is None else into
        if not isinstance(name, str) or not re.match(STEP_NAME, name):
            raise DefinitionError(f"{where}: name is invalid, expected a Python identifier of up to 100 chars")
        if name in self.signals:
            raise DefinitionError(f"{where} is declared twice")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise DefinitionError(f"{where}: model must be a pydantic BaseModel subclass, got {model!r}")
        if not isinstance(into, str) or not re.match(STEP_NAME, into):
            raise DefinitionError(f"{where}: into={into!r} is invalid, expected a state field name")
        fields = self.state.model_fields
        if into in fields:
            try:  # the other fields' errors (required ones are missing here) do not matter
                self.state.model_validate({into: None})
                refused = False
            except pydantic.ValidationError as exc:
                refused = any(error["loc"][:1] == (into,) for error in exc.errors())
            if refused:
                raise DefinitionError(
                    f"{where}: state field {into!r} must accept None (a wait that times out sets it to None), "
                    f"e.g. {into}: {model.__name__} | None = None"
                )
        elif self.state.model_config.get("extra") != "allow":
            raise DefinitionError(
                f"{where}: the state model {self.state.__name__} has no field {into!r} to receive the payload "
                f"(fields: {sorted(fields)})"
            )
        self.signals[name] = SignalDef(name, model, into)

    def signal_payload(self, name: str, payload: Any) -> dict[str, Any]:
        """``payload`` validated against the model declared for signal ``name``, as JSON-ready data."""
        declared = self.signals.get(name)
        if declared is None:
            known = ", ".join(sorted(self.signals)) or "none"
            raise ValidationError(
                f"signal {name!r} is not declared by workflow {self.name!r} (declared: {known}); "
                "declare it with flow.signal(name, Model)"
            )
        what = f"payload of signal {name!r} of workflow {self.name!r}"
        try:
            model = payload if isinstance(payload, declared.model) else declared.model.model_validate(payload)
            return model.model_dump(mode="json")
        except pydantic.ValidationError as exc:
            raise ValidationError(describe_validation_error(exc, what=what)) from None
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            raise ValidationError(f"{what} is not JSON-serializable: {describe_serialization_error(exc)}") from None

    @overload
    def step(self, fn: F, /) -> F: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout_s: float | None = None,
        heartbeat_timeout_s: float | None = None,
        deadline_s: float | None = None,
        rate_limit: str | RateLimit | None = None,
        concurrency: str | ConcurrencyLimit | None = None,
        executor: RQ | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout_s: float | None = None,
        heartbeat_timeout_s: float | None = None,
        deadline_s: float | None = None,
        rate_limit: str | RateLimit | None = None,
        concurrency: str | ConcurrencyLimit | None = None,
        executor: RQ | None = None,
    ) -> F | Callable[[F], F]:
        """Register a step; usable as ``@flow.step`` or ``@flow.step(retry=...)``.

        ``timeout_s`` bounds one attempt. ``heartbeat_timeout_s`` makes the step prove
        progress: if it does not call ``ctx.heartbeat()`` that often, the worker stops waiting for
        it and fails the attempt as a timeout (retried per ``retry``; a late result of the stalled
        attempt is fenced off). ``deadline_s`` bounds the whole step visit from when it is
        queued: the wait in the queue, every attempt and every backoff. When it passes before the
        step commits, the run fails with ``StepDeadlineExceeded`` (a running attempt is stopped
        at its worker's next heartbeat, a retry that would start after it is not scheduled).
        Runs keep the deadlines of the definition they were submitted with. ``rate_limit`` (a
        name declared with :meth:`rate_limit`, or a :class:`~orchestrator.ratelimit.RateLimit`)
        admits each start of the step under that fleet-wide limit: one that may not start yet
        waits, holding no worker slot, until its reserved moment. ``concurrency`` (a name declared
        with :meth:`concurrency_limit`, or a :class:`~orchestrator.permits.ConcurrencyLimit`)
        makes each attempt hold a permit of that fleet-wide limit while it runs: one that finds
        none free waits in line, holding no worker slot, until one is free for it. ``executor``
        (an :class:`~orchestrator.bridge.RQ`) runs the step's code in a work-horse of an RQ
        worker that listens on that RQ queue; the worker keeps the claim and watches the job
        (orchestrator.bridge: ``RQ(timeout_s=...)`` is the hard limit, ``timeout_s`` does not apply).
        """

        def register(func: F) -> F:
            step_name = name or func.__name__
            limits = self._limit(rate_limit, step_name), self._permit(concurrency, step_name)
            self._add(func, step_name, retry or Retry(), timeout_s, heartbeat_timeout_s, deadline_s, *limits)
            if executor is not None:
                self._bridge(step_name, executor)
            return func

        return register(fn) if fn is not None else register

    def _add(
        self,
        fn: Callable[..., Any],
        name: str,
        retry: Retry,
        timeout_s: float | None,
        heartbeat_timeout_s: float | None,
        deadline_s: float | None = None,
        rate_limit: RateLimit | None = None,
        concurrency: ConcurrencyLimit | None = None,
    ) -> None:
        where = f"step {name!r} of workflow {self.name!r}"
        if not re.match(STEP_NAME, name):
            raise DefinitionError(f"{where}: name is invalid, expected a Python identifier of up to 100 chars")
        if any(s.name == name for s in self.steps):
            raise DefinitionError(f"{where} is defined twice")
        if not callable(fn):
            raise DefinitionError(f"{where}: {fn!r} is not callable")
        params = _positional(fn)
        if params != 2:
            raise DefinitionError(f"{where}: expected a function of (ctx, state), got {params} parameters")
        limits = (("timeout_s", timeout_s), ("heartbeat_timeout_s", heartbeat_timeout_s), ("deadline_s", deadline_s))
        for label, value in limits:
            if value is not None and value <= 0:
                raise DefinitionError(f"{where}: {label}={value} must be positive")
        is_async = inspect.iscoroutinefunction(fn)
        if deadline_s is not None and deadline_s > MAX_SLEEP_S:
            raise DefinitionError(f"{where}: deadline_s={deadline_s} is over a year ({MAX_SLEEP_S:.0f} s)")
        self.steps.append(
            StepDef(name, fn, is_async, retry, timeout_s, heartbeat_timeout_s, deadline_s, rate_limit, concurrency)
        )

    def _bridge(self, step: str, executor: RQ) -> None:
        """Hand the step ``step`` (just added) to ``executor``."""
        where = f"step {step!r} of workflow {self.name!r}: executor"
        if not isinstance(executor, RQ):
            raise DefinitionError(f"{where}={executor!r} is invalid: expected RQ(queue, timeout_s=...)")
        if ITEM_MARK in self.name:
            raise DefinitionError(f"{where}: map items cannot run on RQ yet; a step can")
        self.steps[-1] = dataclasses.replace(self.steps[-1], executor=executor)

    def rate_limit(
        self, name: str, rate: float, *, per_s: float = 60.0, burst: float = 1.0, cost: float = 1.0
    ) -> RateLimit:
        """Declare the fleet-wide rate limit ``name``: at most ``rate`` units per ``per_s`` seconds,
        ``burst`` at once; a step start takes ``cost`` units (0: the steps report what they used
        with ``ctx.spend(name, units)``, e.g. tokens). Steps name it with ``rate_limit=name``;
        ``orchestrator limits set`` changes it at run time for the whole fleet."""
        if name in self.rate_limits:
            raise DefinitionError(f"rate limit {name!r} of workflow {self.name!r} is declared twice")
        limit = RateLimit(name, rate, per_s=per_s, burst=burst, cost=cost)
        self.rate_limits[name] = limit
        return limit

    def _limit(self, limit: str | RateLimit | None, step: str) -> RateLimit | None:
        """The rate limit a step (or item) named, declared on this workflow."""
        where = f"step {step!r} of workflow {self.name!r}: rate_limit"
        return _declared(limit, self.rate_limits, where, "rate_limit({!r}, rate, per_s=...)")

    def concurrency_limit(self, name: str, limit: int) -> ConcurrencyLimit:
        """Declare the fleet-wide concurrency limit ``name``: at most ``limit`` steps (and map
        items) that name it run at once, across every worker. Steps name it with
        ``concurrency=name``; ``orchestrator limits set NAME N`` changes it at run time."""
        if name in self.concurrency_limits:
            raise DefinitionError(f"concurrency limit {name!r} of workflow {self.name!r} is declared twice")
        declared = ConcurrencyLimit(name, limit)
        self.concurrency_limits[name] = declared
        return declared

    def _permit(self, limit: str | ConcurrencyLimit | None, step: str) -> ConcurrencyLimit | None:
        """The concurrency limit a step (or item) named, declared on this workflow."""
        where = f"step {step!r} of workflow {self.name!r}: concurrency"
        return _declared(limit, self.concurrency_limits, where, "concurrency_limit({!r}, limit)")

    @overload
    def item(self, fn: F, /) -> F: ...

    @overload
    def item(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout_s: float | None = None,
        heartbeat_timeout_s: float | None = None,
        rate_limit: str | RateLimit | None = None,
        concurrency: str | ConcurrencyLimit | None = None,
    ) -> Callable[[F], F]: ...

    def item(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout_s: float | None = None,
        heartbeat_timeout_s: float | None = None,
        rate_limit: str | RateLimit | None = None,
        concurrency: str | ConcurrencyLimit | None = None,
    ) -> F | Callable[[F], F]:
        """Register an item function for :class:`Map`: ``(ctx, item) -> value``, sync or async,
        run once per element of the mapped list. It is not a step of the chain: a step reaches
        it by returning ``Map(each=name, over=..., into=...)``. Its value (JSON-serializable, a
        pydantic model included) goes into the mapped step's ``into`` list; ``ctx.idempotency_key``
        is the item's own key. ``retry``, ``timeout_s``, ``heartbeat_timeout_s``, ``rate_limit`` and
        ``concurrency`` are per item, as for a step (a concurrency limit counts items across every
        map and worker, on top of each map's ``parallelism``). Items run on this workflow's queue.
        """

        def register(func: F) -> F:
            item_name = name or func.__name__
            where = f"item {item_name!r} of workflow {self.name!r}"
            if item_name in self.items or any(s.name == item_name for s in self.steps):
                raise DefinitionError(f"{where} is defined twice (items and steps share one namespace)")
            if not callable(func) or _positional(func) != 2:
                raise DefinitionError(f"{where}: expected a function of (ctx, item), got {func!r}")
            flow_name = f"{self.name}{ITEM_MARK}{item_name}"
            if len(flow_name) > 100:
                raise DefinitionError(f"{where}: workflow and item names together are over 98 characters")
            limits = self._limit(rate_limit, item_name), self._permit(concurrency, item_name)
            flow = Workflow(
                flow_name,
                state=ItemState,
                queue=self.queue,
                rate_limits=dict(self.rate_limits),
                concurrency_limits=dict(self.concurrency_limits),
            )
            flow._add(_item_step(func), item_name, retry or Retry(), timeout_s, heartbeat_timeout_s, None, *limits)
            self.items[item_name] = flow
            return func

        return register(fn) if fn is not None else register

    # -- lookups --------------------------------------------------------------------------

    @property
    def first_step(self) -> str:
        if not self.steps:
            raise DefinitionError(f"workflow {self.name!r} has no steps")
        return self.steps[0].name

    def step_deadlines_ms(self) -> dict[str, int]:
        """The steps' ``deadline_s`` in whole ms (rounded up), by step name: stored with each run at submit."""
        return {s.name: math.ceil(s.deadline_s * 1000) for s in self.steps if s.deadline_s is not None}

    def get_step(self, name: str) -> StepDef:
        for step in self.steps:
            if step.name == name:
                return step
        known = ", ".join(s.name for s in self.steps)
        raise DefinitionError(f"step {name!r} is not in workflow {self.name!r} (steps: {known})")

    def step_after(self, name: str) -> str | None:
        names = [s.name for s in self.steps]
        index = names.index(name)
        return names[index + 1] if index + 1 < len(names) else None

    # -- state ----------------------------------------------------------------------------

    def validate_input(self, data: Any) -> S:
        """Validate submit input against the state model; the error names each bad field."""
        if isinstance(data, self.state):
            return data
        try:
            return self.state.model_validate(data)
        except pydantic.ValidationError as exc:
            raise ValidationError(describe_validation_error(exc, what=f"input of workflow {self.name!r}")) from None

    def encode_input(self, data: Any, *, limit: int) -> tuple[dict[str, str], str]:
        """Submit input validated and encoded: the state fields as stored, and the digest that
        tells a resubmit of the same input from another (``RunConflict``)."""
        state = self.validate_input({} if data is None else data)
        what = f"input of workflow {self.name!r}"
        names = type(state).model_fields.keys() | (state.model_extra or {}).keys()
        fields = encode_fields(self.json_fields(state, names, what=what, error=ValidationError), what=what, limit=limit)
        digest = hashlib.sha256(dumps(dict(sorted(fields.items())), what="input").encode()).hexdigest()[:32]
        return fields, digest

    def load_state(self, fields: Mapping[str, Any]) -> S:
        """Build the state model from stored fields (already JSON-decoded)."""
        try:
            return self.state.model_validate(fields)
        except pydantic.ValidationError as exc:
            raise ValidationError(
                describe_validation_error(exc, what=f"stored state of workflow {self.name!r}")
            ) from None

    def json_fields(
        self, state: S, names: Any, *, what: str, error: type[ValidationError] = StepResultError
    ) -> dict[str, Any]:
        """JSON-ready values of the named top-level fields of ``state``, checked against the codec limits.

        Raises ``error`` (:class:`StepResultError` for a step's update, :class:`ValidationError` for
        submit input) naming the field when one cannot be stored and read back
        (huge integer, too deep, NaN or Infinity: see ``codec.check_encoded``). The values carry
        their JSON text, so ``encode_fields`` does not serialize them again.
        """
        names = list(names)
        try:  # only the named fields: a large state is not serialized whole at every step
            dumped = state.model_dump(mode="json", include=set(names)) if names else {}
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            raise error(f"{what} is not JSON-serializable: {describe_serialization_error(exc)}") from None
        values = {name: dumped[name] for name in names}
        encoded = {
            name: self._encode_field(state, name, value, what=what, error=error) for name, value in values.items()
        }
        return JsonValues(values, encoded)

    @staticmethod
    def _encode_field(state: BaseModel, name: str, value: Any, *, what: str, error: type[ValidationError]) -> str:
        """One field's JSON, checked against the field as the model holds it: the JSON-mode dump
        has already turned a NaN inside an untyped value into None, the attribute has not."""
        where = f"{what} field {name!r}"
        raw = to_json(value, what=where, refuse=error)
        held = state.__dict__[name] if name in state.__dict__ else (state.model_extra or {}).get(name, value)
        check_encoded(raw, held, what=where, refuse=error)
        return raw.decode()

    def interpret(self, step: StepDef, returned: Any) -> StepOutcome:
        """Normalise what a step returned into an update and the next step (pure)."""
        where = f"step {step.name!r} of workflow {self.name!r}"
        next_step: str | None = self.step_after(step.name)
        if isinstance(returned, Goto):
            self.get_step(returned.step)  # raises a DefinitionError naming the known steps
            next_step, returned = returned.step, returned.update
        elif isinstance(returned, End):
            next_step, returned = None, returned.update
        elif isinstance(returned, Sleep):
            wake = returned.wake()
            if returned.step is not None:
                self.get_step(returned.step)
                next_step = returned.step
            if next_step is None:
                raise StepResultError(
                    f"{where} returned Sleep without step= and is the last step: name the step to continue at"
                )
            update = self._update(where, returned.update)
            return StepOutcome(update=update, next_step=next_step, wake=wake)
        elif isinstance(returned, WaitFor):
            return self._wait(where, returned, next_step)
        elif isinstance(returned, StartChildren):
            return self._children(where, returned, next_step)
        elif isinstance(returned, Map):
            return self._map(where, returned, next_step)
        return StepOutcome(update=self._update(where, returned), next_step=next_step)

    def item_flow(self, each: str | Callable[..., Any]) -> Workflow[ItemState]:
        """The item workflow of ``each`` (an item's name or its function)."""
        name = each if isinstance(each, str) else getattr(each, "__name__", repr(each))
        flow = self.items.get(name)
        if flow is None:
            known = ", ".join(sorted(self.items)) or "none"
            raise StepResultError(
                f"Map(each={name!r}) names no item of workflow {self.name!r} (items: {known}); "
                "register it with @flow.item"
            )
        return flow

    def _map(self, where: str, mapped: Map, next_step: str | None) -> StepOutcome:
        self.item_flow(mapped.each)
        if mapped.step is not None:
            self.get_step(mapped.step)
        next_step = mapped.step or next_step
        if next_step is None:
            raise StepResultError(f"{where} returned Map without step= and is the last step: name the step")
        extra = self.state.model_config.get("extra") == "allow"
        for label, name in (("over", mapped.over), ("into", mapped.into)):
            if not isinstance(name, str) or (name not in self.state.model_fields and not extra):
                raise StepResultError(
                    f"{where}: Map({label}={name!r}) names no field of {self.state.__name__} "
                    f"(fields: {sorted(self.state.model_fields)})"
                )
        p = mapped.parallelism
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise StepResultError(f"{where}: Map(parallelism={p!r}) is invalid: expected a whole number >= 1 or None")
        return StepOutcome(update=self._update(where, mapped.update), next_step=next_step, map=mapped)

    def _wait(self, where: str, wait: WaitFor, next_step: str | None) -> StepOutcome:
        declared = self.signals.get(wait.signal) if isinstance(wait.signal, str) else None
        if declared is None:
            known = ", ".join(sorted(self.signals)) or "none"
            raise StepResultError(
                f"{where} returned WaitFor({wait.signal!r}), a signal the workflow does not declare "
                f"(declared: {known}); declare it with flow.signal(name, Model)"
            )
        for step in (wait.step, wait.on_timeout):
            if step is not None:
                self.get_step(step)
        next_step = wait.step or next_step
        if next_step is None:
            raise StepResultError(f"{where} returned WaitFor without step= and is the last step: name the step")
        timeout_ms = 0
        if wait.on_timeout is not None and wait.timeout_s is None:
            raise StepResultError(f"{where} returned WaitFor(on_timeout={wait.on_timeout!r}) without timeout_s")
        if wait.timeout_s is not None:
            t = wait.timeout_s
            if isinstance(t, bool) or not isinstance(t, int | float) or not (math.isfinite(t) and 0 < t <= MAX_SLEEP_S):
                raise StepResultError(
                    f"WaitFor(timeout_s={t!r}) is invalid: expected a number of seconds above 0 and at most "
                    f"{MAX_SLEEP_S:.0f} (one year)"
                )
            timeout_ms = math.ceil(t * 1000)
        spec = {"signal": declared.name, "into": declared.into, "timeout_ms": timeout_ms}
        spec["on_timeout"] = wait.on_timeout or ""
        return StepOutcome(update=self._update(where, wait.update), next_step=next_step, wait=spec)

    def _children(self, where: str, start: StartChildren, next_step: str | None) -> StepOutcome:
        if start.step is not None:
            self.get_step(start.step)
        next_step = start.step or next_step
        if next_step is None:
            raise StepResultError(f"{where} returned StartChildren without step= and is the last step: name the step")
        children = list(start.children)
        if not children or len(children) > MAX_CHILDREN:
            raise StepResultError(
                f"{where} returned StartChildren with {len(children)} children: expected 1 to {MAX_CHILDREN}"
            )
        for i, child in enumerate(children):
            if not isinstance(child, Child) or not isinstance(child.workflow, Workflow):
                raise StepResultError(f"{where}: child {i} is {child!r}, expected Child(workflow, input)")
        keys = [child.key or str(i) for i, child in enumerate(children)]
        bad = [k for k in keys if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", k)]
        if bad or len(set(keys)) != len(keys):
            raise StepResultError(
                f"{where}: child keys {bad or keys} are invalid: expected distinct keys of 1-64 A-Z a-z 0-9 _ . -"
            )
        if start.into not in self.state.model_fields and self.state.model_config.get("extra") != "allow":
            raise StepResultError(
                f"{where}: StartChildren(into={start.into!r}) names no field of {self.state.__name__} "
                f"(fields: {sorted(self.state.model_fields)})"
            )
        update = self._update(where, start.update)
        return StepOutcome(update=update, next_step=next_step, children=start)

    @staticmethod
    def _update(where: str, returned: Any) -> dict[str, Any]:
        if returned is None:
            update: dict[str, Any] = {}
        elif isinstance(returned, (BaseModel, Mapping)):
            update = dict(returned)
        else:
            raise StepResultError(
                f"{where} returned {type(returned).__name__}; expected a dict of state updates, "
                "None, Goto(step, update), End(update), Sleep(seconds | until, step, update), "
                "WaitFor(signal, step, timeout_s, on_timeout, update), StartChildren(children, into, step, ...) "
                "or Map(each, over, into, ...)"
            )
        bad_keys = [k for k in update if not isinstance(k, str)]
        if bad_keys:
            raise StepResultError(f"{where} returned non-string keys {bad_keys!r}")
        return update

    def merge(self, state: S, update: Mapping[str, Any], *, where: str) -> S:
        """Apply an update to a state and validate the result; unknown fields are an error."""
        if self.state.model_config.get("extra") != "allow":
            unknown = sorted(set(update) - set(self.state.model_fields))
            if unknown:
                raise StepResultError(
                    f"{where} returned unknown field(s) {unknown}; the state model "
                    f"{self.state.__name__} has: {sorted(self.state.model_fields)}"
                )
        merged = {**state.model_dump(), **update}
        try:
            return self.state.model_validate(merged)
        except pydantic.ValidationError as exc:
            raise StepResultError(describe_validation_error(exc, what=f"state update from {where}")) from None


def _item_step(fn: Callable[..., Any]) -> StepFn:
    """A map item function ``(ctx, item) -> value`` as the one step of its item workflow: the
    value becomes the item run's ``result`` and the run ends."""
    if inspect.iscoroutinefunction(fn):

        async def run_item_async(ctx: StepContext, state: ItemState) -> End:
            return _item_end(fn, await fn(ctx, state.item))

        return run_item_async

    def run_item(ctx: StepContext, state: ItemState) -> End:
        return _item_end(fn, fn(ctx, state.item))

    return run_item


def _item_end(fn: Callable[..., Any], value: Any) -> End:
    if isinstance(value, Goto | End | Sleep | WaitFor | StartChildren | Map):
        raise StepResultError(
            f"map item {getattr(fn, '__name__', fn)!r} returned {type(value).__name__}: an item returns its value"
        )
    return End({"result": value})


def _positional(fn: Callable[..., Any]) -> int:
    """How many positional parameters ``fn`` takes."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in inspect.signature(fn).parameters.values() if p.kind in kinds)
