"""Durable sleep end to end: a run that returns ``Sleep`` gives its worker slot back at once,
shows "sleeping until T", wakes within a promote interval of T and never before it, and the
step that slept never runs again: across a supervisor's sweeps, a kill -9 of its worker and a
kill -9 of Redis restarted from its AOF."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Client, End, Settings, Sleep, StepContext, Workflow
from orchestrator.chaos.ledger import Ledger
from orchestrator.cli.render import status_text
from orchestrator.connection import connect
from orchestrator.embedded import RedisServer
from tests.conftest import fast_settings
from tests.harness import start_worker, supervisor_thread, worker_thread
from tests.helpers import wait_until
from workers.testflows import Counter, Nap, chain, napping
from workers.testflows import Nap as State


def slept_on_time(client: Client, run_id: str, within_ms: int | None = None) -> None:
    """The run went to sleep once, woke once, and no earlier than its due time (Redis clock),
    and within ``within_ms`` of it when given; its second step started after that (the
    worker's clock: the same machine's)."""
    events = client.events(run_id)
    sleeps = [e for e in events if e.type == "sleeping"]
    wakes = [e for e in events if e.type == "woke"]
    assert len(sleeps) == 1 and len(wakes) == 1, [e.type for e in events]
    due = sleeps[0].until_ms
    assert due is not None and wakes[0].at >= due
    if within_ms is not None:
        assert wakes[0].at - due <= within_ms, f"woke {wakes[0].at - due} ms after its due time"
    after = [e for e in events if e.type == "ok" and e.step == "wake_up"]
    assert len(after) == 1 and after[0].start_ms is not None and after[0].start_ms >= due


def test_a_sleeping_run_frees_its_slot_and_wakes_on_time_despite_the_sweep(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    """One slot: a chain submitted after the nap starts runs to its end while the nap sleeps;
    the supervisor sweeps every 0.3 s (runs older than 1 s) and must not wake it early."""
    one_slot = settings.model_copy(update={"concurrency": 1})
    with supervisor_thread(settings), worker_thread([napping, chain], one_slot):
        nap = client.submit(napping, Nap(nap_s=3.0), run_id="nap")
        wait_until(lambda: client.get("nap").status == "sleeping", what="the run asleep")
        info = client.get("nap")
        assert info.due_ms is not None and info.step == "wake_up" and info.worker is None
        assert "sleeping until " in status_text(info) and "then step wake_up" in status_text(info)
        busy = client.submit(chain, Counter(), run_id="busy")
        busy.wait(timeout_s=20)
        assert client.get("nap").status == "sleeping"  # the chain ran on the one slot meanwhile
        assert nap.wait(timeout_s=20).naps == 1
    # woken by a worker's promote (every 0.05 s here), not by the sweep: a loose bound, not a timing test
    slept_on_time(client, "nap", within_ms=2000)
    assert {k: n for k, n in ledger.execution_counts().items() if k.startswith("nap:")} == {
        "nap:doze": 1,
        "nap:wake_up": 1,
    }


def test_a_sleep_survives_kill_9_of_its_worker_and_of_redis_restarted_from_its_aof(
    fresh_server: RedisServer, tmp_path: Path
) -> None:
    settings = fast_settings(fresh_server.url)
    client = Client(settings)
    ledger = Ledger(connect(settings.plain_url()), settings.namespace)
    worker = start_worker(settings, tmp_path, name="w1")
    try:
        client.submit(napping, Nap(nap_s=4.0), run_id="nap")
        wait_until(lambda: client.get("nap").status == "sleeping", timeout_s=20, what="the run asleep")
        worker.kill()
        fresh_server.restart(hard=True)  # kill -9, started again from its AOF (appendfsync always)
        assert client.get("nap").status == "sleeping"
        worker = start_worker(settings, tmp_path, name="w2")
        wait_until(lambda: client.get("nap").status == "completed", timeout_s=30, what="the run completed")
    finally:
        worker.kill()
    slept_on_time(client, "nap")
    counts = ledger.execution_counts()
    assert counts == {"nap:doze": 1, "nap:wake_up": 1}, counts  # the step that slept never ran again
    client.close()


@pytest.mark.parametrize("until", [False, True])
def test_sleep_until_a_time_and_for_seconds_name_the_step_to_go_on_at(
    client: Client, settings: Settings, until: bool
) -> None:

    from orchestrator import End, Sleep, Workflow
    from workers.testflows import Nap as State

    flow: Workflow[State] = Workflow(f"alarm_{until}", state=State)

    @flow.step
    def first(ctx: StepContext, state: State) -> Sleep:
        if until:
            return Sleep(until=datetime.now(UTC) + timedelta(seconds=0.5), step="last", update={"naps": 1})
        return Sleep(seconds=0.5, step="last", update={"naps": 1})

    @flow.step
    def skipped(ctx: StepContext, state: State) -> None:
        raise AssertionError("Sleep(step='last') goes on at last")

    @flow.step
    def last(ctx: StepContext, state: State) -> End:
        return End({"naps": state.naps + 1})

    with worker_thread([flow], settings):
        assert client.submit(flow, State(), run_id="alarm").wait(timeout_s=20).naps == 2
    types = [e.type for e in client.events("alarm")]
    assert types.count("sleeping") == 1 and types.count("woke") == 1 and "skipped" not in str(types)


def test_the_readme_sleep_example_runs_as_written(client: Client, settings: Settings) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Waiting: durable sleep") :]
    code = section[
        section.index("```python") + len("```python") : section.index("```\n", section.index("```python") + 9)
    ]
    example: dict[str, Any] = {}
    exec(compile(code, "README.md (durable sleep)", "exec"), example)
    reminders = example["reminders"]
    with worker_thread([reminders], settings):
        final = client.submit(reminders, {"email": "a@example.com"}, run_id="remind").wait(timeout_s=30)
    assert final.sent == 3
    events = client.events("remind")
    assert [e.step for e in events if e.type == "sleeping"] == ["send", "send", "close"]
    assert sum(e.type == "woke" for e in events) == 3


def test_with_no_worker_running_the_supervisor_wakes_a_sleeping_run(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    """Workers scaled to zero while a run sleeps (KEDA counts no entry for it): the supervisor
    puts its next step on the queue at its due time, and that entry is what brings workers back."""
    with worker_thread([napping], settings):
        client.submit(napping, Nap(nap_s=1.5), run_id="nap")
        wait_until(lambda: client.get("nap").status == "sleeping", what="the run asleep")
    keys = client.keys.queue_of(napping.queue, "nap")
    assert client.redis.xlen(keys.stream) == 1 and client.redis.xpending(keys.stream, "workers")["pending"] == 0
    with supervisor_thread(settings):
        wait_until(lambda: client.get("nap").status == "running", timeout_s=20, what="the supervisor waking it")
    woke = [e for e in client.events("nap") if e.type == "woke"]
    dispatch = client.redis.hget(client.keys.run("nap").run, "dispatch")
    assert len(woke) == 1 and client.redis.xrange(keys.stream, dispatch, dispatch)  # its entry, waiting for a worker
    with worker_thread([napping], settings):
        wait_until(lambda: client.get("nap").status == "completed", timeout_s=20, what="the run completed")
    slept_on_time(client, "nap")
