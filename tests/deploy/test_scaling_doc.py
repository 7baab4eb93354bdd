"""docs/scaling.md: its figures recomputed (tests/deploy/spread.py, whose model of redis-cli is
checked against a real cluster in test_cluster_processes.py), its rules of thumb checked for
every cluster size, the partition setting's limits and what `orchestrator migrate` does with a
count, and every test it names exists."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest

from orchestrator import Client, Settings
from orchestrator.embedded import RedisServer
from orchestrator.errors import ConfigError
from orchestrator.keys import DEFAULT_PARTITIONS, MAX_PARTITIONS, SLOTS, Keys
from tests.deploy.manifests import REPO, clean_environ
from tests.deploy.spread import most_on_one_master, redis_cli_ranges, spread
from tests.deploy.test_compose_cluster import node_config
from workers.testflows import chain

DOC = REPO / "docs" / "scaling.md"


def text() -> str:
    return " ".join(DOC.read_text().split())


def spread_table() -> dict[tuple[int, int], tuple[int, float]]:
    """The doc's table: (partitions, masters) -> (most on one master, average)."""
    raw = DOC.read_text().split("<!-- spread-table", 1)[1]
    lines = [line for line in raw.splitlines()[1:] if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    masters = [int(m) for m in header[1:]]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for m, cell in zip(masters, cells[1:], strict=True):
            most, average = cell.split(" / ")
            table[int(cells[0]), m] = (int(most), float(average))
    return table


def test_the_spread_table_is_what_the_model_computes() -> None:
    table = spread_table()
    assert len(table) >= 20
    for (partitions, masters), (most, average) in table.items():
        assert most == most_on_one_master(partitions, masters), (partitions, masters)
        assert average == round(partitions / masters, 1), (partitions, masters)


def test_sixteen_partitions_fall_on_three_masters_as_the_doc_says() -> None:
    ranges = redis_cli_ranges(3)
    assert "(masters in slot order, " + ", ".join(f"`{a}-{b}`" for a, b in ranges) + ")" in text()
    assert "5, 5 and 6 partitions for the namespace `orch`" in text() and spread("orch", 16, ranges) == [5, 5, 6]
    others = Counter(tuple(spread(f"ns{i}", 16, ranges)) for i in range(400))
    assert set(others) == {(5, 5, 6), (6, 5, 5), (5, 6, 5), (6, 4, 6)}
    assert "other namespaces get 6/5/5, 5/6/5 or 6/4/6" in text()
    assert max(max(s) for s in others) == most_on_one_master(16, 3) == 6


def test_the_rules_of_thumb_hold_for_every_cluster_size() -> None:
    for masters in range(2, 17):
        for partitions in range(1, 257):
            most = most_on_one_master(partitions, masters)
            assert most <= math.ceil(partitions / masters) + 1, (partitions, masters)
            if partitions % masters == 0:  # at most P/M + 1: 1/4 above the average at 4 a master, 1/8 at 8
                assert most <= partitions // masters + 1
            if partitions < masters:  # a namespace's partitions leave some masters with none
                assert spread("orch", partitions, redis_cli_ranges(masters)).count(0) >= masters - partitions
        for per_master in (1, 2, 4, 8):  # powers of two: exactly P/M each
            if masters & (masters - 1) == 0:
                assert most_on_one_master(per_master * masters, masters) == per_master
    assert "at most 1/4 above the average with 4 partitions per master, 1/8 with 8" in text()
    assert "8 partitions on 16 masters leave 8 of them idle" in text()
    assert all(spread(f"ns{i}", 8, redis_cli_ranges(16)).count(0) == 8 for i in range(50))
    # the advice: the default up to 4 masters, 64 for 8, 128 for 16: 4 to 8 partitions a master
    assert "The default, 16, suits up to 4 masters.** For 8 masters choose 64; for 16, 128." in text()
    for partitions, masters in ((DEFAULT_PARTITIONS, 4), (64, 8), (128, 16)):
        assert 4 <= partitions / masters <= 8
        assert most_on_one_master(partitions, masters) <= 1.25 * partitions / masters


def test_the_partition_setting_is_what_the_doc_says() -> None:
    assert "(the setting, 16 by default, at most 1,024)" in text()
    assert Settings.model_fields["partitions"].default == DEFAULT_PARTITIONS == 16 and MAX_PARTITIONS == 1024
    Settings(partitions=MAX_PARTITIONS)
    with pytest.raises((ConfigError, ValueError)):
        Settings(partitions=MAX_PARTITIONS + 1)
    assert "a run belongs to partition `crc32(run_id) mod P`" in text()
    for run_id in ("a", "acme-q4", "x" * 200):
        assert Keys("orch", 16).partition_of(run_id) == zlib.crc32(run_id.encode()) % 16
    assert "most slots hold no partition (16 of 16,384 by default)" in text() and SLOTS == 16384
    assert "`cluster-node-timeout` (5 s in `deploy/compose.cluster.yaml`)" in text()
    assert node_config()["cluster-node-timeout"] == "5000"


def orchestrator(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**clean_environ(), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--redis-url", url, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_migrate_takes_the_shared_partitions_option(tmp_path: Path) -> None:
    """`orchestrator migrate` moves a namespace into the layout with the count it is given, and
    refuses another count on a namespace that has one: no command changes a namespace's count."""
    with RedisServer(tmp_path / "redis", appendfsync=None) as server:
        fresh = orchestrator(server.url, "--namespace", "fresh", "--partitions", "32", "migrate", "--dry-run")
        assert fresh.returncode == 0 and "namespace 'fresh' (32 partitions)" in fresh.stdout, fresh.stderr
        with Client(Settings(redis_url=server.url, namespace="used", partitions=16)) as client:
            client.submit(chain, {})  # the first use records 16
        other = orchestrator(server.url, "--namespace", "used", "--partitions", "32", "migrate")
        assert other.returncode == 2 and "partitions 32 does not match namespace 'used'" in other.stderr
    assert "`orchestrator migrate` moves a namespace written before partitions existed" in text()
    assert "No command changes the count of a partitioned namespace" in text()


def test_every_test_the_doc_names_exists() -> None:
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", DOC.read_text()))
    assert len(named) >= 10
    defined = {
        match
        for path in (REPO / "tests").rglob("test_*.py")
        for match in re.findall(r"^def (test_[a-z0-9_]+)\(", path.read_text(), re.M)
    }
    assert named - defined == set()


def test_the_doc_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", DOC.read_text()):
        assert (DOC.parent / target).exists(), target
