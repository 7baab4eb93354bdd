"""Fixtures for behaviour tests: the test ledger of workers/testflows.py and a client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from orchestrator import Client, Settings
from workers.testflows import ledger_prefix


class Ledger:
    """Reads what test steps recorded: executions per idempotency key, fences, effects."""

    def __init__(self, r: redis.Redis, namespace: str) -> None:
        self.r, self.prefix = r, ledger_prefix(namespace)

    def executions(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(f"{self.prefix}:executions").items()}

    def fences(self, idem_key: str) -> list[int]:
        return [int(x) for x in self.r.lrange(f"{self.prefix}:fences:{idem_key}", 0, -1)]

    def effects(self) -> dict[str, str]:
        return self.r.hgetall(f"{self.prefix}:effects")

    def effect_requests(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(f"{self.prefix}:effect_requests").items()}

    def items(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(f"{self.prefix}:items").items()}


@pytest.fixture
def ledger(r: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("ORCHESTRATOR_NAMESPACE", settings.namespace)
    return Ledger(r, settings.namespace)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    c = Client(settings)
    yield c
    c.close()
