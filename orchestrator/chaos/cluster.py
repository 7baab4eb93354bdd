"""A real Redis Cluster on loopback, for the tests and ``orchestrator chaos --cluster``: masters
and replicas as plain redis-server processes, and the two faults a cluster adds (a master's
``kill -9`` with its replica's promotion, and slots moved between masters under load).

Built with redis-py rather than ``redis-cli --cluster create``, so that it needs nothing but the
server binary and works the same for Redis 7 and Valkey: every node is started with
``--cluster-enabled yes``, introduced with ``CLUSTER MEET``, the slots are split evenly between
the masters (``CLUSTER ADDSLOTS``), each replica follows its master (``CLUSTER REPLICATE``), and
the cluster is ready when every node reports ``cluster_state:ok`` and agrees on the topology.

``cluster-node-timeout`` is 2 s, so a ``kill -9``'d master's replica takes over in about 4-5 s
(../shared/context/cluster-research.md, 1.10); ``cluster-require-full-coverage no``, so a lost
shard leaves the others serving.

Resharding (:meth:`LoopbackCluster.move_slot`) follows the steps ``redis-cli --cluster reshard``
takes, with redis-py so that no redis-cli is needed: the target marks the slot IMPORTING, the
source MIGRATING, the keys move in batches with ``MIGRATE``, then every master is told the
slot's new owner (``CLUSTER SETSLOT <slot> NODE``). Meanwhile clients get ASK for keys already
moved and TRYAGAIN for a multi-key call whose keys are split between the two nodes.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from orchestrator.embedded import RedisServer, find_redis_server, free_port
from orchestrator.errors import ConfigError

SLOTS = 16384
NODE_TIMEOUT_MS = 2000
MIGRATE_BATCH = 100  # keys per MIGRATE
MIGRATE_TIMEOUT_MS = 5000


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
    def version(self) -> str:
        """The nodes' server (``redis-server`` or ``valkey-server``) and version, for reports."""
        with self.live_nodes()[0].client() as client:
            info = client.info("server")
        return (
            f"{'Valkey' if 'valkey_version' in info else 'Redis'} {info.get('valkey_version') or info['redis_version']}"
        )

    @property
    def url(self) -> str:
        """A plain URL of one node, as KEDA and redis-cli take a cluster."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 30.0) -> LoopbackCluster:
        count = self.masters * (1 + self.replicas)
        binary = self.binary or find_redis_server()
        for i, port in enumerate(_cluster_ports(count)):
            node = ClusterNode(self.data_dir / f"node-{i}", port=port, binary=binary, appendfsync=self.appendfsync)
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

    # -- the faults a cluster adds ----------------------------------------------------------

    def masters_now(self) -> list[ClusterNode]:
        """The live nodes that are masters at this moment (a promoted replica included)."""
        return [n for n in self.live_nodes() if self.role(n) == "master"]

    def kill_master(self, slot: int) -> ClusterNode:
        """``kill -9`` the master serving ``slot``; its replica takes over after the node
        timeout. Returns the killed node (:meth:`rejoin` starts it again, as a replica)."""
        node = self.master_of_slot(slot)
        node.kill()
        return node

    def rejoin(self, node: ClusterNode, timeout_s: float = 30.0) -> None:
        """Start a killed node again on its port and data: its ``nodes.conf`` makes it rejoin,
        and the promoted replica's newer epoch turns it into that replica's replica."""
        node.start(timeout_s)

    def move_slot(self, slot: int, target: ClusterNode) -> int:
        """Move ``slot`` (and its keys) from its master to the master ``target``, under load;
        returns the number of keys moved. Masters that cannot be reached are skipped when the
        new owner is announced: the cluster bus spreads it to them."""
        source = self.master_of_slot(slot)
        if source is target:
            return 0
        source_id, target_id = source.node_id(), target.node_id()
        moved = 0
        with source.client() as src, target.client() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, MIGRATE_BATCH):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *keys)
                moved += len(keys)
            for node in [target, source, *self.masters_now()]:
                with node.client() as client, contextlib.suppress(redis.RedisError):
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved
