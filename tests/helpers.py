"""Test helpers: polling instead of sleeping, and a step that runs until its claim is lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from orchestrator import ClaimLost, StepContext

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(interval_s)


def heartbeat_until_lost(ctx: StepContext, lost: list[str], seconds: float = 10.0) -> None:
    """A step body that beats for ``seconds``; when a beat says the claim is lost (cancelled,
    lapsed, taken over) it notes "claim lost" in ``lost`` and lets ``ClaimLost`` go on."""
    try:
        for _ in range(int(seconds / 0.025)):
            time.sleep(0.025)
            ctx.heartbeat()
    except ClaimLost:
        lost.append("claim lost")
        raise
