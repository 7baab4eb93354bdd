"""Reads what the steps of workers/testflows.py recorded: executions, fences, effects."""

from __future__ import annotations

import redis

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
