"""Child runs: starting them for a step that returned ``StartChildren``, and bringing each one's
outcome back to its parent.

A parent and its children live in different partitions (hash slots), so no one script can
touch both. The parent's commit parks it and lists its children (``advance()`` in
``_prelude.lua``); the worker then submits each child (``submit.lua``, idempotent by the child's
run id, which derives from the parent's idempotency key). A child that finishes says so on its
partition's ``finished`` stream in the script that finishes it; the supervisor relays that to
the parent (``child_done.lua``, once per child), and from a cancelled parent to its children.
The sweep's look at a waiting parent (``check_parent``) repairs whatever those two fast paths
lost: a child never submitted (the worker died after the commit), a notice never relayed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel

from orchestrator import scripts
from orchestrator.codec import loads
from orchestrator.keys import ITEM_MARK, RUN_ID_PATTERN, Keys
from orchestrator.priority import split
from orchestrator.runs import TERMINAL
from orchestrator.store import Outcome, Store
from orchestrator.workflow import StartChildren, Workflow

if TYPE_CHECKING:
    from orchestrator.bridge.callback import Callbacks

log = logging.getLogger("orchestrator.children")
GROUP = "parents"  # the consumer group of the supervisors on each partition's finished stream
READ = 100  # notices relayed per partition and tick


class ChildResult(BaseModel):
    """How one child run ended, as its parent's state receives it (in the ``into`` list)."""

    run_id: str
    workflow: str
    status: str  # completed, failed or cancelled
    state: dict[str, Any] | None = None  # the child's final state
    error: dict[str, Any] | None = None  # its error (type, message, ...) when it failed


class ItemResult(BaseModel):
    """How one map item ended, as ``Map(collect_failures=True)`` hands it to the next step."""

    index: int
    status: str  # completed, failed or cancelled
    value: Any = None  # what the item function returned (completed items)
    error: dict[str, Any] | None = None  # its error (type, message, ...) when it failed


def _strings(values: Any) -> list[str | None]:
    """A reply of strings (the clients decode responses), typed as such."""
    return [None if v is None else str(v) for v in values]


def child_specs(start: StartChildren, idempotency_key: str, *, limit: int) -> list[dict[str, Any]]:
    """Each child's submit, ready to store in the parent's step record and to send: run id,
    workflow, queue, first step, step deadlines, input digest and state fields (JSON)."""
    specs = []
    for i, child in enumerate(start.children):
        run_id = f"{idempotency_key}/{child.key or i}"
        if not RUN_ID_PATTERN.match(run_id):
            raise ValueError(f"child run id {run_id!r} is over 200 characters: use shorter keys or run ids")
        fields, digest = child.workflow.encode_input(child.input, limit=limit)
        specs.append(
            {
                "run": run_id,
                "wf": child.workflow.name,
                "queue": child.workflow.queue,
                "first": child.workflow.first_step,
                "sd": child.workflow.step_deadlines_ms(),
                "sha": digest,
                "state": fields,
            }
        )
    return specs


def map_specs(flow: Workflow[Any], values: Sequence[Any], idempotency_key: str, *, limit: int) -> list[dict[str, Any]]:
    """Each map item's submit, as :func:`child_specs` makes a child's: a run of the item workflow
    ``flow`` whose id is the mapping step's idempotency key and the item's index."""
    specs = []
    for i, value in enumerate(values):
        run_id = f"{idempotency_key}:{i}"
        if not RUN_ID_PATTERN.match(run_id):
            raise ValueError(f"map item run id {run_id!r} is over 200 characters: use shorter run ids")
        fields, digest = flow.encode_input({"item": value, "index": i}, limit=limit)
        specs.append(
            {"run": run_id, "wf": flow.name, "queue": flow.queue, "first": flow.first_step, "sd": {}, "sha": digest}
            | {"state": fields}
        )
    return specs


