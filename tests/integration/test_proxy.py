"""FaultProxy in front of a real redis-server: each mode as a plain redis-py client sees it."""

from __future__ import annotations

import gc
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.chaos.proxy import FaultProxy, Mode
from orchestrator.embedded import RedisServer
from tests.helpers import wait_until

pytestmark = pytest.mark.single_server

TIMEOUT_S = 0.3  # client socket timeout where a test expects a timeout
PATIENT_S = 5.0  # where a test expects a fast error: failing well before this is not a timeout

Connect = Callable[..., redis.Redis]


def no_retry_client(port: int, timeout_s: float) -> redis.Redis:
    """One attempt per command: redis-py 8 retries ConnectionError and TimeoutError by default."""
    return redis.Redis(
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


@pytest.fixture
def connect(proxy: FaultProxy) -> Iterator[Connect]:
    """Make no-retry clients through the proxy; all closed before the proxy stops."""
    clients: list[redis.Redis] = []

    def make(timeout_s: float = TIMEOUT_S) -> redis.Redis:
        clients.append(no_retry_client(proxy.port, timeout_s))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def key() -> str:
    return f"proxy-test:{uuid.uuid4().hex}"


def test_pass_through_forwards_commands_and_counts_traffic(
    proxy: FaultProxy, connect: Connect, r: redis.Redis, key: str
) -> None:
    client = connect()
    assert client.set(key, "v") is True
    assert client.get(key) == "v"
    pipe = client.pipeline(transaction=False)
    for _ in range(100):
        pipe.incr(f"{key}:n")
    assert pipe.execute() == list(range(1, 101))
    assert r.get(f"{key}:n") == "100"
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    assert proxy.stats() == {
        "connections_accepted": 1,
        "connections_cut": 0,
        "connections_open": 1,
        "bytes_to_upstream": proxy.bytes_to_upstream,
        "bytes_to_client": proxy.bytes_to_client,
    }
    assert proxy.bytes_to_upstream > 100 * len("INCR") and proxy.bytes_to_client > 100 * len(":1\r\n")


def test_delay_adds_latency_to_each_chunk_both_ways(proxy: FaultProxy, connect: Connect) -> None:
    client = connect(PATIENT_S)
    client.ping()  # connected before the delay, so it applies to an open connection
    proxy.delay(0.15)
    started = time.monotonic()
    assert client.ping()
    elapsed_s = time.monotonic() - started
    assert 2 * 0.15 <= elapsed_s < PATIENT_S  # the request and the reply each waited
    proxy.heal()
    assert client.ping()


def test_blackhole_times_out_and_writes_nothing_until_heal(
    proxy: FaultProxy, connect: Connect, r: redis.Redis, key: str
) -> None:
    client = connect()
    client.ping()
    proxy.blackhole()
    with pytest.raises(redis.TimeoutError):
        client.set(key, "v")
    with pytest.raises(redis.TimeoutError):  # a new connection is accepted, then hears nothing
        connect().ping()
    assert r.exists(key) == 0
    proxy.heal()
    assert connect().ping()
    # Like TCP after a partition, the bytes were held, not lost: the SET still executes.
    wait_until(lambda: r.get(key) == "v", timeout_s=2, what="the held SET to arrive after heal")


def test_reset_during_blackhole_discards_what_was_held(
    proxy: FaultProxy, connect: Connect, r: redis.Redis, key: str
) -> None:
    client = connect()
    client.ping()
    proxy.blackhole()
    with pytest.raises(redis.TimeoutError):
        client.set(key, "v")
    proxy.reset()
    proxy.heal()
    assert connect().ping()
    assert r.exists(key) == 0  # the connection that held the SET is gone: nothing left to deliver


def test_reset_sends_an_rst_to_open_and_new_connections(proxy: FaultProxy, connect: Connect) -> None:
    client = connect(PATIENT_S)
    client.ping()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENT_S) as raw:
        raw.sendall(b"PING\r\n")
        assert raw.recv(64) == b"+PONG\r\n"
        proxy.reset()
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):  # an RST; after a FIN, recv would return b""
            raw.recv(64)
    # A new connection is accepted, then reset: the RST may even beat connect()'s return.
    with (
        pytest.raises(ConnectionResetError),
        socket.create_connection(("127.0.0.1", proxy.port), timeout=PATIENT_S) as raw,
    ):
        raw.recv(64)
    with pytest.raises(redis.ConnectionError):  # redis-py finds its pooled connection dead, reconnects: reset
        client.ping()
    with pytest.raises(redis.ConnectionError):
        connect(PATIENT_S).ping()
    assert time.monotonic() - started < 1.0  # errors, not timeouts
    assert proxy.connections_cut >= 4
    proxy.heal()
    assert client.ping()


