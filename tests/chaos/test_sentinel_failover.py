"""S18: the primary dies under load and Sentinel promotes its replica, all on loopback.

Replication is asynchronous, so writes the primary acknowledged just before it died can be
missing on the new primary. What must hold: every run the new primary knows about finishes
(no run hangs silently on a half-applied history), the invariants hold for them, and the
runs whose submit was lost are exactly the ones the checker reports as gone.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orchestrator import Client
from orchestrator.embedded import RedisServer, find_redis_server, free_port
from orchestrator.errors import RedisUnavailable
from tests.chaos.conftest import Fleet
from tests.chaos.invariants import check_completed_chain
from tests.conftest import fast_settings
from tests.helpers import wait_until
from tests.ledger import Ledger
from workers.testflows import chain


class Topology:
    """A primary, one replica and three sentinels on 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.primary = RedisServer(tmp / "primary", appendfsync="everysec").start()
        self.replica_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        (tmp / "replica").mkdir()
        self._start(
            [
                find_redis_server(),
                "--port",
                str(self.replica_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(tmp / "replica"),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--replicaof",
                "127.0.0.1",
                str(self.primary.port),
            ]
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        for i, port in enumerate(self.sentinel_ports):
            conf = tmp / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp}\n"
                f"sentinel monitor primary 127.0.0.1 {self.primary.port} 2\n"
                "sentinel down-after-milliseconds primary 1000\n"
                "sentinel failover-timeout primary 3000\n"
            )
            self._start([find_redis_server(), str(conf), "--sentinel"])
        replica = redis.Redis(port=self.replica_port, decode_responses=True)
        wait_until(lambda: replica.info("replication").get("master_link_status") == "up", what="replica in sync")
        replica.close()
        # a sentinel learns of the replica from the primary's INFO (every 10 s) and of the other
        # sentinels from hello messages: kill the primary before that and nobody fails over
        wait_until(self._sentinels_ready, timeout_s=30, what="every sentinel knows the replica and the others")

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            with redis.Redis(port=port, decode_responses=True) as s:
                replicas = s.execute_command("SENTINEL", "REPLICAS", "primary")
                others = s.execute_command("SENTINEL", "SENTINELS", "primary")
            if len(replicas) != 1 or len(others) != 2:
                return False
        return True

    def _start(self, argv: list[str]) -> None:
        self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/primary/0"

    def master_port(self) -> int | None:
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, decode_responses=True) as s:
                    addr = s.execute_command("SENTINEL", "get-master-addr-by-name", "primary")
                    return int(addr[1])
            except redis.ConnectionError:
                continue
        return None

    def stop(self) -> None:
        self.primary.kill()
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    top = Topology(tmp_path)
    yield top
    top.stop()


def test_a_sentinel_failover_under_load_leaves_no_run_hanging(topology: Topology, tmp_path: Path) -> None:
    settings = fast_settings(topology.url)
    fleet = Fleet(settings, tmp_path)
    direct = Client(settings.with_url(f"redis://127.0.0.1:{topology.replica_port}/0"))
    client = Client(settings)
    try:
        fleet.supervisor()
        for i in range(2):
            fleet.worker(f"w{i}")
        submitted: list[str] = []
        stop = threading.Event()

        def submit_forever() -> None:
            i = 0
            while not stop.is_set():
                try:
                    client.submit(chain, {"sleep_s": 0.02}, run_id=f"f{i}")
                    submitted.append(f"f{i}")
                except (redis.RedisError, RedisUnavailable):
                    pass  # mid-failover: this run id is retried next round
                else:
                    i += 1
                time.sleep(0.05)

        submitter = threading.Thread(target=submit_forever, daemon=True)
        submitter.start()
        time.sleep(2.0)
        topology.primary.kill()  # kill -9 of the primary
        wait_until(lambda: topology.master_port() == topology.replica_port, timeout_s=30, what="failover")
        time.sleep(2.0)
        stop.set()
        submitter.join()
        known = [rid for rid in submitted if direct.redis.exists(direct.keys.run(rid).run)]
        for rid in known:
            client.run(rid).wait(timeout_s=60)  # every run the new primary knows finishes
        ledger = Ledger(direct.redis, settings.namespace)
        for rid in known:
            check_completed_chain(direct, ledger, rid)
        lost = len(submitted) - len(known)
        print(f"failover: {len(submitted)} submits acknowledged, {lost} lost with the old primary")
        assert len(known) > 10  # the load went on through the failover
    finally:
        fleet.stop()
        client.close()
        direct.close()