def submit_calls(
    store: Store, specs: Sequence[dict[str, Any]], parent: str, queue: str, first: int = 0
) -> list[scripts.Call]:
    """The submits of a parent's children (each idempotent: one already there is kept);
    ``specs[0]`` is child ``first``. A child on its parent's queue (every map item) runs at its
    parent's priority, in its parent's lane (``queue``); one on another queue at normal priority."""
    base, _ = split(queue)
    return [
        store.submit(
            run_id=spec["run"],
            workflow=spec["wf"],
            queue=queue if spec["queue"] == base else spec["queue"],
            first_step=spec["first"],
            input_sha=spec["sha"],
            event=json.dumps({"detail": f"workflow {spec['wf']}, child {i} of run {parent}"}),
            request_id=f"child:{spec['run']}",
            state=spec["state"],
            step_deadlines=spec["sd"],
            parent=(parent, queue, i),
        )
        for i, spec in enumerate(specs, start=first)
    ]


def result_of(client: redis.Redis, keys: Keys, run_id: str) -> tuple[str, str, str] | None:
    """A finished child's status, its result as JSON (a :class:`ChildResult`; a map item's an
    :class:`ItemResult`) and a completed map item's value as JSON ('' otherwise). State fields
    are copied as stored, not decoded and encoded again. None while it runs or when it is gone."""
    rk = keys.run(run_id)
    pipe = client.pipeline(transaction=False)
    pipe.hmget(rk.run, "status", "wf", "error")
    pipe.hgetall(rk.state)
    (status, wf, error), state = pipe.execute()
    if status not in TERMINAL:
        return None
    failure = json.dumps(loads(error, what="error") if error else None)
    if ITEM_MARK in (wf or ""):
        value = state.get("result", "null") if status == "completed" else ""
        index = int(state.get("index", "0"))
        head = f'{{"index":{index},"status":{json.dumps(status)},"error":{failure},"value":'
        return status, head + (value or "null") + "}", value
    fields = ",".join(f"{json.dumps(name)}:{value}" for name, value in sorted(state.items()))
    head = json.dumps({"run_id": run_id, "workflow": wf, "status": status})
    return status, head[:-1] + f',"error":{failure},"state":{{' + fields + "}}", ""


def report(client: redis.Redis, store: Store, child: str, *, unless_recorded: bool = False) -> Outcome | None:
    """Hand a finished child's outcome to its parent (``child_done.lua``) and act on the answer:
    start the map items it says to start, cancel the items still running when a failed item
    failed the parent. None when ``child`` is not a child, still runs, or is gone. Called by
    the worker that finished a map item, by the supervisor's relay and by its sweep: each
    answer is acted on by whoever got it, and the sweep repairs what a caller that died left.
    ``unless_recorded`` (the relay): a child whose result its parent holds already (the worker
    that finished a map item reported it) is left at that, for two reads instead of six."""
    rk = store.keys.run(child)
    parent, queue, index = _strings(client.hmget(rk.run, "parent", "parent_queue", "parent_index"))
    if not parent or not queue or not index:
        return None
    if unless_recorded and client.hexists(store.keys.run(parent).children, f"r:{index}"):
        return Outcome("DUP", ())
    found = result_of(client, store.keys, child)
    if found is None:
        return None
    status, result, value = found
    call = store.child_done(
        parent=parent, queue=queue, index=int(index), child=child, status=status, result=result, value=value
    )
    outcome = Outcome.parse(scripts.execute(client, [call])[0])
    if outcome.code in ("RECORDED", "DUP") and len(outcome.detail) > 2:
        start_items(client, store, parent, queue, [int(i) for i in outcome.detail[2:]])
    elif outcome.code == "FAILED":
        cancel_children(client, store, parent, f"parent {parent} failed: map item {child} {status}")
    return outcome


def start_items(client: redis.Redis, store: Store, parent: str, queue: str, indexes: Sequence[int]) -> int:
    """Submit the map items ``indexes`` of ``parent`` from the specs its children hash keeps
    (``p:<i>``); returns how many were sent (each submit is idempotent by the item's run id)."""
    if not indexes:
        return 0
    raw = _strings(client.hmget(store.keys.run(parent).children, [f"p:{i}" for i in indexes]))
    calls = [
        submit_calls(store, [loads(spec, what=f"map item {i} of {parent}")], parent, queue, first=i)[0]
        for i, spec in zip(indexes, raw, strict=True)
        if spec
    ]
    scripts.execute(client, calls)
    return len(calls)


