"""docs/from-rq.md runs as written: its RQ ``depends_on`` chain on a real ``rq worker``, and its
workflow on the same kind of RQ worker with our worker and supervisor, every process started
with the command the page shows, from the folder its files are written to.

The page's Python blocks that open with a ``# path.py`` comment are the app's files (written
under ``tmp_path``); the others are run in order, in this process, the way the page says to run
them. The values the page promises in its comments are read from the page and checked.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.job import Job
from rq.registry import FinishedJobRegistry

from orchestrator.embedded import RedisServer
from tests.conftest import ON_CLUSTER
from tests.harness import REPO, Proc, run_cli
from tests.helpers import wait_until

DOC = REPO / "docs" / "from-rq.md"
FILE_HEADER = re.compile(r"^# ([\w/]+\.py)\b")

pytestmark = pytest.mark.skipif(ON_CLUSTER, reason="RQ does not support Redis Cluster")


def python_blocks() -> list[str]:
    """Every ```python block of the page, in order."""
    return re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)


def app_files() -> dict[str, str]:
    """The blocks that are files of the app, by path (``# shop/flows.py`` on their first line)."""
    files = {}
    for block in python_blocks():
        found = FILE_HEADER.match(block)
        if found:
            files[found.group(1)] = block
    return files


def script(uses: str) -> str:
    """The page's block (not a file) that imports ``uses``."""
    (block,) = [b for b in python_blocks() if not FILE_HEADER.match(b) and f"from {uses} import" in b]
    return block


def promised(block: str, expression: str) -> str:
    """The value a comment of ``block`` says ``expression`` has (``# expression == "value"``)."""
    found = re.search(re.escape(expression) + r' == "([^"]+)"', block)
    assert found, f"the page no longer says what {expression} is"
    return found.group(1)


def command(starts: str) -> list[str]:
    """The page's command line that starts with ``starts`` (its comment dropped), as arguments."""
    text = DOC.read_text()
    for block in re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M) + re.findall(r"`(python [^`]+)`", text):
        for line in block.splitlines():
            if line.startswith(starts):
                return shlex.split(line, comments=True)
    raise AssertionError(f"docs/from-rq.md shows no command starting with {starts!r}")


@pytest.fixture
def app(tmp_path: Path, fresh_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The page's files in a folder of their own, the environment its commands run with
    (``REDIS_URL`` only, as the page exports it), and this process set up the same way."""
    folder = tmp_path / "app"
    for path, code in app_files().items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code)
        if target.parent != folder:
            (target.parent / "__init__.py").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_") and k != "REDIS_URL"}
    env["REDIS_URL"] = fresh_server.url
    env["PYTHONPATH"] = str(REPO)  # this checkout's orchestrator, as an installed one would be
    monkeypatch.setenv("REDIS_URL", fresh_server.url)
    monkeypatch.syspath_prepend(str(folder))
    procs: list[Proc] = []
    yield {"folder": folder, "env": env, "url": fresh_server.url, "procs": procs, "logs": tmp_path}
    for proc in procs:
        proc.kill()
    for name in [n for n in sys.modules if n == "shop" or n.startswith("shop.")]:
        del sys.modules[name]


def start(app: dict[str, Any], argv: list[str], name: str) -> Proc:
    """Run one of the page's commands from the app's folder, ``$REDIS_URL`` expanded by the shell's rule."""
    argv = [arg.replace("$REDIS_URL", app["url"]) for arg in argv]
    launchers = {"rq": (sys.executable, "-m", "rq.cli"), "orchestrator": (sys.executable, "-m", "orchestrator")}
    launcher = launchers.get(argv[0], (sys.executable,))
    proc = Proc(argv[1:], app["env"], app["logs"] / f"{name}.log", launcher=launcher, cwd=app["folder"])
    app["procs"].append(proc)
    return proc


def run_block(block: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"from_rq_{name}"}
    exec(compile(block, f"docs/from-rq.md ({name})", "exec"), namespace)
    return namespace


def test_the_page_has_the_blocks_this_test_runs() -> None:
    assert sorted(app_files()) == ["rqworker.py", "shop/flows.py", "shop/hooks.py", "shop/jobs.py"]
    assert command("rq worker")[-2:] == ["-S", "rq.serializers.JSONSerializer"]
    assert command("python rqworker.py")[:3] == ["python", "rqworker.py", "worker"]


def test_the_rq_chain_runs_on_a_real_rq_worker(app: dict[str, Any]) -> None:
    start(app, command("rq worker"), "rq")
    block = script("shop.jobs")
    last: Job = run_block(block, "chain")["last"]
    wait_until(lambda: last.get_status(refresh=True) == "finished", timeout_s=30, what="the chain's last job")
    assert last.return_value(refresh=True) == promised(block, "last.return_value()")
    first, second = (Job.fetch(i, connection=last.connection, serializer=last.serializer) for i in ids(last))
    assert [first.func_name, second.func_name, last.func_name] == ["shop.jobs.reserve", "shop.jobs.charge",
                                                                   "shop.jobs.ship"]  # fmt: skip
    assert all(job.retries_left == 3 for job in (first, second, last))  # Retry(max=3), nothing retried


def ids(job: Job) -> list[str]:
    """The ids of the two jobs before ``job`` in its chain."""
    parent = job.dependency
    assert parent is not None and parent.dependency is not None
    return [parent.dependency.id, parent.id]


@pytest.mark.parametrize("rq_worker", ["rq worker", "python rqworker.py"], ids=["rq-worker", "preloading-script"])
def test_the_workflow_runs_every_step_on_the_rq_worker(app: dict[str, Any], rq_worker: str) -> None:
    rq = start(app, command(rq_worker), "rq")
    start(app, command("orchestrator worker"), "worker")
    start(app, command("orchestrator supervisor"), "supervisor")
    block = script("shop.flows")
    namespace = run_block(block, "workflow")
    final, client = namespace["final"], namespace["client"]
    try:
        assert final.tracking == promised(block, "final.tracking")
        assert final.payment_id == "pay-order-o-1:charge" and final.amount_cents == 1999
        ok = [e for e in client.history("order-o-1").events if e.type == "ok"]
        assert [e.step for e in ok] == ["reserve", "charge", "ship"]
        assert all(e.executor == "rq" and e.rq_job and e.rq_worker for e in ok)
        # ordinary RQ jobs on RQ's own registries (rq info, rq-dashboard)
        registry = FinishedJobRegistry("tools", connection=redis.Redis.from_url(app["url"]))
        wait_until(lambda: set(registry.get_job_ids()) == {e.rq_job for e in ok}, what="RQ filed the jobs")
        shown = run_cli("history", "order-o-1", env=app["env"], cwd=app["folder"])
        assert shown.returncode == 0 and all(e.rq_job in shown.stdout for e in ok), shown.stdout + shown.stderr
        again = namespace["client"].submit(namespace["order"], {"order_id": "o-1"}, run_id="order-o-1")
        assert again.run_id == "order-o-1" and again.wait(timeout_s=5) == final  # the same run, not a new one
    finally:
        client.close()
    assert rq.alive(), rq.output()


def test_an_rq_job_starts_the_run_and_one_callback_follows_its_finish(app: dict[str, Any]) -> None:
    start(app, command("rq worker"), "rq")
    start(app, command("orchestrator worker"), "worker")
    start(app, command("orchestrator supervisor"), "supervisor")
    (block,) = [b for b in python_blocks() if "orchestrator.bridge.start_run" in b and not FILE_HEADER.match(b)]
    run_block(block, "start_run")
    conn = redis.Redis.from_url(app["url"], decode_responses=True)
    done = wait_until(lambda: conn.get("order-done:order-o-2"), timeout_s=30, what="the callback")
    assert done == promised(block, "the key order-done:order-o-2")
    run_block(block, "start_run")  # the same job again: the same run, and no second finish
    keys = [k for k in conn.scan_iter("rq:job:orch-done-*")]
    assert len(keys) == 1, keys
