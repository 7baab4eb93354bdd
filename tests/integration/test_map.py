"""Fan-out / fan-in end to end: a step that returns ``Map`` runs an item function once per list
element, each item a run of its own (``{run_id}:{step}:{index}``, its idempotency key) that any
worker takes, at most ``parallelism`` at a time; the run goes on once every item committed, with
the values in item order, once. A failed item fails the run at once and cancels the others; a
retry re-runs only the items that did not complete. A worker killed mid-map, and one killed
between an item's commit and its fan-in, cost only the unfinished items."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import Client, RunFailed, Settings
from orchestrator.chaos.ledger import Ledger
from orchestrator.children import map_specs
from orchestrator.cli.render import status_text
from orchestrator.connection import connect
from orchestrator.embedded import RedisServer
from orchestrator.keys import idempotency_key
from tests.conftest import fast_settings
from tests.harness import start_worker, supervisor_thread, worker_thread
from tests.helpers import readme_example, wait_until
from workers import testflows
from workers.testflows import Survey, survey


def items_of(ledger: Ledger, run_id: str) -> dict[str, int]:
    """Executions of each map item of ``run_id``'s ``plan`` step, by idempotency key."""
    prefix = f"{run_id}:plan:"
    return {key: n for key, n in ledger.execution_counts().items() if key.startswith(prefix)}


def max_running(ledger: Ledger, run_id: str) -> int:
    """The most items that were running at once when one of ``run_id``'s started."""
    return max(int(ex.saw) for ex in ledger.executions() if ex.key.startswith(f"{run_id}:plan:"))