def children_of(client: redis.Redis, keys: Keys, parent: str) -> list[str]:
    """The child runs of ``parent``'s current (or last) wait, in order."""
    found: dict[str, str] = client.hgetall(keys.run(parent).children)  # type: ignore[assignment]
    return [found[f"c:{i}"] for i in range(int(found.get("n", 0))) if f"c:{i}" in found]


def cancel_call(store: Store, child: str, queue: str, parent: str, reason: str = "") -> scripts.Call:
    """The cancel of ``parent``'s child ``child`` because the parent was cancelled."""
    reason = reason or f"parent {parent} cancelled"
    return store.cancel(run_id=child, queue=queue, reason=reason, request_id=f"parent:{parent}")


def unfinished_children(client: redis.Redis, keys: Keys, parent: str, recorded: Sequence[Any]) -> list[str]:
    """The children a retried ``parent`` must re-drive: those whose failure or cancel it had
    recorded (``recorded``, from ``retry_run.lua``), and those that failed or were cancelled
    without it recording so (it had failed already: ``child_done.lua`` keeps only completed
    results then), in index order."""
    info: dict[str, str] = client.hgetall(keys.run(parent).children)  # type: ignore[assignment]
    started = [info[f"c:{i}"] for i in range(int(info.get("started", info.get("n", 0)))) if f"c:{i}" in info]
    unrecorded = [child for i, child in enumerate(started) if f"r:{i}" not in info]
    pipe = client.pipeline(transaction=False)
    for child in unrecorded:
        pipe.hget(keys.run(child).run, "status")
    ended = {
        child for child, status in zip(unrecorded, pipe.execute(), strict=True) if status in ("failed", "cancelled")
    }
    wanted = ended | {str(child) for child in recorded}
    return [child for child in started if child in wanted]


def cancel_children(client: redis.Redis, store: Store, parent: str, reason: str = "") -> int:
    """Cancel every unfinished child of ``parent``; returns how many were cancelled."""
    children = children_of(client, store.keys, parent)
    pipe = client.pipeline(transaction=False)
    for child in children:
        pipe.hmget(store.keys.run(child).run, "status", "queue")
    calls = []
    for child, reply in zip(children, pipe.execute(), strict=True):
        status, queue = _strings(reply)
        if status and queue and status not in TERMINAL:
            calls.append(cancel_call(store, child, queue, parent, reason))
    replies = scripts.execute(client, calls) if calls else []
    return sum(Outcome.parse(reply).code == "CANCELLED" for reply in replies)


def check_parent(client: redis.Redis, store: Store, parent: str) -> dict[str, int]:
    """The sweep's look at a parent waiting for its children: submit the children it lists
    (up to a map's ``started``) that do not exist, from the specs of the step record that
    started them or a map's ``p:<i>``, and report every finished one (``child_done.lua``
    settles the parent once all are in, and tops up a map's window)."""
    keys = store.keys
    rk = keys.run(parent)
    info: dict[str, str] = client.hgetall(rk.children)  # type: ignore[assignment]
    (queue,) = _strings([client.hget(rk.run, "queue")])
    if not info or queue is None:
        return {}
    n = int(info["n"])
    started = int(info.get("started", n))
    counts = {"children_checked": 0, "children_submitted": 0}
    pipe = client.pipeline(transaction=False)
    for i in range(started):
        pipe.exists(keys.run(info[f"c:{i}"]).run)
    missing = [i for i, there in enumerate(pipe.execute()) if not there]
    if missing:
        (raw,) = _strings([client.hget(rk.results, info["from"])])
        record = loads(raw or "{}", what=f"step record of {parent}")
        specs = (record.get("children") or {}).get("specs") or []
        calls = submit_calls(store, specs, parent, queue)
        scripts.execute(client, [calls[i] for i in missing if i < len(calls)])
        counts["children_submitted"] = len(missing)
    unrecorded = [i for i in range(started) if f"r:{i}" not in info]
    for i in unrecorded:
        counts["children_checked"] += 1
        report(client, store, info[f"c:{i}"])
    if not unrecorded and started == n and "settled" not in info:
        # every result is in, yet the parent waits: they came while it had failed (its deadline)
        # and a retry parked it again; any child's report settles it (child_done.lua)
        report(client, store, info["c:0"])
    return counts


