"""Fixtures: real redis-server processes on free loopback ports, one namespace per test.

With ``TEST_ON_REDIS_CLUSTER=1`` the session's server is a Redis Cluster on loopback (3
masters, 3 replicas; tests/cluster.py) reached through one node's plain URL, as users give it,
and ``r`` is redis-py's cluster client: the suites that use only these fixtures run unchanged
against a cluster (CI runs the protocol suites so). Tests that restart or kill "the" server
(``fresh_server``) stay on a single server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orchestrator import Client
from orchestrator.chaos.cluster import LoopbackCluster
from orchestrator.embedded import RedisServer
from orchestrator.settings import Settings
from tests.ledger import Ledger

ON_CLUSTER = os.environ.get("TEST_ON_REDIS_CLUSTER", "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ON_CLUSTER:
        skip = pytest.mark.skip(reason="needs a single server of its own kind (TEST_ON_REDIS_CLUSTER=1)")
        for item in items:
            if "single_server" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | LoopbackCluster]:
    """One server (or cluster) for the session; tests stay apart by namespace, not by FLUSHALL."""
    server: RedisServer | LoopbackCluster
    if ON_CLUSTER:
        server = LoopbackCluster(tmp_path_factory.mktemp("cluster")).start()
    else:
        server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync=None).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, with AOF, for tests that kill or restart Redis."""
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    yield server
    server.kill()


def fast_settings(url: str, **overrides: object) -> Settings:
    """Short timings so recovery paths run in about a second."""
    values: dict[str, object] = {
        "redis_url": url,
        "namespace": f"t{uuid.uuid4().hex[:10]}",
        "heartbeat_interval_s": 0.1,
        "lease_s": 0.8,
        "reclaim_interval_s": 0.1,
        "sweep_interval_s": 0.3,
        "sweep_after_s": 1.0,
        "block_ms": 50,
        "promote_interval_s": 0.05,
        "drain_grace_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(redis_server: RedisServer | LoopbackCluster) -> Settings:
    return fast_settings(redis_server.url)


@pytest.fixture
def r(redis_server: RedisServer | LoopbackCluster) -> Iterator[redis.Redis]:
    client: redis.Redis
    if ON_CLUSTER:
        client = redis.RedisCluster.from_url(redis_server.url, decode_responses=True)  # type: ignore[assignment]
    else:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def ledger(r: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """The test ledger, and the env that in-process test steps read it from."""
    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", settings.plain_url())
    monkeypatch.setenv("ORCHESTRATOR_NAMESPACE", settings.namespace)
    return Ledger(r, settings.namespace)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    c = Client(settings)
    yield c
    c.close()
