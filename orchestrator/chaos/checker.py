"""The invariant checker: compares the orchestrator's records of a namespace with the ledger.

I1  every accepted run reaches a terminal state (completed, failed or cancelled)
I2  one committed result per (run, step, visit), never overwritten: it comes from the
    attempt with the highest fencing token that executed, so no execution of a step
    started after its result was persisted
I3  a receiver that dedupes by the idempotency key applies each effect once, and every
    request carries the key of a step visit that exists (keys stable across retries)
I4  no entry stays pending once the runs are done; a killed worker's steps run again
    within lease + sweep + slack (counted from Redis' return when Redis was restored from an
    older copy between the kill and the recovery: the recovery it made before was forgotten)
I5  crashes per step stay within max_crashes; a step over it is quarantined with the reason
I6  the fleet-wide counters agree with the runs' histories
I7  no worker or supervisor process died except those the chaos run killed (reported by
    the driver, see ``runner``)
I8  a step never starts before its predecessor's result is durable: each chain step saw
    exactly the state its predecessors committed
I9  fencing holds: for every committed step that sent an effect, the token kept by a
    receiver that keeps the highest fencing token per idempotency key is the fence of the
    persisted step record, and no ``fenced`` event of that step (a commit we refused)
    carries that token
I10 no wake-up early: a run that slept woke (``woke`` event) no earlier than the due time
    of its ``sleeping`` event, and no execution of the step after a Sleep was claimed before
    the wake-up its predecessor asked for (its fencing token, at least the server's clock at
    the claim, is not below it); a wake-up that never came is I1
I11 no run expired before its deadline: a run failed with ``DeadlineExceeded`` finished no
    earlier than its ``deadline_ms`` (both on the Redis clock); a run past its deadline that
    never finished is I1
I12 no signal lost or applied twice: a completed run that waited for a signal got it once
    (one ``signalled`` event) or timed out once (one ``timed_out``, no earlier than the wait's
    timeout, and with no signal accepted before it: the driver sends each one before its
    run's wait ends, and again every few seconds while the run is open), never both; the step
    after the wait ran at one visit only, and every execution of it saw the run's own token
    (or none after a timeout); a signal never delivered is I1
I13 child runs: a parent's children are exactly those it listed (no other run carries a
    child id of its step: none started twice), each one says so (``parent``); a completed
    parent finished after every child (its ``children_done`` no earlier than any child's end)
    and its next step saw one outcome per child; every child of a cancelled parent is finished
    (none left running); a child never finished is I1 (children are checked as runs too)
I14 map items: a map's items are exactly the runs it listed (none started twice), each
    committed once (I2, as runs); a completed map fanned in once (one ``children_done``, no
    earlier than any item's end) and its next step saw the items' values in item order; never
    more than the map's ``parallelism`` items were started and unfinished at once; a map that
    failed (an item failed: the others are cancelled) or was cancelled leaves no item running
I15 concurrency limit: never more steps held a permit of the chaos limit at once than it allows,
    counted by the holders themselves in the ledger (each stamps its entry while it works; a
    killed one stops, and its permit returns only after a lease); at rest no permit is held
    (every lease a killed worker left ended) and no unfinished run waits in line. Under lost
    writes the bound is not checked: a restore forgets holders, and until they end that many
    more may hold permits (docs/design.md)

Under lost writes (Redis restored from an older copy) the ledger lives on another server and
keeps the executions of the forgotten timeline. The invariants above still hold as stated:
claims made after the restore get fences from the server clock, above every fence of the
forgotten timeline, so the persisted record must still carry the highest executed fence (I2)
and the highest token a receiver saw (I9); runs the restore forgot entirely are resubmitted
by the driver with the same id and input, and then must finish like any other (I1).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from orchestrator.chaos.flows import (
    EFFECT_STEPS,
    MAX_ITEMS,
    MAX_KIDS,
    PARENTS,
    PERMIT,
    PERMITS,
    approvals,
    mappers,
    signal_token,
)
from orchestrator.chaos.ledger import Execution, Ledger
from orchestrator.client import Client
from orchestrator.codec import HistoryEvent, StepRecord
from orchestrator.keys import GROUP
from orchestrator.runs import TERMINAL, RunInfo

# counters compared with the histories (I6), and the history event each one counts
COUNTER_EVENTS = {
    "steps_ok": "ok",
    "crashes": "crashed",
    "fenced": "fenced",
    "redispatched": "redispatched",
    "repaired": "repaired",
    "released": "released",
    "quarantined": "quarantined",
    "runs_completed": "completed",
    "runs_cancelled": "cancelled",
    "sleeps": "sleeping",
    "woken": "woke",
    "waits": "waiting",
    "signals": "signal",
    "signals_delivered": "signalled",
    "wait_timeouts": "timed_out",
    "rate_limited": "rate_limited",
}


@dataclass(frozen=True)
class Violation:
    invariant: str
    run_id: str
    detail: str


@dataclass
class RunFacts:
    """Everything the checker reads about one run."""

    info: RunInfo | None
    results: dict[str, StepRecord]
    events: list[HistoryEvent]


@dataclass
class Report:
    """What a chaos run found: counts, latencies and every invariant violation."""

    runs: Counter[str] = field(default_factory=Counter)
    executions: int = 0
    committed_steps: int = 0
    re_executions: int = 0
    effects_applied: int = 0
    effect_requests: int = 0
    fencing_checked: int = 0  # committed steps whose effect reached the fenced receiver (I9)
    vanished: int = 0  # runs a restore from an older copy forgot; resubmitted by the driver
    items_redone: int = 0
    sleeps: int = 0  # sleeping events in the histories (I10)
    signalled: int = 0  # runs that got their signal (I12)
    wait_timeouts: int = 0  # runs whose wait timed out (I12)
    signal_sends: int = 0  # signals the driver sent, resends included (set by the driver)
    children: int = 0  # child runs the parents started (I13)
    rate_deferred: int = 0  # starts a rate limit gave back to wait for their reserved moment
    permit_waits: int = 0  # starts that waited in line for a permit (I15)
    most_holding: int = 0  # the most permit holders the ledger saw at once (I15)
    map_items: int = 0  # items the maps listed (I14)
    maps_settled: int = 0  # maps that fanned in (I14)
    parents_cancelled: int = 0  # parents the driver cancelled while their children ran (I13)
    faults: Counter[str] = field(default_factory=Counter)
    detection_ms: list[int] = field(default_factory=list)
    recovery_ms: list[int] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def count(self, invariant: str) -> int:
        return sum(1 for v in self.violations if v.invariant == invariant)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runs": dict(self.runs),
            "lost": self.count("I1"),
            "overwritten_or_rerun_after_commit": self.count("I2"),
            "duplicate_effects": self.count("I3"),
            "fencing_violations": self.count("I9"),
            "early_wake_ups": self.count("I10"),
            "early_expiries": self.count("I11"),
            "signals_lost_or_doubled": self.count("I12"),
            "signalled": self.signalled,
            "wait_timeouts": self.wait_timeouts,
            "signal_sends": self.signal_sends,
            "children": self.children,
            "parents_cancelled": self.parents_cancelled,
            "child_violations": self.count("I13"),
            "rate_deferred": self.rate_deferred,
            "map_items": self.map_items,
            "maps_settled": self.maps_settled,
            "map_violations": self.count("I14"),
            "permit_waits": self.permit_waits,
            "most_holding": self.most_holding,
            "permit_violations": self.count("I15"),
            "sleeps": self.sleeps,
            "fencing_checked": self.fencing_checked,
            "vanished": self.vanished,
            "executions": self.executions,
            "committed_steps": self.committed_steps,
            "re_executions": self.re_executions,
            "effects_applied": self.effects_applied,
            "effect_requests": self.effect_requests,
            "items_redone": self.items_redone,
            "faults": dict(self.faults),
            "detection_ms": percentiles(self.detection_ms),
            "recovery_ms": percentiles(self.recovery_ms),
            "violations": [v.__dict__ for v in self.violations[:200]],
        }


def percentiles(values: list[int]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


def load(client: Client, run_ids: list[str]) -> dict[str, RunFacts]:
    """Read the record, results and history of every run (pipelined, 200 runs at a time)."""
    facts: dict[str, RunFacts] = {}
    for start in range(0, len(run_ids), 200):
        chunk = run_ids[start : start + 200]
        pipe = client.redis.pipeline(transaction=False)
        for rid in chunk:
            keys = client.keys.run(rid)
            pipe.hgetall(keys.run)
            pipe.hgetall(keys.results)
            pipe.lrange(keys.history, 0, -1)
        replies = pipe.execute()
        for i, rid in enumerate(chunk):
            record, results, history = replies[3 * i : 3 * i + 3]
            facts[rid] = RunFacts(
                info=RunInfo.from_hash(rid, record) if record else None,
                results={k: StepRecord.model_validate_json(v) for k, v in results.items()},
                events=[HistoryEvent.model_validate_json(e) for e in history],
            )
    return facts


def children_of(client: Client, parent_ids: list[str]) -> dict[str, list[str]]:
    """Each parent's listed children (its ``children`` hash), for the parents that started any."""
    pipe = client.redis.pipeline(transaction=False)
    for rid in parent_ids:
        pipe.hgetall(client.keys.run(rid).children)
    out = {}
    for rid, listed in zip(parent_ids, pipe.execute() if parent_ids else [], strict=True):
        if listed:
            out[rid] = [listed[f"c:{i}"] for i in range(int(listed["n"]))]
    return out


