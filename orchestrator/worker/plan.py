"""What a commit writes, worked out from a step's return value: shared by the worker, which
commits the steps it runs, and by an RQ work-horse, which commits a bridged step itself
(orchestrator.bridge.horse) through the same script with the claim's token.

Pure: nothing here touches Redis, so both callers build byte-for-byte the same record.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from orchestrator import scripts
from orchestrator.children import child_specs, map_specs
from orchestrator.codec import Dispatch, StepRecord, dumps, encode_fields
from orchestrator.context import StepContext
from orchestrator.errors import StepResultError
from orchestrator.store import Store
from orchestrator.workflow import Map, StepDef, StepOutcome, Workflow


@dataclass(frozen=True)
class Attempt:
    """Who made this attempt, as every record and event of it says."""

    dispatch: Dispatch
    attempt: int
    fence: int
    worker: str
    start_ms: int

    def event(self, end_ms: int, **extra: Any) -> str:
        """The body of this attempt's history event (commit, failure, release)."""
        d = self.dispatch
        body = {
            "step": d.step,
            "visit": d.visit,
            "attempt": self.attempt,
            "fence": self.fence,
            "worker": self.worker,
            "start_ms": self.start_ms,
            "end_ms": end_ms,
            **extra,
        }
        return dumps(body, what="history event")


@dataclass(frozen=True)
class CommitPlan:
    """A step's outcome, ready for ``Store.commit``."""

    outcome: StepOutcome
    record: str  # the step record (JSON)
    fields: dict[str, str]  # the state fields the update changes, JSON-encoded
    spec: dict[str, Any] | None  # the children or map items the run waits for
    specs: list[dict[str, Any]]  # each child's (or item's) submit
    cost: dict[str, float]  # what the step reported with ctx.cost
    duration_ms: int

    def call(
        self,
        store: Store,
        dispatch: Dispatch,
        *,
        queue: str,
        token: str,
        event: str,
        max_steps: int,
        entry_id: str,
        chain_to: str | None = None,
        chain_token: str = "",
    ) -> scripts.Call:
        """The commit under the claim ``token`` (``Store.commit`` says what each part does)."""
        outcome = self.outcome
        return store.commit(
            dispatch=dispatch,
            queue=queue,
            token=token,
            record=self.record,
            event=event,
            next_step=outcome.next_step,
            duration_ms=self.duration_ms,
            cost=self.cost,
            state=self.fields,
            max_steps=max_steps,
            chain_to=chain_to,
            chain_token=chain_token,
            entry_id=entry_id,
            wake=outcome.wake,
            wait=json.dumps(outcome.wait) if outcome.wait else "",
            children=self.children,
        )

    @property
    def children(self) -> str:
        """``Store.commit``'s ``children``: a child run's spec is in the record; a map's items
        go to Redis as well (started later, as items finish)."""
        spec = self.spec
        if spec is None:
            return ""
        if self.outcome.map:
            return json.dumps(spec)
        return json.dumps({"into": spec["into"], "collect": spec["collect"], "runs": [c["run"] for c in self.specs]})

    @property
    def first_children(self) -> list[dict[str, Any]]:
        """The children (or map items) started right after the commit: a map starts only its window."""
        if self.spec is None:
            return []
        return self.specs[: self.spec.get("window", len(self.specs))]


def plan_commit(
    wf: Workflow[Any],
    step: StepDef,
    state: Any,
    returned: Any,
    ctx: StepContext,
    who: Attempt,
    *,
    end_ms: int,
    max_payload_bytes: int,
    max_map_items: int,
) -> CommitPlan:
    """Interpret what the step returned and build the record its commit persists.

    Raises :class:`StepResultError` (or a validation error) for a return value the workflow
    cannot take: the attempt then fails with that reason."""
    where = f"step {who.dispatch.step!r} of workflow {wf.name!r}"
    outcome = wf.interpret(step, returned)
    merged = wf.merge(state, outcome.update, where=where)
    children = outcome.children
    specs = child_specs(children, ctx.idempotency_key, limit=max_payload_bytes) if children else []
    spec: dict[str, Any] | None = None
    if children:
        spec = {"into": children.into, "collect": children.collect_failures, "specs": specs}
    elif outcome.map:
        spec = _map_spec(wf, outcome.map, merged, where, ctx, max_payload_bytes, max_map_items)
        specs = spec["specs"]
        if not specs:  # a Map over an empty list: nothing to wait for, its result is an empty list
            outcome = dataclasses.replace(outcome, update={**outcome.update, outcome.map.into: []}, map=None)
            merged, spec = wf.merge(state, outcome.update, where=where), None
    values = wf.json_fields(merged, outcome.update.keys(), what=f"update from {where}")
    fields = encode_fields(values, what=f"update from {where}", limit=max_payload_bytes)
    unset_parts = {"wake": not outcome.wake, "wait": outcome.wait is None, "children": spec is None}
    record = StepRecord(
        step=who.dispatch.step,
        visit=who.dispatch.visit,
        attempt=who.attempt,
        fence=who.fence,
        worker=who.worker,
        start_ms=who.start_ms,
        end_ms=end_ms,
        update=values,
        next=outcome.next_step,
        cost=ctx.cost,
        wake=outcome.wake or None,
        wait=outcome.wait,
        children=spec,
    ).model_dump_json(exclude={name for name, unset in unset_parts.items() if unset})
    return CommitPlan(outcome, record, fields, spec, specs, dict(ctx.cost), max(0, end_ms - who.start_ms))


def _map_spec(
    wf: Workflow[Any],
    mapped: Map,
    merged: Any,
    where: str,
    ctx: StepContext,
    max_payload_bytes: int,
    max_map_items: int,
) -> dict[str, Any]:
    """A Map's items, read from the state this step leaves, as commit.lua takes them."""
    raw = merged.model_dump(mode="json", include={mapped.over}).get(mapped.over)
    if not isinstance(raw, list):
        raise StepResultError(
            f"{where} returned Map(over={mapped.over!r}), whose value is {type(raw).__name__}: expected a list"
        )
    if len(raw) > max_map_items:
        raise StepResultError(
            f"{where} returned Map(over={mapped.over!r}) over {len(raw)} items: at most {max_map_items} "
            "(setting max_map_items, ORCHESTRATOR_MAX_MAP_ITEMS)"
        )
    flow = wf.item_flow(mapped.each)
    specs = map_specs(flow, raw, ctx.idempotency_key, limit=max_payload_bytes)
    window = min(len(specs), mapped.parallelism or len(specs))
    return {"into": mapped.into, "collect": mapped.collect_failures, "map": True, "window": window, "specs": specs}
