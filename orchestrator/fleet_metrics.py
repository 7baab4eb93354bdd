"""The fleet metrics a supervisor serves: read from Redis at every scrape, at a bounded cost.

They are right however many workers there are and whichever worker died: the Lua scripts keep
the counters they come from atomically with what they count. Every supervisor replica serves
the same numbers: aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.connection import REDIS_FAILURES, server_ms
from orchestrator.counters import add_up, with_derived
from orchestrator.figures import RUN_STATUSES, Detail, apportion, compound, known_workflows, parse_detail
from orchestrator.keys import GROUP, Keys
from orchestrator.permits import read_permits

log = logging.getLogger("orchestrator.metrics")

RUN_SAMPLE = 200  # run records a scrape reads at most, for each of the in-flight and dead-letter gauges
MEMORY_SAMPLE = 16  # runs whose memory a scrape measures
# fleet counters from the stats hash: (metric name, stats field, help)
FLEET_COUNTERS = (
    ("orchestrator_fleet_crashes_total", "crashes", "Step attempts whose worker died (found by the next claim)."),
    ("orchestrator_fleet_fenced_commits_total", "fenced", "Commits refused because their claim was replaced."),
    (
        "orchestrator_fleet_redispatched_steps_total",
        "redispatched",
        "Steps re-enqueued after their worker's heartbeat stopped (or it gave them up).",
    ),
    ("orchestrator_fleet_repaired_runs_total", "repaired", "Runs with no queued work that the sweep re-enqueued."),
    ("orchestrator_fleet_quarantined_steps_total", "quarantined", "Steps quarantined after max_crashes."),
    ("orchestrator_fleet_released_steps_total", "released", "Steps handed back by a draining worker."),
    ("orchestrator_fleet_dead_workers_total", "dead_workers", "Workers found without a heartbeat."),
    ("orchestrator_fleet_malformed_entries_total", "malformed", "Stream entries set aside as malformed."),
    ("orchestrator_fleet_runaway_runs_total", "runaway_runs", "Runs failed at max_run_steps (a loop that never ends)."),
    ("orchestrator_fleet_purged_runs_total", "purged", "Finished runs deleted after their retention."),
    ("orchestrator_fleet_expired_runs_total", "runs_expired", "Runs failed because their deadline passed."),
    ("orchestrator_fleet_expired_steps_total", "steps_expired", "Runs failed because a step's deadline_s passed."),
    ("orchestrator_fleet_sleeps_total", "sleeps", "Runs put to sleep by a step that returned Sleep."),
    ("orchestrator_fleet_waits_total", "waits", "Runs parked waiting for a signal (WaitFor)."),
    ("orchestrator_fleet_signals_total", "signals", "Signals accepted (each signal id once)."),
    ("orchestrator_fleet_signals_delivered_total", "signals_delivered", "Signals delivered to a waiting run."),
    ("orchestrator_fleet_wait_timeouts_total", "wait_timeouts", "Waits for a signal that ended at their timeout."),
    ("orchestrator_fleet_child_runs_total", "children_started", "Child runs started by steps (StartChildren)."),
    ("orchestrator_fleet_map_items_total", "map_items", "Map items listed by steps that returned Map (each a run)."),
    ("orchestrator_fleet_rate_limited_total", "rate_limited", "Step starts a rate limit deferred to their moment."),
    ("orchestrator_fleet_permit_waits_total", "permit_waits", "Step starts that waited in line for a permit."),
)


Labels = tuple[str, ...]


def _filled(family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[Labels, float]) -> Metric:
    """``family`` with one sample per label set, in label order."""
    for labels, value in sorted(values.items()):
        family.add_metric(list(labels), value)
    return family


def _with_zeros(zeros: Iterable[Labels], values: Mapping[Labels, float]) -> dict[Labels, float]:
    """``values``, with 0 for every label set of ``zeros`` that has none."""
    return {**dict.fromkeys(zeros, 0.0), **values}


class FleetCollector(Collector):
    """Reads the fleet's counters, queues and runs from Redis at every scrape.

    A scrape costs a bounded number of Redis commands, however many runs there are: about a
    dozen, plus five per queue, plus at most ``sample`` run records read for the in-flight gauge
    and as many for the dead-letter gauge, plus five per run of ``memory_sample`` for the memory
    gauge: at most about 460 with one queue (tests/integration/test_scrape_cost.py counts them).
    Up to ``sample`` runs those gauges are exact; beyond, their exact totals are split by
    workflow and status in the proportions of a random sample (their help texts say so).

    Series of every known workflow and step (announced by workers, or seen in a run) exist at 0
    before their first event, so that dashboards show 0 rather than no data.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        lease_ms: int,
        sample: int = RUN_SAMPLE,
        memory_sample: int = MEMORY_SAMPLE,
    ) -> None:
        self.client = client
        self.keys = keys
        self.lease_ms = lease_ms
        self.sample = sample
        self.memory_sample = memory_sample

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not read Redis (the supervisor may start before it)."""
        return []

    def collect(self) -> Iterator[Metric]:
        error = GaugeMetricFamily("orchestrator_fleet_scrape_error", "1 when reading Redis for metrics failed.")
        try:
            yield from self._collect()
            error.add_metric([], 0)
        except REDIS_FAILURES as exc:
            log.warning("fleet metrics unavailable", extra={"error": str(exc)})
            error.add_metric([], 1)
        yield error

    def _collect(self) -> Iterator[Metric]:
        pipe = self.client.pipeline(transaction=False)
        for key in (*self.keys.all_stats, *self.keys.all_stats_detail):
            pipe.hgetall(key)
        pipe.smembers(self.keys.queues)
        pipe.smembers(self.keys.permits)
        *hashes, queues, permits = pipe.execute()
        now_ms = server_ms(self.client)
        n = len(self.keys.all_stats)
        raw_detail = add_up(hashes[n:])
        stats = with_derived(add_up(hashes[:n]), raw_detail)
        detail = parse_detail(raw_detail)
        known = known_workflows(detail)
        yield from self._counters(stats, detail, known)
        yield from self._compound(detail)
        yield from self._queues(sorted(queues), now_ms)
        yield from self._runs(sorted(queues), known, now_ms)
        yield from self._permits(sorted(permits))

    def _permits(self, names: list[str]) -> Iterator[Metric]:
        """Each concurrency limit's permits in use, steps waiting in line, and limit now."""
        found = read_permits(self.client, self.keys, names) if names else []
        gauges = (
            (
                "orchestrator_fleet_permits_in_use",
                "Permits of a concurrency limit held now (leases not ended).",
                "in_use",
            ),
            (
                "orchestrator_fleet_permits_waiting",
                "Steps waiting in line for a permit of a concurrency limit.",
                "waiting",
            ),
            (
                "orchestrator_fleet_permits_limit",
                "Permits a concurrency limit allows at once (set or code).",
                "effective",
            ),
        )
        for name, text, field in gauges:
            family = GaugeMetricFamily(name, text, labels=["limit"])
            yield _filled(family, {(p.name,): float(getattr(p, field) or 0) for p in found})

    def _counters(self, stats: dict[str, str], detail: Detail, known: dict[str, list[str]]) -> Iterator[Metric]:
        yield _filled(
            CounterMetricFamily(
                "orchestrator_fleet_runs",
                "Runs by outcome: submitted, completed, failed, cancelled, retried (a failed run re-driven).",
                labels=["workflow", "outcome"],
            ),
            detail.get("runs", {}),
        )
        yield _filled(
            CounterMetricFamily(
                "orchestrator_fleet_step_attempts",
                "Step attempts by outcome, fleet-wide: ok, error, timeout, crashed, fenced.",
                labels=["workflow", "step", "outcome"],
            ),
            detail.get("steps", {}),
        )
        yield from self._work_saved(detail, known)
        for name, field, text in FLEET_COUNTERS:
            family = CounterMetricFamily(name.removesuffix("_total"), text)
            family.add_metric([], float(stats.get(field, 0)))
            yield family

    def _work_saved(self, detail: Detail, known: dict[str, list[str]]) -> Iterator[Metric]:
        workflows: list[Labels] = [(wf,) for wf in known]
        steps_ms = _with_zeros(workflows, detail.get("saved_ms", {}))
        stash_ms = _with_zeros(workflows, detail.get("saved_stash_ms", {}))
        yield _filled(
            CounterMetricFamily(
                "orchestrator_fleet_work_saved_steps",
                "Committed steps that resumed runs did not redo (counted at every crash they survived).",
                labels=["workflow"],
            ),
            _with_zeros(workflows, detail.get("saved_steps", {})),
        )
        yield _filled(
            CounterMetricFamily(
                "orchestrator_fleet_work_saved_seconds",
                "Step time that resumed runs did not redo: their committed steps' and what the crashed "
                "step's last ctx.stash() kept.",
                labels=["workflow"],
            ),
            {key: (steps_ms.get(key, 0.0) + stash_ms.get(key, 0.0)) / 1000 for key in steps_ms | stash_ms},
        )
        yield _filled(
            CounterMetricFamily(
                "orchestrator_fleet_work_saved_stash_seconds",
                "The part of work_saved_seconds that ctx.stash() checkpoints of crashed steps kept.",
                labels=["workflow"],
            ),
            {key: ms / 1000 for key, ms in stash_ms.items()},
        )
        # a unit exists once any step reported it; every known step then has its series at 0
        units = sorted({key[-1] for key in [*detail.get("cost", {}), *detail.get("cost_saved", {})]})
        steps: list[Labels] = [(wf, step, unit) for wf, names in known.items() for step in names for unit in units]
        yield _filled(
            CounterMetricFamily(
                "orchestrator_fleet_step_cost", "Cost reported by steps.", labels=["workflow", "step", "unit"]
            ),
            _with_zeros(steps, detail.get("cost", {})),
        )
        yield _filled(
            CounterMetricFamily(
                "orchestrator_fleet_cost_saved",
                "Cost of committed steps that resumed runs did not pay again.",
                labels=["workflow", "unit"],
            ),
            _with_zeros([(wf, unit) for wf in known for unit in units], detail.get("cost_saved", {})),
        )

    def _compound(self, detail: Detail) -> Iterator[Metric]:
        figures = compound(detail)
        yield _filled(
            GaugeMetricFamily(
                "orchestrator_step_success_ratio",
                "p_i: share of a step's attempts that succeeded (lifetime).",
                labels=["workflow", "step"],
            ),
            figures["step_success"],
        )
        yield _filled(
            GaugeMetricFamily(
                "orchestrator_chain_completion_predicted_ratio",
                "Completion without durability: the product of the steps' p_i.",
                labels=["workflow"],
            ),
            {(wf,): ratio for wf, ratio in figures["predicted"].items()},
        )
        yield _filled(
            GaugeMetricFamily(
                "orchestrator_chain_completion_observed_ratio",
                "Completion with durability, by each run's final outcome: completed / (completed + "
                "failed - retried) runs.",
                labels=["workflow"],
            ),
            {(wf,): ratio for wf, ratio in figures["observed"].items()},
        )

    def _queues(self, queues: list[str], now_ms: int) -> Iterator[Metric]:
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
        for queue in queues:
            pipe = self.client.pipeline(transaction=False)
            for p in range(self.keys.partitions):
                qk = self.keys.queue(queue, p)
                pipe.xlen(qk.stream)
                pipe.xpending(qk.stream, GROUP)
                pipe.xinfo_groups(qk.stream)
                pipe.zcard(qk.delayed)
            replies = pipe.execute(raise_on_error=False)
            totals = [0.0, 0.0, 0.0, 0.0]  # length, pending, lag, delayed: summed over the partitions
            oldest_ms: int | None = None
            for i in range(0, len(replies), 4):
                xlen, summary, groups, n_delayed = replies[i : i + 4]
                entries = float(xlen) if isinstance(xlen, int) else 0.0
                pend = float(summary.get("pending", 0)) if isinstance(summary, dict) else 0.0
                group = next((g for g in groups if g.get("name") == GROUP), None) if isinstance(groups, list) else None
                reported = (group or {}).get("lag")
                # Without a lag from Redis (6.2; or after entries were deleted ahead of the
                # group) the stream's length stands in: undelivered and pending entries, plus
                # acked ones until the supervisor's next trim (trim.lua)
                behind = float(reported) if reported is not None else max(0.0, entries - pend)
                if reported is not None:
                    entries = behind + pend  # acked entries the next trim drops are not queue
                waiting = float(n_delayed) if isinstance(n_delayed, int) else 0.0
                totals = [a + b for a, b in zip(totals, (entries, pend, behind, waiting), strict=True)]
                low = summary.get("min") if isinstance(summary, dict) else None
                if low:
                    low_ms = int(str(low).split("-")[0])
                    oldest_ms = low_ms if oldest_ms is None else min(oldest_ms, low_ms)
            for family, value in zip((length, pending, lag, delayed), totals, strict=True):
                family.add_metric([queue], value)
            oldest.add_metric([queue], max(0.0, (now_ms - oldest_ms) / 1000) if oldest_ms is not None else 0.0)
        yield from (length, pending, lag, oldest, delayed)

    def _runs(self, queues: list[str], known: dict[str, list[str]], now_ms: int) -> Iterator[Metric]:
        pipe = self.client.pipeline(transaction=False)
        pipe.zcount(self.keys.workers, now_ms - self.lease_ms, "+inf")
        pipe.exists(self.keys.leader)
        n_live, n_leaders = pipe.execute()
        live = GaugeMetricFamily("orchestrator_fleet_live_workers", "Workers with a heartbeat within a lease.")
        live.add_metric([], float(n_live))
        yield live
        leaders = GaugeMetricFamily(
            "orchestrator_fleet_leading_supervisors",
            "Supervisors holding the leader lease: 1, or 0 while none re-dispatches, sweeps and promotes.",
        )
        leaders.add_metric([], float(n_leaders))
        yield leaders
        exact = f"exact up to {self.sample} runs; beyond, the exact total split in the proportions of a random sample"
        dead = self._dead_by_workflow()
        yield _filled(
            GaugeMetricFamily(
                "orchestrator_fleet_dead_letter_runs",
                f"Failed runs waiting in the dead letter, by workflow ({exact}).",
                labels=["workflow"],
            ),
            _with_zeros([(wf,) for wf in known], dead),
        )
        counts, sampled = self._in_flight(queues)
        yield _filled(
            GaugeMetricFamily(
                "orchestrator_fleet_runs_in_flight",
                f"Unfinished runs by workflow and status ({exact}).",
                labels=["workflow", "status"],
            ),
            _with_zeros([(wf, status) for wf in known for status in RUN_STATUSES], counts),
        )
        sizes = self._memory(sampled)
        yield _filled(
            GaugeMetricFamily(
                "orchestrator_run_state_bytes",
                f"Average bytes Redis holds per run (record, state, results, history), over up to "
                f"{self.memory_sample} runs sampled at each scrape.",
                labels=["workflow"],
            ),
            {(wf,): sum(values) / len(values) for wf, values in sizes.items()},
        )

    def _sample(self, sets: list[str]) -> list[tuple[str, float]]:
        """Members of these sorted sets, each with how many members it stands for: all of them
        (1 each) when the sets hold at most ``sample`` in all, else a random sample of each set
        in proportion to its size (ZRANDMEMBER), weighted so that the weights add up to its size."""
        pipe = self.client.pipeline(transaction=False)
        for key in sets:
            pipe.zcard(key)
        sizes = [int(n) for n in pipe.execute()]
        total = sum(sizes)
        if not total:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key, size in zip(sets, sizes, strict=True):
            if total <= self.sample:
                pipe.zrange(key, 0, self.sample - 1)
            else:
                pipe.zrandmember(key, math.ceil(self.sample * size / total))
        picked: list[tuple[str, float]] = []
        for size, members in zip(sizes, pipe.execute(), strict=True):
            if members:
                weight = 1.0 if total <= self.sample else size / len(members)
                picked += [(member, weight) for member in members]
        return picked

    def _dead_by_workflow(self) -> dict[tuple[str, ...], float]:
        picked = self._sample([p.dead for p in self.keys.parts])
        pipe = self.client.pipeline(transaction=False)
        for rid, _ in picked:
            pipe.hget(self.keys.run(rid).run, "wf")
        estimates: dict[tuple[str, ...], float] = defaultdict(float)
        for (_, weight), wf in zip(picked, pipe.execute(), strict=True):
            if wf:
                estimates[(wf,)] += weight
        return apportion(estimates, round(sum(estimates.values())))

    def _in_flight(self, queues: list[str]) -> tuple[dict[tuple[str, ...], float], list[str]]:
        """Unfinished runs by (workflow, status), and the run ids read. Unfinished runs are in
        ``active`` (claimed, or waiting out a retry backoff) or in their queue's ``queued``
        index (their dispatch waits in the stream)."""
        queued = [self.keys.queue(q, p).queued for q in queues for p in range(self.keys.partitions)]
        picked = self._sample([*(p.active for p in self.keys.parts), *queued])
        pipe = self.client.pipeline(transaction=False)
        for rid, _ in picked:
            pipe.hmget(self.keys.run(rid).run, "wf", "status")
        estimates: dict[tuple[str, ...], float] = defaultdict(float)
        for (_, weight), (wf, status) in zip(picked, pipe.execute(), strict=True):
            if wf and status in RUN_STATUSES:
                estimates[(wf, status)] += weight
        return apportion(estimates, round(sum(estimates.values()))), [rid for rid, _ in picked]

    def _memory(self, unfinished: list[str]) -> dict[str, list[float]]:
        """Redis memory of up to ``memory_sample`` runs (half unfinished, half recently finished), by workflow."""
        pipe = self.client.pipeline(transaction=False)
        for part in self.keys.parts:
            pipe.zrevrange(part.done, 0, self.memory_sample - 1, withscores=True)
        newest = sorted((row for rows in pipe.execute() for row in rows), key=lambda row: -row[1])
        recent = [rid for rid, _ in newest[: self.memory_sample]]
        sampled = (unfinished[: self.memory_sample // 2] + recent)[: self.memory_sample]
        pipe = self.client.pipeline(transaction=False)
        for rid in sampled:
            rk = self.keys.run(rid)
            pipe.hget(rk.run, "wf")
            for key in (rk.run, rk.state, rk.results, rk.history):
                pipe.memory_usage(key)
        replies = pipe.execute(raise_on_error=False)
        sizes: dict[str, list[float]] = defaultdict(list)
        for i in range(len(sampled)):
            wf, *usage = replies[5 * i : 5 * i + 5]
            if isinstance(wf, str):
                sizes[wf].append(float(sum(u for u in usage if isinstance(u, int))))
        return sizes
