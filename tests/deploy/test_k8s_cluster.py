"""deploy/k8s/components/redis-cluster: rendered by kustomize on the base (alone and with the ACL
and TLS components) and checked like the base: Kubernetes' schemas, KEDA's CRD fields and its
redis-cluster-streams parameters, the generated patch against its generator, and agreement
between KEDA's addresses and the pods' URL; and deploy/README.md's overlay for a cluster."""

from __future__ import annotations

import base64
import re
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from orchestrator.keys import GROUP, Keys
from orchestrator.settings import Settings
from tests.deploy.manifests import DEPLOY, K8S, orchestrator_keda, shared_option
from tests.deploy.test_k8s import (
    KEDA_API,
    REDIS_STREAMS_AUTH_PARAMETERS,
    SCALED_OBJECT_SPEC,
    TRIGGER_AUTHENTICATION_SPEC,
    layout,
    scaled_spec,
    validate_for_kubernetes,
)
from tests.deploy.test_k8s_security import Docs, auth_refs, keda_tls, overlay_with, render, secret_value
from tests.keda_fields import REDIS_CLUSTER_STREAMS_METADATA

COMPONENT = K8S / "components" / "redis-cluster"
PATCH = COMPONENT / "keda-cluster.yaml"
COMBINATIONS = [
    ("redis-cluster",),
    ("redis-cluster", "redis-acl"),
    ("redis-cluster", "redis-tls"),
    ("redis-cluster", "redis-acl", "redis-tls"),
]


def header_command() -> str:
    (line,) = re.findall(r"^#\s+(orchestrator keda .*)$", PATCH.read_text(), re.M)
    return str(line)


def patched(path: str) -> Any:
    """The value keda-cluster.yaml puts at ``path`` of the ScaledObject."""
    (op,) = [op for op in yaml.safe_load(PATCH.read_text()) if op["path"] == path]
    assert op["op"] == "replace"
    return op["value"]


