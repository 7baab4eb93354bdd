"""Fixtures for crash tests: real worker and supervisor processes, killed with SIGKILL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import Settings
from tests.conftest import fast_settings
from tests.harness import Proc, start_supervisor, start_worker


class Fleet:
    """Starts processes for one test and kills whatever is left at the end."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings, self.tmp = settings, tmp
        self.procs: list[Proc] = []

    def worker(
        self,
        name: str,
        faults: str = "",
        spec: str = "workers.testflows:ALL",
        args: tuple[str, ...] = (),
        *,
        redis_url: str | None = None,
        launcher: tuple[str, ...] = (),
    ) -> Proc:
        """A worker process; ``redis_url`` routes it through e.g. a fault proxy (its steps' ledger
        writes still go straight to Redis: the observer must not suffer the faults it observes)."""
        settings = self.settings.with_url(redis_url) if redis_url else self.settings
        args = ("--worker-id", name, *args)  # history names the worker as the test does
        proc = start_worker(
            settings,
            self.tmp,
            spec,
            name=name,
            faults=faults,
            args=args,
            launcher=launcher,
            ledger_url=self.settings.plain_url() if redis_url else None,
        )
        self.procs.append(proc)
        return proc

    def supervisor(self, name: str = "sup", faults: str = "", *, redis_url: str | None = None) -> Proc:
        settings = self.settings.with_url(redis_url) if redis_url else self.settings
        proc = start_supervisor(settings, self.tmp, name=name, faults=faults)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"----- {p.log_path.name}\n{p.output()[-4000:]}" for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def settings(redis_server) -> Settings:  # type: ignore[no-untyped-def]
    return fast_settings(redis_server.url, concurrency=8)


@pytest.fixture
def fleet(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    f = Fleet(settings, tmp_path)
    yield f
    f.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
