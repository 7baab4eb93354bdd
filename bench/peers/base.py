"""The interface every peer adapter implements, and what they share: warm-up and readiness."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from bench import marks
from bench.procs import Child, Fleet, wait_until

READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PeerSpec:
    """One peer configuration: its row name, what it is, and the settings it runs with (for the JSON and docs)."""

    name: str
    system: str
    settings: str
    factory: Callable[[str], Peer]


class Peer(ABC):
    """A running system under test: its worker processes and a client that submits chains to it."""

    def __init__(self, url: str, spec: PeerSpec) -> None:
        self.url = url
        self.spec = spec
        self.conn = redis.Redis.from_url(url, decode_responses=True)
        self.workers: list[Child] = []
        self.progress_base = 0

    @abstractmethod
    def worker_argv(self, index: int) -> list[str]:
        """The command line of worker process ``index``, with the settings of ``spec``."""

    @abstractmethod
    def ready_workers(self) -> int:
        """How many worker processes have registered with the system (its own notion of ready)."""

    @abstractmethod
    def submit(self, wf: str, steps: int, work_ms: float = 0.0, record: bool = False) -> None:
        """Start one chain of ``steps`` steps named ``wf`` through the system's ordinary API."""

    @abstractmethod
    def steps_finished(self) -> int:
        """Steps finished so far, from the system's own bookkeeping (the steps themselves write nothing)."""

    def diagnose(self, wfs: list[str]) -> dict[str, Any]:
        """Where the system left unfinished chains (for the JSON: why a chain counted as lost)."""
        return {}

    def start(self, fleet: Fleet, workers: int, env: dict[str, str]) -> None:
        """Start ``workers`` worker processes and wait until they are registered and warm."""
        tag = self.spec.name.replace(" ", "_")
        for i in range(workers):
            self.workers.append(fleet.spawn(f"{tag}-{i}-{time.monotonic_ns()}", self.worker_argv(i), env))
        wait_until(lambda: self.ready_workers() >= workers, READY_TIMEOUT_S, f"{self.spec.name} workers", fleet)
        self.warm_up(fleet, workers)

    def warm_up(self, fleet: Fleet, workers: int) -> None:
        """Run a few one-step chains first, so imports and first connections stay out of the measurement."""
        names = [f"warm{i}" for i in range(2 * workers)]
        for wf in names:
            self.submit(wf, 1)
        wait_until(lambda: len(marks.ends(self.conn)) >= len(names), READY_TIMEOUT_S, "warm-up chains", fleet)
        marks.reset(self.conn)
        self.progress_base = self.steps_finished()

    def progress(self) -> int:
        """Steps finished since the warm-up."""
        return self.steps_finished() - self.progress_base

    def close(self) -> None:
        self.conn.close()
