"""deploy/compose.cluster.yaml's Redis nodes as local redis-server processes, for the tests: each
node started with the compose file's own command line and config file, the create service's own
script run against them, and the moves of a slot between masters that resharding makes.

The substitutions, as in test_processes.py: compose's service names become ``localhost`` and a
port of each node's own (compose's DNS and port 6379 exist only there), the config file's path a
local one, the password one of the test's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from orchestrator.embedded import free_port
from tests.deploy.manifests import clean_environ, compose_cluster, interpolate, service_env
from tests.deploy.test_compose_cluster import CONFIG_TARGET, CREATE, NODE_PORT, NODES, create_script
from tests.helpers import wait_until

HOST = "localhost"  # stands for the service names, which compose's DNS resolves to each container


# -- the tools: a Redis 7 server and redis-cli -------------------------------------------------


def redis_7(name: str) -> str | None:
    """A ``redis-server`` or ``redis-cli`` of Redis 7 or later (not Valkey's): ``$ORCHESTRATOR_REDIS_SERVER``'s
    folder, then PATH, then Debian's."""
    folders = [str(Path(os.environ.get("ORCHESTRATOR_REDIS_SERVER", "/nonexistent")).parent)]
    folders += [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for folder in folders:
        found = shutil.which(name, path=folder)
        if not found:
            continue
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"(?:v=|redis-cli )(\d+)\.(\d+)", out)
        if match and int(match[1]) >= 7:
            return found
    return None


def last_line(output: str) -> str:
    """The last line redis-cli and the script printed, without redis-cli's colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", output).splitlines()[-1]


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Node:
    """One redis-node-N service as a redis-server process."""

    service: str
    port: int
    argv: list[str]
    data_dir: Path
    password: str
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        with open(self.data_dir / "log", "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        wait_until(self.answers, timeout_s=20, what=f"{self.service} answering")

    def answers(self) -> bool:
        assert self.popen is not None and self.popen.poll() is None, (self.data_dir / "log").read_text()[-2000:]
        try:
            with self.admin() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True, socket_timeout=10)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(timeout=30)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


@dataclass
class Stack:
    nodes: list[Node]
    password: str
    config: Path
    cli: str
    tmp: Path
    created: subprocess.CompletedProcess[str] = field(init=False)
    acl: dict[str, list[str]] = field(default_factory=dict)  # the users made on every node

    def restart(self, node: Node) -> None:
        """Start a stopped node again; its ACL users again too (ACL SETUSER lasts until a restart)."""
        node.start()
        with node.admin() as client:
            for name, rules in self.acl.items():
                client.execute_command("ACL", "SETUSER", name, "reset", *rules)

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def url(self, user: str = "", password: str = "", node: Node | None = None) -> str:
        """The workers' REDIS_URL from the compose file, for a node here (and another user)."""
        url = interpolate(service_env(compose_cluster()["services"]["worker"])["REDIS_URL"], {"REDIS_PASSWORD": "PW"})
        url = url.replace(f"{NODES[0]}:{NODE_PORT}", (node or self.nodes[0]).address)
        return url.replace(":PW@", f"{user}:{password or self.password}@")

    def substituted(self, text: str) -> str:
        """Compose's names and paths in ``text`` replaced by this stack's."""
        text = text.replace(CONFIG_TARGET, str(self.config))
        for node in self.nodes:
            text = text.replace(f"{node.service}:{NODE_PORT}", node.address)
        return text

    def create(self, **env: str) -> subprocess.CompletedProcess[str]:
        """The create service's script, with its environment, against these nodes."""
        environment = clean_environ()
        environment["PATH"] = f"{Path(self.cli).parent}{os.pathsep}{environment.get('PATH', '')}"
        environment.update(
            {k: self.substituted(v) for k, v in service_env(compose_cluster()["services"][CREATE]).items()}
        )
        environment.update(env)
        script = self.substituted(create_script())
        return subprocess.run(["sh", "-c", script], env=environment, capture_output=True, text=True, timeout=120)

    def admin(self) -> redis.RedisCluster:
        return redis.RedisCluster(host=HOST, port=self.nodes[0].port, password=self.password, decode_responses=True)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.popen is not None and n.popen.poll() is None]

    def slots(self) -> list[tuple[int, int, str, int, list[int]]]:
        """CLUSTER SLOTS as seen from a live node: (first, last, master host, master port, replica ports)."""
        with self.live()[0].admin() as client:
            raw = client.execute_command("CLUSTER", "SLOTS")
        return [(int(a), int(b), str(m[0]), int(m[1]), [int(r[1]) for r in rest]) for a, b, m, *rest in raw]

    def master_of(self, slot: int) -> Node:
        (port,) = [port for first, last, _, port, _ in self.slots() if first <= slot <= last]
        return self.node(port)

    def masters(self) -> list[Node]:
        return [self.node(port) for _, _, _, port, _ in sorted(self.slots())]


