"""Named crash points for tests and the chaos tooling; no-ops unless explicitly armed.

Arm with ``Settings.faults`` (``ORCHESTRATOR_FAULTS``), a comma-separated list of
``point=action[@step][#nth]``:

- ``kill``: SIGKILL this process (a crash: no cleanup, no flush)
- ``sleep:S``: pause S seconds (a frozen process; its heartbeats keep going)
- ``freeze:S``: pause S seconds *and* stop this worker's heartbeats (a GC pause / stopped VM)
- ``raise``: raise :class:`InjectedFault` (an exception inside the worker at that point)

``@step`` fires only for that step name; ``#n`` only at the n-th hit (default: every hit).

Points in the worker: ``after_claim`` (claimed, user code not started), ``mid_step`` (called
by test steps through :func:`point`), ``after_stash`` (a stash is durable), ``before_commit``
(the step returned, nothing persisted), ``after_persist_before_ack`` (the outcome is durable;
a commit acked its entry with it, a failure's entry is not acked yet), ``before_children`` (a
commit that parked its run for child runs is durable, the children are not submitted yet),
``before_fan_in`` (a map item's run finished, its result not handed to its parent yet),
``after_permit`` (a concurrency permit taken, user code not started), ``before_permit_release``
(the outcome is durable, the permit not given back). In the supervisor: ``before_redispatch``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

POINTS = frozenset(
    {
        "after_claim",
        "mid_step",
        "after_stash",
        "before_commit",
        "after_persist_before_ack",
        "before_children",
        "before_fan_in",
        "after_permit",
        "before_permit_release",
        "before_redispatch",
    }
)


class InjectedFault(Exception):
    """Raised at an armed point whose action is ``raise``."""


@dataclass
class _Rule:
    action: str
    arg: float
    step: str | None
    nth: int | None
    hits: int = 0


@dataclass
class Faults:
    """Parsed fault rules of one process. ``Faults("")`` does nothing and costs one dict lookup."""

    spec: str = ""
    rules: dict[str, list[_Rule]] = field(default_factory=dict)
    frozen_until: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for item in filter(None, (part.strip() for part in self.spec.split(","))):
            name, _, rest = item.partition("=")
            if name not in POINTS:
                raise ValueError(f"fault point {name!r} is unknown; expected one of {sorted(POINTS)}")
            nth = None
            if "#" in rest:
                rest, _, n = rest.partition("#")
                nth = int(n)
            step = None
            if "@" in rest:
                rest, _, step = rest.partition("@")
            action, _, arg = rest.partition(":")
            if action not in ("kill", "sleep", "freeze", "raise"):
                raise ValueError(f"fault action {action!r} is unknown; expected kill, sleep:S, freeze:S or raise")
            self.rules.setdefault(name, []).append(_Rule(action, float(arg or 0), step, nth))

    def hit(self, name: str, step: str | None = None) -> None:
        """Fire the rules armed for ``name``; returns at once when none are."""
        rules = self.rules.get(name)
        if not rules:
            return
        for rule in rules:
            if rule.step and rule.step != step:
                continue
            with self._lock:
                rule.hits += 1
                hits = rule.hits
            if rule.nth is not None and hits != rule.nth:
                continue
            self._fire(rule)

    def _fire(self, rule: _Rule) -> None:
        if rule.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif rule.action == "raise":
            raise InjectedFault("injected fault")
        elif rule.action == "freeze":
            self.frozen_until = time.monotonic() + rule.arg
            time.sleep(rule.arg)
        else:
            time.sleep(rule.arg)

    @property
    def frozen(self) -> bool:
        return time.monotonic() < self.frozen_until


_current = Faults()


def arm(faults: Faults) -> None:
    """Install the process-wide rules used by :func:`point` (the worker does this at start)."""
    global _current
    _current = faults


def point(name: str, step: str | None = None) -> None:
    """A crash point inside user code (test workflows call ``point("mid_step")``)."""
    _current.hit(name, step)
