"""Signals end to end: a run that returns ``WaitFor`` parks at zero compute, shows "waiting for
signal S", and takes the payload of the signal sent to it exactly once, whether it was sent
before or during the wait, resent, sent through the CLI, or sent after a kill -9 of its worker
and of Redis restarted from its AOF; the step that waited never runs again. Bad payloads,
undeclared signals, finished and unknown runs get clear errors that name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from orchestrator import (
    Client,
    DefinitionError,
    InvalidTransition,
    RunConflict,
    RunNotFound,
    Settings,
    StepContext,
    ValidationError,
    WaitFor,
    Workflow,
)
from orchestrator.chaos.ledger import Ledger
from orchestrator.cli.render import status_text
from orchestrator.connection import connect
from orchestrator.embedded import RedisServer
from tests.conftest import fast_settings
from tests.harness import process_env, run_cli, start_worker, supervisor_thread, worker_thread
from tests.helpers import readme_example, wait_until
from workers.testflows import Approval, Purchase, approving

ANN = {"approved": True, "by": "ann"}


def waits(client: Client, run_id: str) -> None:
    wait_until(lambda: client.get(run_id).status == "waiting", timeout_s=20, what=f"{run_id} waiting")


def test_a_waiting_run_frees_its_slot_and_goes_on_once_with_the_payload(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    one_slot = settings.model_copy(update={"concurrency": 1})
    with supervisor_thread(settings), worker_thread([approving], one_slot):
        run = client.submit(approving, Purchase(), run_id="p1")
        waits(client, "p1")
        info = client.get("p1")
        assert info.worker is None and info.waiting is not None and info.waiting.signal == "approval"
        assert "waiting for signal approval since" in status_text(info) and "then step book" in status_text(info)
        assert client.why("p1").waiting_for == "signal" and "no timeout" in client.why("p1").text
        other = client.submit(approving, Purchase(), run_id="p2")  # the one slot is free meanwhile
        waits(client, "p2")
        sent = run.signal("approval", Approval(**ANN), signal_id="click-1")
        assert (sent.outcome, sent.step, sent.visit) == ("delivered", "book", 1)
        again = client.signal("p1", "approval", ANN, signal_id="click-1")  # a double click, or a lost reply
        assert (again.outcome, again.step) == ("duplicate", "book")
        final = run.wait(timeout_s=20)
        assert final.approval == Approval(**ANN) and final.outcome == "booked, approved by ann"
        other.cancel("not needed")
    counts = {k: n for k, n in ledger.execution_counts().items() if k.startswith("p1:")}
    assert counts == {"p1:ask": 1, "p1:book": 1, "p1:done": 1}, counts
    stats = client.stats()  # the fleet counters (orchestrator_fleet_*_total): a resend counts once
    assert (stats["waits"], stats["signals"], stats["signals_delivered"], stats.get("wait_timeouts", 0)) == (2, 1, 1, 0)
    assert [e.type for e in client.events("p1")].count("signalled") == 1


def test_a_signal_sent_before_the_wait_is_listed_then_delivered_when_the_run_waits(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    client.submit(approving, Purchase(), run_id="early")
    sent = client.signal("early", "approval", ANN, signal_id="s1")
    assert sent.outcome == "buffered"
    info = client.get("early")
    assert [(p.name, p.signal_id) for p in info.signals_pending] == [("approval", "s1")]
    assert "signal    approval (s1) sent" in status_text(info) and "not received yet" in status_text(info)
    assert "1 signal(s) sent to it wait for a step" in client.why("early").text
    with worker_thread([approving], settings):
        final = client.run("early", approving).wait(timeout_s=20)
    assert final.approval == Approval(**ANN)
    types = [e.type for e in client.events("early")]
    assert "waiting" not in types and types.count("signalled") == 1
    assert client.get("early").signals_pending == []


def test_a_wait_that_times_out_goes_on_at_on_timeout_with_none(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with supervisor_thread(settings), worker_thread([approving], settings):
        final = client.submit(approving, Purchase(timeout_s=0.5), run_id="late").wait(timeout_s=20)
    assert final.approval is None and final.outcome == "no approval in time"
    events = client.events("late")
    waited = next(e for e in events if e.type == "waiting")
    timed_out = next(e for e in events if e.type == "timed_out")
    assert waited.until_ms is not None and timed_out.at >= waited.until_ms  # never early
    with pytest.raises(InvalidTransition, match="already completed; no step will ever receive signal 'approval'"):
        client.signal("late", "approval", ANN)


def test_signals_that_cannot_be_delivered_get_clear_errors(client: Client, settings: Settings) -> None:
    client.submit(approving, Purchase(), run_id="p")
    with pytest.raises(ValidationError, match=r"payload of signal 'approval' of workflow 'approving'.*by"):
        client.signal("p", "approval", {"approved": True})
    with pytest.raises(
        ValidationError, match=r"signal 'approve' is not declared by workflow 'approving' \(declared: approval\)"
    ):
        client.signal("p", "approve", ANN)
    with pytest.raises(RunNotFound, match="no run 'ghost'"):
        client.signal("ghost", "approval", ANN)
    with pytest.raises(ValidationError, match="signal_id 'a b' is invalid"):
        client.signal("p", "approval", ANN, signal_id="a b")
    client.signal("p", "approval", ANN, signal_id="same")
    with pytest.raises(RunConflict, match="signal id 'same' was already sent"):
        client.signal("p", "approval", {"approved": False, "by": "bob"}, signal_id="same")
    limited = Client(settings.model_copy(update={"max_signals_per_run": 2}))
    limited.signal("p", "approval", ANN)
    with pytest.raises(InvalidTransition, match="the limit \\(max_signals_per_run\\)"):
        limited.signal("p", "approval", ANN)
    assert len(client.get("p").signals_pending) == 2  # the refused one was not kept
    stranger = Workflow("unknown_here", state=Purchase)
    stranger.step(lambda ctx, state: None, name="nothing")
    client.submit(stranger, Purchase(), run_id="u")
    del stranger  # no definition of it left in this process
    with pytest.raises(ValidationError, match="workflow 'unknown_here' of run 'u' is not defined in this process"):
        client.signal("u", "approval", ANN)


def test_a_workflow_must_declare_what_it_waits_for_and_a_field_that_accepts_none() -> None:
    class Strict(BaseModel):
        approval: Approval

    flow = Workflow("strict_signals", state=Strict)
    with pytest.raises(DefinitionError, match="state field 'approval' must accept None"):
        flow.signal("approval", Approval)
    with pytest.raises(DefinitionError, match="has no field 'nowhere'"):
        flow.signal("approval", Approval, into="nowhere")
    loose = Workflow("loose_signals", state=Purchase)

    @loose.step
    def only(ctx: StepContext, state: Purchase) -> WaitFor:
        return WaitFor("approval")

    with pytest.raises(Exception, match="a signal the workflow does not declare"):
        loose.interpret(loose.get_step("only"), WaitFor("approval", step="only"))


def test_cancel_reaches_a_waiting_run_at_once(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([approving], settings):
        client.submit(approving, Purchase(timeout_s=3600), run_id="c")
        waits(client, "c")
        assert client.cancel("c", "declined by phone").status == "cancelled"
    assert client.redis.zcard(client.keys.queue_of(approving.queue, "c").delayed) == 0


def test_a_deadline_ends_a_waiting_run(client: Client, settings: Settings, ledger: Ledger) -> None:
    with supervisor_thread(settings), worker_thread([approving], settings):
        client.submit(approving, Purchase(), run_id="d", deadline_s=1.0)
        wait_until(lambda: client.get("d").status == "failed", timeout_s=20, what="the deadline")
    error = client.get("d").error
    assert error is not None and error.type == "DeadlineExceeded" and "(waiting)" in error.message


def test_a_wait_survives_kill_9_of_its_worker_and_of_redis_restarted_from_its_aof(
    fresh_server: RedisServer, tmp_path: Path
) -> None:
    settings = fast_settings(fresh_server.url)
    client = Client(settings)
    ledger = Ledger(connect(settings.plain_url()), settings.namespace)
    worker = start_worker(settings, tmp_path, name="w1")
    try:
        client.submit(approving, Purchase(), run_id="k")
        waits(client, "k")
        worker.kill()
        fresh_server.restart(hard=True)  # kill -9, started again from its AOF (appendfsync always)
        assert client.get("k").status == "waiting"
        assert client.signal("k", "approval", ANN, signal_id="after-restart").outcome == "delivered"
        worker = start_worker(settings, tmp_path, name="w2")
        wait_until(lambda: client.get("k").status == "completed", timeout_s=30, what="the run completed")
    finally:
        worker.kill()
    assert ledger.execution_counts() == {"k:ask": 1, "k:book": 1, "k:done": 1}  # ask never ran again
    client.close()


def test_the_cli_sends_a_signal_checked_against_the_workflow(client: Client, settings: Settings) -> None:
    client.submit(approving, Purchase(), run_id="cli")
    env = process_env(settings)
    spec = ("--workflow", "workers.testflows:approving")
    sent = run_cli("signal", "cli", "approval", json.dumps(ANN), *spec, "--signal-id", "x1", env=env)
    assert sent.returncode == 0, sent.stderr
    assert "kept approval (x1) for cli" in sent.stdout
    again = run_cli(
        "signal", "cli", "approval", "-", *spec, "--signal-id", "x1", "-o", "json", env=env, stdin=json.dumps(ANN)
    )
    assert again.returncode == 0 and json.loads(again.stdout)["outcome"] == "duplicate"
    bad = run_cli("signal", "cli", "approval", '{"approved": "maybe"}', *spec, env=env)
    assert bad.returncode == 1 and "approved" in bad.stderr and "Traceback" not in bad.stderr
    unchecked = run_cli("signal", "cli", "approval", json.dumps(ANN), env=env)
    assert unchecked.returncode == 2 and "--workflow" in unchecked.stderr
    ghost = run_cli("signal", "ghost", "approval", json.dumps(ANN), *spec, env=env)
    assert ghost.returncode == 1 and "no run 'ghost'" in ghost.stderr


def test_the_readme_signal_example_runs_as_written(client: Client, settings: Settings) -> None:
    module = readme_example("### Waiting for a signal: human in the loop")
    purchases = module.purchases
    with worker_thread([purchases], settings):
        run = client.submit(purchases, {"item": "laptop"}, run_id="buy")
        waits(client, "buy")
        client.signal("buy", "approval", {"approved": True, "by": "ann"}, signal_id="req-7")
        final = run.wait(timeout_s=20)
    assert final.booked is True and final.approval.by == "ann"
