"""A namespace's partition count is recorded at first use; a process with another is refused.

README, Configuration: "recorded when a namespace is first used, and every process must use the
same count (another is refused)" — a run's keys are found from its id and the count, so a second
count would silently miss every run of the first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from orchestrator import Client, Settings
from orchestrator.errors import ConfigError
from tests.harness import process_env, run_cli, start_worker
from workers.testflows import chain


def test_the_first_count_is_recorded_and_every_other_process_with_another_is_refused(
    settings: Settings, r: redis.Redis, tmp_path: Path
) -> None:
    with Client(settings) as client:
        client.submit(chain, {}, run_id="first")  # records 16, the default
    assert r.hget(client.keys.config, "partitions") == str(settings.partitions)
    other = settings.model_copy(update={"partitions": 8})
    with Client(other) as wrong, pytest.raises(ConfigError, match=r"partitions 8 does not match .* which has 16"):
        wrong.get("first")
    env = process_env(other)
    status = run_cli("status", "first", env=env)
    assert status.returncode == 2 and "ORCHESTRATOR_PARTITIONS=16" in status.stderr, status.stderr
    worker = start_worker(other, tmp_path, "workers.testflows:chain")
    assert worker.wait(timeout_s=30) != 0  # refused at start, not left serving the wrong keys
    assert "partitions 8 does not match" in worker.output()
    with Client(settings) as client:
        assert client.get("first").status == "pending"  # the right count still finds the run