def nodes_table(node: Node) -> list[dict[str, str]]:
    """CLUSTER NODES of ``node``: id, port, hostname, flags, master, config epoch per node."""
    with node.admin() as client:
        text = str(client.execute_command("CLUSTER", "NODES"))
    rows = []
    for line in text.strip().splitlines():
        node_id, address, flags, master, _ping, _pong, epoch = line.split()[:7]
        endpoint, _, hostname = address.partition(",")
        rows.append(
            {
                "id": node_id,
                "port": endpoint.split("@")[0].rsplit(":", 1)[1],
                "hostname": hostname,
                "role": "master" if "master" in flags else "replica",
                "master": master,
                "epoch": epoch,
            }
        )
    return rows


def cluster_info(node: Node) -> dict[str, str]:
    with node.admin() as client:
        text = str(client.execute_command("CLUSTER", "INFO"))
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def replicas_synced(stack: Stack) -> bool:
    """Every replica follows its master, and every node sees a replica for each master."""
    for node in stack.live():
        with node.admin() as client:
            view = client.execute_command("CLUSTER", "SLOTS")
        if len({int(m[1]) for _a, _b, m, *_r in view}) != 3 or any(len(rest) != 1 for _a, _b, _m, *rest in view):
            return False
    for node in stack.live():
        with node.admin() as client:
            info = client.info("replication")
        if info["role"] == "slave" and info.get("master_link_status") != "up":
            return False
    return True


@dataclass
class Move:
    """A slot moved from its master to another, step by step as redis-cli's reshard does."""

    stack: Stack
    slot: int
    source: Node = field(init=False)
    target: Node = field(init=False)

    def __post_init__(self) -> None:
        self.source = self.stack.master_of(self.slot)
        self.target = next(m for m in self.stack.masters() if m is not self.source)

    def begin(self) -> None:
        with self.source.admin() as src, self.target.admin() as dst:
            dst.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", src.execute_command("CLUSTER", "MYID"))
            src.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", dst.execute_command("CLUSTER", "MYID"))

    def migrate(self, *keys: str) -> None:
        with self.source.admin() as src:
            src.execute_command(
                "MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000, "AUTH", self.stack.password, "KEYS", *keys
            )

    def finish(self) -> None:
        with self.source.admin() as src:
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100):
                self.migrate(*keys)
        with self.target.admin() as dst:
            target_id = dst.execute_command("CLUSTER", "MYID")
        for node in [self.target, self.source, *self.stack.masters()]:
            with node.admin() as client:
                client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", target_id)


def tryagain_count(*nodes: Node) -> int:
    total = 0
    for node in nodes:
        with node.admin() as client:
            total += int(client.info("errorstats").get("errorstat_TRYAGAIN", {}).get("count", 0))
    return total


def stack_sees(stack: Stack, node: Node, slot: int, owner: Node) -> bool:
    with node.admin() as client:
        raw = client.execute_command("CLUSTER", "SLOTS")
    return any(int(a) <= slot <= int(b) and int(m[1]) == owner.port for a, b, m, *_ in raw)


def nodes_role(node: Node) -> str:
    with node.admin() as client:
        return "replica" if client.execute_command("ROLE")[0] == "slave" else "master"


def start_stack(tmp: Path, server: str, cli: str) -> Stack:
    """The six nodes of the compose file, not started yet (:func:`form` starts and forms them)."""
    password = uuid.uuid4().hex
    config = tmp / "node.conf"
    config.write_text(
        interpolate(compose_cluster()["configs"]["redis-cluster-node"]["content"], {"REDIS_PASSWORD": password})
    )
    nodes = []
    for service, port in zip(NODES, cluster_ports(len(NODES)), strict=True):
        command = compose_cluster()["services"][service]["command"]
        args = [str(config) if a == CONFIG_TARGET else HOST if a == service else a for a in command[1:]]
        argv = [server, *args, "--port", str(port), "--bind", "127.0.0.1"]
        nodes.append(Node(service, port, argv, tmp / service, password))
    return Stack(nodes, password, config, cli, tmp)


def form(stack: Stack) -> None:
    """Start the nodes and run the create script, which must exit 0; wait for the replicas."""
    for node in stack.nodes:
        node.start()
    stack.created = stack.create()
    assert stack.created.returncode == 0, stack.created.stdout[-3000:] + stack.created.stderr
    wait_until(lambda: replicas_synced(stack), timeout_s=30, what="every replica synced with its master")
