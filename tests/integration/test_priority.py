"""Run priorities: a run submitted ``high`` (``low``) goes to its queue's lane for that level, a
queue of its own; workers start the entries they read by the 4:2:1 rule (``Picker``), so a
high-priority run read behind a backlog starts first and a low-priority run still progresses
under a sustained high-priority load. Map items run at their run's level."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from pydantic import BaseModel

from orchestrator import Client, Settings, StepContext, Workflow
from orchestrator.chaos.ledger import Ledger
from orchestrator.cli.render import status_text
from orchestrator.errors import DefinitionError, ValidationError
from orchestrator.keys import GROUP
from orchestrator.priority import PRIORITIES, Picker, lane, split
from tests.conftest import ON_CLUSTER
from tests.harness import process_env, run_cli, worker_thread
from tests.helpers import readme_example, wait_until
from workers.testflows import Survey, survey


class Job(BaseModel):
    work_s: float = 0.02


started: list[str] = []  # run ids in the order their step started (workers run in this process)
_lock = threading.Lock()
jobs = Workflow("prio_jobs", state=Job)


@jobs.step
def work(ctx: StepContext, state: Job) -> None:
    with _lock:
        started.append(ctx.run_id)
    time.sleep(state.work_s)


@pytest.fixture(autouse=True)
def _fresh_log() -> None:
    started.clear()


def test_the_picker_gives_each_level_its_share_and_takes_the_oldest_first() -> None:
    picker = Picker()
    waiting = [(level, i) for i in range(100) for level in PRIORITIES]
    picked = picker.pick(waiting, 70, lambda item: item[0])
    assert Counter(level for level, _ in picked) == {"high": 40, "normal": 20, "low": 10}  # 4:2:1
    assert [i for level, i in picked if level == "low"] == list(range(10))  # oldest first
    only_high_and_low = [("high", i) for i in range(100)] + [("low", i) for i in range(100)]
    picked = Picker().pick(only_high_and_low, 70, lambda item: item[0])
    assert Counter(level for level, _ in picked) == {"high": 60, "low": 10}  # normal's share goes to the highest
    assert [level for level, _ in Picker().pick([("low", 0)], 5, lambda item: item[0])] == ["low"]  # none idle


def test_a_priority_is_a_lane_of_the_queue_and_its_name_is_reserved() -> None:
    assert (lane("q", "high"), lane("q", "normal"), lane("q", "low")) == ("q..high", "q", "q..low")
    assert [split(q) for q in ("q..high", "q", "a.b..low", "q..other")] == [
        ("q", "high"),
        ("q", "normal"),
        ("a.b", "low"),
        ("q..other", "normal"),
    ]
    with pytest.raises(ValidationError, match="priority 'urgent' is invalid: expected one of high, normal, low"):
        lane("q", "urgent")
    with pytest.raises(DefinitionError, match=r"without '\.\.' \(kept for priority lanes\)"):
        Workflow("bad", queue="q..high")


def test_a_high_priority_run_read_behind_a_backlog_starts_first(client: Client, settings: Settings) -> None:
    backlog = [client.submit(jobs, Job(), run_id=f"n{i}") for i in range(30)]
    urgent = client.submit(jobs, Job(), run_id="urgent", priority="high")
    assert client.get("urgent").queue == "default..high" and client.get("n0").queue == "default"
    with worker_thread([jobs], settings.model_copy(update={"concurrency": 1})):
        urgent.wait(timeout_s=30)
        for run in backlog:
            run.wait(timeout_s=30)
    if ON_CLUSTER:  # a worker reads each partition on its own: what the reads before urgent's brought starts first
        assert started.index("urgent") < settings.partitions
    else:
        assert started.index("urgent") == 0  # the first read holds it and the normal ones: it goes first


def test_a_low_priority_run_progresses_under_a_sustained_high_priority_load(client: Client, settings: Settings) -> None:
    high = [client.submit(jobs, Job(), run_id=f"h{i}", priority="high") for i in range(60)]
    low = [client.submit(jobs, Job(), run_id=f"l{i}", priority="low") for i in range(3)]
    feeding = threading.Event()

    def feed() -> None:  # more high-priority work keeps coming while the worker runs
        for i in range(60):
            if feeding.is_set():
                return
            high.append(client.submit(jobs, Job(), run_id=f"more{i}", priority="high"))
            time.sleep(0.01)

    with worker_thread([jobs], settings.model_copy(update={"concurrency": 1})):
        feeder = threading.Thread(target=feed)
        feeder.start()
        for run in low:
            run.wait(timeout_s=60)
        feeding.set()
        feeder.join()
        for run in high:
            run.wait(timeout_s=60)
    last_low = max(started.index(run.run_id) for run in low)
    assert sum(1 for rid in started[last_low:] if not rid.startswith("l")) >= 30  # high work still waited
    assert last_low < 3 * 7 + 16  # one start in 7 (give or take a read's worth): it did not starve


def test_map_items_run_at_their_runs_priority(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([survey], settings):
        client.submit(survey, Survey(topics=["a", "b"]), run_id="hi", priority="high").wait(timeout_s=30)
    items = [client.get(f"hi:plan:{i}") for i in range(2)]
    assert [(item.queue, item.priority) for item in items] == [("default..high", "high")] * 2


def test_submit_priority_on_the_cli_and_status_shows_it(settings: Settings) -> None:
    env = process_env(settings)
    spec = "tests.integration.test_priority:jobs"
    done = run_cli("submit", spec, "{}", "--run-id", "c1", "--priority", "low", env=env)
    assert done.returncode == 0, done.stderr
    shown = run_cli("status", "c1", env=env)
    assert "(queue default..low, priority low)" in shown.stdout
    bad = run_cli("submit", spec, "{}", "--priority", "urgent", env=env)
    assert bad.returncode != 0 and "'urgent' is not one of 'high', 'normal', 'low'" in bad.stderr
    client = Client(settings)
    assert "priority low" in status_text(client.get("c1"))
    client.close()


def test_a_worker_already_running_reads_a_lane_once_a_run_is_submitted_to_it(
    client: Client, settings: Settings
) -> None:
    with worker_thread([jobs], settings) as worker:
        client.submit(jobs, Job(), run_id="before").wait(timeout_s=10)
        assert worker.lanes == ["default"]  # no lane in use yet: only the queue's own streams are read
        client.submit(jobs, Job(), run_id="late", priority="high").wait(timeout_s=10)  # lease_s 0.8 s here
        assert "default..high" in worker.lanes


def test_keda_takes_a_lanes_streams(settings: Settings) -> None:
    out = run_cli(
        "keda", "--queue", "default", "--queue", "default..high", "--print", "groups", env=process_env(settings)
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.endswith(':default..high" workers 0 MKSTREAM') for line in lines) == 16  # every partition


def test_the_readme_priority_example_runs_as_written(client: Client, settings: Settings) -> None:
    module = readme_example("### Concurrency limits")
    module.client = client
    readme_example("### Priorities", into=module)
    with worker_thread([module.study], settings.model_copy(update={"concurrency": 1})) as worker:
        final = module.mine.wait(timeout_s=30)
        for run in module.nightly:
            run.wait(timeout_s=60)
    assert final.notes[-1] == "2 rivals read" and client.get(module.mine.run_id).priority == "high"
    assert {client.get(run.run_id).priority for run in module.nightly} == {"low"}
    assert "default..high" in worker.lanes and "default..low" in worker.lanes


def test_an_entry_of_a_lane_a_live_worker_lost_track_of_is_given_back_by_its_own_audit(
    client: Client, settings: Settings
) -> None:
    """A lane that came in use after the worker started is audited too: an entry delivered to the
    worker's consumer that it never saw (a reply lost with its connection, Redis restored from an
    older copy) is given back by the worker itself (no supervisor here), then runs."""
    stream = client.keys.queue_of("default..high", "lost-hi").stream
    with worker_thread([jobs], settings, worker_id="w-lane") as worker:
        client.submit(jobs, Job(), run_id="warm").wait(timeout_s=10)  # the worker runs, reading no lane yet
        client.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        run = client.submit(jobs, Job(), run_id="lost-hi", priority="high")
        assert client.redis.xreadgroup(GROUP, "w-lane", {stream: ">"})  # delivered to the worker, unseen
        run.wait(timeout_s=20)
        assert "default..high" in worker.lanes
    given_back = [e for e in client.events("lost-hi") if e.type == "redispatched"]
    assert len(given_back) == 1 and "given up by w-lane" in (given_back[0].detail or "")


def test_the_heartbeat_announces_the_lanes_so_a_queues_set_lost_with_redis_data_comes_back(
    client: Client, settings: Settings
) -> None:
    with worker_thread([jobs], settings):
        client.submit(jobs, Job(), run_id="hi", priority="low").wait(timeout_s=10)
        client.redis.srem(client.keys.queues, "default..low")  # Redis restored from an older copy
        wait_until(lambda: client.redis.sismember(client.keys.queues, "default..low"), what="the lane announced")
