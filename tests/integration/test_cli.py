"""The orchestrator command as operators use it: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import Client, Settings
from orchestrator.children import children_of
from orchestrator.demo.agent import Call, read_calls, research
from orchestrator.demo.runner import KILL_INTO_CALL_S, RUN_ID
from orchestrator.embedded import RedisServer
from tests.harness import REPO, process_env, run_cli, start_worker, worker_thread
from tests.ledger import Ledger
from workers.testflows import chain


def cli(
    settings: Settings, *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env or process_env(settings), stdin=stdin, timeout=timeout)


def test_submit_status_history_and_list_in_text_and_json(settings: Settings, ledger: Ledger, tmp_path: Path) -> None:
    with worker_thread([chain], settings):
        done = cli(
            settings, "submit", "workers.testflows:chain", '{"i": 1}', "--run-id", "a1", "--wait", "20", "-o", "json"
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "run_id": "a1",
            "created": True,
            "state": {"i": 11, "sleep_s": 0.0, "steps": [f"s{n}" for n in range(10)]},
        }
        (tmp_path / "in.json").write_text('{"i": 2}')
        shown = cli(
            settings,
            "submit",
            "workers.testflows:chain",
            "-f",
            str(tmp_path / "in.json"),
            "--run-id",
            "a2",
            "--wait",
            "20",
        )
        assert shown.returncode == 0 and "run submitted" in shown.stdout and "run completed" in shown.stdout
        assert shown.stdout.count("done (") == 10  # progress while waiting: one line per committed step
        piped = cli(settings, "submit", "workers.testflows:chain", "-", "--run-id", "a3", stdin='{"i": 3}')
        assert piped.stdout.strip() == "submitted: a3"
        again = cli(settings, "submit", "workers.testflows:chain", "-", "--run-id", "a3", stdin='{"i": 3}')
        assert again.stdout.strip() == "already exists: a3"
        Client(settings).run("a3").wait(timeout_s=20)
    status = cli(settings, "status", "a1")
    assert status.returncode == 0 and "status    completed" in status.stdout and "10 steps committed" in status.stdout
    assert json.loads(cli(settings, "status", "a1", "-o", "json").stdout)["steps_done"] == 10
    history = cli(settings, "history", "a1")
    assert history.returncode == 0 and history.stdout.count(" ok ") == 10 and "completed" in history.stdout
    assert len(json.loads(cli(settings, "history", "a1", "--output", "json").stdout)["steps"]) == 10
    followed = cli(settings, "history", "a1", "--follow", "-o", "json").stdout.splitlines()
    assert [json.loads(line)["type"] for line in followed] == ["submitted", *["ok"] * 10, "completed"]
    listed = json.loads(cli(settings, "runs", "list", "--status", "completed", "-o", "json").stdout)
    assert sorted(r["run_id"] for r in listed) == ["a1", "a2", "a3"]
    assert "a2" in cli(settings, "runs", "list").stdout
    stats = json.loads(cli(settings, "stats", "-o", "json").stdout)
    assert stats["counters"]["steps_ok"] == 30
    (row,) = stats["workflows"]
    assert (row["workflow"], row["steps"], row["completed"], row["observed"]) == ("chain", 10, 3, 1.0)
    table = cli(settings, "stats", "--workflow", "chain").stdout
    assert "WITHOUT DURABILITY" in table and "steps of chain:" in table and "s9" in table
    live = cli(settings, "top", "--iterations", "1")
    assert live.returncode == 0 and "orchestrator top" in live.stdout and "queue default" in live.stdout


def test_an_unreachable_redis_is_one_clear_line(settings: Settings) -> None:
    from orchestrator.embedded import free_port

    result = cli(settings, "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "status", "r", timeout=60)
    assert result.returncode == 1 and "error: cannot reach Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_cancel_and_retry_and_their_errors(settings: Settings) -> None:
    Client(settings).submit(chain, {}, run_id="c1")
    assert cli(settings, "cancel", "c1").stdout.strip() == "cancelled c1"
    again = cli(settings, "cancel", "c1")
    assert again.returncode == 1 and "already cancelled" in again.stderr
    retry = cli(settings, "retry", "c1")
    assert retry.returncode == 1 and "is cancelled, not failed" in retry.stderr
    missing = cli(settings, "status", "nope")
    assert missing.returncode == 1 and "error: no run 'nope'" in missing.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["submit", "workers.testflows:chain", "{not json"], "is not valid JSON"),
        (["submit", "nomodule:flow", "{}"], "cannot import 'nomodule'"),
        (["submit", "workers.testflows:nothing", "{}"], "has no attribute 'nothing'"),
        (["submit", "workers.testflows", "{}"], "expected module:attribute"),
        (["runs", "list", "--status", "bogus"], "Invalid value for '--status'"),
        (["worker", "workers.testflows:chain", "--lease-s", "0.1"], "lease_s (0.1) must be more than 3 x"),
        (["--redis-url", "http://x", "status", "r"], "unknown scheme 'http'"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2_with_a_message_naming_the_problem(
    settings: Settings, args: list[str], message: str
) -> None:
    result = cli(settings, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_input_exits_1_and_names_the_field(settings: Settings) -> None:
    result = cli(settings, "submit", "workers.testflows:chain", '{"i": "lots"}')
    assert result.returncode == 1 and "i: Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_redis_password_never_appears_in_output_or_logs(tmp_path: Path, ledger: Ledger) -> None:
    from tests.conftest import fast_settings

    with RedisServer(tmp_path / "redis", appendfsync=None, password="s3cr3t-pw") as server:
        settings = fast_settings(server.url)
        assert "s3cr3t-pw" in server.url
        proc = start_worker(settings, tmp_path, "workers.testflows:chain")
        try:
            result = cli(
                settings,
                "--log-level",
                "DEBUG",
                "submit",
                "workers.testflows:chain",
                "{}",
                "--wait",
                "20",
                "--run-id",
                "p1",
            )
            assert result.returncode == 0, result.stderr
            status = cli(settings, "status", "p1")
            wrong = cli(settings, "--redis-url", server.url.replace("s3cr3t-pw", "wrong-pw"), "status", "p1")
        finally:
            proc.signal(2)
            proc.wait()
        assert wrong.returncode == 1 and "refused the credentials in the URL" in wrong.stderr
        assert "Traceback" not in wrong.stderr
        for text in (
            result.stdout,
            result.stderr,
            status.stdout,
            status.stderr,
            wrong.stdout,
            wrong.stderr,
            proc.output(),
        ):
            assert "s3cr3t-pw" not in text and "wrong-pw" not in text
        assert "redis=redis://:***@127.0.0.1" in proc.output()


def demo_client(settings: Settings, out: str) -> Client:
    """A client of the namespace the demo printed (it uses a fresh one in the user's Redis)."""
    namespace = re.search(r"the demo's figures stay in namespace (\S+):", out)
    assert namespace, out
    return Client(Settings(redis_url=settings.plain_url(), namespace=namespace[1]))


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of ``spans`` ([start, end)) that hold one instant."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # an end first at a tie
    held = most = 0
    for _, step in edges:
        held += step
        most = max(most, held)
    return most


def check_demo_map(client: Client, calls: list[Call], competitors: int) -> list[str]:
    """The demo's map: one item per competitor, each committed exactly once (one result, one
    ``ok``), the findings in the run's state in item order; returns the items' run ids."""
    items = children_of(client.redis, client.keys, RUN_ID)
    assert items == [f"{RUN_ID}:study:{i}" for i in range(competitors)]
    for item in items:
        assert client.get(item).status == "completed"
        assert client.redis.hlen(client.keys.run(item).results) == 1, item
        assert [e.type for e in client.events(item)].count("ok") == 1, item
    state = client.state(RUN_ID, research)
    assert [f.split(":")[0] for f in state.findings] == state.competitors
    for item, company in zip(items, state.competitors, strict=True):
        assert {c.item for c in calls if c.run == item} == {company}
    return items


def test_the_demo_kills_a_worker_and_the_run_still_completes(settings: Settings, tmp_path: Path) -> None:
    result = cli(
        settings,
        "--redis-url",
        settings.plain_url(),
        "demo",
        "--competitors",
        "3",
        "--demo-dir",
        str(tmp_path / "demo"),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "run completed" in out and "the meeting was booked 1 time(s)" in out
    # the fan-out under the concurrency limit: 3 items, 2 permits, so one waits in line
    assert "children 3 map items: study:0, study:1, study:2" in out
    assert "permit_wait concurrency limit llm: 2 of 2 permits in use, 0 waiting ahead" in out
    kill = re.search(r"\+\s*([0-9.]+)s  study_one\[(\d)\]\s+\*\*\* kill -9 (worker-\d) \(pid \d+\) in the middle", out)
    assert kill, out
    assert f"attempt 1 lost: {kill[3]} (or its RQ work-horse) died mid-step" in out
    calls = read_calls(tmp_path / "demo" / "world.sqlite3", RUN_ID)
    with demo_client(settings, out) as client:
        items = check_demo_map(client, calls, 3)
        run = client.events(RUN_ID)
        item_events = {item: client.events(item) for item in items}
    # the kill as printed (to 0.1 s), on the Redis clock; the workers' call log shares the machine's clock
    kill_ms = run[0].at + float(kill[1]) * 1000
    early_ms, late_ms = kill_ms - 50, kill_ms + 50
    at = {e.type: e.at for e in run}
    assert at["children"] < early_ms and at["children_done"] > late_ms, "the kill landed in the middle of the map"
    # only the item(s) the kill cut short ran again: every other item made one model call, finished
    cut = {c.run for c in calls if c.seconds is None}
    assert items[int(kill[2])] in cut and cut <= set(items)
    for item in items:
        mine = [c for c in calls if c.run == item]
        if item in cut:
            (lost,) = [c for c in mine if c.seconds is None]
            (again,) = [c for c in mine if c.seconds is not None]
            assert lost.started * 1000 < late_ms < again.started * 1000, item
            (ok,) = [e for e in item_events[item] if e.type == "ok"]
            assert ok.worker != kill[3] and ok.fence == again.fence > lost.fence, item
        else:
            assert len(mine) == 1 and mine[0].seconds is not None, item
    committed = {i: next(e.at for e in item_events[i] if e.type == "ok") for i in items}
    done_before = [i for i in items if committed[i] < early_ms]
    assert done_before and not set(done_before) & cut, "an item committed before the kill, and was not run again"
    # the limit held: never more than 2 model calls at once (a cut-short call lasted until the kill)
    spans = [(c.started, c.started + c.seconds) for c in calls if c.seconds is not None]
    spans += [(c.started, late_ms / 1000) for c in calls if c.seconds is None]
    assert most_at_once(spans) == 2
    # what the report says, measured from the same call log
    assert re.search(r"2 steps committed before the kill \(find_competitors, study\), not run again", out), out
    kept = re.search(r"(\d) of 3 map items committed before the kill \([A-Za-z, ]+\), not run again", out)
    assert kept and len(done_before) <= int(kept[1]) <= sum(at < late_ms for at in committed.values()), out
    lost = re.search(rf"{len(cut)} map items? cut short by the kill \([A-Za-z, ]+\), run again: ([0-9.]+) s of", out)
    assert lost and float(lost[1]) >= KILL_INTO_CALL_S, out
    # a lease (this test's settings) and a supervisor scan later, the killed item runs again
    rerun_s = float(re.search(r"ran again ([0-9.]+) s after the kill", out).group(1))  # type: ignore[union-attr]
    assert rerun_s < 10
    # then it waits for an approval with every worker killed, and the approval alone resumes it
    assert "the run waits for approval: no worker slot, no lease, no queue entry" in out
    assert "not one worker left while it waits ***" in out
    assert "approval sent with no worker alive: delivered, step schedule_meeting queued" in out
    assert re.search(
        r"the run waited [0-9.]+ s for its approval with every worker killed, then went on at "
        r"schedule_meeting; steps before it run again: 0",
        out,
    ), out


def test_the_demo_waits_for_the_approval_the_user_types(settings: Settings, tmp_path: Path) -> None:
    """``--approve manually``: the demo prints the ``orchestrator signal`` command (with
    ``$REDIS_URL`` for a URL of the user's: it may hold a password) and the run goes on once
    an operator types it."""
    env = {**process_env(settings), "REDIS_URL": settings.plain_url()}
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "demo",
            "--competitors",
            "3",
            "--no-kill",
            "--approve",
            "manually",
            "--demo-dir",
            str(tmp_path / "demo"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        for line in demo.stdout:
            lines.append(line)
            if line.strip().startswith("orchestrator --redis-url"):
                break
        command = lines[-1].strip()
        assert '--redis-url "$REDIS_URL"' in command and settings.plain_url() not in "".join(lines), lines
        typed = subprocess.run(
            ["bash", "-c", command.replace("orchestrator ", f"{sys.executable} -m orchestrator ", 1)],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert typed.returncode == 0, typed.stdout + typed.stderr
        assert "delivered approval" in typed.stdout and "it goes on at step schedule_meeting" in typed.stdout
        rest, _ = demo.communicate(timeout=120)
    finally:
        demo.kill()
        demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()
    assert demo.returncode == 0, "".join(lines) + rest
    assert "run completed" in rest and "no worker was killed: " in rest and "the meeting was booked 1 time(s)" in rest
    calls = read_calls(tmp_path / "demo" / "world.sqlite3", RUN_ID)
    with demo_client(settings, rest) as client:
        items = check_demo_map(client, calls, 3)
    # with no kill, each item made one model call, two at once at most: the limit is 2
    assert sorted(c.run for c in calls if c.run in items) == items
    assert most_at_once([(c.started, c.started + (c.seconds or 0)) for c in calls]) == 2
    assert all(c.seconds is not None for c in calls)


def test_runs_purge_deletes_finished_runs_by_status_and_age_with_a_dry_run_first(
    settings: Settings, client: Client, ledger: Ledger
) -> None:
    with worker_thread([chain], settings):
        for i in range(3):
            client.submit(chain, {}, run_id=f"done{i}").wait(timeout_s=30)
    client.submit(chain, {}, run_id="cancelled")
    client.cancel("cancelled")
    assert cli(settings, "runs", "purge", "--older-than", "1h").stdout.startswith("purged 0 runs")  # too young
    dry = cli(settings, "runs", "purge", "--older-than", "0s", "--status", "completed", "--dry-run", "-o", "json")
    assert dry.returncode == 0, dry.stderr
    # kept: the cancelled run, as old, in the same index, not selected
    assert json.loads(dry.stdout) == {"purged": 3, "kept": 1, "dry_run": True, "statuses": ["completed"]}
    assert client.get("done0").status == "completed"  # a dry run deletes nothing
    done = cli(settings, "runs", "purge", "--older-than", "0", "--status", "completed")
    assert done.returncode == 0 and done.stdout.strip() == "purged 3 runs (completed) finished more than 0 ago"
    assert [r.run_id for r in client.list_runs()] == ["cancelled"]  # the cancelled run was not selected
    bad = cli(settings, "runs", "purge", "--older-than", "a week")
    assert bad.returncode == 2 and "'a week' is not a duration" in bad.stderr