def test_every_item_runs_once_and_the_values_come_back_in_item_order(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    topics = ["ants", "bees", "cats", "dogs", "eels"]
    with supervisor_thread(settings), worker_thread([survey], settings):
        final = client.submit(survey, Survey(topics=topics), run_id="m").wait(timeout_s=30)
    assert [f["topic"] for f in final.findings] == topics and final.summary == "5 findings"
    assert items_of(ledger, "m") == {f"m:plan:{i}": 1 for i in range(5)}  # the item's key is its run id
    counts = ledger.execution_counts()
    assert counts["m:plan"] == 1 and counts["m:summarize"] == 1
    item = client.get("m:plan:3")
    assert item.parent == "m" and item.status == "completed" and item.workflow == "survey..study"
    events = client.events("m")
    assert [e.type for e in events].count("child") == 5 and [e.type for e in events].count("children_done") == 1
    assert client.stats()["map_items"] == 5


def test_parallelism_bounds_the_items_running_at_once(client: Client, settings: Settings, ledger: Ledger) -> None:
    topics = [f"t{i}:slow0.3" for i in range(6)]
    with supervisor_thread(settings), worker_thread([survey], settings):
        final = client.submit(survey, Survey(topics=topics, parallelism=2), run_id="p").wait(timeout_s=40)
    assert [f["topic"] for f in final.findings] == topics
    assert items_of(ledger, "p") == {f"p:plan:{i}": 1 for i in range(6)}
    assert max_running(ledger, "p") <= 2
    with worker_thread([survey], settings):  # without a limit, the same items overlap
        client.submit(survey, Survey(topics=topics), run_id="q").wait(timeout_s=40)
    assert max_running(ledger, "q") > 2


def test_a_failed_item_fails_the_run_at_once_and_a_retry_re_runs_only_unfinished_items(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    topics = ["a", "b:slow0.2", "c", "d", "e", "f"]
    testflows.FLAKY.add("c")
    try:
        with supervisor_thread(settings), worker_thread([survey], settings.model_copy(update={"concurrency": 2})):
            run = client.submit(survey, Survey(topics=topics, parallelism=2), run_id="f")
            with pytest.raises(RunFailed, match="ChildFailed: map item f:plan:2 failed"):
                run.wait(timeout_s=30)
            wait_until(
                lambda: all(client.get(f"f:plan:{i}").status != "running" for i in range(3)), what="items settled"
            )
            assert all(client.redis.exists(client.keys.run(f"f:plan:{i}").run) == 0 for i in (4, 5))  # never started
            before = items_of(ledger, "f")
            completed = {key for key in before if client.get(key).status == "completed"}
            assert "f:plan:0" in completed and client.get("f:plan:2").status == "failed"
            testflows.FLAKY.discard("c")
            client.retry("f")
            final = client.run("f", survey).wait(timeout_s=30)
    finally:
        testflows.FLAKY.clear()
    assert [x["topic"] for x in final.findings] == topics
    after = items_of(ledger, "f")
    assert all(after[key] == before[key] for key in completed)  # no completed item ran again
    assert after["f:plan:2"] == before["f:plan:2"] + 1  # the failed item ran again, once
    assert all(after[f"f:plan:{i}"] == 1 for i in (4, 5))  # the items never started ran once
    assert ledger.execution_counts()["f:plan"] == 1  # the mapping step never ran again


def test_collected_failures_reach_the_next_step_as_item_results(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with supervisor_thread(settings), worker_thread([survey], settings):
        final = client.submit(survey, Survey(topics=["x", "y:fail"], collect=True), run_id="c").wait(30)
    assert [r["status"] for r in final.findings] == ["completed", "failed"]
    assert final.findings[0] == {"index": 0, "status": "completed", "error": None, "value": {"topic": "x", "words": 1}}
    assert "cannot study y:fail" in final.findings[1]["error"]["message"]


def test_an_empty_list_goes_on_at_once_and_too_long_a_list_fails_naming_the_setting(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with worker_thread([survey], settings.model_copy(update={"max_map_items": 3})):
        assert client.submit(survey, Survey(topics=[]), run_id="e").wait(timeout_s=20).findings == []
        with pytest.raises(RunFailed, match=r"over 4 items: at most 3 \(setting max_map_items"):
            client.submit(survey, Survey(topics=list("abcd")), run_id="l").wait(timeout_s=20)
    assert not client.redis.exists(client.keys.run("l:plan:0").run)


def test_a_worker_killed_mid_map_costs_only_the_unfinished_items(fresh_server: RedisServer, tmp_path: Path) -> None:
    """kill -9 in the third item (a map of two at a time, on a worker of one slot, so that no
    other item is mid-step): a second worker finishes the map; every item commits once, and
    only the killed item runs again."""
    settings = fast_settings(fresh_server.url)
    client = Client(settings)
    ledger = Ledger(connect(settings.plain_url()), settings.namespace)
    worker = start_worker(settings, tmp_path, name="w1", faults="mid_step=kill@study#3", args=["-c", "1"])
    try:
        with supervisor_thread(settings):
            client.submit(survey, Survey(topics=[f"t{i}:slow0.1" for i in range(8)], parallelism=2), run_id="k")
            wait_until(lambda: worker.popen.poll() is not None, timeout_s=20, what="the worker killed mid-item")
            worker = start_worker(settings, tmp_path, name="w2")
            final = client.run("k", survey).wait(timeout_s=40)
    finally:
        worker.kill()
    assert len(final.findings) == 8
    runs = items_of(ledger, "k")
    assert sum(runs.values()) == 9 and sorted(runs.values()) == [1] * 7 + [2]  # only the killed item ran again
    again = next(key for key, n in runs.items() if n == 2)
    assert [e.type for e in client.events(again)].count("crashed") == 1
    client.close()


def test_a_worker_killed_between_an_item_commit_and_its_fan_in_loses_nothing(
    fresh_server: RedisServer, tmp_path: Path
) -> None:
    """kill -9 after an item's run completed, before the worker handed its value to the parent:
    the supervisor relays it from the partition's finished stream; nothing runs again."""
    settings = fast_settings(fresh_server.url)
    client = Client(settings)
    ledger = Ledger(connect(settings.plain_url()), settings.namespace)
    worker = start_worker(settings, tmp_path, name="w1", faults="before_fan_in=kill#2", args=["-c", "1"])
    try:
        with supervisor_thread(settings):
            client.submit(survey, Survey(topics=["a", "b", "c", "d"], parallelism=1), run_id="j")
            wait_until(lambda: worker.popen.poll() is not None, timeout_s=20, what="the worker killed before fan-in")
            worker = start_worker(settings, tmp_path, name="w2")
            final = client.run("j", survey).wait(timeout_s=40)
    finally:
        worker.kill()
    assert [f["topic"] for f in final.findings] == ["a", "b", "c", "d"]
    assert items_of(ledger, "j") == {f"j:plan:{i}": 1 for i in range(4)}
    assert ledger.execution_counts()["j:summarize"] == 1
    client.close()


def test_the_readme_map_example_runs_as_written(client: Client, settings: Settings) -> None:
    module = readme_example("### Fan-out and fan-in")
    with supervisor_thread(settings), worker_thread([module.research], settings):
        final = client.submit(module.research, {"competitors": ["Acme", "Globex"]}, run_id="r").wait(timeout_s=30)
    assert final.report == "Acme: 4 letters; Globex: 6 letters"


def test_status_and_why_say_how_far_a_map_is(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([survey], settings.model_copy(update={"concurrency": 2})):
        client.submit(survey, Survey(topics=["a:slow1.5", "b:slow1.5", "c", "d"], parallelism=2), run_id="s")
        wait_until(lambda: client.get("s").status == "waiting", what="the map started")
        info = client.get("s")
        assert info.children is not None and (info.children.map, info.children.started) == (True, 2)
        assert "waiting for map items (0 of 4 done, 2 running, 2 at a time), then step summarize" in status_text(info)
        why = client.why("s")
        assert why.waiting_for == "children" and "map items (0 of 4 done" in why.text and "s:plan:0" in why.text
        client.run("s", survey).wait(timeout_s=30)


def test_item_ids_carry_the_visit_when_a_loop_comes_back_to_the_mapping_step() -> None:
    """README: ``<run id>:<step>:<index>``, ``<run id>:<step>:<visit>:<index>`` after a loop."""
    flow = survey.item_flow("study")
    first = map_specs(flow, ["a", "b"], idempotency_key("r", "plan", 1), limit=1 << 20)
    again = map_specs(flow, ["a"], idempotency_key("r", "plan", 2), limit=1 << 20)
    assert [s["run"] for s in first] == ["r:plan:0", "r:plan:1"] and again[0]["run"] == "r:plan:2:0"
    assert idempotency_key("r:plan:2:0", "study", 1, flow.name) == "r:plan:2:0"  # the item's ctx key is its id
