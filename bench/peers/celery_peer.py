"""Celery 5 as peer-benchmarks.md ran its chains: N nodes of ``celery worker -P prefork -c 1``, ``chain()``."""

from __future__ import annotations

import sys

from celery import chain

from bench import marks
from bench.peers import celery_app
from bench.peers.base import Peer, PeerSpec

WORKER_FLAGS = ["-P", "prefork", "-c", "1", "--loglevel", "WARNING", "--without-mingle", "--without-gossip"]
SETTINGS = (
    "N x celery worker " + " ".join(WORKER_FLAGS) + "; chain(); no result backend; acks_late=True, "
    "reject_on_worker_lost=True, broker_transport_options=" + repr(celery_app.TRANSPORT)
)


class CeleryPeer(Peer):
    """Celery nodes with one prefork child each; a chain is one ``chain(...).apply_async()``."""

    def __init__(self, url: str, spec: PeerSpec) -> None:
        super().__init__(url, spec)
        self.app = celery_app.make_app(url)
        self.task = self.app.tasks[celery_app.TASK]
        self.chain_steps = 1

    def worker_argv(self, index: int) -> list[str]:
        app = ["-A", "bench.peers.celery_app", "worker", *WORKER_FLAGS]
        return [sys.executable, "-m", "celery", *app, "-n", f"bench{index}@%h"]

    def ready_workers(self) -> int:
        return len(self.app.control.ping(timeout=0.5) or [])

    def submit(self, wf: str, steps: int, work_ms: float = 0.0, record: bool = False) -> None:
        self.chain_steps = steps
        chain(*(self.task.si(wf, k, steps, work_ms, record) for k in range(steps))).apply_async()

    def steps_finished(self) -> int:
        """Celery keeps no record of finished tasks without a result backend: count finished chains.

        A lower bound on steps when chains are unfinished; only used when a run hits its time cap.
        """
        return len(marks.ends(self.conn)) * self.chain_steps

    def close(self) -> None:
        self.app.close()
        super().close()


def celery_spec() -> PeerSpec:
    def factory(url: str) -> Peer:
        return CeleryPeer(url, spec)

    spec = PeerSpec(name="celery prefork-durable", system="celery", settings=SETTINGS, factory=factory)
    return spec
