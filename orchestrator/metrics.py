"""Prometheus metrics: the metric objects of workers and supervisors, on explicit registries, and
the HTTP endpoint, served only when asked.

Two kinds of sources:

- **Worker metrics** (``WorkerMetrics``): what one worker process saw (its attempts by outcome,
  step durations, queue waits, stashes, in-flight steps, work saved when it resumed a crashed
  run). Sum them across workers.
- **Fleet metrics** (``FleetCollector`` in :mod:`orchestrator.fleet_metrics`, served by
  supervisors): read from Redis at scrape time, so they are right however many workers there
  are and whichever worker died. Several supervisors serve the same numbers: aggregate them with
  ``max``, not ``sum``. The figures they compute (the article's compound figures among them) are
  in :mod:`orchestrator.figures`, without I/O.

Names are ``orchestrator_*``, counters end in ``_total``, durations are seconds, labels are
bounded (workflow, step, queue, outcome, unit, status): never a run id. docs/metrics.md lists
every metric.
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

# what the supervisor, the worker and the CLI import from here
from orchestrator.figures import step_positions as step_positions
from orchestrator.figures import zero_fields as zero_fields
from orchestrator.fleet_metrics import FleetCollector as FleetCollector

log = logging.getLogger("orchestrator.metrics")

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800)


class WorkerMetrics:
    """The metrics of one worker process, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.attempts = Counter(
            "orchestrator_step_attempts",
            "Step attempts this worker finished, by outcome: ok, "
            "error, timeout, crashed (a previous attempt found dead), fenced, duplicate, released; executor: "
            "worker (ran in the worker) or rq (ran in an RQ work-horse, orchestrator.bridge).",
            ["workflow", "step", "outcome", "executor"],
            registry=r,
        )
        self.duration = Histogram(
            "orchestrator_step_duration_seconds",
            "Time an attempt ran user code.",
            ["workflow", "step"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "orchestrator_step_queue_wait_seconds",
            "From enqueue to claim (Redis clock).",
            ["workflow", "queue"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "orchestrator_step_retries",
            "Attempts that failed and were scheduled to retry.",
            ["workflow", "step"],
            registry=r,
        )
        self.rate_limited = Counter(
            "orchestrator_step_rate_limited",
            "Step starts a rate limit deferred (given back to wait for their reserved moment, no code run).",
            ["workflow", "step", "limit"],
            registry=r,
        )
        self.permit_waits = Counter(
            "orchestrator_step_permit_waits",
            "Step starts that found no permit of their concurrency limit free (given back to wait, no code run).",
            ["workflow", "step", "limit"],
            registry=r,
        )
        self.permit_wait = Histogram(
            "orchestrator_permit_wait_seconds",
            "From a step's first ask for a permit of its concurrency limit to getting one (Redis clock).",
            ["limit"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("orchestrator_steps_in_flight", "Steps this worker is running now.", registry=r)
        self.concurrency = Gauge("orchestrator_worker_concurrency", "Steps this worker may run at once.", registry=r)
        self.run_duration = Histogram(
            "orchestrator_run_duration_seconds",
            "From submit to completion, for runs whose last step this worker committed.",
            ["workflow"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.stash_writes = Counter(
            "orchestrator_stash_writes", "ctx.stash() checkpoints written.", ["workflow", "step"], registry=r
        )
        self.stash_bytes = Counter(
            "orchestrator_stash_bytes", "Bytes of JSON written by ctx.stash().", ["workflow", "step"], registry=r
        )
        self.saved_steps = Counter(
            "orchestrator_work_saved_steps", "Committed steps a resumed run did not redo.", ["workflow"], registry=r
        )
        self.saved_seconds = Counter(
            "orchestrator_work_saved_seconds", "Step time a resumed run did not redo.", ["workflow"], registry=r
        )
        self.cost = Counter(
            "orchestrator_step_cost",
            "Cost reported by steps through ctx.record_cost().",
            ["workflow", "step", "unit"],
            registry=r,
        )
        self.info = Info("orchestrator_worker", "This worker: version and id.", registry=r)

    def announce(self, steps: dict[str, dict[str, str]]) -> None:
        """Create the per-step series at 0: a series born at its first increment hides that
        increment from rate() (a counter's first sample has nothing to compare with).
        ``steps``: workflow -> step -> executor."""
        for workflow, executors in steps.items():
            for step, executor in executors.items():
                for outcome in ("ok", "error"):
                    self.attempts.labels(workflow, step, outcome, executor)
                self.duration.labels(workflow, step)
                self.retries.labels(workflow, step)
                self.stash_writes.labels(workflow, step)
                self.stash_bytes.labels(workflow, step)


class SupervisorMetrics:
    """What one supervisor measures itself: how long dead claims took to be noticed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.detection = Histogram(
            "orchestrator_detection_latency_seconds",
            "From a dead worker's last heartbeat to the re-dispatch of its step.",
            buckets=(0.5, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 60, 120),
            registry=registry,
        )


class MetricsServer:
    """``/metrics`` for one registry on a daemon thread; ``port`` is the bound one (0 picks a free port)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double the series count and tell nothing here
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port
        log.info("metrics served", extra={"address": f"http://{host}:{self.port}/metrics"})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
