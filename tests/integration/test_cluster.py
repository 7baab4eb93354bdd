"""A real Redis Cluster on loopback (3 masters, 3 replicas; tests/cluster.py).

Until runs are partitioned for it (issue 11), a cluster must be refused where it is first met,
with a message that says so: before this, ``orchestrator chaos`` pointed at a cluster node
submitted nothing and hung, and a worker retried its MOVED replies forever.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orchestrator.connection import cluster_reply, redis_failure
from orchestrator.errors import ConfigError
from tests.cluster import LoopbackCluster
from tests.harness import REPO, run_cli

pytestmark = pytest.mark.timeout(180)

PASSWORD_FREE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    loopback = LoopbackCluster(tmp_path_factory.mktemp("cluster")).start()
    yield loopback
    loopback.stop()


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {**PASSWORD_FREE_ENV, "ORCHESTRATOR_REDIS_URL": url, "ORCHESTRATOR_NAMESPACE": "clu", **extra}


def test_the_loopback_cluster_promotes_a_replica_when_a_master_is_killed(tmp_path: Path) -> None:
    loopback = LoopbackCluster(tmp_path).start()
    try:
        killed = loopback.master_of_slot(0)
        started = time.monotonic()
        killed.kill()
        loopback.wait_ready(timeout_s=60)
        took = time.monotonic() - started
        promoted = loopback.master_of_slot(0)
        assert promoted is not killed and loopback.role(promoted) == "master"
        assert took < 30, f"failover took {took:.1f} s"
    finally:
        loopback.stop()


def test_cluster_replies_are_configuration_errors_that_name_the_cluster(cluster: LoopbackCluster) -> None:
    with cluster.nodes[0].client() as client, pytest.raises(redis.ResponseError) as crossslot:
        client.exists("clu:probe:{a}", "clu:probe:{b}")
    assert cluster_reply(crossslot.value) == "CROSSSLOT"
    error = redis_failure(crossslot.value, cluster.url)
    assert isinstance(error, ConfigError)
    assert "Redis Cluster node" in error.message and "CROSSSLOT" in error.message


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "workers.testflows:chain", "{}"],
        ["worker", "workers.testflows:chain"],
        ["supervisor"],
        ["chaos", "--duration", "5"],
    ],
    ids=["submit", "worker", "supervisor", "chaos"],
)
def test_every_command_refuses_a_cluster_node_at_once_with_a_clear_message(
    cluster: LoopbackCluster, command: list[str], tmp_path: Path
) -> None:
    if command[0] == "chaos":
        command = [*command, "--chaos-dir", str(tmp_path / "chaos")]
    started = time.monotonic()
    result = run_cli(*command, env=env_for(cluster.url), cwd=tmp_path, timeout=90)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Redis Cluster node" in output and "not supported yet" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert took < 60, f"{command[0]} took {took:.0f} s to refuse the cluster"
