"""Workflows from RQ code (orchestrator/bridge/callback.py), with real RQ workers: an RQ job
starts a run (idempotent by run id), and a run submitted with ``on_finish`` gets one RQ job per
finish (completed, failed, cancelled), however often the supervisor's relay sends it: a relay
that died before its ack, a notice sent again after the job ran, a Redis that refused the
enqueue. RQ does not support Redis Cluster: there, the RQ parts refuse with the reason."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import rq
from pydantic import BaseModel
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from orchestrator import Client, NonRetryableError, RunFailed, Settings, StepContext, Workflow
from orchestrator.bridge.callback import Callbacks, OnFinish, client_for, start_run
from orchestrator.bridge.connection import RQOnClusterRefused, rq_client
from orchestrator.chaos.cluster import LoopbackCluster
from orchestrator.children import GROUP, relay
from orchestrator.embedded import RedisServer
from orchestrator.errors import ValidationError
from tests.conftest import fast_settings
from tests.harness import REPO, process_env, run_cli, supervisor_thread, worker_thread
from tests.helpers import wait_until

START = "orchestrator.bridge.callback.start_run"
BROKEN: set[str] = set()  # runs whose step fails (a test mends one, then retries it)


class Order(BaseModel):
    item: str = ""
    shipped: bool = False


orders = Workflow("rq_orders", state=Order)
idle = Workflow("rq_idle", queue="rq_idle_nobody_serves")


@orders.step
def ship(ctx: StepContext, state: Order) -> dict[str, Any]:
    if ctx.run_id in BROKEN:
        raise NonRetryableError(f"out of stock: {state.item}")
    return {"shipped": True}


@idle.step
def never(ctx: StepContext, state: Any) -> None:
    pass


def record(run_id: str, status: str, error: dict[str, str] | None) -> None:
    """The callback the tests enqueue: appends its arguments to a list, in the RQ job's Redis."""
    job = rq.get_current_job()
    assert job is not None
    job.connection.rpush(f"rqcb:{run_id}", json.dumps([run_id, status, error]))


def callbacks_of(r: redis.Redis, run_id: str) -> list[list[Any]]:
    return [json.loads(item) for item in r.lrange(f"rqcb:{run_id}", 0, -1)]


class _Worker(SimpleWorker):
    """RQ's SimpleWorker without its command channel (pubsub), which tests do not use: RQ 3.0 on
    redis-py 8 can stop that channel's thread only after a 60 s wait (a race between its
    unsubscribe and the thread's first read)."""

    def subscribe(self) -> None:
        pass


def drain(connection: redis.Redis, queue: str) -> None:
    """Run every job of ``queue`` in this process (RQ's SimpleWorker, burst mode)."""
    queues = [Queue(queue, connection=connection, serializer=JSONSerializer)]
    _Worker(queues, connection=connection, serializer=JSONSerializer).work(burst=True)


