"""The Celery app of the benchmark: ``celery -A bench.peers.celery_app worker`` imports ``app`` from here.

Settings from peer-benchmarks.md, "prefork-durable": ``acks_late``, ``reject_on_worker_lost``,
no result backend, Redis broker with ``visibility_timeout`` 10 s and the unacked-restore sweep
every second (``unacked_restore_interval=1``, ``unacked_restore_throttle=1``); Celery's
defaults would leave a killed worker's messages unacked for an hour.
"""

from __future__ import annotations

import os

from celery import Celery

from bench.marks import URL_ENV, step_body

TASK = "bench.step"
TRANSPORT = {"visibility_timeout": 10, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}


def step(wf: str, k: int, steps: int, work_ms: float = 0.0, record: bool = False) -> None:
    """One step of a chain; Celery's ``chain()`` sends the next one when this one returns."""
    step_body(wf, k, steps, work_ms, record)


def make_app(url: str) -> Celery:
    """A Celery app on broker ``url`` with the durable settings; the benchmark makes one per measurement."""
    app = Celery("bench", broker=url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        broker_transport_options=TRANSPORT,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=TASK)(step)
    return app


app = make_app(os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"))
