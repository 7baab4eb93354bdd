"""A redis+sentinel:// URL reaches the primary that a real Sentinel process names."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import Client, StepContext, Workflow
from orchestrator.embedded import RedisServer, find_redis_server, free_port
from tests.conftest import fast_settings
from tests.harness import worker_thread
from tests.helpers import wait_until

pytestmark = pytest.mark.single_server


@pytest.fixture
def sentinel_port(redis_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\nsentinel monitor primary 127.0.0.1 {redis_server.port} 1\n"
    )
    proc = subprocess.Popen(
        [find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    sentinel = redis.Redis(port=port, decode_responses=True)
    try:
        wait_until(lambda: _primary(sentinel), what="sentinel answering")
        yield port
    finally:
        sentinel.close()
        proc.kill()
        proc.wait()


def _primary(sentinel: redis.Redis) -> Any:
    try:
        return sentinel.execute_command("SENTINEL", "get-master-addr-by-name", "primary")
    except redis.ConnectionError:
        return None


def test_a_run_completes_through_a_sentinel_url(sentinel_port: int) -> None:
    settings = fast_settings(f"redis+sentinel://127.0.0.1:{sentinel_port}/primary/0")
    flow = Workflow("via_sentinel")

    @flow.step
    async def hello(ctx: StepContext, state: Any) -> dict[str, str]:
        return {"greeting": f"hello from {ctx.worker_id}"}

    with worker_thread([flow], settings) as worker, Client(settings) as client:
        final = client.submit(flow, {}, run_id="s1").wait(timeout_s=10)
    assert final == {"greeting": f"hello from {worker.id}"}
