"""The paced benchmarks time a run's completion by the last write of its hash, as a subscribed
client sees it (keyspace notifications): to the microsecond, checked against the run's own
``finished_ms``, and the server's notification setting is put back afterwards."""

from __future__ import annotations

import time

import pytest
import redis

from bench.measure import run_writes_seen, seen_finish_ms
from orchestrator.embedded import RedisServer
from orchestrator.keys import Keys
from tests.helpers import wait_until


@pytest.fixture
def admin(fresh_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(fresh_server.url, decode_responses=True)


def test_the_last_write_of_each_run_hash_is_seen_to_the_microsecond(admin: redis.Redis) -> None:
    keys = Keys("clock", 4)
    runs = ["a", "b"]
    admin.config_set("notify-keyspace-events", "Ex")
    with run_writes_seen(admin, [keys.run(r).run for r in runs]) as seen:
        for run in runs:
            admin.hset(keys.run(run).run, "status", "running")
            time.sleep(0.01)
            admin.hset(keys.run(run).run, "status", "completed")
            wrote = time.time()
            admin.set(keys.run(run).state, "x")  # another key of the run: not its completion
        wait_until(lambda: len(seen) == 2, what="both runs' writes seen")
    assert admin.config_get("notify-keyspace-events")["notify-keyspace-events"] in ("xE", "Ex")
    assert abs(seen[keys.run("b").run] - wrote) < 0.05
    finished = [int(seen[keys.run(r).run] * 1000) for r in runs]
    assert seen_finish_ms(seen, keys, runs, finished) == [seen[keys.run(r).run] * 1000 for r in runs]


def test_a_run_written_after_it_finished_is_refused_rather_than_timed(admin: redis.Redis) -> None:
    keys = Keys("clock", 4)
    with run_writes_seen(admin, [keys.run("a").run]) as seen:
        admin.hset(keys.run("a").run, "status", "completed")
        wait_until(lambda: seen, what="the write seen")
    finished_long_before = int(seen[keys.run("a").run] * 1000) - 1000
    with pytest.raises(RuntimeError, match="something else wrote the run's hash"):
        seen_finish_ms(seen, keys, ["a"], [finished_long_before])
    with pytest.raises(RuntimeError, match="notification was lost"):
        seen_finish_ms({}, keys, ["a"], [finished_long_before])
