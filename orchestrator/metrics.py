"""Prometheus metrics: every metric in one module, on explicit registries, served only when asked.

Two kinds of sources:

- **Worker metrics** (``WorkerMetrics``): what one worker process saw (its attempts by outcome,
  step durations, queue waits, stashes, in-flight steps, work saved when it resumed a crashed
  run). Sum them across workers.
- **Fleet metrics** (``FleetCollector``, served by supervisors): read from Redis at scrape time,
  so they are right however many workers there are and whichever worker died. The scripts keep
  the counters they come from atomically with what they count. Several supervisors serve the
  same numbers: aggregate them with ``max``, not ``sum``.

The compound figures of the article are fleet gauges: per step the success ratio ``p_i`` (of
attempts: ok / ok + error + timeout + crashed), per workflow the chain completion a run would
have *without* durability (the product of its steps' ``p_i``) and the completion it has
*with* it (completed / completed + failed runs). They are lifetime ratios; the recording
rules in ``deploy/prometheus/`` compute the same over a 5 minute window.

Names are ``orchestrator_*``, counters end in ``_total``, durations are seconds, labels are
bounded (workflow, step, queue, outcome, unit, status): never a run id.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.keys import GROUP, Keys

log = logging.getLogger("orchestrator.metrics")

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800)
FAILED_OUTCOMES = ("error", "timeout", "crashed")
STEP_OUTCOMES = ("ok", "error", "timeout", "crashed", "fenced")
RUN_OUTCOMES = ("submitted", "completed", "failed", "cancelled", "retried")
# fleet counters from the stats hash: (metric name, stats field, help)
FLEET_COUNTERS = (
    ("orchestrator_fleet_crashes_total", "crashes", "Step attempts whose worker died (found by the next claim)."),
    ("orchestrator_fleet_fenced_commits_total", "fenced", "Commits refused because their claim was replaced."),
    ("orchestrator_fleet_redispatched_steps_total", "redispatched", "Steps re-enqueued after their lease lapsed."),
    ("orchestrator_fleet_repaired_runs_total", "repaired", "Runs with no queued work that the sweep re-enqueued."),
    ("orchestrator_fleet_quarantined_steps_total", "quarantined", "Steps quarantined after max_crashes."),
    ("orchestrator_fleet_released_steps_total", "released", "Steps handed back by a draining worker."),
    ("orchestrator_fleet_dead_workers_total", "dead_workers", "Workers found without a heartbeat."),
    ("orchestrator_fleet_malformed_entries_total", "malformed", "Stream entries set aside as malformed."),
    ("orchestrator_fleet_runaway_runs_total", "runaway_runs", "Runs failed at max_run_steps (a loop that never ends)."),
    ("orchestrator_fleet_purged_runs_total", "purged", "Finished runs deleted after their retention."),
)


class WorkerMetrics:
    """The metrics of one worker process, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.attempts = Counter(
            "orchestrator_step_attempts",
            "Step attempts this worker finished, by outcome: ok, "
            "error, timeout, crashed (a previous attempt found dead), fenced, duplicate, released.",
            ["workflow", "step", "outcome"],
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

    def announce(self, steps: dict[str, list[str]]) -> None:
        """Create the per-step series at 0: a series born at its first increment hides that
        increment from rate() (a counter's first sample has nothing to compare with)."""
        for workflow, names in steps.items():
            for step in names:
                for outcome in ("ok", "error"):
                    self.attempts.labels(workflow, step, outcome)
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


def parse_detail(raw: dict[str, str]) -> dict[str, dict[tuple[str, ...], float]]:
    """``runs|wf|outcome`` -> {"runs": {(wf, outcome): n}} and so on for every kind of field.

    Every outcome of a workflow or step seen at all is filled in (0 when it never happened):
    a counter series that appears at its first increment hides that increment from ``rate()``.
    """
    out: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)
    for field, value in raw.items():
        kind, *labels = field.split("|")
        out[kind][tuple(labels)] = float(value)
    for wf, step, _ in list(out.get("steps", {})):
        for outcome in STEP_OUTCOMES:
            out["steps"].setdefault((wf, step, outcome), 0.0)
    for wf, _ in list(out.get("runs", {})):
        for outcome in RUN_OUTCOMES:
            out["runs"].setdefault((wf, outcome), 0.0)
    return out


