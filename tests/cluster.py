"""A real Redis Cluster on loopback for tests: masters and replicas as plain redis-server processes.

Built with redis-py rather than ``redis-cli --cluster create``, so that it needs nothing but the
server binary and works the same for Redis 7 and Valkey: every node is started with
``--cluster-enabled yes``, introduced with ``CLUSTER MEET``, the slots are split evenly between
the masters (``CLUSTER ADDSLOTS``), each replica follows its master (``CLUSTER REPLICATE``), and
the cluster is ready when every node reports ``cluster_state:ok`` and agrees on the topology.

``cluster-node-timeout`` is 2 s, so a ``kill -9``'d master's replica takes over in about 4-5 s
(../shared/context/cluster-research.md, 1.10); ``cluster-require-full-coverage no``, so a lost
shard leaves the others serving.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from orchestrator.embedded import RedisServer, free_port
from orchestrator.errors import ConfigError

SLOTS = 16384
NODE_TIMEOUT_MS = 2000


def _cluster_ports(count: int) -> list[int]:
    """``count`` free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 <= 65535 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ClusterNode(RedisServer):
    """A redis-server with cluster mode on; its ``nodes.conf`` lives in its data folder."""

    def _argv(self, *, appendonly: bool = True) -> list[str]:
        return [
            *super()._argv(appendonly=appendonly),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str((self.data_dir / "nodes.conf").resolve()),
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage",
            "no",
        ]

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=10)

    def node_id(self) -> str:
        with self.client() as client:
            return str(client.execute_command("CLUSTER", "MYID"))


@dataclass
class LoopbackCluster:
    """``masters`` shards of one master and ``replicas`` replicas each, on 127.0.0.1."""

    data_dir: Path
    masters: int = 3
    replicas: int = 1
    binary: str | None = None
    appendfsync: str | None = None
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A plain URL of one node, as KEDA and redis-cli take a cluster."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 30.0) -> LoopbackCluster:
        count = self.masters * (1 + self.replicas)
        for i, port in enumerate(_cluster_ports(count)):
            node = ClusterNode(self.data_dir / f"node-{i}", port=port, binary=self.binary, appendfsync=self.appendfsync)
            self.nodes.append(node)
        try:
            for node in self.nodes:
                node.start()
            self._form(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        first = self.nodes[0]
        with first.client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        per_master = SLOTS // self.masters
        for i, node in enumerate(self.nodes[: self.masters]):
            end = SLOTS if i == self.masters - 1 else (i + 1) * per_master
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(i * per_master, end))
        ids = [node.node_id() for node in self.nodes]
        everyone_met = lambda: all(self._known(n) >= len(ids) for n in self.nodes)  # noqa: E731
        self._wait(deadline, "every node knows every other", everyone_met)
        for r, node in enumerate(self.nodes[self.masters :]):
            with node.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", ids[r % self.masters])
        self._wait(deadline, "the cluster is ready", self.ready)

    @staticmethod
    def _known(node: ClusterNode) -> int:
        with node.client() as client:
            return len(str(client.execute_command("CLUSTER", "NODES")).strip().splitlines())

    def ready(self) -> bool:
        """Every live node says ``cluster_state:ok`` and sees ``masters`` live masters (processes
        of ours that are running, not flagged failed), and every live replica has synced."""
        live_ports = {n.port for n in self.live_nodes()}
        for node in self.live_nodes():
            with node.client() as client:
                try:
                    info = str(client.execute_command("CLUSTER", "INFO"))
                    nodes = str(client.execute_command("CLUSTER", "NODES"))
                    replication = client.info("replication")
                except redis.RedisError:
                    return False
            if "cluster_state:ok" not in info:
                return False
            masters = 0
            for line in nodes.strip().splitlines():
                _id, address, flags = line.split()[:3]
                port = int(address.split("@")[0].rsplit(":", 1)[1])
                masters += "master" in flags and "fail" not in flags and port in live_ports
            if masters != self.masters:
                return False
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def live_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def master_of_slot(self, slot: int) -> ClusterNode:
        with self.live_nodes()[0].client() as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise ConfigError(f"slot {slot} is not covered")

    def role(self, node: ClusterNode) -> str:
        with node.client() as client:
            return str(client.execute_command("ROLE")[0])

    def _wait(self, deadline: float, what: str, done: Callable[[], bool]) -> None:
        while not done():
            if time.monotonic() > deadline:
                raise ConfigError(f"loopback cluster: timed out waiting until {what}")
            time.sleep(0.05)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        self._wait(time.monotonic() + timeout_s, "the cluster is ready", self.ready)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