def relay(
    client: redis.Redis,
    store: Store,
    partitions: Iterable[int],
    consumer: str,
    *,
    groups: set[str],
    reclaim: bool = False,
) -> dict[str, int]:
    """Relay the ``finished`` notices of ``partitions``: each child's outcome to its parent, a
    cancelled parent's cancel to its children, and a run's ``on_finish`` callback to its RQ queue
    (orchestrator.bridge.callback). A notice is acked and deleted once relayed; with ``reclaim``,
    notices another supervisor left pending for a minute (it died; a callback Redis refused) are
    taken over. One round trip reads every partition; ``groups`` remembers the streams whose group
    exists."""
    streams = [store.keys.part(p).finished for p in partitions]
    for stream in streams:
        if stream not in groups:
            with contextlib.suppress(redis.ResponseError):  # it exists
                client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            groups.add(stream)
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xreadgroup(GROUP, consumer, {stream: ">"}, count=READ)
        if reclaim:
            pipe.xautoclaim(stream, GROUP, consumer, min_idle_time=60_000, start_id="0", count=READ)
    replies: list[Any] = pipe.execute(raise_on_error=False)
    notices: list[tuple[str, str, dict[str, str]]] = []
    per_stream = 2 if reclaim else 1
    for i, stream in enumerate(streams):
        read, *stale = replies[i * per_stream : (i + 1) * per_stream]
        if isinstance(read, redis.ResponseError) or any(isinstance(x, redis.ResponseError) for x in stale):
            groups.discard(stream)  # NOGROUP (the stream was lost): made again next time
            continue
        for _, batch in read or []:
            notices += [(stream, entry_id, fields) for entry_id, fields in batch]
        for claimed in stale:
            notices += [(stream, entry_id, fields) for entry_id, fields in (claimed[1] if claimed else [])]
    from orchestrator.bridge.callback import Callbacks  # here: the bridge imports the client, which imports us

    counts = {"children_reported": 0, "children_cancelled": 0, "callbacks_enqueued": 0}
    callbacks = Callbacks(client, store.keys.namespace)  # connects to RQ at its first callback
    try:
        for stream, entry_id, fields in notices:
            run_id = fields.get("run", "")
            if run_id and not _relay_run(client, store, run_id, counts, callbacks):
                continue  # its callback is not enqueued yet: the notice stays pending, taken over later
            client.xack(stream, GROUP, entry_id)
            client.xdel(stream, entry_id)
    finally:
        callbacks.close()
    return counts


def _relay_run(client: redis.Redis, store: Store, run_id: str, counts: dict[str, int], callbacks: Callbacks) -> bool:
    """Relay the notice of ``run_id``; False when it must stay pending: the run's callback could
    not be enqueued (``Callbacks``: it is enqueued once per finish, however often it is sent)."""
    counts["children_reported"] += report(client, store, run_id, unless_recorded=True) is not None
    rk = store.keys.run(run_id)
    status, on_finish, finished_ms, error = _strings(
        client.hmget(rk.run, "status", "on_finish", "finished_ms", "error")
    )
    # a parent that ended (cancelled, or failed: a map's failed item, its deadline) leaves no child running
    if status in ("cancelled", "failed"):
        counts["children_cancelled"] += cancel_children(client, store, run_id)
    if not on_finish or status not in TERMINAL:  # no callback; or the run was retried: its next finish says so
        return True
    sent = callbacks.send(run_id, status, on_finish, finished_ms or "", error)
    counts["callbacks_enqueued"] += sent == "ENQUEUED"
    return sent != "FAILED"
