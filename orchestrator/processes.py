"""Child ``orchestrator`` processes (workers, supervisors) for the demo and the chaos run.

Each child is ``python -m orchestrator <args>`` with the given environment and its output in
``<logs>/<name>.log``. Whatever happens, ``stop_all`` ends every one of them: SIGTERM first
(workers drain), SIGKILL for those still alive after the grace period.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent dies, even by kill -9
    (Linux only; None elsewhere). A demo or chaos run killed from outside (a CI timeout, an
    operator's kill -9) then leaves no workers, supervisors or redis-server behind. The signal
    follows the thread that started the child: start children from the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return arm


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (an RQ worker's work-horse, say); none where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as found:
            return [int(child) for child in found.read().split()]
    except OSError:
        return []


class ProcessGroup:
    """Named child processes sharing one environment and one log folder."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None, module: str = "orchestrator"
    ) -> subprocess.Popen[bytes]:
        """``python -m <module> <args>`` (``orchestrator``, or ``rq.cli`` for an RQ worker)."""
        with open(self.logs / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        self.procs[name] = proc
        return proc

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def kill(self, name: str) -> int | None:
        """kill -9; returns the pid it killed, or None when it was not running."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return proc.pid

    def stop_all(self, grace_s: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
