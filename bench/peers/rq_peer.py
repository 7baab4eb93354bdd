"""RQ 3 as peer-benchmarks.md ran it: ``rq worker`` processes (SimpleWorker or the default forking Worker).

Worker flags: ``--logging_level WARNING --worker-ttl 30 --maintenance-interval 5
--job-monitoring-interval 5``; jobs ``job_timeout=5``, ``Retry(max=3)``; results kept (RQ's
default). Chains either enqueue their next step from inside the job ("next") or are enqueued
up front, each job ``depends_on`` the previous one ("deps").
"""

from __future__ import annotations

import sys
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job

from bench.peers.base import Peer, PeerSpec
from bench.peers.rq_jobs import enqueue_step

QUEUE = "bench"
WORKER_FLAGS = ["--logging_level", "WARNING", "--worker-ttl", "30", "--maintenance-interval", "5"]
WORKER_FLAGS += ["--job-monitoring-interval", "5"]
RQ_MAIN = "import sys; from rq.cli import main; sys.argv[0] = 'rq'; sys.exit(main())"
SETTINGS = "jobs job_timeout=5 s, Retry(max=3); workers " + " ".join(WORKER_FLAGS)


class RqPeer(Peer):
    """RQ workers of one class; chains by successor enqueue or by ``depends_on``."""

    def __init__(self, url: str, spec: PeerSpec, *, worker_class: str | None, chain_next: bool) -> None:
        super().__init__(url, spec)
        self.worker_class = worker_class
        self.chain_next = chain_next
        self.queue = Queue(QUEUE, connection=redis_bytes(url))
        self.job_ids: dict[str, list[str]] = {}

    def worker_argv(self, index: int) -> list[str]:
        argv = [sys.executable, "-c", RQ_MAIN, "worker", "-u", self.url, *WORKER_FLAGS]
        if self.worker_class:
            argv += ["-w", self.worker_class]
        return [*argv, QUEUE]

    def ready_workers(self) -> int:
        return Worker.count(connection=self.queue.connection)

    def submit(self, wf: str, steps: int, work_ms: float = 0.0, record: bool = False) -> None:
        if self.chain_next:
            self.job_ids[wf] = [enqueue_step(self.queue, wf, 0, steps, work_ms, record, True).id]
            return
        previous = None
        for k in range(steps):
            previous = enqueue_step(self.queue, wf, k, steps, work_ms, record, False, depends_on=previous)
            self.job_ids.setdefault(wf, []).append(previous.id)

    def diagnose(self, wfs: list[str]) -> dict[str, Any]:
        """RQ's status of every job we enqueued for each chain (in "next" mode only the first job's id is known)."""
        out: dict[str, Any] = {}
        for wf in wfs:
            jobs = Job.fetch_many(self.job_ids.get(wf, []), connection=self.queue.connection)
            out[wf] = [None if job is None else job.get_status(refresh=False).value for job in jobs]
        return out

    def steps_finished(self) -> int:
        return int(self.queue.finished_job_registry.get_job_count(cleanup=False))

    def close(self) -> None:
        self.queue.connection.close()
        super().close()


def redis_bytes(url: str) -> redis.Redis:
    """RQ needs a client that returns bytes (it pickles)."""
    return redis.Redis.from_url(url)


def rq_spec(name: str, worker_class: str | None, chain_next: bool) -> PeerSpec:
    """A registry entry for one RQ configuration."""
    how = "each job enqueues the next" if chain_next else "whole chain enqueued up front with depends_on"
    cls = worker_class or "rq.Worker (default: fork per job)"
    settings = f"rq worker -w {cls}; chain: {how}; {SETTINGS}"

    def factory(url: str) -> Peer:
        return RqPeer(url, spec, worker_class=worker_class, chain_next=chain_next)

    spec = PeerSpec(name=name, system="rq", settings=settings, factory=factory)
    return spec
