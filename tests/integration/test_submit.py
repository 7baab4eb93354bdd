"""Submitting is idempotent by run id, also when threads and processes race on the same id."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from orchestrator import Client, RunConflict, Settings
from tests.harness import REPO, process_env
from workers.testflows import chain

SUBMIT_AT = """
import sys, time
from orchestrator import Client
from workers.testflows import chain
client = Client()
start = float(sys.argv[1])
time.sleep(max(0.0, start - time.time()))
print(int(client.submit(chain, {"i": 5}, run_id="same").created))
"""


def test_threads_and_processes_submitting_one_run_id_create_exactly_one_run(client: Client, settings: Settings) -> None:
    start = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SUBMIT_AT, str(start)],
            env=process_env(settings),
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    created: list[bool] = []
    lock = threading.Lock()

    def submit() -> None:
        time.sleep(max(0.0, start - time.time()))
        run = client.submit(chain, {"i": 5}, run_id="same")
        with lock:
            created.append(run.created)

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outputs = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    created += [out == "1" for out in outputs]
    assert len(created) == 13 and created.count(True) == 1
    assert sum(client.redis.xlen(stream) for stream in client.keys.streams("default")) == 1
    assert client.get("same").status == "pending"
    assert client.state("same") == {"i": 5, "sleep_s": 0.0, "steps": []}


def test_the_same_id_with_another_input_is_a_conflict(client: Client) -> None:
    client.submit(chain, {"i": 1}, run_id="c")
    assert client.submit(chain, {"i": 1}, run_id="c").created is False
    with pytest.raises(RunConflict, match="already exists with workflow 'chain' and a different input"):
        client.submit(chain, {"i": 2}, run_id="c")
