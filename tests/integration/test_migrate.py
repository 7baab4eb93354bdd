"""``orchestrator migrate`` on data written by the release before partitions, with its own code.

The old release (the last commit before partitions, checked out with ``git archive``) submits
runs and runs a real worker, stopped by SIGTERM in the middle of a run; then the migration
moves the namespace, and today's worker finishes every run. What must hold: no run lost,
nothing a committed step wrote lost, no committed step executed again (the ledger counts every
execution across both releases), the old keys gone, and a second migration a no-op.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.chaos.ledger import Ledger
from orchestrator.keys import LegacyKeys
from tests.harness import REPO, Proc, process_env, run_cli, worker_thread
from tests.helpers import wait_until
from workers.testflows import chain

LEGACY_COMMIT = "e0933e3672ba3819bae144dc65d0e32a8eedf6ff"  # the last commit before partitions
CHAIN_STEPS = 10

pytestmark = [pytest.mark.timeout(180), pytest.mark.single_server]


@pytest.fixture(scope="module")
def legacy_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old release's ``orchestrator`` and ``workers`` packages, from git."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and this repository's history (the old release is read from it)")
    found = subprocess.run(
        ["git", "-C", str(REPO), "archive", LEGACY_COMMIT, "orchestrator", "workers"], capture_output=True, timeout=60
    )
    if found.returncode != 0:
        pytest.skip(f"commit {LEGACY_COMMIT[:7]} not in this clone (shallow?): {found.stderr.decode()[-200:]}")
    folder = tmp_path_factory.mktemp("legacy")
    with tarfile.open(fileobj=BytesIO(found.stdout)) as archive:
        archive.extractall(folder, filter="data")
    return folder


def legacy_env(settings: Settings, code: Path) -> dict[str, str]:
    return {**process_env(settings), "PYTHONPATH": str(code)}


def legacy_submit(settings: Settings, code: Path, runs: dict[str, float]) -> None:
    """Submit chain runs (run id -> seconds each step sleeps) with the old release's client."""
    program = (
        "import sys, json; from orchestrator import Client; from workers.testflows import chain\n"
        "with Client() as c:\n"
        "    for rid, s in json.loads(sys.argv[1]).items(): c.submit(chain, {'sleep_s': s}, run_id=rid)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, json.dumps(runs)],
        env=legacy_env(settings, code),
        cwd=code,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_namespace_written_by_the_old_release_migrates_and_finishes_with_nothing_run_twice(
    settings: Settings, r: redis.Redis, ledger: Ledger, legacy_code: Path, tmp_path: Path
) -> None:
    legacy = LegacyKeys(settings.namespace)
    runs = {"done-a": 0.0, "mid-b": 0.4, "wait-c": 0.0, "wait-d": 0.0}
    legacy_submit(settings, legacy_code, {"done-a": 0.0})
    env = {**legacy_env(settings, legacy_code), "ORCHESTRATOR_CONCURRENCY": "1"}
    worker = Proc(["worker", "workers.testflows:chain"], env, tmp_path / "legacy-worker.log", cwd=legacy_code)
    try:
        wait_until(lambda: r.hget(legacy.run("done-a").run, "status") == "completed", timeout_s=30, what="done-a")
        legacy_submit(settings, legacy_code, {"mid-b": 0.4})
        wait_until(lambda: int(r.hget(legacy.run("mid-b").run, "seq") or 0) >= 3, timeout_s=30, what="mid-b under way")
        legacy_submit(settings, legacy_code, {"wait-c": 0.0, "wait-d": 0.0})
        refused = run_cli("migrate", env=process_env(settings))  # a live worker: refused
        assert refused.returncode == 2 and "stop every worker and supervisor" in refused.stderr, refused.stderr
        worker.signal(signal.SIGTERM)  # drains: the step in flight commits, nothing more starts
        assert worker.wait() == 0, worker.output()[-3000:]
    finally:
        worker.kill()
    before = {rid: r.hgetall(legacy.run(rid).run) for rid in runs}
    assert before["done-a"]["status"] == "completed"
    assert before["mid-b"]["status"] != "completed" and int(before["mid-b"]["seq"]) >= 3
    old_results = r.hgetall(legacy.run("mid-b").results)

    dry = run_cli("migrate", "--dry-run", env=process_env(settings))
    assert dry.returncode == 0 and "4 runs would move" in dry.stdout, dry.stdout + dry.stderr
    moved = run_cli("migrate", env=process_env(settings))
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "4 runs moved" in moved.stdout and "3 unfinished runs enqueued" in moved.stdout, moved.stdout

    for rid in runs:  # nothing left under the old names
        assert r.exists(*vars(legacy.run(rid)).values()) == 0
    assert r.exists(legacy.queue("default").stream, legacy.index("active"), legacy.index("done")) == 0
    with Client(settings) as client, worker_thread([chain], settings):
        assert client.results("mid-b") and len(client.results("mid-b")) == len(old_results)
        for rid in runs:
            final = client.run(rid, chain).wait(timeout_s=60)
            assert final.i == CHAIN_STEPS and final.steps == [f"s{i}" for i in range(CHAIN_STEPS)], (rid, final)
        repaired = [e.detail for e in client.events("wait-c") if e.type == "repaired"]
        assert repaired == ["no queued entry"]
        assert client.get("done-a").status == "completed" and len(client.events("done-a")) > CHAIN_STEPS
    counts = ledger.execution_counts()
    assert {rid for key in counts for rid in runs if key.startswith(f"{rid}:")} == set(runs)
    twice = {key: n for key, n in counts.items() if n != 1}
    assert twice == {}, f"steps executed more than once across the two releases: {twice}"

    again = run_cli("migrate", env=process_env(settings))
    assert again.returncode == 0 and "0 runs moved" in again.stdout, again.stdout + again.stderr
