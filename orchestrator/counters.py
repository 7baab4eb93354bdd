"""Counters kept per partition, read as one: the sum of every partition's hash and the fleet's.

Scripts count in the hash of the partition they work in (in the slot of the run they count, so
the count is atomic with what it counts); the supervisor and workers count their own work in
the fleet's hash. A reader adds them up. The sum is not a point-in-time snapshot across
partitions, which is fine for counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import redis


def add_up(hashes: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Field-wise sum of counter hashes; a field that is not a number keeps its first value."""
    totals: dict[str, float] = {}
    kept: dict[str, str] = {}
    whole: set[str] = set()
    for fields in hashes:
        for name, value in fields.items():
            try:
                number = float(value)
            except ValueError:
                kept.setdefault(name, value)
                continue
            if name not in totals:
                whole.add(name)
            if not value.lstrip("-").isdigit():
                whole.discard(name)
            totals[name] = totals.get(name, 0.0) + number
    summed = {name: str(int(total)) if name in whole else repr(total) for name, total in totals.items()}
    return {**kept, **summed}


def read_summed(client: redis.Redis, keys: Sequence[str]) -> dict[str, str]:
    """``HGETALL`` of every hash in ``keys`` (one round trip), added up."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return add_up(pipe.execute())
