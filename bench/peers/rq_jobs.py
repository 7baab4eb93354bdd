"""The RQ job of a benchmark step (imported by RQ worker processes): the step, then maybe its successor.

Settings from peer-benchmarks.md: every job has ``job_timeout=5`` s and ``Retry(max=3)``.
"""

from __future__ import annotations

from rq import Queue, Retry, get_current_job
from rq.job import Job

from bench.marks import step_body

JOB_TIMEOUT_S = 5
RETRIES = 3


def enqueue_step(
    queue: Queue,
    wf: str,
    k: int,
    steps: int,
    work_ms: float,
    record: bool,
    chain_next: bool,
    depends_on: Job | None = None,
) -> Job:
    """Enqueue step ``k`` of ``wf`` with the benchmark's job settings."""
    return queue.enqueue(
        step,
        args=(wf, k, steps, work_ms, record, chain_next),
        job_timeout=JOB_TIMEOUT_S,
        retry=Retry(max=RETRIES),
        depends_on=depends_on,
    )


def step(wf: str, k: int, steps: int, work_ms: float, record: bool, chain_next: bool) -> None:
    """Run step ``k``; in the "next" variant, enqueue step ``k + 1`` from inside the job, as an app would."""
    step_body(wf, k, steps, work_ms, record)
    if chain_next and k + 1 < steps:
        job = get_current_job()
        assert job is not None
        enqueue_step(Queue(job.origin, connection=job.connection), wf, k + 1, steps, work_ms, record, True)
