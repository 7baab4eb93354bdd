"""Child processes of the benchmarks: start, watch, kill (whole process trees) and stop them, always.

A :class:`Fleet` owns every subprocess of one measurement: workers, raw consumers, peers'
workers, supervisors. Leaving its block stops every one of them, error or not (SIGTERM, then
SIGKILL of the whole tree after a grace period), so no benchmark leaves a process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from orchestrator import Settings
from orchestrator.keys import Keys

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.010
STOP_GRACE_S = 10.0
REGISTER_TIMEOUT_S = 30.0


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), so a prefork pool's children are counted and killed too."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def proc_cpu_s(pid: int) -> float | None:
    """User+system CPU seconds of one process (all its threads), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": fields 3.. of proc(5)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_state(pid: int) -> str | None:
    """One letter of proc(5) (``R``, ``S``, ``T`` for stopped, ...), None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def stop_quietly(pid: int, drain_s: float = 0.3, timeout_s: float = 10.0) -> None:
    """SIGSTOP ``pid``, wait until the kernel shows it stopped, then ``drain_s`` more for the
    commands it had already sent to reach Redis: kill() only queues the signal, so a process
    on the other core runs on for a moment and a measurement window opened at once would
    count its last calls."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while process_state(pid) not in ("T", "t", None):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not stop within {timeout_s} s of SIGSTOP")
        time.sleep(POLL_S)
    time.sleep(drain_s)


@dataclass
class Child:
    """One subprocess we started, with its log file for post-mortems."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    killed: bool = False  # we SIGKILLed it on purpose: its death is not a failure

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the child's output, to show why it died instead of just that it did."""
        return self.log_path.read_text(errors="replace")[-chars:]

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class Fleet:
    """The subprocesses of one measurement; leaving the block stops every one of them, error or not."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.dead_cpu_s = 0.0  # CPU of children we killed, so CPU per step still counts their work

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> Child:
        """Start ``argv`` with output in a log file (a pipe nobody reads could fill up and block it)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(list(argv), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def spawn_module(self, name: str, module_args: Sequence[str], env: dict[str, str]) -> Child:
        """``python -m <module_args>`` with this interpreter."""
        return self.spawn(name, [sys.executable, "-m", *module_args], env)

    def cpu_s(self) -> float | None:
        """User+system CPU seconds of every live child process tree so far; None off Linux."""
        if not Path("/proc/self/stat").exists():
            return None
        total = self.dead_cpu_s
        for child in self.children:
            if child.alive:
                total += sum(filter(None, (proc_cpu_s(pid) for pid in tree_pids(child.popen.pid))))
        return total

    def kill(self, child: Child) -> list[int]:
        """``kill -9`` the child's whole process tree at once (an OOM-killed container); returns the pids."""
        pids = tree_pids(child.popen.pid)
        self.dead_cpu_s += sum(filter(None, (proc_cpu_s(pid) for pid in pids)))
        child.killed = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.popen.wait()
        return pids

    def check_alive(self) -> None:
        """Fail fast with the child's log when one died on its own, instead of polling until the timeout."""
        for child in self.children:
            code = child.popen.poll()
            if code is not None and not child.killed:
                raise RuntimeError(f"{child.name} exited with {code} during the measurement:\n{child.log_tail()}")

    def stop(self) -> None:
        """SIGTERM all (workers drain), then SIGKILL each process tree still alive after the grace period."""
        for child in self.children:
            if child.alive:
                with contextlib.suppress(ProcessLookupError):
                    child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            try:
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(child)
        for child in self.children:  # a pool child orphaned by its parent's death must not outlive us
            for pid in tree_pids(child.popen.pid)[1:]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.children.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_env(settings: Settings | None, url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a benchmark child: our settings as ORCHESTRATOR_* variables, none inherited.

    Inherited ORCHESTRATOR_* or REDIS_URL variables are dropped so a developer's shell cannot
    point a benchmark process at another server or namespace.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_") and k != "REDIS_URL"}
    env["ORCHESTRATOR_REDIS_URL"] = url
    if settings is not None:
        env["ORCHESTRATOR_NAMESPACE"] = settings.namespace
        env["ORCHESTRATOR_PARTITIONS"] = str(settings.partitions)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, fleet: Fleet | None = None) -> float:
    """Poll ``predicate`` every 10 ms; the perf_counter time it first held. Raises after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.perf_counter()
        if fleet is not None:
            fleet.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def wait_registered(admin: redis.Redis, keys: Keys, expected: int, fleet: Fleet) -> None:
    """Submitting before the consumers listen would measure their start-up, not their throughput."""
    wait_until(
        lambda: admin.zcard(keys.workers) >= expected,
        REGISTER_TIMEOUT_S,
        f"{expected} consumer(s) registering",
        fleet,
    )


def worker_args(target: str, concurrency: int | None = None, worker_id: str | None = None) -> list[str]:
    """``python -m`` arguments of one of our worker processes (default settings unless given)."""
    args = ["orchestrator", "worker", target]
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    if worker_id is not None:
        args += ["--worker-id", worker_id]
    return args
