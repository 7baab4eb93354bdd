"""Test helpers: polling instead of sleeping, a step that runs until its claim is lost, and the
README's examples as modules."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
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


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_code(heading: str, *, block: int = 0) -> str:
    """The ``block``-th ```python block under README heading ``heading``, verbatim."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n")[block + 1].split("```\n", 1)[0]


def readme_example(heading: str, *, block: int = 0, into: types.ModuleType | None = None) -> types.ModuleType:
    """Run the ``block``-th ```python block under README heading ``heading`` verbatim, as the
    module an app would keep it in (pydantic resolves its models there), or in ``into``."""
    code = readme_code(heading, block=block)
    if into is None:
        into = types.ModuleType("readme_" + "".join(c if c.isalnum() else "_" for c in heading.strip("# ").lower()))
        sys.modules[into.__name__] = into
    exec(compile(code, f"README.md ({heading})", "exec"), into.__dict__)
    return into
