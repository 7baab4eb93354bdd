"""Steps run by real RQ workers (orchestrator.bridge): kill -9 of work-horses, RQ workers and
our own worker, RQ's timeout, and the invariants the chaos checker holds every run to.

Each test has a Redis of its own (RQ's keys are not namespaced) and real ``rq worker``
processes started as docs/from-rq.md says. ``workers.rqflows.bridged`` is prepare (our worker)
-> tool (RQ, timeout 3 s) -> finish (our worker); every step records each execution and the
pid that ran it in the ledger.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from orchestrator import Client, Settings, Worker
from orchestrator.bridge import RQ
from orchestrator.bridge.executor import SERIALIZER, BridgedTask, job_id
from orchestrator.bridge.watch import enqueue
from orchestrator.chaos.ledger import Ledger
from orchestrator.codec import HistoryEvent
from orchestrator.embedded import RedisServer
from orchestrator.errors import DefinitionError
from orchestrator.keys import Keys
from tests.conftest import ON_CLUSTER, fast_settings
from tests.harness import Proc, start_rq_worker, start_worker, supervisor_thread, worker_thread
from tests.helpers import readme_code, wait_until
from workers import rqflows

pytestmark = pytest.mark.skipif(ON_CLUSTER, reason="RQ does not support Redis Cluster (test_rq_refused_on_cluster)")


@pytest.fixture
def setup(fresh_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, Client, Ledger]]:
    settings = fast_settings(fresh_server.url)
    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", settings.plain_url())
    monkeypatch.setenv("ORCHESTRATOR_NAMESPACE", settings.namespace)
    client = Client(settings)
    plain = redis.Redis.from_url(fresh_server.url, decode_responses=True)
    yield settings, client, Ledger(plain, settings.namespace)
    client.close()
    plain.close()


@dataclass(frozen=True)
class Fleet:
    rq: Proc  # a real `rq worker` process
    ours: Worker  # our worker, on a thread of this process


@contextmanager
def fleet(settings: Settings, tmp: Path, **rq_options: Any) -> Iterator[Fleet]:
    """A real ``rq worker`` on the tool queue and one of ours serving ``bridged``; the RQ
    worker is killed (-9) at the end: stopping one can stall a minute in RQ 3.0's pubsub."""
    rq_worker = start_rq_worker(settings, tmp, rqflows.TOOLS, **rq_options)
    try:
        with worker_thread([rqflows.bridged], settings) as worker:
            yield Fleet(rq_worker, worker)
    finally:
        rq_worker.kill()


def tool_runs(ledger: Ledger, run_id: str) -> list[Any]:
    """The executions of the run's tool step, in order (``saw`` is the pid that ran it)."""
    return [ex for ex in ledger.executions() if ex.key == f"{run_id}:tool"]


def check_invariants(settings: Settings, client: Client, ledger: Ledger, run_id: str) -> dict[str, Any]:
    """What must hold after any of these runs, whatever was killed: the run completed, each
    step committed once, no step executed again after its commit (an execution's fence is
    never above the committed one's), the tool's effect applied (once: the receiver dedupes by
    the idempotency key). Returns the records."""
    info = client.get(run_id)
    assert info.status == "completed", info
    raw = client.redis.hgetall(Keys(settings.namespace, settings.partitions).run(run_id).results)
    records = {key: json.loads(value) for key, value in raw.items()}
    assert sorted(records) == sorted(f"{run_id}:{s}" for s in ("prepare", "tool", "finish"))
    for ex in ledger.executions():
        if ex.run == run_id:
            assert ex.fence <= records[ex.key]["fence"], f"{ex.key} executed after its commit: {ex}"
    assert [key for key in ledger.effects() if key.startswith(f"{run_id}:")] == [f"{run_id}:tool"]
    return records


