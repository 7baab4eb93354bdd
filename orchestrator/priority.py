"""Run priorities: three levels, each a lane of its own per queue, and the rule workers pick by.

A run submitted with ``priority="high"`` (or ``"low"``) goes to its queue's lane for that level,
``<queue>..high`` (``<queue>..low``): a queue of its own in every respect (streams in every
partition, delayed set, indexes, the supervisor's scans), so nothing in the commit and recovery
protocols changes. ``"normal"`` is the queue itself. A worker reads the lanes of its queues that
are in use (a lane is in use once a run was submitted to it) and, whenever it has read more
entries than it has free slots, picks which to start by :class:`Picker`'s rule, weighted 4:2:1:
of every 7 picks, 4 prefer ``high``, 2 ``normal`` and 1 ``low``; a pick whose preferred level has
nothing waiting takes the highest level that has. So a level with work waiting gets at least
its share of the starts (low: one in 7) however much of the others waits, and starts the next
free slot at once when the others have nothing waiting: no level starves, and a high-priority
run read behind a backlog of others starts first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar, get_args

from orchestrator.errors import ValidationError

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)  # highest first
LANE_MARK = ".."  # "<queue>..<level>": never in a queue's own name
SHARES: tuple[Priority, ...] = ("high", "high", "high", "high", "normal", "normal", "low")  # 4:2:1

T = TypeVar("T")


def lane(queue: str, priority: str) -> str:
    """The queue a run of ``priority`` on ``queue`` goes to (``normal``: the queue itself)."""
    if priority not in PRIORITIES:
        raise ValidationError(f"priority {priority!r} is invalid: expected one of {', '.join(PRIORITIES)}")
    return queue if priority == "normal" else f"{queue}{LANE_MARK}{priority}"


def split(queue: str) -> tuple[str, Priority]:
    """A lane's queue and level (a queue of no lane: itself, ``normal``)."""
    base, mark, level = queue.rpartition(LANE_MARK)
    if mark and level in PRIORITIES:
        return base, level
    return queue, "normal"


def lanes_of(queues: Sequence[str], in_use: Sequence[str]) -> list[str]:
    """``queues`` and the lanes of them that are ``in_use`` (the namespace's queues set)."""
    mine = set(queues)
    return sorted(mine | {q for q in in_use if split(q)[0] in mine})


class Picker:
    """Which read entries a worker starts when it has fewer free slots than entries: pick ``k``
    prefers level ``SHARES[k % 7]``, oldest first, or else the highest level waiting (a worker
    keeps its count across reads, so the shares hold over time)."""

    def __init__(self) -> None:
        self.picks = 0

    def pick(self, waiting: list[T], slots: int, level: Callable[[T], str]) -> list[T]:
        """Take up to ``slots`` entries out of ``waiting`` (oldest first), in the order to start them."""
        chosen: list[T] = []
        rank: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}
        levels = [level(item) for item in waiting]  # once: a pick pops from both lists
        while waiting and len(chosen) < slots:
            preferred: str = SHARES[self.picks % len(SHARES)]
            self.picks += 1
            if preferred not in levels:
                preferred = min(levels, key=lambda lv: rank.get(lv, 1))
            at = levels.index(preferred)
            levels.pop(at)
            chosen.append(waiting.pop(at))
        return chosen
