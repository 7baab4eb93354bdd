"""How a namespace's partitions fall on a Redis Cluster's masters: the slot ranges ``redis-cli
--cluster create`` gives the masters, and where each partition's slot is. docs/scaling.md's
figures are computed here (tests/deploy/test_scaling_doc.py), and checked against a cluster
that redis-cli really formed (tests/deploy/test_cluster_processes.py)."""

from __future__ import annotations

import math
import struct
from collections import Counter

from redis.crc import key_slot

from orchestrator.keys import SLOTS, Keys


def _f32(value: float) -> float:
    """``value`` rounded to a C ``float``, which redis-cli computes the ranges in."""
    rounded: float = struct.unpack("f", struct.pack("f", value))[0]
    return rounded


def redis_cli_ranges(masters: int) -> list[tuple[int, int]]:
    """The slot range of each master, first to last, as ``redis-cli --cluster create`` assigns
    them (clusterManagerCommandCreate in redis-cli.c: ``slots_per_node = 16384 / (float) n``,
    each range ending at ``lround(cursor + slots_per_node - 1)``, the last at 16383)."""
    per_node = _f32(SLOTS / masters)
    first, cursor, ranges = 0, _f32(0.0), []
    for i in range(masters):
        last = math.floor(_f32(_f32(cursor + per_node) - 1) + 0.5)  # lround of a value >= 0
        if last > SLOTS or i == masters - 1:
            last = SLOTS - 1
        last = max(last, first)
        ranges.append((first, last))
        first, cursor = last + 1, _f32(cursor + per_node)
    return ranges


def partition_range(partition: int, partitions: int) -> tuple[int, int]:
    """The slots partition ``partition``'s tag may hash to: the ``partition``-th 1/P of them
    (keys.partition_tag: ``slot * P // 16384 == partition``)."""
    return -(-partition * SLOTS // partitions), -(-(partition + 1) * SLOTS // partitions) - 1


def spread(namespace: str, partitions: int, ranges: list[tuple[int, int]]) -> list[int]:
    """How many of the namespace's partitions each master (by its slot range) holds."""
    keys = Keys(namespace, partitions)
    owners = Counter(
        i
        for p in range(partitions)
        for i, (first, last) in enumerate(ranges)
        if first <= key_slot(keys.tag(p).encode()) <= last
    )
    return [owners[i] for i in range(len(ranges))]


def most_on_one_master(partitions: int, masters: int) -> int:
    """The most partitions one master can hold, whatever the namespace: those whose slot range
    meets the master's (a partition whose range straddles two masters' goes to either, by the
    namespace's tag)."""
    shares = [partition_range(p, partitions) for p in range(partitions)]
    return max(
        sum(1 for low, high in shares if low <= last and high >= first) for first, last in redis_cli_ranges(masters)
    )