def horse_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie the RQ worker has not reaped yet is gone for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for_tool(ledger: Ledger, run_id: str, n: int = 1) -> Any:
    return wait_until(lambda: len(tool_runs(ledger, run_id)) >= n and tool_runs(ledger, run_id)[n - 1], what="tool ran")


def events(client: Client, run_id: str, step: str) -> list[HistoryEvent]:
    return [e for e in client.history(run_id).events if e.step == step]


def test_bridged_step_runs_in_an_rq_work_horse_between_steps_of_ours(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    settings, client, ledger = setup
    with fleet(settings, tmp_path) as f:
        state = client.submit(rqflows.bridged, {"n": 1}, run_id="happy").wait(timeout_s=30)

        def attempts() -> dict[tuple[str, str, str], float]:
            return {
                (s.labels["step"], s.labels["executor"], s.labels["outcome"]): s.value
                for metric in f.ours.metrics.registry.collect()
                if metric.name == "orchestrator_step_attempts"
                for s in metric.samples
                if s.name.endswith("_total")
            }

        # the run may complete before the watch's next look at the finished job
        samples = wait_until(lambda: attempts() if attempts()[("tool", "rq", "ok")] else None, what="counted")
    assert state.n == 21 and state.effect
    ours, horse, ours_again = state.pids
    assert ours == ours_again == os.getpid()  # the worker thread runs in this process
    assert horse not in (os.getpid(), f.rq.pid)  # a forked work-horse
    check_invariants(settings, client, ledger, "happy")
    ok = [e for e in events(client, "happy", "tool") if e.type == "ok"]
    assert len(ok) == 1
    assert ok[0].executor == "rq" and ok[0].rq_job == job_id(settings.namespace, "happy:tool", ok[0].fence)
    assert ok[0].rq_worker is not None and ok[0].rq_worker.startswith("rq-")
    # an ordinary RQ job to RQ's own tools (rq info, rq-dashboard)
    rq_redis = redis.Redis.from_url(settings.plain_url())
    assert FinishedJobRegistry(rqflows.TOOLS, connection=rq_redis).get_job_ids() == [ok[0].rq_job]
    assert samples[("tool", "rq", "ok")] == 1 and samples[("prepare", "worker", "ok")] == 1


def test_simple_worker_runs_the_step_in_its_own_process(setup: tuple[Settings, Client, Ledger], tmp_path: Path) -> None:
    settings, client, ledger = setup
    with fleet(settings, tmp_path, simple=True) as f:
        state = client.submit(rqflows.bridged, {"n": 1}, run_id="simple").wait(timeout_s=30)
    assert state.pids[1] == f.rq.pid
    check_invariants(settings, client, ledger, "simple")


@pytest.mark.parametrize("block_alarm", [False, True], ids=["alarm", "alarm-blocked"])
def test_step_past_its_rq_timeout_is_killed_and_retried(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path, block_alarm: bool
) -> None:
    """RQ's alarm ends a step that sleeps past timeout_s; one that blocks the alarm (as a hang
    in C code would) is killed by the watch through RQ's stop command, a lease after its
    timeout instead of RQ's own minute. Either way the horse is gone and the step is retried."""
    settings, client, ledger = setup
    with fleet(settings, tmp_path):
        run = client.submit(rqflows.bridged, {"n": 1, "hang_s": 60, "block_alarm": block_alarm}, run_id="hang")
        hung = wait_for_tool(ledger, "hang")
        state = run.wait(timeout_s=30)
        assert horse_gone(hung.saw)
    assert [ex.attempt for ex in tool_runs(ledger, "hang")] == [1, 2]
    assert state.n == 21
    check_invariants(settings, client, ledger, "hang")
    outcomes = [e for e in events(client, "hang", "tool") if e.type in ("timeout", "ok", "crashed")]
    assert [e.type for e in outcomes] == ["timeout", "ok"]
    assert outcomes[0].rq_job and outcomes[0].rq_job != outcomes[1].rq_job  # a job per claim


def test_kill_9_of_the_work_horse_mid_step_is_a_crash_resumed_from_its_stash(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    settings, client, ledger = setup
    with fleet(settings, tmp_path):
        run = client.submit(rqflows.bridged, {"n": 1, "work_s": 2.0}, run_id="horse")
        first = wait_for_tool(ledger, "horse")
        stash_key = Keys(settings.namespace, settings.partitions).run("horse").stash
        wait_until(lambda: client.redis.hget(stash_key, "horse:tool"), what="a stash")
        os.kill(first.saw, signal.SIGKILL)
        state = run.wait(timeout_s=30)
    runs = tool_runs(ledger, "horse")
    assert len(runs) == 2 and runs[1].saw != first.saw
    check_invariants(settings, client, ledger, "horse")
    types = [e.type for e in events(client, "horse", "tool")]
    assert types.count("crashed") == 1 and types[-1] == "ok"
    assert state.resumed_from > 0  # the second attempt started from the first one's stash


def test_kill_9_of_the_work_horse_after_its_commit_runs_nothing_again(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    """The horse dies after the commit is durable and before RQ hears of it: the watch finds
    the commit (the run's record) and the step is not run again."""
    settings, client, ledger = setup
    with fleet(settings, tmp_path, faults="after_persist_before_ack=kill@tool"):
        client.submit(rqflows.bridged, {"n": 1}, run_id="after").wait(timeout_s=30)
        rq_redis = redis.Redis.from_url(settings.plain_url())
        failed = wait_until(lambda: FailedJobRegistry(rqflows.TOOLS, connection=rq_redis).get_job_ids())
    assert len(tool_runs(ledger, "after")) == 1
    check_invariants(settings, client, ledger, "after")
    assert "crashed" not in [e.type for e in events(client, "after", "tool")]
    assert len(failed) == 1  # RQ saw its work-horse die


def test_kill_9_of_the_rq_worker_leaves_its_horse_to_finish(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    """RQ's worker process dies, its work-horse lives on and commits: nothing runs twice."""
    settings, client, ledger = setup
    rq_worker = start_rq_worker(settings, tmp_path, rqflows.TOOLS)
    with worker_thread([rqflows.bridged], settings):
        run = client.submit(rqflows.bridged, {"n": 1, "work_s": 1.5}, run_id="parent")
        wait_for_tool(ledger, "parent")
        rq_worker.kill()
        run.wait(timeout_s=30)
    assert len(tool_runs(ledger, "parent")) == 1
    check_invariants(settings, client, ledger, "parent")


def test_kill_9_of_the_rq_worker_and_its_horse_is_a_crash_another_rq_worker_recovers(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    """The whole RQ machine dies (worker and horse, kill -9): the horse's beat stops, the step is
    re-dispatched as a crash and a second RQ worker runs it again from its stash."""
    settings, client, ledger = setup
    first = start_rq_worker(settings, tmp_path, rqflows.TOOLS, name="rq1")
    second: Proc | None = None
    try:
        with worker_thread([rqflows.bridged], settings):
            run = client.submit(rqflows.bridged, {"n": 1, "work_s": 2.0}, run_id="machine")
            horse = wait_for_tool(ledger, "machine")
            first.kill()
            os.kill(horse.saw, signal.SIGKILL)
            second = start_rq_worker(settings, tmp_path, rqflows.TOOLS, name="rq2")
            run.wait(timeout_s=30)
    finally:
        first.kill()
        if second is not None:
            second.kill()
    runs = tool_runs(ledger, "machine")
    assert len(runs) == 2
    check_invariants(settings, client, ledger, "machine")
    assert "crashed" in [e.type for e in events(client, "machine", "tool")]


def test_a_late_commit_of_a_horse_whose_claim_was_replaced_is_fenced(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    """Our worker dies (kill -9) while its bridged step runs on RQ; the supervisor re-dispatches
    the step to another worker, whose own RQ job runs it again. The first horse's commit comes
    late and is refused: one commit, the effect applied once."""
    settings, client, ledger = setup
    rq_worker = start_rq_worker(settings, tmp_path, rqflows.TOOLS)
    ours = start_worker(settings, tmp_path, "workers.rqflows:ALL", name="w1")
    other: Proc | None = None
    try:
        with supervisor_thread(settings):
            run = client.submit(rqflows.bridged, {"n": 1, "work_s": 2.0}, run_id="late")
            wait_for_tool(ledger, "late")
            ours.kill()
            other = start_worker(settings, tmp_path, "workers.rqflows:ALL", name="w2")
            run.wait(timeout_s=40)
            records = check_invariants(settings, client, ledger, "late")
            wait_until(lambda: "fenced" in [e.type for e in events(client, "late", "tool")], what="fenced")
    finally:
        for proc in (ours, other, rq_worker):
            if proc is not None:
                proc.kill()
    runs = tool_runs(ledger, "late")
    assert len(runs) == 2 and records["late:tool"]["fence"] == runs[1].fence
    fenced = next(e for e in events(client, "late", "tool") if e.type == "fenced")
    assert fenced.fence == runs[0].fence and fenced.executor == "rq"


def test_an_enqueue_sent_twice_for_one_claim_is_one_rq_job(setup: tuple[Settings, Client, Ledger]) -> None:
    settings, _, _ = setup
    rq_redis = redis.Redis.from_url(settings.plain_url())
    first = job_id(settings.namespace, "r1:tool", 1765000000000)  # its id rules: tests/unit/test_bridge.py
    task = BridgedTask(
        namespace=settings.namespace, partitions=settings.partitions, module="workers.rqflows", run="r1",
        wf="bridged", step="tool", visit=1, queue="default", entry_id="1-0", token="w:1", fence=1765000000000,
        attempt=1, errors=0, worker="w", start_ms=0, result_ttl_ms=1000, lease_ms=800,
        max_payload_bytes=1 << 20, max_run_steps=100, max_map_items=100,
    )  # fmt: skip
    sent = [enqueue(rq_redis, RQ("ids"), first, task, description="d", meta={}) for _ in range(2)]
    assert sent == [True, False]
    assert Queue("ids", connection=rq_redis, serializer=SERIALIZER).get_job_ids() == [first]


def test_a_step_that_keeps_killing_its_work_horse_is_quarantined(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    settings, client, ledger = setup
    with fleet(settings, tmp_path):
        client.submit(rqflows.bridged, {"die": True}, run_id="doomed")
        info = wait_until(lambda: (i := client.get("doomed")).status == "failed" and i, timeout_s=30, what="fail")
    assert info.error is not None and info.error.type == "Quarantined"
    assert len(tool_runs(ledger, "doomed")) == settings.max_crashes
    redispatched = [e for e in client.history("doomed").events if e.type == "redispatched"]
    assert len(redispatched) == settings.max_crashes
    assert all("stopped without an outcome" in (e.detail or "") for e in redispatched)


def test_a_job_rq_lost_before_it_started_is_handed_back_not_counted(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    """The job vanishes from RQ's queue before any RQ worker took it (a flush, a restore of an
    older copy): nothing of the step ran, so it is handed back (no crash counted, which would
    quarantine a step for RQ's loss) and its next claim's job runs."""
    settings, client, ledger = setup
    rq_redis = redis.Redis.from_url(settings.plain_url())
    rq_worker: Proc | None = None
    try:
        with worker_thread([rqflows.bridged], settings):
            run = client.submit(rqflows.bridged, {"n": 1}, run_id="lost")
            queue = Queue(rqflows.TOOLS, connection=rq_redis, serializer=SERIALIZER)
            (lost,) = wait_until(queue.get_job_ids, what="the tool's RQ job")
            rq_redis.delete(Job.key_for(lost))
            wait_until(lambda: "released" in [e.type for e in events(client, "lost", "tool")], what="hand-back")
            rq_worker = start_rq_worker(settings, tmp_path, rqflows.TOOLS)
            run.wait(timeout_s=30)
    finally:
        if rq_worker is not None:
            rq_worker.kill()
    assert len(tool_runs(ledger, "lost")) == 1  # the lost job never ran
    check_invariants(settings, client, ledger, "lost")
    assert "crashed" not in [e.type for e in events(client, "lost", "tool")] and client.get("lost").crashes == 0


def test_a_job_rq_lost_while_it_ran_is_a_crash(setup: tuple[Settings, Client, Ledger], tmp_path: Path) -> None:
    """The job vanishes from RQ while its horse runs: a crash of the step (re-dispatched, the
    reason in the event); whichever of the old horse's commit and the new claim's comes first
    is the one persisted, once."""
    settings, client, ledger = setup
    rq_redis = redis.Redis.from_url(settings.plain_url())
    with fleet(settings, tmp_path):
        run = client.submit(rqflows.bridged, {"n": 1, "work_s": 1.5}, run_id="gone")
        wait_for_tool(ledger, "gone")
        job = job_id(settings.namespace, "gone:tool", client.get("gone").fence)  # the running claim's
        assert rq_redis.delete(Job.key_for(job)) == 1
        run.wait(timeout_s=30)
    redispatched = [e for e in client.history("gone").events if e.type == "redispatched"]
    assert len(redispatched) == 1 and "RQ lost its job" in (redispatched[0].detail or "")
    check_invariants(settings, client, ledger, "gone")


def test_readme_example_runs_model_written_code_on_an_rq_worker(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's example, verbatim, as the module an app keeps it in (the RQ worker imports it)."""
    settings, client, _ = setup
    (tmp_path / "readme_rq.py").write_text(readme_code("### Running steps on RQ"))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("readme_rq")
    rq_worker = start_rq_worker(settings, tmp_path, "tools", pythonpath=tmp_path)
    try:
        with worker_thread([module.pipeline], settings):
            state = client.submit(module.pipeline, {"code": "print(6 * 7)"}, run_id="readme").wait(timeout_s=30)
    finally:
        rq_worker.kill()
        sys.modules.pop("readme_rq", None)
    assert state.report == "the code printed 42"
    (ok,) = [e for e in events(client, "readme", "run_code") if e.type == "ok"]
    assert ok.executor == "rq" and ok.rq_worker


def test_an_executor_that_is_not_rq_is_refused_naming_the_step() -> None:
    flow = rqflows.Workflow("bad_executor", state=rqflows.Job)
    with pytest.raises(DefinitionError, match=r"step 'x' of workflow 'bad_executor': executor='tools' is invalid"):

        @flow.step(executor="tools")  # type: ignore[arg-type]
        def x(ctx: Any, state: Any) -> None: ...


def test_a_step_defined_in_main_is_refused_with_the_reason(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path
) -> None:
    settings, client, _ = setup
    flow = rqflows.Workflow("in_main", state=rqflows.Job)

    def tool(ctx: Any, state: Any) -> None: ...

    tool.__module__ = "__main__"
    flow.step(executor=RQ("nobody"), retry=rqflows.Retry(max_attempts=1))(tool)
    with worker_thread([flow], settings):
        run = client.submit(flow, {}, run_id="main")
        wait_until(lambda: client.get("main").status == "failed", what="run failed")
    assert "defined in __main__, which an RQ worker cannot import" in str(client.get("main").error)
    del run


def test_runs_why_says_where_a_bridged_step_is_in_rq(setup: tuple[Settings, Client, Ledger], tmp_path: Path) -> None:
    """No RQ worker listening: `runs why` says so and how to start one; once one takes the job,
    it names the job and the RQ worker running it."""
    settings, client, ledger = setup
    rq_worker: Proc | None = None
    try:
        with worker_thread([rqflows.bridged], settings):
            run = client.submit(rqflows.bridged, {"work_s": 2.0}, run_id="why")
            waiting = wait_until(lambda: (w := client.why("why")).details.get("rq_status") == "queued" and w)
            assert waiting.waiting_for == "worker" and waiting.details["rq_workers"] == 0
            assert f"no RQ worker listens on it: start one (rq worker {rqflows.TOOLS} -S {SERIALIZER})" in waiting.text
            rq_worker = start_rq_worker(settings, tmp_path, rqflows.TOOLS)
            wait_for_tool(ledger, "why")
            running = client.why("why")
            assert running.details["rq_status"] == "started" and running.details["rq_worker"]
            assert f"Its code runs on RQ: job {running.details['rq_job']} on RQ worker" in running.text
            run.wait(timeout_s=30)
    finally:
        if rq_worker is not None:
            rq_worker.kill()
    check_invariants(settings, client, ledger, "why")


def test_a_step_waiting_on_rq_holds_one_of_its_workers_slots(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path, fresh_server: RedisServer
) -> None:
    """As the README says: a worker with one slot watching a step on RQ starts nothing else."""
    _, client, ledger = setup
    settings = fast_settings(fresh_server.url, namespace=client.settings.namespace, concurrency=1)
    rq_worker: Proc | None = None
    try:
        with worker_thread([rqflows.bridged], settings):
            first = client.submit(rqflows.bridged, {}, run_id="slot-a")
            wait_until(lambda: client.why("slot-a").details.get("rq_status") == "queued", what="on RQ")
            second = client.submit(rqflows.bridged, {}, run_id="slot-b")
            time.sleep(1.0)  # a free slot would have run slot-b's first step many times over
            assert [ex.key for ex in ledger.executions() if ex.run == "slot-b"] == []
            rq_worker = start_rq_worker(settings, tmp_path, rqflows.TOOLS)
            first.wait(timeout_s=30)
            second.wait(timeout_s=30)
    finally:
        if rq_worker is not None:
            rq_worker.kill()


def test_readme_example_starts_a_run_from_rq_code_and_calls_back_once(
    setup: tuple[Settings, Client, Ledger], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's second example verbatim: an RQ job starts the run, an RQ job runs its step,
    and one RQ job is the callback when it completes (the supervisor sends it)."""
    settings, client, _ = setup
    app = tmp_path / "app"
    (app / "myapp").mkdir(parents=True)
    (app / "myapp" / "__init__.py").write_text("")
    (app / "myapp" / "flows.py").write_text(readme_code("### Running steps on RQ"))
    (app / "myapp" / "hooks.py").write_text(
        "import json, os, redis\n\n"
        "def run_done(run_id, status, error):\n"
        "    client = redis.Redis.from_url(os.environ['ORCHESTRATOR_REDIS_URL'])\n"
        "    client.rpush('readme-callbacks', json.dumps([run_id, status, error]))\n"
    )
    monkeypatch.syspath_prepend(str(app))
    flows = importlib.import_module("myapp.flows")
    rq_worker = start_rq_worker(settings, tmp_path, ["default", "tools", "notify"], pythonpath=app)
    redis_conn = redis.Redis.from_url(settings.plain_url())
    try:
        with worker_thread([flows.pipeline], settings), supervisor_thread(settings):
            exec(readme_code("### Running steps on RQ", block=1), {"redis_conn": redis_conn})
            wait_until(lambda: redis_conn.llen("readme-callbacks"), timeout_s=30, what="the callback")
            time.sleep(0.5)  # a second callback would land meanwhile
    finally:
        rq_worker.kill()
        for name in ("myapp.flows", "myapp"):
            sys.modules.pop(name, None)
    assert client.get("order-42").status == "completed"
    assert client.state("order-42")["report"] == "the code printed 42"
    assert [json.loads(x) for x in redis_conn.lrange("readme-callbacks", 0, -1)] == [["order-42", "completed", None]]