def readme_blocks(first_line: str) -> list[str]:
    """Every fenced code block of deploy/README.md that starts with ``first_line``."""
    readme = (DEPLOY / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", readme, re.M | re.S)]
    return [b for b in blocks if b.startswith(first_line)]


def check_cluster_keda(docs: Docs) -> None:
    """KEDA's resources: the CRD fields, every trigger a redis-cluster-streams one with only its
    documented parameters, reaching the cluster the pods' REDIS_URL names."""
    scaled, auth = docs["ScaledObject", "orchestrator-worker"], docs["TriggerAuthentication", "orchestrator-redis"]
    assert scaled["apiVersion"] == auth["apiVersion"] == KEDA_API
    jsonschema.validate(scaled["spec"], SCALED_OBJECT_SPEC)
    jsonschema.validate(auth["spec"], TRIGGER_AUTHENTICATION_SPEC)
    params = auth_refs(docs)
    assert set(params) <= REDIS_STREAMS_AUTH_PARAMETERS, set(params) - REDIS_STREAMS_AUTH_PARAMETERS
    url = urlsplit(secret_value(docs, "orchestrator-redis", "REDIS_URL"))
    assert Settings(redis_url=url.geturl()).redis_url and int(url.path.strip("/") or 0) == 0, "a cluster has db 0"
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-cluster-streams"
        assert set(meta) <= REDIS_CLUSTER_STREAMS_METADATA, set(meta) - REDIS_CLUSTER_STREAMS_METADATA
        assert meta["addresses"].split(",")[0] == f"{url.hostname}:{url.port or 6379}"
        assert "databaseIndex" not in meta and "address" not in meta
        assert trigger["authenticationRef"] == {"name": "orchestrator-redis"}
        assert not ("enableTLS" in meta and "tls" in params), "KEDA refuses tls in both places"
        assert keda_tls(docs, meta) == (url.scheme == "rediss" or "tls" in params)


def test_the_patch_is_what_its_header_command_prints_for_the_pods_namespace_and_partitions() -> None:
    line = header_command()
    namespace, partitions = layout()
    assert (shared_option(line, "--namespace"), int(shared_option(line, "--partitions"))) == (namespace, partitions)
    assert "--cluster" in line.split()
    output, _ = orchestrator_keda(line)
    assert output == PATCH.read_text(), f"{PATCH.relative_to(DEPLOY.parent)} is stale: run `{line} > {PATCH.name}`"


def test_the_cluster_triggers_are_keda_yamls_pairs_as_redis_cluster_streams() -> None:
    """The same trigger for every partition stream as keda.yaml (names, streams, group, modes),
    with KEDA's cluster type and `addresses`, and the same scalingModifiers."""
    ours, base = patched("/spec/triggers"), scaled_spec()["triggers"]
    namespace, partitions = layout()
    assert len(ours) == len(base) == 2 * partitions * 1  # one queue: default
    for trigger, single in zip(ours, base, strict=True):
        assert trigger["name"] == single["name"] and trigger["authenticationRef"] == single["authenticationRef"]
        assert trigger["metadata"]["addresses"] == shared_option(header_command(), "--address")
        kept = {k: v for k, v in single["metadata"].items() if k not in ("address", "databaseIndex")}
        assert {k: v for k, v in trigger["metadata"].items() if k != "addresses"} == kept
    streams = [t["metadata"]["stream"] for t in ours]
    assert streams == 2 * Keys(namespace, partitions).streams("default")
    assert {t["metadata"]["consumerGroup"] for t in ours} == {GROUP}
    assert patched("/spec/advanced/scalingModifiers") == scaled_spec()["advanced"]["scalingModifiers"]


def test_several_nodes_become_keda_addresses() -> None:
    line = header_command().replace("--print patch", "--address node-b.example:6380 --print patch")
    output, _ = orchestrator_keda(line)
    (op,) = [op for op in yaml.safe_load(output) if op["path"] == "/spec/triggers"]
    first = shared_option(header_command(), "--address")
    assert {t["metadata"]["addresses"] for t in op["value"]} == {f"{first},node-b.example:6380"}


@pytest.mark.parametrize("components", COMBINATIONS, ids="+".join)
def test_the_component_renders_on_the_base_as_valid_kubernetes_and_keda(
    tmp_path: Path, components: tuple[str, ...]
) -> None:
    docs = render(tmp_path, overlay_with(*components))
    validate_for_kubernetes(docs.values())
    check_cluster_keda(docs)
    spec = docs["ScaledObject", "orchestrator-worker"]["spec"]
    assert spec["triggers"] == patched("/spec/triggers")
    assert spec["advanced"]["scalingModifiers"] == patched("/spec/advanced/scalingModifiers")
    assert "CHANGE-ME" in secret_value(docs, "orchestrator-redis", "REDIS_URL"), "the base's placeholder, untouched"
    params = auth_refs(docs)
    assert ("username" in params) == ("redis-acl" in components)
    assert ("tls" in params) == ("redis-tls" in components)
    for name in ("orchestrator-worker", "orchestrator-supervisor"):  # the pods read the Secret's URL
        (container,) = docs["Deployment", name]["spec"]["template"]["spec"]["containers"]
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "REDIS_URL"]
        assert [r["name"] for r in refs] == ["orchestrator-redis"]


def test_the_readme_overlay_for_a_cluster_sets_the_image_the_secret_and_keda_addresses(tmp_path: Path) -> None:
    (kustomization,) = [b for b in readme_blocks("# my-deploy/kustomization.yaml") if "redis-cluster" in b]
    (line,) = re.findall(r"^\s*#\s+(orchestrator keda .*)$", kustomization, re.M)
    assert (shared_option(line, "--namespace"), int(shared_option(line, "--partitions"))) == layout()
    assert "--cluster" in line.split()
    patch, path = orchestrator_keda(line)
    assert path.startswith("my-deploy/") and f"path: {path.removeprefix('my-deploy/')}" in kustomization
    env_lines = re.findall(r"^\s*#\s+(REDIS_(?:URL|PASSWORD)=\S+)$", kustomization, re.M)
    files = {path.removeprefix("my-deploy/"): patch, "redis.env": "\n".join(env_lines) + "\n"}
    docs = render(tmp_path, kustomization, files)
    check_cluster_keda(docs)
    secret = {k: base64.b64decode(v).decode() for k, v in docs["Secret", "orchestrator-redis"]["data"].items()}
    assert secret == dict(line.split("=", 1) for line in env_lines) and "CHANGE-ME" not in str(secret)
    url = urlsplit(secret["REDIS_URL"])
    assert url.password == secret["REDIS_PASSWORD"]
    for trigger in docs["ScaledObject", "orchestrator-worker"]["spec"]["triggers"]:
        assert trigger["metadata"]["addresses"] == f"{url.hostname}:{url.port}" == shared_option(line, "--address")
    for name in ("orchestrator-worker", "orchestrator-supervisor"):
        (container,) = docs["Deployment", name]["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "REGISTRY/orchestrator:0.1.0"
