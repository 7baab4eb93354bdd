"""rediss+sentinel://: TLS to the sentinels and to the servers they name, through a failover.

A primary, its replica and a sentinel, all on 127.0.0.1, all TLS only and all asking every
client for a certificate (``--tls-auth-clients yes``), replicating and monitoring over TLS. A
URL that did not give the TLS options to the sentinels, or not to the primary, could not talk to
either; one without the client certificate is refused by both.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import Client, RedisRefused, RedisUnavailable, StepContext, Workflow
from orchestrator.connection import close, connect, parse_sentinel_url
from tests.conftest import fast_settings
from tests.harness import worker_thread
from tests.helpers import wait_until
from tests.secure_redis import Certs, tls_sentinel, tls_server, tls_url

pytestmark = pytest.mark.single_server


class TlsTopology:
    def __init__(self, tmp: Path, bundle: Certs, binary: str) -> None:
        self.primary = tls_server(tmp / "primary", bundle, binary, auth_clients="yes").start()
        self.replica = tls_server(tmp / "replica", bundle, binary, auth_clients="yes", replica_of=self.primary.port)
        self.replica.start()
        self.sentinel = tls_sentinel(tmp / "sentinel", bundle, binary, self.primary.port, auth_clients="yes").start()
        with self.replica.client() as replica:
            wait_until(lambda: replica.info("replication")["master_link_status"] == "up", what="replica in sync")
        self.certs = bundle

    def url(self, **kwargs: Any) -> str:
        return tls_url(self.sentinel.port, self.certs, scheme="rediss+sentinel", path="/primary/0", **kwargs)

    def primary_port(self) -> int:
        with self.sentinel.client() as sentinel:
            return int(sentinel.execute_command("SENTINEL", "get-master-addr-by-name", "primary")[1])

    def knows_replica(self) -> bool:
        with self.sentinel.client() as sentinel:
            return len(sentinel.execute_command("SENTINEL", "REPLICAS", "primary")) == 1

    def stop(self) -> None:
        for process in (self.sentinel, self.replica, self.primary):
            process.kill()


@pytest.fixture
def topology(tmp_path: Path, certs: Certs, tls_redis_server: str) -> Iterator[TlsTopology]:
    top = TlsTopology(tmp_path, certs, tls_redis_server)
    yield top
    top.stop()


class Greeting(BaseModel):
    n: int = 0
    greeting: str = ""


hello = Workflow("sentinel_tls_hello", state=Greeting)


@hello.step
async def greet(ctx: StepContext, state: Greeting) -> dict[str, str]:
    return {"greeting": f"hello from {ctx.worker_id}"}


def test_the_tls_options_reach_the_sentinels_and_the_servers_they_name(topology: TlsTopology) -> None:
    url = topology.url(client_cert=True)
    target = parse_sentinel_url(url)
    assert target.tls["ssl"] is True and target.tls["ssl_certfile"] == str(topology.certs.client)
    settings = fast_settings(url)
    with worker_thread([hello], settings) as worker, Client(settings) as client:  # asyncio worker, sync client
        final = client.submit(hello, {}, run_id="s1").wait(timeout_s=10)
    assert final == Greeting(greeting=f"hello from {worker.id}")
    with topology.primary.client() as primary:  # it really went to the primary the sentinel named
        assert primary.exists(client.keys.run("s1").run) == 1


def test_a_sentinel_url_without_the_client_certificate_is_refused_clearly(topology: TlsTopology) -> None:
    settings = fast_settings(topology.url())  # the CA, no client certificate
    with Client(settings) as client, pytest.raises((RedisRefused, RedisUnavailable)) as refused:
        client.stats()
    message = refused.value.message
    assert "ssl_certfile and ssl_keyfile" in message and "rediss+sentinel://127.0.0.1:" in message, message
    assert "SSLConnection" not in message, "redis-py's reprs of the sentinels are cut"


def test_runs_go_on_over_tls_after_the_sentinel_fails_over(topology: TlsTopology) -> None:
    settings = fast_settings(topology.url(client_cert=True))
    # a sentinel learns of a replica from the primary's INFO, every 10 s: no failover before that
    wait_until(topology.knows_replica, timeout_s=30, what="the sentinel knows the replica")
    with worker_thread([hello], settings), Client(settings) as client:
        client.submit(hello, {"n": 1}, run_id="before").wait(timeout_s=10)
        with topology.replica.client() as replica:
            wait_until(lambda: replica.exists(client.keys.run("before").run), what="the run replicated")
        assert topology.primary.process is not None
        topology.primary.process.send_signal(signal.SIGKILL)  # kill -9 of the primary
        wait_until(lambda: topology.primary_port() == topology.replica.port, timeout_s=30, what="failover")
        assert client.submit(hello, {"n": 2}, run_id="after").wait(timeout_s=30).n == 2
        assert client.get("before").status == "completed"
    direct = connect(settings.plain_url())
    try:
        assert direct.connection_pool.connection_kwargs["ssl_ca_certs"] == str(topology.certs.ca)
        assert direct.info("replication")["role"] == "master"
    finally:
        close(direct)
