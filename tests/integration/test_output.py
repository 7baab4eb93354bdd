"""Live step output: ``ctx.emit`` appends to the run's output stream, which clients follow as it
is written and resume from the last entry id they saw; it never changes state, is bounded per
run, goes with the run when it is purged, and is not durable: an attempt killed mid-step keeps
what it emitted and the next attempt emits again."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from orchestrator import Client, Settings, ValidationError
from orchestrator.chaos.ledger import Ledger
from orchestrator.connection import connect
from orchestrator.context import StepContext
from orchestrator.embedded import RedisServer
from orchestrator.errors import RunNotFound, WaitTimeout
from orchestrator.output import OutputEvent
from tests.conftest import fast_settings
from tests.harness import process_env, run_cli, start_worker, supervisor_thread, worker_thread
from tests.helpers import readme_example, wait_until
from workers.testflows import Talk, talker

WORDS = ["the", "quick", "brown", "fox"]


def test_a_follower_sees_each_emit_in_order_and_a_reconnect_resumes_after_its_last_id(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    run = client.submit(talker, Talk(words=WORDS), run_id="t")
    seen: list[OutputEvent] = []
    follower = threading.Thread(target=lambda: seen.extend(run.follow_output(timeout_s=30, block_ms=200)))
    follower.start()  # before any worker: it waits for the first entry
    with worker_thread([talker], settings):
        final = run.wait(timeout_s=30)
        follower.join(timeout=30)
    assert not follower.is_alive()  # it stopped by itself once the run finished
    assert [e.data for e in seen] == [{"token": w} for w in WORDS] + [w.upper() for w in WORDS]  # sync, then async
    assert [e.step for e in seen] == ["speak"] * 4 + ["shout"] * 4 and {e.attempt for e in seen} == {1}
    assert final.said == "the quick brown fox" and "token" not in final.model_dump()  # never state
    resumed = list(run.follow_output(after=seen[3].id, timeout_s=5))
    assert resumed == seen[4:]
    assert client.output("t", after=seen[-2].id) == seen[-1:]
    with pytest.raises(ValidationError, match="after='x' is invalid"):
        client.output("t", after="x")
    with pytest.raises(RunNotFound):
        list(client.run("nope").follow_output(timeout_s=1))


def test_run_follow_interleaves_events_and_output_in_time_order(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with worker_thread([talker], settings):
        items = list(client.submit(talker, Talk(words=["hi"]), run_id="f").follow(timeout_s=30, output=True))
    kinds = [item.data if isinstance(item, OutputEvent) else item.type for item in items]
    assert kinds.index({"token": "hi"}) < kinds.index("HI") < kinds.index("completed")
    assert [item.at for item in items] == sorted(item.at for item in items)


def test_output_is_bounded_per_run_and_purged_with_the_run(client: Client, settings: Settings, ledger: Ledger) -> None:
    with worker_thread([talker], settings.model_copy(update={"max_output_entries": 10})):
        client.submit(talker, Talk(words=[f"w{i}" for i in range(400)]), run_id="b").wait(timeout_s=60)
    key = client.keys.run("b").output
    # trimmed approximately (MAXLEN ~): whole stream nodes of 100 entries go, never the newest 10
    assert 10 <= client.redis.xlen(key) <= 10 + 100 < 800
    assert client.output("b")[-1].data == "W399"
    assert client.purge(older_than_s=0).purged == 1 and not client.redis.exists(key)


def test_an_emit_that_is_not_json_fails_the_step_naming_it(redis_server: RedisServer) -> None:
    ctx = StepContext(
        run_id="r",
        workflow="w",
        step="s",
        visit=1,
        attempt=1,
        fencing_token=1,
        snapshot=None,
        worker_id="w1",
        max_payload_bytes=1024,
        save_stash=lambda raw: True,
        save_stash_async=lambda raw: None,  # type: ignore[arg-type,return-value]
    )
    with pytest.raises(ValidationError, match="output of step 's' \\(run 'r'\\) is not JSON-serializable"):
        ctx.emit(object())
    assert ctx.emit("no stream") is False  # a context without an emitter (a test's) drops it


def test_history_follow_prints_output_with_ids_and_resumes_after_one(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    with worker_thread([talker], settings):
        client.submit(talker, Talk(words=["a", "b"]), run_id="h").wait(timeout_s=30)
    env = process_env(settings)
    text = run_cli("history", "h", "-f", "--timeout-s", "10", env=env)
    assert text.returncode == 0, text.stderr
    lines = [line for line in text.stdout.splitlines() if " > " in line]
    assert [line.split(" > ")[1].split("  [")[0] for line in lines] == ['{"token": "a"}', '{"token": "b"}', "A", "B"]
    second = lines[1].rsplit("[", 1)[1].rstrip("]")
    resumed = run_cli("history", "h", "-f", "--after", second, "-o", "json", env=env)
    outputs = [json.loads(line) for line in resumed.stdout.splitlines() if '"type": "output"' in line]
    assert [o["data"] for o in outputs] == ["A", "B"] and outputs[0]["step"] == "shout"


def test_an_attempt_killed_mid_step_keeps_what_it_emitted_and_the_next_emits_again(
    fresh_server: RedisServer, tmp_path: Path
) -> None:
    settings = fast_settings(fresh_server.url)
    client = Client(settings)
    ledger = Ledger(connect(settings.plain_url()), settings.namespace)
    worker = start_worker(settings, tmp_path, name="w1", faults="mid_step=kill@speak#2")
    try:
        with supervisor_thread(settings):
            run = client.submit(talker, Talk(words=WORDS), run_id="k")
            wait_until(lambda: worker.popen.poll() is not None, timeout_s=20, what="the worker killed mid-step")
            worker = start_worker(settings, tmp_path, name="w2")
            run.wait(timeout_s=40)
    finally:
        worker.kill()
    spoken = [(e.attempt, e.data["token"]) for e in client.output("k") if e.step == "speak"]
    assert spoken == [(1, "the"), (1, "quick")] + [(2, w) for w in WORDS]  # not durable: said again
    assert ledger.execution_counts()["k:speak"] == 2
    client.close()


def test_the_readme_output_example_runs_as_written(client: Client, settings: Settings) -> None:
    module = readme_example("### Live step output")
    run = client.submit(module.chat, {"question": "why?"}, run_id="q")
    with worker_thread([module.chat], settings):
        tokens = [e.data["token"] for e in run.follow_output(timeout_s=30)]
    assert tokens == ["Durable", "agents", "resume."] and run.wait(timeout_s=5).text == "Durable agents resume."
    last = client.output("q")[0].id
    assert [e.data["token"] for e in run.follow_output(after=last, timeout_s=5)] == ["agents", "resume."]


def test_an_emit_redis_refuses_is_dropped_with_a_warning_and_the_step_goes_on(
    client: Client, settings: Settings, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    client.redis.set(client.keys.run("d").output, "not a stream")  # every XADD to it is refused
    logger = logging.getLogger("orchestrator.output")  # directly: another test's setup may stop propagation
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger=logger.name)
    try:
        with worker_thread([talker], settings):
            final = client.submit(talker, Talk(words=["x"]), run_id="d").wait(timeout_s=30)
    finally:
        logger.removeHandler(caplog.handler)
    assert final.said == "x" and ledger.execution_counts()["d:speak"] == 1
    assert any(r.getMessage() == "emitted output dropped" for r in caplog.records)


def test_a_follower_waits_with_blocking_reads_not_polling(client: Client, settings: Settings) -> None:
    """README: ``follow_output`` is a blocking read, no polling: a follower of a run that emits
    nothing for 2 s sends about one read per ``block_ms`` (1 s), not one per few ms."""
    client.submit(talker, Talk(words=["x"]), run_id="quiet")  # no worker: it stays queued, emits nothing
    client.redis.config_resetstat()
    with pytest.raises(WaitTimeout):
        list(client.run("quiet").follow_output(timeout_s=2.0, block_ms=1000))
    calls = {k: v["calls"] for k, v in client.redis.info("commandstats").items()}
    assert 1 <= calls.get("cmdstat_xread", 0) <= 4 and calls.get("cmdstat_hget", 0) <= 4
