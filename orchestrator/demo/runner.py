"""``orchestrator demo``: run the agent on real processes, kill -9 one mid-map, show the recovery.

Starts a private redis-server (or uses ``REDIS_URL``), a supervisor and two workers as
subprocesses, submits one research run, and prints its history live, with each map item's
model calls and events. The ``study`` step maps the competitors: one item each, a run of its
own, at most two calling the simulated model at once (the agent's ``llm`` concurrency limit).
Once an item has committed, the worker running another item's model call is killed with
SIGKILL; the supervisor notices the lapsed lease and another worker runs that item again,
while the committed items stay done. Before booking the meeting the run waits for a person's
approval (a signal): meanwhile every worker is killed, and the approval (sent by the demo, or
typed by the user with ``--approve manually``) still resumes it. At the end the demo prints
the timeline and what resuming saved, measured from what the simulated model was asked.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import redis

from orchestrator.children import children_of
from orchestrator.cli.render import history_text, live_line
from orchestrator.client import Client
from orchestrator.codec import HistoryEvent
from orchestrator.demo.agent import APPROVAL_TIMEOUT_S, LLM, SCHEMA, Call, read_calls, research
from orchestrator.embedded import RedisServer
from orchestrator.errors import OrchestratorError
from orchestrator.keys import Keys
from orchestrator.processes import ProcessGroup
from orchestrator.settings import Settings

Echo = Callable[[str], None]
RUN_ID = "acme-competitive-review"
ITEM_QUIET = frozenset({"submitted", "completed"})  # an item's start shows as its model call, its end as "done"
MAP_EVENTS = frozenset({"children", "child", "children_done"})
KILL_INTO_CALL_S = 0.6  # the kill waits until the model call is this far in: it visibly costs model time


def run_line(ev: HistoryEvent, t0: int) -> str:
    """A live line of the run's own history. A map's events (started, each item's end, all in)
    carry the step the run goes on at afterwards: shown without it, and with item ids short."""
    if ev.type in MAP_EVENTS:
        ev = ev.model_copy(update={"step": None, "detail": (ev.detail or "").replace(f"{RUN_ID}:", "")})
    return live_line(ev, t0)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def again(calls: int) -> str:
    """How a part of the run fared after the kill, from the model calls it made since."""
    return "not run again" if calls == 0 else f"yet {plural(calls, 'model call')} made again"


def companies(calls: Sequence[Call], runs: Sequence[str]) -> str:
    """The competitors that the map items ``runs`` studied, as their model calls name them."""
    return ", ".join(dict.fromkeys(c.item for run in runs for c in calls if c.run == run))


class Demo:
    """One demo run against ``url``; ``echo`` prints (click.echo in the CLI)."""

    def __init__(
        self, url: str, namespace: str, data_dir: Path, echo: Echo, kill: bool, approve: str, url_shown: str
    ) -> None:
        self.settings = Settings(redis_url=url, namespace=namespace)
        self.approve = approve  # "auto": the demo sends the approval; "manually": the user types it
        self.url_shown = url_shown  # the URL as the printed command gives it (never a password)
        self.client = Client(self.settings)
        self.keys = Keys(namespace)
        self.data_dir = data_dir
        self.world = data_dir / "world.sqlite3"
        self.echo = echo
        self.kill = kill
        env = {
            **{k: v for k, v in os.environ.items() if k != "REDIS_URL"},
            "ORCHESTRATOR_REDIS_URL": url,  # the variable that wins over REDIS_URL
            "ORCHESTRATOR_NAMESPACE": namespace,
            "ORCHESTRATOR_DEMO_DB": str(self.world),
        }
        self.procs = ProcessGroup(env, data_dir / "logs")
        self.killed: tuple[str, int, int] | None = None  # worker, pid, server ms
        self.parked_ms: int | None = None  # when the run started to wait for its approval (server ms)
        self.workers = 0
        self.item_events: dict[str, int] = {}  # map item run id -> history events shown
        self.calls_shown = 0  # the last call log row shown

    def run(self, competitors: int) -> int:
        with closing(sqlite3.connect(self.world)) as db:
            db.executescript(SCHEMA)  # before any worker: the live view reads the call log from the start
        self.echo(f"starting a supervisor and 2 workers (logs in {self.data_dir / 'logs'}/) ...")
        self.procs.start("supervisor", "supervisor")
        for _ in range(2):
            self._worker()
        self._wait_for_workers(2)
        run = self.client.submit(
            research, {"company": "Acme", "how_many": competitors, "needs_approval": True}, run_id=RUN_ID
        )
        limit = research.concurrency_limits[LLM].limit
        self.echo(
            f"\nrun {RUN_ID}: research {competitors} competitors of Acme in parallel (a map, at most {limit} "
            f"model calls at once: concurrency limit {LLM}), then, once a person approves, book a review meeting\n"
        )
        self._follow(timeout_s=120 if self.approve == "auto" else APPROVAL_TIMEOUT_S + 60)
        final = run.wait(timeout_s=5)
        self.echo(f"\nresult: {final.summary}\nmeeting: {final.meeting}\n")
        self.echo(history_text(self.client.history(RUN_ID)))
        self.echo("")
        self._report_savings()
        return 0

    def _worker(self, name: str | None = None) -> str:
        self.workers += 1
        name = name or f"worker-{self.workers}"
        self.procs.start(name, "worker", "orchestrator.demo.agent:research", "--concurrency", "4", "--worker-id", name)
        return name

    def _server_ms(self) -> int:
        sec, usec = self.client.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    def _wait_for_workers(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while self.client.redis.zcard(self.keys.workers) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not start; see {self.data_dir / 'logs'}")
            time.sleep(0.05)

    def _follow(self, timeout_s: float) -> None:
        """Print the run's history events and its map items' as they appear; kill the worker
        running an item mid-map, and every worker once the run waits for its approval."""
        seen, t0 = 0, 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            events = self.client.events(RUN_ID, seen)
            t0 = t0 or events[0].at
            seen += len(events)
            items = children_of(self.client.redis, self.keys, RUN_ID)
            lines = [(ev.at, run_line(ev, t0)) for ev in events]
            lines += self._item_lines(items, t0) + self._call_lines(items, t0)
            for _, line in sorted(lines, key=lambda at_line: at_line[0]):
                self.echo(line)
            if any(ev.type in ("completed", "failed", "cancelled") for ev in events):
                return
            if self.kill and self.killed is None and items:
                self._maybe_kill(items, t0)
            if self.parked_ms is None and self.client.get(RUN_ID).waiting is not None:
                self._parked(t0)
            time.sleep(0.1)
        raise RuntimeError("the demo run did not finish in time")

    def _item_lines(self, items: list[str], t0: int) -> list[tuple[int, str]]:
        """What the map items' histories say since the last look (a wait for a permit, a commit,
        a crash), each line with the server time it happened."""
        lines = []
        for index, item in enumerate(items):
            events = self.client.events(item, self.item_events.get(item, 0))
            self.item_events[item] = self.item_events.get(item, 0) + len(events)
            labelled = [ev.model_copy(update={"step": f"{ev.step}[{index}]"}) for ev in events]
            lines += [(ev.at, live_line(ev, t0)) for ev in labelled if ev.type not in ITEM_QUIET]
        return lines

    def _call_lines(self, items: list[str], t0: int) -> list[tuple[int, str]]:
        """Each model call a map item started since the last look (from the call log: the item
        holds a permit then), timed when it is seen."""
        lines = []
        for call in read_calls(self.world, RUN_ID, self.calls_shown):
            self.calls_shown = call.rowid
            if call.run in items:
                worker = self.client.get(call.run).worker
                label, on = f"{call.step}[{items.index(call.run)}]", f" on {worker}" if worker else ""
                now = self._server_ms()
                text = f"{call.item}: model call started{on} (try {call.attempt})"
                lines.append((now, f"  +{(now - t0) / 1000:5.1f}s  {label:<17} {text}"))
        return lines

    def _maybe_kill(self, items: list[str], t0: int) -> None:
        """kill -9 the worker running a map item's model call once another item has committed:
        the kill lands in the middle of the fan-out, with work done and work in flight."""
        wait = self.client.get(RUN_ID).children
        target = self._in_flight(items) if wait is not None and wait.done > 0 else None
        if wait is None or target is None:
            return
        worker, call = target
        pid = self.procs.kill(worker)
        if pid is None:
            return
        now = self._server_ms()
        self.killed = (worker, pid, now)
        label = f"{call.step}[{items.index(call.run)}]"
        self.echo(
            f"  +{(now - t0) / 1000:5.1f}s  {label:<17} *** kill -9 {worker} (pid {pid}) in the middle of the map: "
            f"{wait.done} of {wait.total} items committed, {call.item}'s model call in flight ***"
        )
        spare = self._worker()  # like an orchestrator restarting the container
        self.echo(f"  +{(now - t0) / 1000:5.1f}s  {'':<17} ({spare} started as a replacement)")

    def _in_flight(self, items: list[str]) -> tuple[str, Call] | None:
        """A map item's model call that has run ``KILL_INTO_CALL_S`` and not finished, and the
        worker making it (the workers run on this machine: the call log's clock is ours)."""
        for call in read_calls(self.world, RUN_ID):
            running = call.run in items and call.seconds is None and time.time() - call.started >= KILL_INTO_CALL_S
            worker = self.client.get(call.run).worker if running else None
            if worker:
                return worker, call
        return None

    def _parked(self, t0: int) -> None:
        """The run waits for its approval: kill -9 every worker, then approve it (or tell the
        user how to): the signal alone brings it back, from where it waited."""
        self.parked_ms = now = self._server_ms()
        at = f"  +{(now - t0) / 1000:5.1f}s  {'':<17}"
        self.echo(f"{at} the run waits for approval: no worker slot, no lease, no queue entry; only its keys in Redis")
        killed = [name for name in sorted(self.procs.procs) if name.startswith("worker-") and self.procs.kill(name)]
        self.echo(f"{at} *** kill -9 {', '.join(killed)}: not one worker left while it waits ***")
        if self.approve == "manually":
            spare = self._worker()
            self.echo(f"{at} ({spare} started; the run goes on when you approve it)\n")
            payload = json.dumps({"approved": True, "by": "you"})
            self.echo("  approve it from another terminal (the run waits up to an hour):\n")
            self.echo(
                f"    orchestrator --redis-url {self.url_shown} --namespace {self.settings.namespace} signal "
                f"{RUN_ID} approval '{payload}' --workflow orchestrator.demo.agent:research\n"
            )
            return
        time.sleep(2)
        sent = self.client.signal(
            RUN_ID, "approval", {"approved": True, "by": "the demo"}, signal_id="demo-approval", workflow=research
        )
        self.echo(
            f"  +{(self._server_ms() - t0) / 1000:5.1f}s  {'':<17} approval sent with no worker alive: "
            f"{sent.outcome}, step {sent.step} queued"
        )
        spare = self._worker()
        self.echo(f"  +{(self._server_ms() - t0) / 1000:5.1f}s  {'':<17} ({spare} started)")

    def _report_savings(self) -> None:
        """What the kill cost and what resuming kept, measured from the simulated model's call
        log (the outside world) and the runs' histories; then the meeting and the approval."""
        calls = read_calls(self.world, RUN_ID)
        with closing(sqlite3.connect(self.world)) as db:
            meetings = db.execute("select count(*) from meetings where run = ?", (RUN_ID,)).fetchone()[0]
            requests = db.execute(
                "select count(*) from booking_requests where idempotency_key like ?", (f"{RUN_ID}:%",)
            ).fetchone()[0]
        history = self.client.history(RUN_ID)
        if self.killed:
            kill_ms = self.killed[2]
            items = {item: self.client.events(item) for item in children_of(self.client.redis, self.keys, RUN_ID)}
            self.echo("what resuming saved (measured from the simulated model's call log):")
            kept = self._steps_kept(history.events, calls, kill_ms) + self._items_kept(items, calls, kill_ms)
            self.echo(
                f"  - in all {kept:.1f} s of model time kept; a restart from scratch would have paid for all of it "
                "again (and, with a real model, got different answers)"
            )
            self._recovery(items, calls, kill_ms)
        else:
            self.echo(f"no worker was killed{self._why_no_kill()}: {plural(len(calls), 'model call')} in all")
        self.echo(
            f"  - the meeting was booked {meetings} time(s) from {plural(requests, 'booking request')}: "
            "the calendar dedupes on the step's idempotency key"
        )
        self._approval(history.events)

    def _why_no_kill(self) -> str:
        """Why a kill that was asked for did not happen: the moment it waits for never came."""
        if not self.kill:
            return ""
        limit = research.concurrency_limits[LLM].limit
        items = len(children_of(self.client.redis, self.keys, RUN_ID))
        if items > limit:
            return " (no map item's model call was in flight after another item had committed)"
        return (
            f" (a limit of {limit} lets all {items} map items run at once, so none waits for another to commit: "
            f"pass --competitors {limit + 1} or more)"
        )

    def _steps_kept(self, events: list[HistoryEvent], calls: list[Call], kill_ms: int) -> float:
        """The run's steps committed before the kill: the model time of their committed attempts,
        and any call they made again after it."""
        done = [(e.step or "", e.fence) for e in events if e.type == "ok" and e.at < kill_ms]
        steps = [step for step, _ in done]
        kept = sum(c.seconds or 0 for c in calls if c.run == RUN_ID and (c.step, c.fence) in done)
        made = sum(c.run == RUN_ID and c.step in steps and c.started * 1000 >= kill_ms for c in calls)
        self.echo(
            f"  - {plural(len(steps), 'step')} committed before the kill ({', '.join(steps)}), "
            f"{again(made)}: {kept:.1f} s of model time"
        )
        return kept

    def _items_kept(self, items: dict[str, list[HistoryEvent]], calls: list[Call], kill_ms: int) -> float:
        """The map items committed before the kill (kept), those it cut short (run again) and the rest."""
        done = {i: e.fence for i, evs in items.items() for e in evs if e.type == "ok" and e.at < kill_ms}
        kept = sum(c.seconds or 0 for c in calls if c.run in done and c.fence == done[c.run])
        made = sum(c.run in done and c.started * 1000 >= kill_ms for c in calls)
        self.echo(
            f"  - {len(done)} of {plural(len(items), 'map item')} committed before the kill "
            f"({companies(calls, list(done))}), {again(made)}: {kept:.1f} s of model time"
        )
        cut = list(dict.fromkeys(c.run for c in calls if c.run in items and c.seconds is None))
        lost = sum(kill_ms / 1000 - c.started for c in calls if c.run in cut and c.seconds is None)
        rerun = {c.run for c in calls if c.run in cut and c.seconds is not None and c.started * 1000 > kill_ms}
        self.echo(
            f"  - {plural(len(cut), 'map item')} cut short by the kill ({companies(calls, cut)}), "
            f"{'run again' if len(rerun) == len(cut) else f'{len(rerun)} of them run again'}: "
            f"{lost:.1f} s of model time lost"
        )
        self._untouched([i for i in items if i not in done and i not in cut], calls, kill_ms)
        return kept

    def _untouched(self, rest: list[str], calls: list[Call], kill_ms: int) -> None:
        """The map items the kill neither found committed nor cut short: in flight on the other
        worker, or not started yet (waiting in line for a permit)."""
        if not rest:
            return
        mine = [c for c in calls if c.run in rest]
        flying = len({c.run for c in mine if c.started * 1000 < kill_ms})
        when = [f"{flying} in flight on another worker at the kill"] if flying else []
        when += [f"{len(rest) - flying} started after it"] if len(rest) > flying else []
        self.echo(
            f"  - {plural(len(rest), 'other map item')} ({companies(calls, rest)}) went on untouched "
            f"({', '.join(when)}): {plural(len(mine), 'model call')}"
        )

    def _recovery(self, items: dict[str, list[HistoryEvent]], calls: list[Call], kill_ms: int) -> None:
        """How soon each item the kill cut short ran again (its ``crashed`` event is in its own history)."""
        for item, events in items.items():
            crashed = [i for i, e in enumerate(events) if e.type == "crashed"]
            ok = next((e for e in events[crashed[0] :] if e.type == "ok"), None) if crashed else None
            if ok and ok.start_ms:
                self.echo(
                    f"  - map item {item} ({companies(calls, [item])}) ran again "
                    f"{(ok.start_ms - kill_ms) / 1000:.1f} s after the kill, on {ok.worker} "
                    f"(lease {self.settings.lease_s:g} s + supervisor scan)"
                )

    def _approval(self, events: list[HistoryEvent]) -> None:
        """How long the run waited for its approval with no worker, and that nothing before it ran again."""
        waited = next((e for e in events if e.type == "signalled"), None)
        if waited and self.parked_ms:
            rerun = sum(1 for e in events if e.type == "ok" and e.at > self.parked_ms and e.step != "schedule_meeting")
            self.echo(
                f"  - the run waited {(waited.at - self.parked_ms) / 1000:.1f} s for its approval with every worker "
                f"killed, then went on at {waited.step}; steps before it run again: {rerun}"
            )

    def close(self) -> None:
        self.procs.stop_all()
        self.client.close()


def run_demo(
    *, redis_url: str | None, data_dir: Path, kill: bool, competitors: int, echo: Echo, approve: str = "auto"
) -> int:
    """The whole demo; returns the exit code. Cleans up every process it started."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "logs").mkdir(parents=True)
    server = None
    namespace = f"demo-{uuid.uuid4().hex[:6]}"
    url_shown = '"$REDIS_URL"'  # the user's own URL: not printed, it may hold a password
    if redis_url is None:
        server = RedisServer(data_dir / "redis", appendfsync="everysec").start()
        redis_url = url_shown = server.url
        echo(f"started a private redis-server at {redis_url} (AOF on, data in {data_dir / 'redis'}/)")
    demo = Demo(redis_url, namespace, data_dir, echo, kill, approve, url_shown)
    try:
        code = demo.run(competitors)
        if server is None:  # the user's Redis: the demo's counters stay there, in its namespace
            echo(
                f"\nthe demo's figures stay in namespace {namespace}: "
                f"orchestrator --namespace {namespace} stats --workflow research"
            )
        return code
    except (OrchestratorError, redis.RedisError, RuntimeError) as exc:
        echo(f"demo failed: {exc}")
        return 1
    finally:
        demo.close()
        if server:
            server.stop()
        echo(f"\nstopped the demo's processes; logs and data are in {data_dir}/")