def test_half_open_executes_but_the_reply_never_arrives(
    proxy: FaultProxy, connect: Connect, r: redis.Redis, key: str
) -> None:
    client = connect()
    client.ping()
    proxy.half_open()
    with pytest.raises(redis.TimeoutError):
        client.set(key, "v")
    wait_until(lambda: r.get(key) == "v", timeout_s=2, what="the SET to reach Redis")


def test_cut_after_forward_executes_the_write_but_the_client_sees_an_error(
    proxy: FaultProxy, connect: Connect, r: redis.Redis, key: str
) -> None:
    client = connect(PATIENT_S)
    client.ping()  # a new connection's first chunks are redis-py's handshake: get it out of the way
    proxy.cut_after_forward()
    with pytest.raises(redis.ConnectionError):
        client.incr(key)
    assert r.get(key) == "1"  # no polling needed: the proxy cuts only once Redis has replied
    assert proxy.connections_cut == 1
    assert proxy.mode is Mode.PASS  # one-shot
    assert client.incr(key) == 2


def test_cut_after_forward_counts_chunks(proxy: FaultProxy, connect: Connect, r: redis.Redis, key: str) -> None:
    client = connect(PATIENT_S)
    client.ping()
    proxy.cut_after_forward(count=2)
    assert client.incr(key) == 1
    with pytest.raises(redis.ConnectionError):
        client.incr(key)
    assert r.get(key) == "2"


def test_cut_after_forward_a_transaction_commits_it_all(
    proxy: FaultProxy, connect: Connect, r: redis.Redis, key: str
) -> None:
    client = connect(PATIENT_S)
    client.ping()
    proxy.cut_after_forward()
    pipe = client.pipeline(transaction=True)
    pipe.incr(key)
    pipe.incr(key)
    pipe.set(f"{key}:done", "yes")
    with pytest.raises(redis.ConnectionError):
        pipe.execute()
    assert r.get(key) == "2"
    assert r.get(f"{key}:done") == "yes"


def test_redis_py_default_retry_runs_a_cut_write_twice(proxy: FaultProxy, r: redis.Redis, key: str) -> None:
    """Why every write we send must be idempotent: the retry hides the error and repeats the INCR."""
    client = redis.Redis(port=proxy.port, socket_timeout=PATIENT_S, decode_responses=True)
    try:
        client.ping()
        proxy.cut_after_forward()
        assert client.incr(key) == 2
        assert r.get(key) == "2"
    finally:
        client.close()


def test_for_seconds_heals_by_itself(proxy: FaultProxy, connect: Connect) -> None:
    proxy.for_seconds(proxy.blackhole, 0.2)
    assert proxy.mode is Mode.BLACKHOLE
    wait_until(lambda: proxy.mode is Mode.PASS, timeout_s=2, what="the timed heal")
    assert connect().ping()


def test_stop_closes_listener_and_connections_without_resource_warnings(redis_server: RedisServer) -> None:
    proxy = FaultProxy("127.0.0.1", redis_server.port).start()
    clients = [no_retry_client(proxy.port, TIMEOUT_S) for _ in range(3)]
    try:
        for client in clients:
            client.ping()
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):  # leaves a chunk held inside the proxy
            clients[0].ping()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            proxy.stop()
            gc.collect()
        assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
        assert proxy.open_connections == 0
        with pytest.raises(redis.ConnectionError):  # the open connection was closed, no reconnect
            clients[1].ping()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        proxy.stop()  # idempotent
    finally:
        for client in clients:
            client.close()