@contextmanager
def rq_worker(settings: Settings, queue: str, tmp: Path) -> Iterator[None]:
    """A real ``rq worker`` (a work-horse forked per job) on ``queue``, started as users start
    it; killed at the end of the block (see ``_Worker`` on why it is not stopped)."""
    args = ["worker", queue, "--url", settings.plain_url(), "-S", "rq.serializers.JSONSerializer"]
    with open(tmp / "rq.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "rq.cli", *args],
            env=process_env(settings),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield
    finally:
        worker.kill()
        worker.wait(timeout=10)


def relay_all(client: Client, consumer: str = "sup", *, reclaim: bool = False) -> dict[str, int]:
    parts = range(client.keys.partitions)
    return relay(client.redis, client.store, parts, consumer, groups=set(), reclaim=reclaim)


@pytest.fixture
def rq_conn(settings: Settings) -> Iterator[redis.Redis]:
    """A connection as RQ makes it: bytes replies."""
    connection = redis.Redis.from_url(settings.plain_url())
    yield connection
    connection.close()


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's namespace in the environment, where ``start_run`` reads its settings."""
    monkeypatch.setenv("ORCHESTRATOR_NAMESPACE", settings.namespace)
    monkeypatch.setenv("ORCHESTRATOR_PARTITIONS", str(settings.partitions))
    return settings


@pytest.mark.single_server
def test_an_rq_job_starts_a_run_that_our_worker_completes(env: Settings, client: Client, rq_conn: redis.Redis) -> None:
    queue = Queue(env.namespace, connection=rq_conn, serializer=JSONSerializer)
    run_id = f"{env.namespace}-order"
    job = queue.enqueue(START, f"{__name__}:orders", {"item": "book"}, run_id=run_id, priority="high")
    drain(rq_conn, queue.name)
    assert job.get_status() == "finished" and job.return_value(refresh=True) == run_id
    with worker_thread([orders], env):
        final = client.run(run_id, orders).wait(timeout_s=20)
    assert final.shipped and client.get(run_id).queue == "default..high"


@pytest.mark.single_server
def test_the_same_start_twice_is_one_run_and_another_input_fails_the_job(
    env: Settings, client: Client, rq_conn: redis.Redis
) -> None:
    queue = Queue(env.namespace, connection=rq_conn, serializer=JSONSerializer)
    run_id = f"{env.namespace}-twice"
    twice = [queue.enqueue(START, f"{__name__}:orders", {"item": "book"}, run_id=run_id) for _ in range(2)]
    other = queue.enqueue(START, f"{__name__}:orders", {"item": "pen"}, run_id=run_id)
    missing = queue.enqueue(START, f"{__name__}:nothing", {}, run_id=f"{run_id}-2")
    drain(rq_conn, queue.name)
    assert [job.return_value(refresh=True) for job in twice] == [run_id, run_id]
    assert [info.run_id for info in client.list_runs()] == [run_id]
    for job, error in ((other, "RunConflict"), (missing, "nothing")):
        result = Job.fetch(job.id, connection=rq_conn, serializer=JSONSerializer).latest_result()
        assert job.get_status() == "failed" and result is not None and error in (result.exc_string or "")


@pytest.mark.single_server
def test_start_run_outside_a_job_uses_the_environments_redis(env: Settings, client: Client, r: redis.Redis) -> None:
    run_id = f"{env.namespace}-direct"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCHESTRATOR_REDIS_URL", env.plain_url())
        callback = {"queue": "notify", "func": f"{__name__}.record", "timeout_s": 30}
        assert start_run("rq_orders", {"item": "cup"}, run_id=run_id, on_finish=callback) == run_id
        with pytest.raises(ValidationError, match=r"on_finish has unknown field\(s\) fn: expected queue, func"):
            start_run("rq_orders", {}, run_id=f"{run_id}-2", on_finish={"queue": "notify", "fn": "a.b"})
    fields = r.hmget(client.keys.run(run_id).run, "on_finish", "notify", "status")
    assert fields == [OnFinish("notify", f"{__name__}.record", 30).to_json(), "1", "pending"]


@pytest.mark.single_server
def test_a_completed_run_gets_one_callback_even_when_its_notice_is_relayed_again(
    settings: Settings, client: Client, r: redis.Redis, rq_conn: redis.Redis
) -> None:
    run_id, notify = f"{settings.namespace}-done", f"{settings.namespace}-notify"
    on_finish = OnFinish(queue=notify, func=f"{__name__}.record")
    client.submit(orders, {"item": "book"}, run_id=run_id, on_finish=on_finish)
    with worker_thread([orders], settings):
        client.run(run_id).wait(timeout_s=20)
    stream = client.keys.part_of(run_id).finished
    # a supervisor reads the notice, enqueues the callback and dies before its ack
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    [[_, [(entry_id, _)]]] = r.xreadgroup(GROUP, "dead-sup", {stream: ">"})
    finished_ms = str(r.hget(client.keys.run(run_id).run, "finished_ms"))
    dead = Callbacks(client.redis, settings.namespace)
    assert dead.send(run_id, "completed", on_finish.to_json(), finished_ms, None) == "ENQUEUED"
    dead.close()
    # a minute later another supervisor takes the notice over: the callback is there already
    r.xclaim(stream, GROUP, "dead-sup", min_idle_time=0, message_ids=[entry_id], idle=61_000)
    counts = relay_all(client, "sup-b", reclaim=True)
    assert counts == {"children_reported": 0, "children_cancelled": 0, "callbacks_enqueued": 0}
    assert r.xpending(stream, GROUP)["pending"] == 0 and r.xlen(stream) == 0
    assert Queue(notify, connection=rq_conn).count == 1
    drain(rq_conn, notify)
    r.xadd(stream, {"run": run_id})  # the same finish announced again after its job ran
    assert relay_all(client)["callbacks_enqueued"] == 0
    drain(rq_conn, notify)
    assert callbacks_of(r, run_id) == [[run_id, "completed", None]]


@pytest.mark.single_server
def test_failed_retried_and_cancelled_runs_get_one_callback_per_finish(
    settings: Settings, client: Client, r: redis.Redis, rq_conn: redis.Redis, tmp_path: Path
) -> None:
    notify = f"{settings.namespace}-notify"
    flaky, cancelled = f"{settings.namespace}-flaky", f"{settings.namespace}-cancelled"
    on_finish = OnFinish(queue=notify, func=f"{__name__}.record", timeout_s=20)
    BROKEN.add(flaky)
    try:
        with supervisor_thread(settings), worker_thread([orders], settings):
            run = client.submit(orders, {"item": "book"}, run_id=flaky, on_finish=on_finish)
            with pytest.raises(RunFailed):
                run.wait(timeout_s=20)
            client.submit(idle, {}, run_id=cancelled, on_finish=on_finish).cancel("not needed")
            wait_until(lambda: Queue(notify, connection=rq_conn).count == 2, timeout_s=10, what="two callbacks")
            BROKEN.discard(flaky)
            client.retry(flaky).wait(timeout_s=20)
            wait_until(lambda: Queue(notify, connection=rq_conn).count == 3, timeout_s=10, what="the retry's")
    finally:
        BROKEN.discard(flaky)
    with rq_worker(settings, notify, tmp_path):
        wait_until(lambda: r.llen(f"rqcb:{flaky}") == 2 and r.llen(f"rqcb:{cancelled}"), what="the callbacks ran")
    error = {"type": "NonRetryableError", "message": "out of stock: book"}
    assert callbacks_of(r, flaky) == [[flaky, "failed", error], [flaky, "completed", None]]
    assert callbacks_of(r, cancelled) == [[cancelled, "cancelled", None]]


@pytest.mark.single_server
def test_a_callback_redis_refused_stays_pending_and_is_enqueued_when_taken_over(
    settings: Settings, client: Client, r: redis.Redis, rq_conn: redis.Redis
) -> None:
    run_id, notify = f"{settings.namespace}-refused", f"{settings.namespace}-notify"
    client.submit(idle, {}, run_id=run_id, on_finish=OnFinish(queue=notify, func=f"{__name__}.record"))
    client.cancel(run_id)
    stream = client.keys.part_of(run_id).finished
    queues = r.smembers("rq:queues")
    r.delete("rq:queues")
    r.set("rq:queues", "not a set")  # RQ's enqueue is refused (WRONGTYPE) before it writes anything
    try:
        assert relay_all(client, "sup-a")["callbacks_enqueued"] == 0
    finally:
        r.delete("rq:queues")
        if queues:
            r.sadd("rq:queues", *queues)
    assert r.xpending(stream, GROUP)["pending"] == 1  # not acked
    [entry] = r.xpending_range(stream, GROUP, min="-", max="+", count=10)
    r.xclaim(stream, GROUP, "sup-a", min_idle_time=0, message_ids=[entry["message_id"]], idle=61_000)
    assert relay_all(client, "sup-b", reclaim=True)["callbacks_enqueued"] == 1
    assert r.xlen(stream) == 0
    drain(rq_conn, notify)
    assert callbacks_of(r, run_id) == [[run_id, "cancelled", None]]


@pytest.mark.single_server  # a submit with on_finish is refused on a cluster
def test_a_resubmit_with_another_callback_keeps_the_first(client: Client, r: redis.Redis) -> None:
    first = OnFinish(queue="notify", func="myapp.hooks.run_done")
    client.submit(orders, {"item": "book"}, run_id="cb", on_finish=first)
    again = client.submit(orders, {"item": "book"}, run_id="cb", on_finish={"queue": "other", "func": "x.y"})
    plain = client.submit(orders, {"item": "book"}, run_id="plain")
    assert not again.created and plain.created
    assert r.hget(client.keys.run("cb").run, "on_finish") == first.to_json()
    assert r.hmget(client.keys.run("plain").run, "on_finish", "notify") == [None, None]


@pytest.mark.single_server
def test_the_cli_submits_with_a_callback(settings: Settings, client: Client, r: redis.Redis) -> None:
    spec = f"{__name__}:orders"
    done = run_cli(
        "submit", spec, "{}", "--run-id", "via-cli", "--on-finish", "a:b:myapp.hooks.done", env=process_env(settings)
    )
    assert done.returncode == 0, done.stderr
    assert r.hget(client.keys.run("via-cli").run, "on_finish") == OnFinish("a:b", "myapp.hooks.done").to_json()
    bad = run_cli("submit", spec, "{}", "--on-finish", "myapp.hooks.done", env=process_env(settings))
    assert bad.returncode == 2 and "--on-finish: 'myapp.hooks.done': expected QUEUE:module.function" in bad.stderr


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"queue": "", "func": "a.b"}, "on_finish queue='' is invalid: expected an RQ queue name"),
        ({"queue": "my queue", "func": "a.b"}, "on_finish queue='my queue' is invalid"),
        ({"queue": "q", "func": "run_done"}, "on_finish func='run_done' is invalid: expected a function's import path"),
        ({"queue": "q", "func": print}, "RQ's JSON serializer cannot carry a callable: pass its path"),
        ({"queue": "q", "func": "a.b", "timeout_s": 0}, "on_finish timeout_s=0 is invalid: expected 1 to 86400"),
        ({"queue": "q", "func": "a.b", "timeout_s": 1.5}, "on_finish timeout_s=1.5 is invalid: expected whole seconds"),
        ({"queue": "q", "func": "a.b", "timeout_s": True}, "on_finish timeout_s=True is invalid"),
        ({"queue": "q"}, "on_finish has no func: expected queue, func and optionally timeout_s"),
        ({"queue": "q", "func": "a.b", "retries": 3}, r"on_finish has unknown field\(s\) retries"),
        ("q:a.b", "on_finish 'q:a.b' is invalid: expected OnFinish"),
    ],
)
def test_invalid_on_finish_values_name_the_field_the_value_and_what_is_expected(
    client: Client, given: Any, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        client.submit(orders, {}, run_id="never", on_finish=given)
    assert client.redis.exists(client.keys.run("never").run) == 0


@pytest.mark.single_server
def test_client_for_reaches_the_rq_connections_redis_with_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync=None, password="pw-Secret-42").start()
    try:
        monkeypatch.setenv("ORCHESTRATOR_NAMESPACE", "pw")
        with redis.Redis.from_url(server.url) as rq_connection, client_for(rq_connection) as client:
            client.submit(orders, {"item": "key"}, run_id="locked")
            assert client.get("locked").status == "pending"
            assert "pw-Secret-42" not in repr(client) and client.settings.redis_url is None
            back = rq_client(client.redis)
            assert back.hget(client.keys.run("locked").run, "wf") == b"rq_orders"  # RQ's kind: bytes
            back.close()
            back.connection_pool.disconnect()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster(tmp_path_factory.mktemp("cluster"), masters=1, replicas=0).start()
    yield cluster
    cluster.stop()