def zero_fields(workflows: dict[str, list[str]]) -> list[str]:
    """The stats-detail fields of these workflows' runs and steps, for a worker to create at 0."""
    fields = [f"runs|{wf}|{outcome}" for wf in workflows for outcome in RUN_OUTCOMES]
    fields += [
        f"steps|{wf}|{step}|{outcome}" for wf, steps in workflows.items() for step in steps for outcome in STEP_OUTCOMES
    ]
    return fields


def compound(detail: dict[str, dict[tuple[str, ...], float]]) -> dict[str, Any]:
    """Per step p_i, per workflow the predicted (product of p_i) and observed chain completion."""
    per_step: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (wf, step, outcome), n in detail.get("steps", {}).items():
        per_step[(wf, step)][outcome] += n
    ratios: dict[tuple[str, str], float] = {}
    for key, outcomes in per_step.items():
        tried = outcomes["ok"] + sum(outcomes[o] for o in FAILED_OUTCOMES)
        if tried:
            ratios[key] = outcomes["ok"] / tried
    predicted: dict[str, float] = {}
    for (wf, _), ratio in ratios.items():
        predicted[wf] = predicted.get(wf, 1.0) * ratio
    runs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (wf, outcome), n in detail.get("runs", {}).items():
        runs[wf][outcome] += n
    observed = {
        wf: r["completed"] / (r["completed"] + r["failed"]) for wf, r in runs.items() if r["completed"] + r["failed"]
    }
    return {"step_success": ratios, "predicted": predicted, "observed": observed, "runs": runs}