class Checker:
    """Checks one namespace after a chaos run. ``kills`` are (worker id, server ms) pairs;
    ``restores_ms`` the server-clock times at which Redis came back from an older copy."""

    def __init__(self, client: Client, ledger: Ledger, *, max_crashes: int, recovery_bound_ms: int) -> None:
        self.client = client
        self.ledger = ledger
        self.max_crashes = max_crashes
        self.recovery_bound_ms = recovery_bound_ms
        self.restored = False  # Redis was restored from an older copy during the run (check())

    def check(
        self,
        submitted: list[str],
        kills: list[tuple[str, int]],
        report: Report | None = None,
        *,
        restores_ms: Sequence[int] = (),
    ) -> Report:
        report = report or Report()
        self.restored = bool(restores_ms)
        facts = load(self.client, submitted)
        kids = children_of(self.client, [rid for rid in facts if rid.startswith(PARENTS)])
        started = load(self.client, [kid for listed in kids.values() for kid in listed])
        facts.update({kid: found for kid, found in started.items() if found.info is not None})
        executions = self.ledger.executions()
        by_key: dict[str, list[Execution]] = {}
        for ex in executions:
            by_key.setdefault(ex.key, []).append(ex)
        report.executions = len(executions)
        for run_id, run in facts.items():
            self._run(report, run_id, run, by_key)
        self._effects(report, facts)
        self._fencing(report, facts)
        self._wake_ups(report, facts, executions)
        self._signals(report, facts, executions)
        self._children(report, facts, kids, executions)
        self._maps(report, facts, {p: listed for p, listed in kids.items() if p.startswith(mappers.name)}, executions)
        self._counters(report, facts)
        report.rate_deferred = sum(ev.type == "rate_limited" for run in facts.values() for ev in run.events)
        self._permits(report, facts)
        self._latencies(report, facts, kills, sorted(restores_ms))
        self._pending(report)
        return report

    def _fail(self, report: Report, invariant: str, run_id: str, detail: str) -> None:
        report.violations.append(Violation(invariant, run_id, detail))

    def _run(self, report: Report, run_id: str, run: RunFacts, by_key: dict[str, list[Execution]]) -> None:
        if run.info is None:
            report.runs["missing"] += 1
            self._fail(report, "I1", run_id, "accepted by submit, but its record is gone")
            return
        report.runs[run.info.status] += 1
        if run.info.status not in TERMINAL:
            self._fail(report, "I1", run_id, f"still {run.info.status} at step {run.info.step} after the drain")
        if run.info.crashes > self.max_crashes:
            self._fail(report, "I5", run_id, f"{run.info.crashes} crashes on one step, over {self.max_crashes}")
        if run.info.error and run.info.error.type == "Quarantined":
            report.runs["quarantined"] += 1
        if run.info.error and run.info.error.type == "DeadlineExceeded":
            report.runs["expired"] += 1
            deadline, finished = run.info.deadline_ms, run.info.finished_ms
            if deadline is None or finished is None or finished < deadline:
                self._fail(report, "I11", run_id, f"expired at {finished}, before its deadline {deadline}")
        for key, record in run.results.items():
            report.committed_steps += 1
            runs = by_key.get(key, [])
            report.re_executions += max(0, len(runs) - 1)
            fences = [ex.fence for ex in runs]
            if fences and max(fences) != record.fence:
                self._fail(
                    report,
                    "I2",
                    run_id,
                    f"{key}: committed by fence {record.fence}, but executed with "
                    f"fences {sorted(fences)} (a run after the commit, or overwritten)",
                )
            if fences and record.fence not in fences:
                self._fail(report, "I2", run_id, f"{key}: the committed fence {record.fence} never executed")
        for key, runs in by_key.items():
            if key.startswith(f"{run_id}:"):
                self._ordering(report, run_id, runs)

    def _ordering(self, report: Report, run_id: str, runs: list[Execution]) -> None:
        """I8: chain step c<k> must have seen i == k; loop visit v of think must have seen v - 1."""
        for ex in runs:
            if ex.step.startswith("c") and ex.step[1:].isdigit() and ex.saw is not None:
                expected = int(ex.step[1:])
            elif ex.step == "think" and ex.saw is not None:
                visit = int(ex.key.rsplit(":", 1)[1]) if ex.key.count(":") > 1 else 1
                expected = visit - 1
            else:
                continue
            if ex.saw != expected:
                self._fail(
                    report,
                    "I8",
                    run_id,
                    f"{ex.key} (fence {ex.fence}) saw {ex.saw}, expected {expected}: "
                    "it started before its predecessor's result was durable",
                )

    def _effects(self, report: Report, facts: dict[str, RunFacts]) -> None:
        effects = self.ledger.effects()
        requests = self.ledger.effect_requests()
        report.effects_applied = len(effects)
        report.effect_requests = sum(requests.values())
        # a request's key must be the key of a step visit: committed, or the step that sends of a
        # run that never got there (failed before it committed)
        expected = {key for run in facts.values() for key in run.results}
        senders = {rid: f"{rid}:{EFFECT_STEPS[run.info.workflow]}" for rid, run in facts.items()
                   if run.info and run.info.workflow in EFFECT_STEPS}  # fmt: skip
        expected |= set(senders.values())
        for key in requests:
            if key not in expected:
                self._fail(report, "I3", key.split(":")[0], f"effect requested with unexpected key {key!r}")
        for rid, key in senders.items():
            info = facts[rid].info
            if info is not None and info.status == "completed" and key not in effects:
                self._fail(report, "I3", rid, "completed, but its effect was never applied")
        report.items_redone = sum(max(0, n - 1) for n in self.ledger.items().values())

    def _fencing(self, report: Report, facts: dict[str, RunFacts]) -> None:
        """I9: the fenced receiver, which keeps the highest token it saw, agrees with the
        persisted record, and never ended on an attempt whose commit we refused."""
        kept = self.ledger.fenced_tokens()
        for run_id, run in facts.items():
            for key, record in run.results.items():
                token = kept.get(key)
                if token is None:
                    continue  # this step sent nothing to the fenced receiver
                report.fencing_checked += 1
                if token > record.fence:
                    self._fail(
                        report,
                        "I9",
                        run_id,
                        f"{key}: the fenced receiver kept token {token}, but the persisted record has fence "
                        f"{record.fence}: an older attempt's commit won over a newer attempt (fencing inverted)",
                    )
                elif token < record.fence:
                    self._fail(
                        report,
                        "I9",
                        run_id,
                        f"{key}: the fenced receiver kept token {token}, but the persisted record has fence "
                        f"{record.fence}: the committed attempt's write never reached the receiver",
                    )
                refused = [
                    ev
                    for ev in run.events
                    if ev.type == "fenced" and ev.step == record.step and ev.visit == record.visit and ev.fence == token
                ]
                if refused:
                    self._fail(
                        report,
                        "I9",
                        run_id,
                        f"{key}: the fenced receiver kept token {token}, the token of an attempt whose "
                        f"commit was refused (fenced by worker {refused[0].worker})",
                    )

    def _wake_ups(self, report: Report, facts: dict[str, RunFacts], executions: list[Execution]) -> None:
        """I10: a sleeping run woke no earlier than its due time, and the step after the sleep
        was never claimed before the wake-up it came after (``saw``: see ``flows.rise``)."""
        for run_id, run in facts.items():
            due: int | None = None
            for ev in run.events:
                if ev.type == "sleeping":
                    report.sleeps += 1
                    due = ev.until_ms
                elif ev.type == "woke" and due is not None:
                    if ev.at < due:
                        self._fail(report, "I10", run_id, f"woke at {ev.at}, before its due time {due}")
                    due = None
        for ex in executions:
            if ex.step == "rise" and isinstance(ex.saw, int) and ex.fence < ex.saw:
                self._fail(
                    report,
                    "I10",
                    ex.run,
                    f"{ex.key} was claimed with fence {ex.fence}, before the wake-up at {ex.saw} it came after",
                )

    def _signals(self, report: Report, facts: dict[str, RunFacts], executions: list[Execution]) -> None:
        """I12: each completed run of the approval flow got its signal once or timed out once,
        never early, and the step after the wait ran at one visit with the run's own token."""
        for run_id, run in facts.items():
            if not run_id.startswith(approvals.name) or run.info is None or run.info.status != "completed":
                continue
            got = [ev for ev in run.events if ev.type == "signalled"]
            timed_out = [ev for ev in run.events if ev.type == "timed_out"]
            report.signalled += len(got)
            report.wait_timeouts += len(timed_out)
            if len(got) + len(timed_out) != 1:
                self._fail(report, "I12", run_id, f"{len(got)} signals delivered and {len(timed_out)} timeouts")
            timeouts = [ev.until_ms for ev in run.events if ev.type == "waiting" and ev.until_ms is not None]
            if timed_out and timeouts and timed_out[0].at < timeouts[-1]:
                self._fail(report, "I12", run_id, f"timed out at {timed_out[0].at}, before {timeouts[-1]}")
            sent = [ev.at for ev in run.events if ev.type == "signal"]
            if timed_out and sent and sent[0] < timed_out[0].at:
                self._fail(report, "I12", run_id, f"signal accepted at {sent[0]}, yet the wait timed out")
        for ex in executions:
            if ex.run.startswith(approvals.name) and ex.step == "proceed":
                if ex.key != f"{ex.run}:proceed":
                    self._fail(report, "I12", ex.run, f"{ex.key}: the step after the wait ran at a second visit")
                if ex.saw not in (signal_token(ex.run), -1):
                    self._fail(report, "I12", ex.run, f"{ex.key} saw token {ex.saw}, not the run's own")

    def _children(
        self, report: Report, facts: dict[str, RunFacts], kids: dict[str, list[str]], executions: list[Execution]
    ) -> None:
        """I13: each parent's children are exactly the ones it listed, finished before it
        completed (all of them, when it was cancelled; a map's, when it failed), and its next
        step saw one outcome each."""
        extra = self._unlisted(kids)
        for parent, listed in kids.items():
            info = facts[parent].info
            is_map = parent.startswith(mappers.name)
            if is_map:
                report.map_items += len(listed)
            else:
                report.children += len(listed)
            for kid in extra.get(parent, []):
                self._fail(report, "I13", parent, f"{kid} exists but the parent did not list it: a second child")
            ends = [self._child(report, parent, info, facts.get(kid), kid, is_map) for kid in listed]
            if info is not None and info.status == "cancelled" and not is_map:
                report.parents_cancelled += 1
            if info is not None and info.status == "completed":
                settled = [ev.at for ev in facts[parent].events if ev.type == "children_done"]
                if not settled or min(settled) < max(ends, default=0):
                    self._fail(report, "I13", parent, f"completed before its children ended ({settled} < {ends})")
        self._tallies(report, facts, kids, executions)

    def _child(
        self, report: Report, parent: str, info: RunInfo | None, found: RunFacts | None, kid: str, is_map: bool
    ) -> int:
        """I13 for one listed child: started unless its parent ended first, naming its parent,
        finished when its parent was cancelled (a map's, also when it failed); its end (ms)."""
        child = found.info if found else None
        if child is None:
            # never started: fine only for a parent that ended without it (cancelled or failed
            # before its children were submitted; a map's items past its window)
            if info is None or info.status == "completed":
                self._fail(report, "I13", parent, f"child {kid} was never started")
            return 0
        if child.parent != parent:
            self._fail(report, "I13", parent, f"child {kid} names another parent: {child.parent}")
            return 0
        if info is not None and info.status == "cancelled" and child.status not in TERMINAL:
            self._fail(report, "I13", parent, f"cancelled, but its child {kid} is still {child.status}")
        if info is not None and info.status == "failed" and is_map and child.status not in TERMINAL:
            self._fail(report, "I14", parent, f"failed, but its item {kid} is still {child.status}")
        return child.finished_ms or 0

    def _tallies(
        self, report: Report, facts: dict[str, RunFacts], kids: dict[str, list[str]], executions: list[Execution]
    ) -> None:
        """I13: the step after the children saw one outcome per child (the execution whose result
        was persisted, when Redis was restored from an older copy: an execution of the forgotten
        timeline saw the children its parent listed there; otherwise every execution)."""
        for ex in executions:
            if ex.step != "tally" or ex.run not in kids or ex.saw == len(kids[ex.run]):
                continue
            committed = facts[ex.run].results.get(f"{ex.run}:tally")
            if self.restored and (committed is None or ex.fence != committed.fence):
                continue
            trail = [f"{ev.type}@{ev.at}:{ev.step}:{ev.detail or ''}" for ev in facts[ex.run].events]
            self._fail(
                report,
                "I13",
                ex.run,
                f"{ex.key} (fence {ex.fence}) saw {ex.saw} outcomes for {len(kids[ex.run])} children; {trail}",
            )

    def _maps(
        self, report: Report, facts: dict[str, RunFacts], maps: dict[str, list[str]], executions: list[Execution]
    ) -> None:
        """I14: a completed map fanned in once, its next step saw its items' values in item
        order, and no more than its parallelism of items were started and unfinished at once."""
        for parent, listed in maps.items():
            info, events = facts[parent].info, facts[parent].events
            if info is not None and info.status == "completed":
                report.maps_settled += 1
                if sum(ev.type == "children_done" for ev in events) != 1:
                    self._fail(report, "I14", parent, "completed, but did not fan in exactly once")
            if self.restored:  # a restore from an older copy can forget which items ended when
                continue
            window = int(self.client.redis.hget(self.client.keys.run(parent).children, "window") or len(listed))
            spans = [
                (facts[kid].info.created_ms, facts[kid].info.finished_ms or 2**62)  # type: ignore[union-attr]
                for kid in listed
                if kid in facts and facts[kid].info is not None
            ]
            edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
            running = most = 0
            for _, step in edges:  # an end before a start at the same ms: a slot handed on
                running += step
                most = max(most, running)
            if most > window:
                self._fail(report, "I14", parent, f"{most} items ran at once, parallelism {window}")
        for ex in executions:
            if ex.step != "total" or ex.run not in maps:
                continue
            committed = facts[ex.run].results.get(f"{ex.run}:scatter")
            if committed is None or (self.restored and ex.fence != self._fence(facts, ex.run, "total")):
                continue
            expected = [item["v"] * 10 for item in committed.update.get("items", [])]
            if ex.saw != expected:
                self._fail(report, "I14", ex.run, f"{ex.key} saw {ex.saw}, expected {expected} (item order)")

    @staticmethod
    def _fence(facts: dict[str, RunFacts], run_id: str, step: str) -> int | None:
        """The fence of the persisted record of ``step`` of ``run_id`` (None: none persisted)."""
        record = facts[run_id].results.get(f"{run_id}:{step}")
        return record.fence if record else None

    def _unlisted(self, kids: dict[str, list[str]]) -> dict[str, list[str]]:
        """Runs with a child id of a parent's step that the parent did not list (the ids are
        the step's idempotency key and the child's place: one past the list would be a second
        start)."""
        pipe = self.client.redis.pipeline(transaction=False)
        probes = []
        for parent in kids:
            is_map = parent.startswith(mappers.name)
            for i in range((MAX_ITEMS if is_map else MAX_KIDS) + 1):
                kid = f"{parent}:scatter:{i}" if is_map else f"{parent}:spawn/{i}"
                if kid not in kids[parent]:
                    probes.append((parent, kid))
                    pipe.exists(self.client.keys.run(kid).run)
        found: dict[str, list[str]] = {}
        for (parent, kid), exists in zip(probes, pipe.execute() if probes else [], strict=True):
            if exists:
                found.setdefault(parent, []).append(kid)
        return found

    def _counters(self, report: Report, facts: dict[str, RunFacts]) -> None:
        """I6: each counter equals the number of history events it counts."""
        stats = self.client.stats()
        events = Counter(ev.type for run in facts.values() for ev in run.events)
        for counter, event in COUNTER_EVENTS.items():
            if stats.get(counter, 0) != events.get(event, 0):
                self._fail(
                    report,
                    "I6",
                    "-",
                    f"counter {counter}={stats.get(counter, 0)} but the histories "
                    f"hold {events.get(event, 0)} '{event}' events",
                )

    def _latencies(
        self, report: Report, facts: dict[str, RunFacts], kills: list[tuple[str, int]], restores_ms: list[int]
    ) -> None:
        """Kill -> supervisor re-dispatch (detection) and kill -> step claimed again (recovery).

        A ``crashed`` event names the dead claim's worker and is written by the next claim, so
        its time is the recovery; the ``redispatched`` event just before it is the detection.
        When Redis was restored from an older copy between the kill and the recovery, the clock
        starts at the restore: whatever recovery happened before it was forgotten with it.
        """
        killed = dict(kills)
        for run_id, run in facts.items():
            redispatched_at: int | None = None
            for ev in run.events:
                if ev.type == "redispatched":
                    redispatched_at = ev.at
                if ev.type != "crashed" or ev.worker not in killed or ev.at < killed[ev.worker]:
                    continue  # not a killed worker's claim recovered (a lease lost to a restore, say)
                kill_ms = max([killed[ev.worker], *(t for t in restores_ms if t <= ev.at)])
                recovery = ev.at - kill_ms
                report.recovery_ms.append(recovery)
                if redispatched_at is not None and redispatched_at >= kill_ms:
                    report.detection_ms.append(redispatched_at - kill_ms)
                if recovery > self.recovery_bound_ms:
                    self._fail(
                        report,
                        "I4",
                        run_id,
                        f"{ev.step} ran again {recovery} ms after its worker "
                        f"{ev.worker} was killed (bound {self.recovery_bound_ms} ms)",
                    )

    def _permits(self, report: Report, facts: dict[str, RunFacts]) -> None:
        """I15: the holders the ledger saw at once stayed within the limit; at rest (within a
        lease and a sweep) no permit is held and no unfinished run waits in line."""
        report.permit_waits = sum(ev.type == "permit_wait" for run in facts.values() for ev in run.events)
        report.most_holding = self.ledger.most_holding().get(PERMIT, 0)
        if report.most_holding > PERMITS and not self.restored:
            most = report.most_holding
            self._fail(report, "I15", "-", f"{most} steps held a {PERMIT} permit at once, limit {PERMITS}")
        keys = self.client.keys.permit(PERMIT)
        deadline = time.monotonic() + self.client.settings.lease_s + 2
        while True:
            sec, usec = self.client.redis.time()
            now_ms = int(sec) * 1000 + int(usec) // 1000
            held: list[str] = self.client.redis.zrangebyscore(keys.holders, f"({now_ms}", "+inf")  # type: ignore[assignment]
            if not held or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for run_id in held:
            self._fail(report, "I15", run_id, "holds a permit at rest (its lease was renewed by nobody running)")
        waiting: list[str] = self.client.redis.zrange(keys.waiting, 0, -1)  # type: ignore[assignment]
        for run_id in waiting:
            info = facts[run_id].info if run_id in facts else None
            if info is not None and info.status not in TERMINAL:
                self._fail(report, "I15", run_id, f"still waits in line for a permit at rest ({info.status})")

    def _pending(self, report: Report) -> None:
        """I4 at rest: once every run is done, nothing may be left pending in any queue."""
        queues: set[str] = self.client.redis.smembers(self.client.keys.queues)  # type: ignore[assignment]
        for queue in sorted(queues):
            pending = 0
            for stream in self.client.keys.streams(queue):
                try:
                    pending += self.client.redis.xpending(stream, GROUP)["pending"]
                except redis.ResponseError:  # no group: nothing was ever read from this stream
                    continue
            if pending:
                self._fail(report, "I4", "-", f"{pending} entries still pending in queue {queue!r} at rest")
