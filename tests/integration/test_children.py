"""Child runs end to end: a step that returns ``StartChildren`` starts one run per child (ids
derived from its idempotency key, so a step that runs again never starts a second child), its
run waits at zero compute, and each child's final state or error comes back into its state, in
order, once; a failed child fails the parent (``orchestrator retry`` re-drives that child) unless
failures are collected; cancelling a parent cancels its children; a worker killed between the
parent's commit and the children's submit, and Redis restarted from its AOF, lose nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import Client, RunFailed, Settings, scripts
from orchestrator.chaos.ledger import Ledger
from orchestrator.cli.render import status_text
from orchestrator.connection import connect
from orchestrator.embedded import RedisServer
from orchestrator.store import Outcome
from tests.conftest import fast_settings
from tests.harness import start_worker, supervisor_thread, worker_thread
from tests.helpers import readme_example, wait_until
from workers import testflows
from workers.testflows import Family, kid, parenting

FLOWS = [parenting, kid]


def kid_runs(client: Client, parent: str) -> list[str]:
    return sorted(r.run_id for r in client.list_runs(limit=1000) if r.parent == parent)


def test_children_run_and_their_results_come_back_in_order_once(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with supervisor_thread(settings), worker_thread(FLOWS, settings):
        run = client.submit(parenting, Family(names=["ann", "bob", "cid"]), run_id="p")
        final = run.wait(timeout_s=30)
    assert [k.run_id for k in final.kids] == ["p:start_kids/ann", "p:start_kids/bob", "p:start_kids/cid"]
    assert [k.state["answer"] for k in final.kids if k.state] == ["hello from ann", "hello from bob", "hello from cid"]
    assert final.summary.count("=completed") == 3
    counts = ledger.execution_counts()
    assert counts["p:start_kids"] == 1 and counts["p:sum_up"] == 1
    assert all(counts[f"p:start_kids/{n}:answer"] == 1 for n in ("ann", "bob", "cid"))
    events = client.events("p")
    started = next(e for e in events if e.type == "children")
    assert started.detail is not None and "p:start_kids/ann" in started.detail  # the parent links its children
    assert [e.type for e in events].count("child") == 3
    child = client.get("p:start_kids/bob")
    assert child.parent == "p" and "parent    p" in status_text(child)  # and each child its parent
    assert client.stats()["children_started"] == 3
    assert "child 1 of run p" in (client.events("p:start_kids/bob")[0].detail or "")


def test_status_and_why_say_what_a_parent_waits_for(client: Client, settings: Settings, ledger: Ledger) -> None:
    testflows.BROKEN.clear()
    with worker_thread([parenting], settings):  # no worker for the kids: they stay queued
        client.submit(parenting, Family(names=["ann", "bob"]), run_id="w")
        wait_until(lambda: client.get("w").status == "waiting", timeout_s=20, what="the parent waiting")
    info = client.get("w")
    assert info.children is not None and (info.children.done, info.children.total) == (0, 2)
    assert "waiting for child runs (0 of 2 done), then step sum_up" in status_text(info)
    why = client.why("w")
    assert why.waiting_for == "children" and "w:start_kids/ann" in why.text


def test_a_failed_child_fails_the_parent_and_a_retry_re_drives_only_that_child(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    testflows.BROKEN.add("bob")
    try:
        with supervisor_thread(settings), worker_thread(FLOWS, settings):
            run = client.submit(parenting, Family(names=["ann", "bob"]), run_id="f")
            with pytest.raises(RunFailed, match="ChildFailed: child run f:start_kids/bob failed"):
                run.wait(timeout_s=30)
            testflows.BROKEN.discard("bob")  # the kid is fixed
            client.retry("f")
            final = client.run("f", parenting).wait(timeout_s=30)
    finally:
        testflows.BROKEN.clear()
    assert [k.status for k in final.kids] == ["completed", "completed"]
    counts = ledger.execution_counts()
    assert counts["f:start_kids/ann:answer"] == 1  # the child that had completed was not run again
    assert counts["f:start_kids"] == 1 and len(kid_runs(client, "f")) == 2  # and no second child started


def test_collected_failures_reach_the_next_step(client: Client, settings: Settings, ledger: Ledger) -> None:
    with supervisor_thread(settings), worker_thread(FLOWS, settings):
        final = client.submit(parenting, Family(names=["ann", "bob"], fail=["bob"], collect=True), run_id="c").wait(30)
    assert [k.status for k in final.kids] == ["completed", "failed"]
    assert final.kids[1].error is not None and "cannot answer" in final.kids[1].error["message"]


def test_cancelling_a_parent_cancels_its_children_and_the_supervisor_does_it_too(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with worker_thread([parenting], settings):  # the kids stay queued: no worker for them
        client.submit(parenting, Family(names=["ann", "bob"]), run_id="x")
        client.submit(parenting, Family(names=["cid"]), run_id="y")
        wait_until(lambda: client.get("x").status == client.get("y").status == "waiting", what="both waiting")
    client.cancel("x", "not needed")  # the client cancels the children at once
    assert {client.get(k).status for k in kid_runs(client, "x")} == {"cancelled"}
    call = client.store.cancel(run_id="y", queue="default", reason="by a script", request_id="r")
    assert Outcome.parse(scripts.execute(client.redis, [call])[0]).code == "CANCELLED"  # no cascade here
    assert client.get("y:start_kids/cid").status == "pending"
    with supervisor_thread(settings):  # the supervisor reads y's notice and cancels its child
        wait_until(lambda: client.get("y:start_kids/cid").status == "cancelled", timeout_s=20, what="the cascade")


def test_a_worker_killed_before_it_started_the_children_and_redis_restarted_lose_nothing(
    fresh_server: RedisServer, tmp_path: Path
) -> None:
    """kill -9 right after the parent's commit, before the children's submit: the supervisor's
    look at the waiting parent starts them from the step record (no worker runs meanwhile);
    then kill -9 of Redis and a restart from its AOF before a worker takes them; each step
    runs once."""
    settings = fast_settings(fresh_server.url)
    client = Client(settings)
    ledger = Ledger(connect(settings.plain_url()), settings.namespace)
    worker = start_worker(settings, tmp_path, name="w1", faults="before_children=kill")
    try:
        with supervisor_thread(settings):
            client.submit(parenting, Family(names=["ann", "bob"]), run_id="k")
            wait_until(lambda: worker.popen.poll() is not None, timeout_s=20, what="the worker killed at the point")
            assert client.get("k").status == "waiting" and kid_runs(client, "k") == []
            wait_until(lambda: len(kid_runs(client, "k")) == 2, timeout_s=30, what="the supervisor starting them")
            # Redis dies while the parent waits and its children are queued, no step in flight (a
            # step whose commit Redis never answered may run again: at least once, by design)
            fresh_server.restart(hard=True)
            worker = start_worker(settings, tmp_path, name="w2")
            wait_until(lambda: client.get("k").status == "completed", timeout_s=40, what="the parent completed")
    finally:
        worker.kill()
    counts = ledger.execution_counts()
    assert counts == {"k:start_kids": 1, "k:start_kids/ann:answer": 1, "k:start_kids/bob:answer": 1, "k:sum_up": 1}
    client.close()


def test_the_readme_children_example_runs_as_written(client: Client, settings: Settings) -> None:
    module = readme_example("### Child workflows")
    with supervisor_thread(settings), worker_thread([module.survey, module.review], settings):
        final = client.submit(module.survey, {"companies": ["Acme", "Globex"]}, run_id="s").wait(timeout_s=30)
    assert final.report == "Acme: reviewed; Globex: reviewed"


def test_a_step_that_runs_again_before_its_commit_starts_its_children_once(
    fresh_server: RedisServer, tmp_path: Path
) -> None:
    """kill -9 after the step returned StartChildren, before its commit: the step runs again on
    another worker and only the committed attempt's children start, once each."""
    settings = fast_settings(fresh_server.url)
    client = Client(settings)
    ledger = Ledger(connect(settings.plain_url()), settings.namespace)
    worker = start_worker(settings, tmp_path, name="w1", faults="before_commit=kill@start_kids")
    try:
        with supervisor_thread(settings):
            client.submit(parenting, Family(names=["ann", "bob"]), run_id="r")
            wait_until(lambda: worker.popen.poll() is not None, timeout_s=20, what="the worker killed at the point")
            worker = start_worker(settings, tmp_path, name="w2")
            wait_until(lambda: client.get("r").status == "completed", timeout_s=40, what="the parent completed")
    finally:
        worker.kill()
    counts = ledger.execution_counts()
    assert counts["r:start_kids"] == 2  # ran again: nothing of the first attempt was committed
    assert kid_runs(client, "r") == ["r:start_kids/ann", "r:start_kids/bob"]
    assert counts["r:start_kids/ann:answer"] == counts["r:start_kids/bob:answer"] == 1
    client.close()