class FleetCollector(Collector):
    """Reads the fleet's counters, queues and runs from Redis at every scrape."""

    def __init__(self, client: redis.Redis, keys: Keys, *, lease_ms: int, sample: int = 200) -> None:
        self.client = client
        self.keys = keys
        self.lease_ms = lease_ms
        self.sample = sample

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not read Redis (the supervisor may start before it)."""
        return []

    def collect(self) -> Iterator[Metric]:
        error = GaugeMetricFamily("orchestrator_fleet_scrape_error", "1 when reading Redis for metrics failed.")
        try:
            yield from self._collect()
            error.add_metric([], 0)
        except (redis.RedisError, OSError) as exc:
            log.warning("fleet metrics unavailable", extra={"error": str(exc)})
            error.add_metric([], 1)
        yield error

    def _collect(self) -> Iterator[Metric]:
        stats: dict[str, str] = self.client.hgetall(self.keys.stats)  # type: ignore[assignment]
        detail = parse_detail(self.client.hgetall(self.keys.stats_detail))  # type: ignore[arg-type]
        yield from self._counters(stats, detail)
        yield from self._compound(detail)
        yield from self._queues()
        yield from self._runs()

    def _counters(self, stats: dict[str, str], detail: dict[str, dict[tuple[str, ...], float]]) -> Iterator[Metric]:
        runs = CounterMetricFamily(
            "orchestrator_fleet_runs",
            "Runs by outcome: submitted, completed, failed, cancelled, retried.",
            labels=["workflow", "outcome"],
        )
        for labels, n in sorted(detail.get("runs", {}).items()):
            runs.add_metric(list(labels), n)
        yield runs
        attempts = CounterMetricFamily(
            "orchestrator_fleet_step_attempts",
            "Step attempts by outcome, fleet-wide: ok, error, timeout, crashed, fenced.",
            labels=["workflow", "step", "outcome"],
        )
        for labels, n in sorted(detail.get("steps", {}).items()):
            attempts.add_metric(list(labels), n)
        yield attempts
        saved_steps = CounterMetricFamily(
            "orchestrator_fleet_work_saved_steps",
            "Committed steps that resumed runs did not redo.",
            labels=["workflow"],
        )
        saved_seconds = CounterMetricFamily(
            "orchestrator_fleet_work_saved_seconds", "Step time that resumed runs did not redo.", labels=["workflow"]
        )
        for (wf,), n in sorted(detail.get("saved_steps", {}).items()):
            saved_steps.add_metric([wf], n)
        for (wf,), ms in sorted(detail.get("saved_ms", {}).items()):
            saved_seconds.add_metric([wf], ms / 1000)
        yield saved_steps
        yield saved_seconds
        cost = CounterMetricFamily(
            "orchestrator_fleet_step_cost", "Cost reported by steps.", labels=["workflow", "step", "unit"]
        )
        for labels, n in sorted(detail.get("cost", {}).items()):
            cost.add_metric(list(labels), n)
        yield cost
        cost_saved = CounterMetricFamily(
            "orchestrator_fleet_cost_saved",
            "Cost of committed steps that resumed runs did not pay again.",
            labels=["workflow", "unit"],
        )
        for labels, n in sorted(detail.get("cost_saved", {}).items()):
            cost_saved.add_metric(list(labels), n)
        yield cost_saved
        for name, field, text in FLEET_COUNTERS:
            family = CounterMetricFamily(name.removesuffix("_total"), text)
            family.add_metric([], float(stats.get(field, 0)))
            yield family

    def _compound(self, detail: dict[str, dict[tuple[str, ...], float]]) -> Iterator[Metric]:
        figures = compound(detail)
        success = GaugeMetricFamily(
            "orchestrator_step_success_ratio",
            "p_i: share of a step's attempts that succeeded (lifetime).",
            labels=["workflow", "step"],
        )
        for (wf, step), ratio in sorted(figures["step_success"].items()):
            success.add_metric([wf, step], ratio)
        yield success
        predicted = GaugeMetricFamily(
            "orchestrator_chain_completion_predicted_ratio",
            "Completion without durability: the product of the steps' p_i.",
            labels=["workflow"],
        )
        for wf, ratio in sorted(figures["predicted"].items()):
            predicted.add_metric([wf], ratio)
        yield predicted
        observed = GaugeMetricFamily(
            "orchestrator_chain_completion_observed_ratio",
            "Completion with durability: completed / (completed + failed) runs.",
            labels=["workflow"],
        )
        for wf, ratio in sorted(figures["observed"].items()):
            observed.add_metric([wf], ratio)
        yield observed

    def _queues(self) -> Iterator[Metric]:
        queues: set[str] = self.client.smembers(self.keys.queues)  # type: ignore[assignment]
        length = GaugeMetricFamily(
            "orchestrator_queue_length", "Entries in the stream (queued + pending).", labels=["queue"]
        )
        pending = GaugeMetricFamily(
            "orchestrator_queue_pending_entries", "Entries delivered, not yet acked.", labels=["queue"]
        )
        lag = GaugeMetricFamily(
            "orchestrator_queue_lag_entries", "Entries not yet delivered to any worker.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "orchestrator_queue_oldest_pending_age_seconds", "Age of the oldest pending entry.", labels=["queue"]
        )
        delayed = GaugeMetricFamily(
            "orchestrator_queue_delayed_entries", "Retries waiting out their backoff.", labels=["queue"]
        )
        sec, usec = self.client.time()
        now_ms = sec * 1000 + usec // 1000
        for queue in sorted(queues):
            qk = self.keys.queue(queue)
            pipe = self.client.pipeline(transaction=False)
            pipe.xlen(qk.stream)
            pipe.xpending(qk.stream, GROUP)
            pipe.xinfo_groups(qk.stream)
            pipe.zcard(qk.delayed)
            xlen, summary, groups, n_delayed = pipe.execute(raise_on_error=False)
            length.add_metric([queue], float(xlen) if isinstance(xlen, int) else 0.0)
            pend = summary.get("pending", 0) if isinstance(summary, dict) else 0
            pending.add_metric([queue], float(pend))
            group = next((g for g in groups if g.get("name") == GROUP), None) if isinstance(groups, list) else None
            reported = (group or {}).get("lag")
            # Redis reports no lag once entries were deleted out of order (workers XDEL what they
            # ack); the stream then holds only undelivered and pending entries, so derive it
            lag.add_metric([queue], float(reported) if reported is not None else max(0.0, float(xlen or 0) - pend))
            low = summary.get("min") if isinstance(summary, dict) else None
            oldest.add_metric([queue], max(0.0, (now_ms - int(str(low).split("-")[0])) / 1000) if low else 0.0)
            delayed.add_metric([queue], float(n_delayed) if isinstance(n_delayed, int) else 0.0)
        yield from (length, pending, lag, oldest, delayed)

    def _runs(self) -> Iterator[Metric]:
        live = GaugeMetricFamily("orchestrator_fleet_live_workers", "Workers with a heartbeat within a lease.")
        sec, usec = self.client.time()
        now_ms = sec * 1000 + usec // 1000
        live.add_metric([], float(self.client.zcount(self.keys.workers, now_ms - self.lease_ms, "+inf")))
        yield live
        dead = GaugeMetricFamily(
            "orchestrator_fleet_dead_letter_runs", "Failed runs waiting in the dead letter.", labels=["workflow"]
        )
        for wf, n in sorted(self._dead_by_workflow().items()):
            dead.add_metric([wf], n)
        yield dead
        in_flight = GaugeMetricFamily(
            "orchestrator_fleet_runs_in_flight",
            "Unfinished runs by workflow and status.",
            labels=["workflow", "status"],
        )
        bytes_per_run = GaugeMetricFamily(
            "orchestrator_run_state_bytes",
            "Average bytes Redis holds per run (record, state, results, history), sampled.",
            labels=["workflow"],
        )
        counts, sizes = self._sample_runs()
        for (wf, status), n in sorted(counts.items()):
            in_flight.add_metric([wf, status], n)
        for wf, values in sorted(sizes.items()):
            bytes_per_run.add_metric([wf], sum(values) / len(values))
        yield in_flight
        yield bytes_per_run

    def _dead_by_workflow(self) -> dict[str, float]:
        dead: list[str] = self.client.zrange(self.keys.dead, 0, 9_999)  # type: ignore[assignment]
        pipe = self.client.pipeline(transaction=False)
        for rid in dead:
            pipe.hget(self.keys.run(rid).run, "wf")
        counts: dict[str, float] = defaultdict(float)
        for wf in pipe.execute():
            if wf:
                counts[wf] += 1
        return counts

    def _sample_runs(self) -> tuple[dict[tuple[str, str], float], dict[str, list[float]]]:
        """Status counts of unfinished runs (up to 10,000) and the memory of a sample of runs."""
        # unfinished runs: claimed or retrying ones in `active`, the ones waiting in a stream in
        # their queue's `queued` index
        queues: set[str] = self.client.smembers(self.keys.queues)  # type: ignore[assignment]
        active: list[str] = []
        for key in [self.keys.active, *(self.keys.queue(q).queued for q in sorted(queues))]:
            active += self.client.zrange(key, 0, 9_999 - len(active))  # type: ignore[arg-type]
            if len(active) >= 10_000:
                break
        recent: list[str] = self.client.zrevrange(self.keys.done, 0, self.sample - 1)  # type: ignore[assignment]
        pipe = self.client.pipeline(transaction=False)
        for rid in active:
            pipe.hmget(self.keys.run(rid).run, "wf", "status")
        statuses = pipe.execute()
        counts: dict[tuple[str, str], float] = defaultdict(float)
        for wf, status in statuses:
            if wf and status:
                counts[(wf, status)] += 1
        sizes: dict[str, list[float]] = defaultdict(list)
        sampled = (active[: self.sample // 2] + recent)[: self.sample]
        pipe = self.client.pipeline(transaction=False)
        for rid in sampled:
            rk = self.keys.run(rid)
            pipe.hget(rk.run, "wf")
            for key in (rk.run, rk.state, rk.results, rk.history):
                pipe.memory_usage(key)
        replies = pipe.execute(raise_on_error=False)
        for i in range(len(sampled)):
            wf, *usage = replies[5 * i : 5 * i + 5]
            if isinstance(wf, str):
                sizes[wf].append(float(sum(u for u in usage if isinstance(u, int))))
        return counts, sizes