def test_the_rq_parts_refuse_a_redis_cluster(
    one_node_cluster: LoopbackCluster, caplog: pytest.LogCaptureFixture
) -> None:
    settings = fast_settings(one_node_cluster.url)
    on_finish = OnFinish(queue="notify", func="myapp.hooks.run_done")
    # caught at the logger itself: an in-process CLI test before may have set propagate=False
    logging.getLogger("orchestrator.callbacks").addHandler(caplog.handler)
    with Client(settings) as client:
        with pytest.raises(RQOnClusterRefused, match="RQ does not support Redis Cluster"):
            client.submit(orders, {}, run_id="c", on_finish=on_finish)
        with redis.Redis.from_url(one_node_cluster.url) as plain, pytest.raises(RQOnClusterRefused, match="Cluster"):
            client_for(plain, settings)
        # a run with a callback from before the namespace moved to a cluster: logged, not enqueued
        client.submit(orders, {}, run_id="c")
        run = client.keys.run("c").run
        client.redis.hset(run, mapping={"status": "completed", "on_finish": on_finish.to_json(), "notify": 1})
        client.redis.xadd(client.keys.part_of("c").finished, {"run": "c"})
        assert relay_all(client)["callbacks_enqueued"] == 0
        assert client.redis.xlen(client.keys.part_of("c").finished) == 0  # acked: it never can be enqueued
    logging.getLogger("orchestrator.callbacks").removeHandler(caplog.handler)
    assert "run c: its on_finish job was not enqueued: RQ does not support Redis Cluster" in caplog.text
