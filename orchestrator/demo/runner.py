"""``orchestrator demo``: run the agent on real processes, kill -9 one mid-step, show the recovery.

Starts a private redis-server (or uses ``REDIS_URL``), a supervisor and two workers as
subprocesses, submits one research run, and prints its history live. While the worker that
runs ``study`` has some findings stashed, it is killed with SIGKILL; the supervisor notices the
lapsed lease and another worker resumes the step from the stash. Before booking the meeting
the run waits for a person's approval (a signal): meanwhile every worker is killed, and the
approval (sent by the demo, or typed by the user with ``--approve manually``) still resumes
it. At the end the demo prints the timeline and what resuming saved, measured from what the
simulated model was asked.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import redis

from orchestrator.cli.render import history_text, live_line
from orchestrator.client import Client
from orchestrator.demo.agent import APPROVAL_TIMEOUT_S, research
from orchestrator.embedded import RedisServer
from orchestrator.errors import OrchestratorError
from orchestrator.keys import Keys
from orchestrator.processes import ProcessGroup
from orchestrator.settings import Settings

Echo = Callable[[str], None]
RUN_ID = "acme-competitive-review"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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

    def run(self, competitors: int) -> int:
        self.echo(f"starting a supervisor and 2 workers (logs in {self.data_dir / 'logs'}/) ...")
        self.procs.start("supervisor", "supervisor")
        for _ in range(2):
            self._worker()
        self._wait_for_workers(2)
        run = self.client.submit(
            research, {"company": "Acme", "how_many": competitors, "needs_approval": True}, run_id=RUN_ID
        )
        self.echo(
            f"\nrun {RUN_ID}: research {competitors} competitors of Acme, then, once a person approves, "
            "book a review meeting\n"
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
        """Print history events as they appear; kill the worker running ``study`` once it stashed,
        and every worker once the run waits for its approval."""
        seen, t0 = 0, 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            events = self.client.events(RUN_ID, seen)
            t0 = t0 or events[0].at
            for ev in events:
                self.echo(live_line(ev, t0))
            seen += len(events)
            if any(ev.type in ("completed", "failed", "cancelled") for ev in events):
                return
            if self.kill and self.killed is None:
                self._maybe_kill(t0)
            if self.parked_ms is None and self.client.get(RUN_ID).status == "waiting":
                self._parked(t0)
            time.sleep(0.1)
        raise RuntimeError("the demo run did not finish in time")

    def _maybe_kill(self, t0: int) -> None:
        info = self.client.get(RUN_ID)
        stash = self.client.redis.hget(self.keys.run(RUN_ID).stash, info.idempotency_key)
        stashed = len(json.loads(stash)) if stash else 0
        if info.step != "study" or not info.worker or stashed < 2:
            return
        pid = self.procs.kill(info.worker)
        if pid is None:
            return
        now = self._server_ms()
        self.killed = (info.worker, pid, now)
        self.echo(
            f"  +{(now - t0) / 1000:5.1f}s  {'study':<17} *** kill -9 {info.worker} (pid {pid}) while it "
            f"runs 'study' with {stashed} findings stashed ***"
        )
        spare = self._worker()  # like an orchestrator restarting the container
        self.echo(f"  +{(now - t0) / 1000:5.1f}s  {'':<17} ({spare} started as a replacement)")

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
        with closing(sqlite3.connect(self.world)) as db:
            calls = db.execute(
                "select item, fence, started, seconds from llm_calls where run = ?", (RUN_ID,)
            ).fetchall()
            meetings = db.execute("select count(*) from meetings where run = ?", (RUN_ID,)).fetchone()[0]
            requests = db.execute(
                "select count(*) from booking_requests where idempotency_key like ?", (f"{RUN_ID}:%",)
            ).fetchone()[0]
        if not self.killed:
            self.echo(f"no worker was killed; {len(calls)} model calls, meeting booked {meetings} time(s).")
            return
        kill_s = self.killed[2] / 1000
        history = self.client.history(RUN_ID)
        done_before = [e for e in history.events if e.type == "ok" and e.at < self.killed[2]]
        crashed = next(e for e in history.events if e.type == "crashed")
        finished = [c for c in calls if c[1] == crashed.fence and c[3] is not None]
        cut_short = [c for c in calls if c[1] == crashed.fence and c[3] is None]
        step_work = sum((e.end_ms or 0) - (e.start_ms or 0) for e in done_before) / 1000
        kept_s = sum(c[3] for c in finished)
        lost_s = sum(kill_s - c[2] for c in cut_short)
        recovered = next((e for e in history.events if e.type == "ok" and e.step == crashed.step), None)
        self.echo("what resuming saved (measured from the simulated model's call log):")
        self.echo(
            f"  - {plural(len(done_before), 'step')} committed before the crash, not run again "
            f"({step_work:.1f} s of work)"
        )
        self.echo(
            f"  - {plural(len(finished), 'model call')} of the crashed step stashed, not repeated "
            f"({kept_s:.1f} s); {plural(len(cut_short), 'call')} cut short by the kill, made again "
            f"({lost_s:.1f} s lost)"
        )
        self.echo(
            f"  - in all {step_work + kept_s:.1f} s of model time kept; a restart from scratch would have "
            "paid for all of it again (and, with a real model, got different answers)"
        )
        if recovered and recovered.start_ms:
            self.echo(
                f"  - the step ran again {(recovered.start_ms - self.killed[2]) / 1000:.1f} s after the kill "
                f"(lease {self.settings.lease_s:g} s + supervisor scan)"
            )
        self.echo(
            f"  - the meeting was booked {meetings} time(s) from {plural(requests, 'booking request')}: "
            "the calendar dedupes on the step's idempotency key"
        )
        waited = next((e for e in history.events if e.type == "signalled"), None)
        if waited and self.parked_ms:
            again = sum(
                1 for e in history.events if e.type == "ok" and e.at > self.parked_ms and e.step != "schedule_meeting"
            )
            self.echo(
                f"  - the run waited {(waited.at - self.parked_ms) / 1000:.1f} s for its approval with every worker "
                f"killed, then went on at {waited.step}; steps before it run again: {again}"
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
