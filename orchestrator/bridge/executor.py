"""``RQ``: a step that runs on an RQ fleet, and the task its RQ job carries.

Our worker keeps the claim, the fence and the lease of a bridged step; RQ runs the step's code
in a forked work-horse it can kill (a hard timeout, memory freed with the process). The job
carries no state and no code: only where to find the step (an importable module, the
workflow's name) and the claim it runs under, as JSON (RQ's ``JSONSerializer``: never pickle).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from orchestrator.errors import DefinitionError

RQ_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
SERIALIZER = "rq.serializers.JSONSerializer"  # what `rq worker -S` must be given
JOB_FUNCTION = "orchestrator.bridge.horse.run_step"


@dataclass(frozen=True)
class RQ:
    """Run the step on the RQ queue ``queue``, in a work-horse RQ kills after ``timeout_s``.

    ``result_ttl_s``: how long RQ keeps a finished job (``rq info``, rq-dashboard); the step's
    result lives in the run, not in RQ."""

    queue: str
    timeout_s: float = 180.0
    result_ttl_s: int = 3600

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not RQ_QUEUE_NAME.match(self.queue):
            raise DefinitionError(
                f"RQ queue={self.queue!r} is invalid: expected 1-100 characters of A-Z a-z 0-9 _ . : -"
            )
        if not isinstance(self.timeout_s, int | float) or not 1 <= self.timeout_s <= 86_400:
            raise DefinitionError(f"RQ timeout_s={self.timeout_s!r} is invalid: expected 1 to 86400 seconds")
        if not isinstance(self.result_ttl_s, int) or self.result_ttl_s < 1:
            raise DefinitionError(f"RQ result_ttl_s={self.result_ttl_s!r} is invalid: expected a whole number >= 1")

    @property
    def job_timeout(self) -> int:
        """RQ's job timeout: whole seconds (its death penalty is an alarm)."""
        return max(1, round(self.timeout_s))


class BridgedTask(BaseModel):
    """What an RQ job of a bridged step carries: the step's place, the claim, our settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str
    partitions: int
    module: str  # imported by the work-horse: it defines the workflow
    run: str
    wf: str
    step: str
    visit: int
    queue: str  # the run's queue (ours, not RQ's): the commit's keys
    entry_id: str  # the stream entry the claim was made from: the commit acks it
    token: str  # the claim token: the only thing that lets the horse's writes in
    fence: int
    attempt: int
    errors: int  # failed attempts of this step so far: the retry policy's count
    worker: str  # our worker, which holds the claim
    start_ms: int
    result_ttl_ms: int  # how long the horse's outcome stays readable (RQ(result_ttl_s=...))
    lease_ms: int  # the horse beats this often x 3; a silent horse is gone after this long
    max_payload_bytes: int
    max_run_steps: int
    max_map_items: int


def job_id(namespace: str, idempotency_key: str, fence: int) -> str:
    """The RQ job of one claim: a second enqueue of the same claim finds it (RQ takes only
    letters, digits, ``_`` and ``-`` in a job id, so the key is hashed)."""
    digest = hashlib.sha256(f"{namespace}\0{idempotency_key}".encode()).hexdigest()[:24]
    return f"orch-{digest}-{fence}"
