"""Counters kept per partition, read as one: the sum of every partition's hash and the fleet's.

Scripts count in the hash of the partition they work in (in the slot of the run they count, so
the count is atomic with what it counts); the supervisor and workers count their own work in
the fleet's hash. A reader adds them up. The sum is not a point-in-time snapshot across
partitions, which is fine for counters.

Three counters are not kept in the counter hashes: ``steps_ok``, ``runs_submitted`` and
``runs_completed`` equal the sums of their per-workflow fields in the detail hashes
(``steps|wf|step|ok``, ``runs|wf|submitted``, ``runs|wf|completed``), which the same scripts
increment anyway; :func:`with_derived` adds them up. One increment less for every step and run.
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


# counter -> (detail kind, outcome): the sum of the detail fields ``kind|...|outcome``
DERIVED = {
    "steps_ok": ("steps", "ok"),
    "runs_submitted": ("runs", "submitted"),
    "runs_completed": ("runs", "completed"),
}


def with_derived(counters: Mapping[str, str], detail: Mapping[str, str]) -> dict[str, str]:
    """``counters`` with the :data:`DERIVED` ones summed from the (added-up) ``detail`` fields.

    A value in ``counters`` under a derived name (written by an older version) is replaced: the
    detail fields were always incremented with it, so their sum is the whole count.
    """
    sums = dict.fromkeys(DERIVED, 0)
    for field, value in detail.items():
        kind, _, rest = field.partition("|")
        for name, (want_kind, outcome) in DERIVED.items():
            if kind == want_kind and rest.rpartition("|")[2] == outcome:
                try:
                    sums[name] += int(float(value))
                except ValueError:
                    continue
    out = dict(counters)
    out.update({name: str(total) for name, total in sums.items() if total or name in counters})
    return out


def read_counters(client: redis.Redis, counter_keys: Sequence[str], detail_keys: Sequence[str]) -> dict[str, str]:
    """The counter hashes and the detail hashes (one round trip), each added up: the counters
    with the :data:`DERIVED` ones summed from the detail."""
    pipe = client.pipeline(transaction=False)
    for key in (*counter_keys, *detail_keys):
        pipe.hgetall(key)
    hashes = pipe.execute()
    return with_derived(add_up(hashes[: len(counter_keys)]), add_up(hashes[len(counter_keys) :]))
