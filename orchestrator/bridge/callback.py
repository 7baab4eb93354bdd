"""Workflows from RQ code: ``start_run`` (an RQ job that submits a run) and ``OnFinish`` (an RQ
job enqueued when a run finishes).

Both travel as JSON (RQ's ``JSONSerializer``; never pickle): a workflow is named by
``module:attribute`` and a callback function by its import path, never passed as objects.

A run submitted with ``on_finish`` keeps it in its record (``on_finish``, JSON) and has
``notify`` set, so the script that finishes it (completed, failed or cancelled) puts its id on
its partition's ``finished`` stream, as for a child run. The supervisor's relay
(``orchestrator.children.relay``) reads that notice, enqueues the callback job (:class:`Callbacks`),
then acks the notice. A relay that dies between the enqueue and the ack leaves the notice
pending and another relay sends it again a minute later (at least once); the job id is a digest
of the namespace, the run id and the time it finished, and RQ enqueues a job id that exists
already not at all (``unique=True``: one Lua script checks and saves), so the second send is a
no-op and the callback is enqueued once per finish of the run. RQ keeps a job that ran for
``KEEP_S`` (its ``result_ttl``), the window in which a late resend is recognised; a notice is
resent within a minute while a supervisor runs. A run retried after it failed and finished
again gets a callback for that finish too (another finish time, another job id).

RQ does not support Redis Cluster (a job's keys span hash slots): on a cluster a submit with
``on_finish`` is refused, and so are :func:`client_for` and the relay's callbacks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis
import rq
from rq.exceptions import DuplicateJobError
from rq.serializers import JSONSerializer

from orchestrator.bridge.connection import RQOnClusterRefused, decoded_client, rq_client
from orchestrator.bridge.executor import RQ_QUEUE_NAME
from orchestrator.client import Client
from orchestrator.codec import abbreviate
from orchestrator.connection import REDIS_FAILURES, is_cluster, redis_failure
from orchestrator.errors import OrchestratorError, ValidationError
from orchestrator.keys import Keys
from orchestrator.priority import Priority
from orchestrator.settings import Settings
from orchestrator.workflow import Workflow, defined

log = logging.getLogger("orchestrator.callbacks")

FUNC_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$", re.ASCII)
MAX_TIMEOUT_S = 86_400
KEEP_S = 86_400  # RQ keeps a callback job this long after it ran: a resend of its finish is recognised meanwhile
ERROR_CHARS = 1000  # of a failed run's error message, in the callback's arguments
FIELDS = ("queue", "func", "timeout_s")
ON_CLUSTER = "RQ does not support Redis Cluster (a job's keys span hash slots)"
SINGLE = "run this namespace and the RQ workers on a single Redis or Sentinel deployment"
Sent = Literal["ENQUEUED", "DUP", "DROPPED", "FAILED"]


@dataclass(frozen=True)
class OnFinish:
    """When the run finishes, enqueue ``func(run_id, status, error)`` on the RQ queue ``queue``.

    ``func``: the function's import path (``myapp.hooks.run_done``), which the RQ worker imports;
    ``status``: ``completed``, ``failed`` or ``cancelled``; ``error``: a failed run's
    ``{"type", "message"}`` (the message cut to 1,000 characters), else None. The run's final
    state is not passed (it can be megabytes, copied into RQ's job): read it with
    ``client_for(rq.get_current_job().connection).state(run_id)``. ``timeout_s``: the job's RQ
    timeout (None: the queue's, 180 s by default). Kept from the first submit of a run id: a
    resubmit with another callback does not change it.
    """

    queue: str
    func: str
    timeout_s: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not RQ_QUEUE_NAME.match(self.queue):
            raise ValidationError(
                f"on_finish queue={abbreviate(self.queue)} is invalid: expected an RQ queue name, "
                "1-100 characters of A-Z a-z 0-9 _ . : -"
            )
        if not isinstance(self.func, str) or len(self.func) > 200 or not FUNC_PATH.match(self.func):
            hint = "; RQ's JSON serializer cannot carry a callable: pass its path" if callable(self.func) else ""
            raise ValidationError(
                f"on_finish func={abbreviate(self.func)} is invalid: expected a function's import path as "
                f"a string, module.function (e.g. 'myapp.hooks.run_done'){hint}"
            )
        timeout = self.timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)):
            raise ValidationError(f"on_finish timeout_s={abbreviate(timeout)} is invalid: expected whole seconds")
        if timeout is not None and not 1 <= timeout <= MAX_TIMEOUT_S:
            raise ValidationError(
                f"on_finish timeout_s={timeout} is invalid: expected 1 to {MAX_TIMEOUT_S} seconds, or None"
            )

    @classmethod
    def parse(cls, value: OnFinish | Mapping[str, object]) -> OnFinish:
        """``value`` checked: an ``OnFinish``, or a dict of its fields (JSON, from an RQ job)."""
        if isinstance(value, OnFinish):
            return value
        if not isinstance(value, Mapping):
            raise ValidationError(
                f"on_finish {abbreviate(value)} is invalid: expected OnFinish(queue=..., func=...) or a dict "
                "with queue, func and optionally timeout_s"
            )
        unknown = sorted(map(str, set(value) - set(FIELDS)))
        missing = [name for name in FIELDS[:2] if name not in value]
        if unknown or missing:
            wrong = f"unknown field(s) {', '.join(unknown)}" if unknown else f"no {' and no '.join(missing)}"
            raise ValidationError(f"on_finish has {wrong}: expected queue, func and optionally timeout_s")
        fields: dict[str, Any] = dict(value)
        return cls(**fields)

    @classmethod
    def from_json(cls, raw: str) -> OnFinish:
        try:
            found = json.loads(raw)
        except ValueError:
            raise ValidationError(f"on_finish {abbreviate(raw)} is not JSON") from None
        return cls.parse(found)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def stored(on_finish: OnFinish | Mapping[str, object], client: redis.Redis) -> str:
    """The run record's ``on_finish`` field for a submit through ``client``; refused on a cluster."""
    checked = OnFinish.parse(on_finish)
    if is_cluster(client):
        raise RQOnClusterRefused(f"on_finish={checked.to_json()}: {ON_CLUSTER}; submit without it, or {SINGLE}")
    return checked.to_json()


def client_for(connection: redis.Redis, settings: Settings | None = None) -> Client:
    """An orchestrator :class:`Client` on the Redis of the RQ connection ``connection`` (its host,
    TLS and password, with ``decode_responses=True`` in a pool of its own: close the client).

    Settings (namespace, partitions, limits) are ``settings``, else read from the environment as
    usual; any URL in them is not used. Raises :class:`RQOnClusterRefused` when ``connection``
    reaches a Redis Cluster (recognised as ``orchestrator.connection`` does: CROSSSLOT)."""
    settings = (settings or Settings()).model_copy(update={"redis_url": None})
    _refuse_cluster(connection, Keys(settings.namespace, settings.partitions).cluster_probe)
    return Client(settings, redis_client=decoded_client(connection))


def _refuse_cluster(connection: redis.Redis, probe: Sequence[str]) -> None:
    found = is_cluster(connection)
    if not found:
        try:
            connection.exists(*probe)
        except redis.exceptions.ClusterCrossSlotError:
            found = True
    if found:
        raise RQOnClusterRefused(f"the RQ connection reaches a Redis Cluster: {ON_CLUSTER}; {SINGLE}")


def _load_workflow(spec: str) -> Workflow[Any]:
    """``module:attribute`` imported, or the name of a workflow defined in this process."""
    if not isinstance(spec, str) or not spec:
        raise ValidationError(f"workflow {abbreviate(spec)} is invalid: expected module:attribute")
    module_name, colon, attr = spec.partition(":")
    if not colon:
        found = defined(spec)
        if found is None:
            raise ValidationError(
                f"workflow {spec!r} is invalid: expected module:attribute (e.g. myapp.flows:research), or the "
                "name of a workflow defined in this process (none is called so)"
            )
        return found
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValidationError(f"workflow {spec!r}: cannot import {module_name!r}: {exc}") from None
    value = getattr(module, attr, None)
    if not isinstance(value, Workflow):
        raise ValidationError(f"workflow {spec!r} is invalid: {type(value).__name__}, expected a Workflow")
    return value


def start_run(
    workflow: str,
    input: dict[str, object] | None = None,
    *,
    run_id: str | None = None,
    priority: Priority = "normal",
    on_finish: dict[str, object] | None = None,
) -> str:
    """Submit a run of ``workflow`` (``module:attribute``); returns its run id. Meant to be an RQ
    job (``queue.enqueue("orchestrator.bridge.callback.start_run", "myapp.flows:research",
    {...}, run_id="order-42")`` on a queue with ``serializer=JSONSerializer``), and callable as
    is. Inside a job it uses the job's Redis connection, elsewhere ``REDIS_URL``; the namespace
    and the rest come from the environment (:class:`Settings`).

    Idempotent by run id, as ``Client.submit``: a job that runs twice (RQ retried it, or it was
    enqueued twice) starts one run; the same id with another input raises ``RunConflict``, which
    fails the job. ``on_finish``: an :class:`OnFinish`'s fields."""
    flow = _load_workflow(workflow)
    job = rq.get_current_job()
    client = client_for(job.connection) if job is not None else Client()
    try:
        finish = None if on_finish is None else OnFinish.parse(on_finish)
        return client.submit(flow, input, run_id=run_id, priority=priority, on_finish=finish).run_id
    finally:
        client.close()


def job_id(namespace: str, run_id: str, finished_ms: str) -> str:
    """The RQ job of one finish of a run (RQ takes only letters, digits, ``_`` and ``-`` in a job
    id, so it is a digest): every resend of that finish's notice names the same job."""
    digest = hashlib.sha256(f"{namespace}\0{run_id}\0{finished_ms}".encode()).hexdigest()[:32]
    return f"orch-done-{digest}"


def _error_summary(raw: str | None) -> dict[str, str] | None:
    """A failed run's error (the record's ``error`` event) as its type and message, cut short."""
    if not raw:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        found = {"message": raw}
    found = found if isinstance(found, dict) else {"message": str(found)}
    return {"type": str(found.get("type", "")), "message": str(found.get("message", ""))[:ERROR_CHARS]}


class Callbacks:
    """The relay's sender of ``on_finish`` jobs: an RQ connection to the relay's own Redis, made
    at the first callback (``close()`` it)."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._client = client
        self._namespace = namespace
        self._rq: redis.Redis | None = None

    def send(self, run_id: str, status: str, raw: str, finished_ms: str, error: str | None) -> Sent:
        """Enqueue the callback of a run that finished with ``status``: ``ENQUEUED``, ``DUP`` (it
        was, by an earlier send of the same finish), ``DROPPED`` (it never can be: a malformed
        ``on_finish``, a Redis Cluster; logged) or ``FAILED`` (Redis refused or failed: the
        notice stays pending, and is sent again). Never raises."""
        if is_cluster(self._client):
            log.error(
                f"run {run_id}: its on_finish job was not enqueued: {ON_CLUSTER} (submitted before this "
                "namespace moved to a cluster: a submit with on_finish is refused on one)",
                extra={"run_id": run_id},
            )
            return "DROPPED"
        try:
            on_finish = OnFinish.from_json(raw)
        except ValidationError as exc:
            log.error(f"run {run_id}: its on_finish job was not enqueued: {exc.message}", extra={"run_id": run_id})
            return "DROPPED"
        try:
            self._rq = self._rq or rq_client(self._client)
            queue = rq.Queue(on_finish.queue, connection=self._rq, serializer=JSONSerializer)
            queue.enqueue_call(
                on_finish.func,
                args=(run_id, status, _error_summary(error) if status == "failed" else None),
                timeout=on_finish.timeout_s,
                result_ttl=KEEP_S,
                job_id=job_id(self._namespace, run_id, finished_ms),
                description=f"on_finish of run {run_id} ({status})",
                unique=True,
            )
        except DuplicateJobError:
            return "DUP"
        except (*REDIS_FAILURES, OrchestratorError) as exc:
            reason = exc.message if isinstance(exc, OrchestratorError) else redis_failure(exc, "").message
            log.warning(
                f"run {run_id}: its on_finish job was not enqueued ({reason}); the relay sends it again in a minute",
                extra={"run_id": run_id},
            )
            return "FAILED"
        return "ENQUEUED"

    def close(self) -> None:
        if self._rq is not None:  # its own pool; a Sentinel's sentinels are the relay client's: left open
            self._rq.close()
            self._rq.connection_pool.disconnect()
            self._rq = None
