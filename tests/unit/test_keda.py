"""orchestrator/keda.py and `orchestrator keda`: KEDA's triggers for the partition streams, the
scalingModifiers formula over them, and the YAML printed for operators (read back with PyYAML)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.errors import ConfigError
from orchestrator.keda import CLUSTER, STANDALONE, KedaScaling, keda_scaling, scalar, to_yaml
from orchestrator.keys import GROUP, Keys
from tests.keda_fields import REDIS_CLUSTER_STREAMS_METADATA, REDIS_STREAMS_METADATA

ADDRESS = "redis.orchestrator.svc.cluster.local:6379"


def scaling(**overrides: Any) -> KedaScaling:
    args: dict[str, Any] = {"namespace": "orch", "partitions": 16, "queues": ("default",), "addresses": (ADDRESS,)}
    return KedaScaling(**{**args, **overrides})


def test_one_lag_and_one_pending_trigger_per_partition_stream_in_partition_order() -> None:
    made = keda_scaling("orch", 16, "default", ADDRESS)
    triggers, modifiers = made["triggers"], made["scalingModifiers"]
    streams = Keys("orch", 16).streams("default")
    lag, pending = triggers[:16], triggers[16:]
    assert [t["name"] for t in lag] == [f"lag{p:02d}" for p in range(16)]
    assert [t["name"] for t in pending] == [f"pending{p:02d}" for p in range(16)]
    assert [t["metadata"]["stream"] for t in lag] == [t["metadata"]["stream"] for t in pending] == streams
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == STANDALONE and trigger["authenticationRef"] == {"name": "orchestrator-redis"}
        assert set(meta) <= REDIS_STREAMS_METADATA
        assert all(isinstance(value, str) for value in meta.values()), "KEDA's CRD wants strings"
        assert (meta["address"], meta["databaseIndex"], meta["consumerGroup"]) == (ADDRESS, "0", GROUP)
    for trigger in lag:
        assert (trigger["metadata"]["lagCount"], trigger["metadata"]["activationLagCount"]) == ("12", "0")
        assert "pendingEntriesCount" not in trigger["metadata"]
    for trigger in pending:  # no lagCount: with one, KEDA would make it a lag trigger
        assert trigger["metadata"]["pendingEntriesCount"] == "12" and "lagCount" not in trigger["metadata"]
    assert modifiers == {
        "formula": " + ".join([f"(lag{p:02d} > 0 ? lag{p:02d} : 0)" for p in range(16)] + [t["name"] for t in pending]),
        "target": "12",
        "activationTarget": "0",
        "metricType": "AverageValue",
    }


def test_the_cluster_variant_uses_the_cluster_scalers_fields() -> None:
    nodes = ("node-0.redis:6379", "node-1.redis:6379", "node-2.redis:6379")
    made = scaling(cluster=True, addresses=nodes)
    for trigger in made.triggers():
        meta = trigger["metadata"]
        assert trigger["type"] == CLUSTER == "redis-cluster-streams"
        assert set(meta) <= REDIS_CLUSTER_STREAMS_METADATA, set(meta) - REDIS_CLUSTER_STREAMS_METADATA
        assert meta["addresses"] == ",".join(nodes) and "address" not in meta and "databaseIndex" not in meta
    # the rest is the single server's: same streams, names and formula
    plain = scaling()
    assert [t["metadata"]["stream"] for t in made.triggers()] == [t["metadata"]["stream"] for t in plain.triggers()]
    assert made.scaling_modifiers() == plain.scaling_modifiers()
    assert "--cluster" in made.command() and made.command().count("--address") == 3


def test_names_are_unique_identifiers_none_a_prefix_of_another() -> None:
    """KEDA pairs metrics with trigger names (pkg/scaling/modifiers); expr-lang needs identifiers."""
    for partitions, queues in ((1, ("default",)), (16, ("default",)), (11, ("a", "b")), (1024, ("default",))):
        s = scaling(partitions=partitions, queues=queues)
        names = s.names("lag") + s.names("pending")
        assert len(set(names)) == len(names) == 2 * partitions * len(queues)
        assert all(name.isidentifier() for name in names)
        ordered = sorted(names)  # a prefix sorts right before the names it starts
        assert not [(a, b) for a, b in itertools.pairwise(ordered) if b.startswith(a)]
    assert scaling(partitions=1).names("lag") == ["lag0"]
    several = scaling(partitions=2, queues=("default", "mail"))
    assert several.names("pending") == ["pending0q0", "pending1q0", "pending0q1", "pending1q1"]
    assert [t["metadata"]["stream"] for t in several.triggers()][:4] == [
        *Keys("orch", 2).streams("default"),
        *Keys("orch", 2).streams("mail"),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"namespace": "a b"}, "namespace"),
        ({"partitions": 0}, "partitions"),
        ({"partitions": 1025}, "partitions"),
        ({"queues": ()}, "queue"),
        ({"queues": ("de fault",)}, "queue"),
        ({"queues": ("a", "a")}, "twice"),
        ({"addresses": ()}, "address"),
        ({"addresses": ("redis",)}, "HOST:PORT"),
        ({"addresses": ("redis:0",)}, "HOST:PORT"),
        ({"addresses": ("redis:99999",)}, "HOST:PORT"),
        ({"addresses": ("a:1", "b:2")}, "Cluster"),
        ({"cluster": True, "database": 1}, "database 0"),
        ({"database": -1}, "database"),
        ({"target": 0}, "target"),
        ({"activation_target": -1}, "activation"),
    ],
)
def test_invalid_input_is_refused_with_what_is_wrong(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scaling(**overrides)


def test_the_manifest_and_the_patch_read_back_as_the_triggers_and_modifiers() -> None:
    for made in (scaling(), scaling(cluster=True, addresses=("[::1]:7000", "h:7001")), scaling(database=3)):
        auth, scaled = yaml.safe_load_all(made.manifest())
        assert (auth["kind"], auth["metadata"]["name"]) == ("TriggerAuthentication", "orchestrator-redis")
        assert scaled["kind"] == "ScaledObject"
        assert scaled["spec"]["triggers"] == made.triggers()
        assert scaled["spec"]["advanced"]["scalingModifiers"] == made.scaling_modifiers()
        assert made.command() in made.manifest()
        assert yaml.safe_load(made.patch()) == [
            {"op": "replace", "path": "/spec/triggers", "value": made.triggers()},
            {"op": "replace", "path": "/spec/advanced/scalingModifiers", "value": made.scaling_modifiers()},
        ]


def test_yaml_scalars_and_folded_strings_read_back_unchanged() -> None:
    for value in ("workers", "16", "0", "true", "no", "null", "a: b", "#x", "-", "{x}", 'q"uo\\te', "", 7, True):
        assert yaml.safe_load(f"k: {scalar(value)}") == {"k": value}, value
    long = " + ".join(f"(name{i} > 0 ? name{i} : 0)" for i in range(40))
    words = "word " * 60
    data = {"a": {"formula": long, "text": words.strip(), "list": [{"x": "1", "y": [1, "b"]}, "c"]}}
    assert yaml.safe_load("\n".join(to_yaml(data, 0))) == data
    assert all(len(line) <= 100 for line in to_yaml(data, 0))


def test_group_commands_create_every_streams_group_from_id_0() -> None:
    lines = scaling(partitions=4).group_commands().splitlines()
    assert lines == [f'XGROUP CREATE "{s}" {GROUP} 0 MKSTREAM' for s in Keys("orch", 4).streams("default")]


def invoke(*args: str, env: Mapping[str, str | None] | None = None) -> Any:
    unset: dict[str, str | None] = {"ORCHESTRATOR_NAMESPACE": None, "ORCHESTRATOR_PARTITIONS": None}
    return CliRunner().invoke(cli, list(args), env={**unset, **(env or {})})


def test_the_cli_prints_without_redis_and_takes_the_shared_options() -> None:
    # an unreachable URL: the command never connects
    env = {"REDIS_URL": "redis://nowhere.invalid:1/0", "ORCHESTRATOR_PARTITIONS": "4"}
    result = invoke("keda", "--address", ADDRESS, "--namespace", "ns1", env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout == KedaScaling("ns1", 4, ("default",), (ADDRESS,)).manifest()
    result = invoke("--partitions", "2", "keda", "--print", "groups", "--queue", "a", "--queue", "b")
    assert result.exit_code == 0, result.output
    assert result.stdout == KedaScaling("orch", 2, ("a", "b"), (ADDRESS,)).group_commands()
    result = invoke("keda", "--address", "n1:1", "--address", "n2:2", "--cluster", "--target", "8", "--print", "patch")
    assert result.exit_code == 0, result.output
    assert result.stdout == KedaScaling("orch", 16, ("default",), ("n1:1", "n2:2"), target=8, cluster=True).patch()


@pytest.mark.parametrize(
    "args",
    [
        ("keda",),  # no address
        ("keda", "--address", "redis"),
        ("keda", "--address", ADDRESS, "--partitions", "0"),
        ("keda", "--address", ADDRESS, "--target", "0"),
        ("keda", "--address", "a:1", "--address", "b:2"),
    ],
)
def test_the_cli_refuses_invalid_input_as_a_usage_error(args: tuple[str, ...]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2 and "Error" in result.output and "Traceback" not in result.output, result.output
