"""deploy/k8s: built-in kinds against Kubernetes' schemas, KEDA's resources against the fields of
its CRDs, and every setting and name against the code that reads it."""

from __future__ import annotations

import base64
import copy
import math
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic import TypeAdapter
from redis.crc import key_slot

from orchestrator._version import __version__
from orchestrator.keys import GROUP, SLOTS, Keys
from orchestrator.settings import Settings
from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    SETTINGS_PREFIX,
    compose,
    container_env,
    formula_terms,
    k8s_documents,
    k8s_files,
    k8s_find,
    keda_replicas,
    orchestrator_keda,
    plain,
    shared_option,
)
from tests.keda_fields import REDIS_STREAMS_METADATA

KEDA_API = "keda.sh/v1alpha1"
DEPLOYMENTS = {"orchestrator-worker": 9100, "orchestrator-supervisor": 9101}
# Oldest Kubernetes that current KEDA releases support, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.27.0", "latest")

# The parts of KEDA's CRDs (keda.sh/v1alpha1 ScaledObject and TriggerAuthentication, KEDA 2.x:
# config/crd/bases/keda.sh_scaledobjects.yaml and https://keda.sh/docs/latest/reference/scaledobject-spec/)
# that these manifests use, strict: an unknown or misspelled field is an error, as it would be
# for the API server with KEDA's structural schema.
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
    },
}
SCALED_OBJECT_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "name": {"type": "string"},
                "envSourceContainerName": {"type": "string"},
            },
        },
        **{
            name: _INT32
            for name in (
                "pollingInterval",
                "cooldownPeriod",
                "initialCooldownPeriod",
                "idleReplicaCount",
                "minReplicaCount",
                "maxReplicaCount",
            )
        },
        "fallback": {
            "type": "object",
            "additionalProperties": False,
            "required": ["failureThreshold", "replicas"],
            "properties": {"failureThreshold": _INT32, "replicas": _INT32},
        },
        "advanced": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                # KEDA >= 2.13: one composite metric from the named triggers
                "scalingModifiers": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["formula", "target"],
                    "properties": {
                        "formula": {"type": "string"},
                        "target": {"type": "string"},
                        "activationTarget": {"type": "string"},
                        "metricType": {"enum": ["AverageValue", "Value"]},
                    },
                },
                "horizontalPodAutoscalerConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "behavior": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES},
                        },
                    },
                },
            },
        },
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "metadata"],
                "properties": {
                    "type": {"type": "string"},
                    "name": {"type": "string"},
                    # the CRD types every metadata value as a string: `lagCount: 16` is rejected
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "useCachedMetrics": {"type": "boolean"},
                    "authenticationRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                        },
                    },
                },
            },
        },
    },
}
TRIGGER_AUTHENTICATION_SPEC = {
    "type": "object",
    "required": ["secretTargetRef"],
    "properties": {
        "secretTargetRef": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["parameter", "name", "key"],
                "properties": {"parameter": {"type": "string"}, "name": {"type": "string"}, "key": {"type": "string"}},
            },
        }
    },
}
REDIS_STREAMS_AUTH_PARAMETERS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword"}
KEDA_YAML = K8S / "keda.yaml"


def builtin_documents() -> list[dict[str, Any]]:
    return [d for d in k8s_documents() if d["apiVersion"] != KEDA_API]


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = k8s_find("Deployment", name)["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    found: dict[str, Any] = pod_spec(name)["containers"][0]
    return found


def scaled_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s_find("ScaledObject", "orchestrator-worker")["spec"]
    return spec


def triggers() -> dict[str, dict[str, Any]]:
    found = {t["name"]: t for t in scaled_spec()["triggers"]}
    assert len(found) == len(scaled_spec()["triggers"]), "trigger names must be unique"
    return found


def lag_and_pending() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The lag triggers and the pending triggers, in manifest order. KEDA picks a trigger's mode
    by its keys: a non-zero lagCount makes a lag trigger, else a consumerGroup a pending one."""
    lag = [t for t in scaled_spec()["triggers"] if int(t["metadata"].get("lagCount", "0"))]
    pending = [t for t in scaled_spec()["triggers"] if t not in lag]
    return lag, pending


def layout() -> tuple[str, int]:
    """The namespace and partition count the pods run with (the ConfigMap, else the defaults)."""
    data = k8s_find("ConfigMap", "orchestrator-config")["data"]
    settings = Settings(
        namespace=data.get("ORCHESTRATOR_NAMESPACE", "orch"), partitions=int(data.get("ORCHESTRATOR_PARTITIONS", 16))
    )
    return settings.namespace, settings.partitions


def header_command() -> str:
    """The `orchestrator keda ...` line of keda.yaml's header: how the file was made."""
    (line,) = re.findall(r"^#\s+(orchestrator keda .*)$", KEDA_YAML.read_text(), re.M)
    return str(line)


def redis_url() -> str:
    url: str = k8s_find("Secret", "orchestrator-redis")["stringData"]["REDIS_URL"]
    return url


def test_the_kustomization_lists_every_manifest_and_only_those() -> None:
    listed = {path.name for path in k8s_files()}
    present = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert {d["kind"] for d in k8s_documents()} == {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ScaledObject",
        "TriggerAuthentication",
    }


def validate_for_kubernetes(docs: Iterable[dict[str, Any]]) -> None:
    """Every document but KEDA's against the schemas of each of ``KUBERNETES_VERSIONS`` (strict);
    skipped where kubernetes-validate is not installed."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = list(docs)
    for version in KUBERNETES_VERSIONS:
        if version == "latest":
            version = kubernetes_validate.latest_version()
        for doc in docs:
            if doc["apiVersion"] != KEDA_API:
                kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_kinds_are_valid_for_kubernetes(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    errors = []
    for doc in builtin_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert errors == []
    # and the validator does reject what the API server would
    broken = copy.deepcopy(k8s_find("Deployment", "orchestrator-supervisor"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: `kubectl kustomize` not checked")
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_kustomize_renders_the_same_resources() -> None:
    rendered = kustomize(K8S)

    def identity(doc: dict[str, Any]) -> tuple[str, str, str]:
        return doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace", "")

    ours = {identity(doc): doc for doc in k8s_documents()}
    assert sorted(map(identity, rendered)) == sorted(ours)
    for doc in rendered:  # what the other tests read is what kustomize sends to the API server
        assert doc == ours[identity(doc)], identity(doc)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_every_setting_in_the_configmap_and_the_pods_is_real_and_valid(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = container_env(k8s_find("Deployment", name))
    settings_env = {k: v for k, v in env.items() if k.startswith(SETTINGS_PREFIX)}
    unknown = [k for k in settings_env if k.removeprefix(SETTINGS_PREFIX).lower() not in Settings.model_fields]
    assert unknown == [], f"not settings (they would be ignored): {unknown}"
    for key in [k for k in os.environ if k.startswith(SETTINGS_PREFIX) or k == "REDIS_URL"]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert plain(settings.redis_url) == redis_url()
    for key, value in settings_env.items():
        field = key.removeprefix(SETTINGS_PREFIX).lower()
        assert getattr(settings, field) == TypeAdapter(Settings.model_fields[field].annotation).validate_python(value)
    assert settings.metrics_port == DEPLOYMENTS[name]
    assert settings.metrics_host == "0.0.0.0"


def test_the_worker_drains_before_kubernetes_kills_it_and_keda_owns_its_replicas() -> None:
    worker = k8s_find("Deployment", "orchestrator-worker")
    assert "replicas" not in worker["spec"], "re-applying the manifest would reset KEDA's replica count"
    drain_s = float(container_env(worker)["ORCHESTRATOR_DRAIN_GRACE_S"])
    assert pod_spec("orchestrator-worker")["terminationGracePeriodSeconds"] >= drain_s + 10
    assert container("orchestrator-worker")["args"] == compose()["services"]["worker"]["command"]
    assert k8s_find("Deployment", "orchestrator-supervisor")["spec"]["replicas"] == 2
    assert container("orchestrator-supervisor")["args"] == ["supervisor"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_pods_are_probed_on_their_named_metrics_port_and_locked_down(name: str) -> None:
    deployment = k8s_find("Deployment", name)
    c = container(name)
    port = DEPLOYMENTS[name]
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] == "metrics" and get["path"].startswith("/metrics"), probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    pod = pod_spec(name)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["image"] == f"orchestrator:{__version__}"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_metrics_service_and_disruption_budget_select_the_pods(name: str) -> None:
    labels = k8s_find("Deployment", name)["spec"]["template"]["metadata"]["labels"]
    selector = k8s_find("Deployment", name)["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = k8s_find("Service", f"{name}-metrics")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["ports"][0]["port"] == DEPLOYMENTS[name]
    assert "annotations" not in service["metadata"], "an annotated Service would be scraped a second time"
    budget = k8s_find("PodDisruptionBudget", name)
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in budget["spec"], "minAvailable would block node drains of a single replica"
    # int-or-string fields: the schema takes any string, the API server only a number or a percentage
    rolling = k8s_find("Deployment", name)["spec"]["strategy"]["rollingUpdate"]
    for value in (budget["spec"]["maxUnavailable"], rolling["maxSurge"], rolling["maxUnavailable"]):
        assert isinstance(value, int) or re.fullmatch(r"\d+%", value), value


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def test_the_network_policy_lets_only_prometheus_reach_the_metrics_ports() -> None:
    """Both Deployments' pods are selected; ingress is allowed on the containers' `metrics` port
    only (the one port they listen on), only from pods labelled as Prometheus; egress (Redis,
    DNS, what steps call) is not restricted."""
    (policy,) = [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    for name, port in DEPLOYMENTS.items():
        labels = k8s_find("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert selects(spec["podSelector"], labels), f"{name}'s pods are not selected"
        assert container(name)["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert not selects(spec["podSelector"], {"app.kubernetes.io/name": "redis"}), "selects pods that are not ours"
    assert spec["policyTypes"] == ["Ingress"], "egress must stay open: Redis, DNS and the steps' own calls"
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {}, "Prometheus usually runs in a namespace of its own"
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert selects(peer["podSelector"], prometheus)
    assert not selects(peer["podSelector"], {"app.kubernetes.io/name": "orchestrator"})
    assert not selects(peer["podSelector"], {}), "an empty pod selector would let every pod in"


def test_keda_yaml_is_what_its_header_command_prints_for_the_pods_namespace_and_partitions() -> None:
    """keda.yaml is generated: edited by hand, or left behind by a change of orchestrator/keda.py
    or keys.py, it differs from the output of the command its header names, run here."""
    line = header_command()
    namespace, partitions = layout()
    assert shared_option(line, "--namespace") == namespace
    assert int(shared_option(line, "--partitions")) == partitions
    output, _ = orchestrator_keda(line)
    assert output == KEDA_YAML.read_text(), f"deploy/k8s/keda.yaml is stale: run `{line} > deploy/k8s/keda.yaml`"


def test_keda_resources_use_only_fields_of_the_keda_crds() -> None:
    scaled = k8s_find("ScaledObject", "orchestrator-worker")
    auth = k8s_find("TriggerAuthentication", "orchestrator-redis")
    assert scaled["apiVersion"] == auth["apiVersion"] == KEDA_API
    jsonschema.validate(scaled["spec"], SCALED_OBJECT_SPEC)
    jsonschema.validate(auth["spec"], TRIGGER_AUTHENTICATION_SPEC)
    typo = copy.deepcopy(scaled["spec"])
    typo["triggers"][0]["metadata"]["lagCount"] = 16  # unquoted: an int, which the CRD refuses
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, SCALED_OBJECT_SPEC)
    typo = copy.deepcopy(scaled["spec"])
    typo["advanced"]["scalingModifiers"]["target"] = 12
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, SCALED_OBJECT_SPEC)


def test_keda_reads_every_partition_stream_of_the_queue_with_a_lag_and_a_pending_trigger() -> None:
    target = scaled_spec()["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    k8s_find("Deployment", target["name"])
    namespace, partitions = layout()
    streams = Keys(namespace, partitions).streams("default")
    assert len(set(streams)) == partitions == 16
    for p, stream in enumerate(streams):  # each partition's stream in its share of the slots
        assert stream.startswith(f"{namespace}:queue:{{") and stream.endswith("}:default")
        assert key_slot(stream.encode()) * partitions // SLOTS == p
    lag, pending = lag_and_pending()
    assert [t["metadata"]["stream"] for t in lag] == streams
    assert [t["metadata"]["stream"] for t in pending] == streams
    for trigger in lag + pending:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert set(meta) <= REDIS_STREAMS_METADATA, set(meta) - REDIS_STREAMS_METADATA
        assert meta["consumerGroup"] == GROUP
        assert "password" not in meta and "passwordFromEnv" not in meta, "the password comes from the Secret"
        auth = k8s_find("TriggerAuthentication", trigger["authenticationRef"]["name"])
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["parameter"] in REDIS_STREAMS_AUTH_PARAMETERS
            assert ref["key"] in k8s_find("Secret", ref["name"])["stringData"]
    for trigger in lag:  # lagCount makes a lag trigger (and then KEDA wants activationLagCount)
        assert int(trigger["metadata"]["activationLagCount"]) == 0
        assert not {"pendingEntriesCount", "streamLength"} & set(trigger["metadata"])
    for trigger in pending:
        assert int(trigger["metadata"]["pendingEntriesCount"]) >= 1
        assert not {"lagCount", "activationLagCount", "streamLength"} & set(trigger["metadata"])


def test_the_formula_sums_every_trigger_once_and_scales_from_zero() -> None:
    modifiers = scaled_spec()["advanced"]["scalingModifiers"]
    terms = formula_terms(modifiers["formula"])
    lag, _ = lag_and_pending()
    assert sorted(name for name, _ in terms) == sorted(triggers()), "each trigger exactly once"
    assert {name for name, clamped in terms if clamped} == {t["name"] for t in lag}, "lags (only) clamped at 0"
    # KEDA's fallback wants an integer target with scalingModifiers, and an AverageValue metric
    assert int(modifiers["target"]) >= 1 and modifiers["metricType"] == "AverageValue"
    assert modifiers["activationTarget"] == "0" and scaled_spec()["minReplicaCount"] == 0
    assert "fallback" in scaled_spec()


def test_keda_wakes_sums_partitions_and_adds_workers_when_they_are_full() -> None:
    """The formula evaluated as KEDA does, the HPA's ceil(metric / target) after it."""
    spec = scaled_spec()
    lag, pending = lag_and_pending()
    target, most = int(spec["advanced"]["scalingModifiers"]["target"]), spec["maxReplicaCount"]

    def replicas(lags: list[int], in_flight: list[int]) -> int:
        values = {t["name"]: v for t, v in zip(lag, lags, strict=True)}
        values.update({t["name"]: v for t, v in zip(pending, in_flight, strict=True)})
        return keda_replicas(spec, values)

    n = len(lag)
    assert replicas([0] * n, [0] * n) == 0, "idle: zero workers"
    assert replicas([0] * (n - 1) + [1], [0] * n) == 1, "the first undelivered step, in any partition, wakes one"
    assert replicas([0] * n, [0] * (n - 1) + [1]) == 1, "a step still running keeps one"
    # 10 queued in each partition: the sum asks for ceil(160 / 12) = 14 workers, where KEDA's
    # max over the triggers would have seen 10 steps, one worker
    assert replicas([10] * n, [0] * n) == math.ceil(10 * n / target) > max(math.ceil(10 / target), 1)
    # Redis cannot tell the lags (NULL: -1 to KEDA); the one it can still wakes a worker
    assert replicas([-1] * (n - 1) + [1], [0] * n) == 1
    # 3 workers full (16 steps each in flight) while the lag is unknown: a 4th is asked for
    concurrency = worker_concurrency()
    in_flight = [3 * concurrency // n + (1 if p < 3 * concurrency % n else 0) for p in range(n)]
    assert sum(in_flight) == 3 * concurrency and replicas([-1] * n, in_flight) == 4
    assert replicas([1000] * n, [0] * n) == most, "no more than maxReplicaCount"


def worker_concurrency() -> int:
    args = container("orchestrator-worker")["args"]
    return int(args[args.index("--concurrency") + 1])


def test_the_target_is_below_a_workers_concurrency() -> None:
    # so that full workers ask for more also while Redis cannot tell the lag
    assert int(scaled_spec()["advanced"]["scalingModifiers"]["target"]) < worker_concurrency()


def test_keda_reaches_the_redis_the_workers_use() -> None:
    url = urlsplit(redis_url())
    secret = k8s_find("Secret", "orchestrator-redis")["stringData"]
    auth = {r["parameter"] for r in k8s_find("TriggerAuthentication", "orchestrator-redis")["spec"]["secretTargetRef"]}
    for trigger in triggers().values():
        meta = trigger["metadata"]
        assert meta["address"] == f"{url.hostname}:{url.port or 6379}"
        assert "." in (url.hostname or ""), "KEDA resolves the address from its own namespace: use a qualified name"
        assert int(meta.get("databaseIndex", "0")) == int(url.path.strip("/") or 0)
        tls = meta.get("enableTLS", "false") == "true" or "tls" in auth
        assert tls == (url.scheme == "rediss")
    assert url.password == secret["REDIS_PASSWORD"] == "CHANGE-ME", "placeholders, documented in secret.yaml"


def test_the_readme_creates_the_consumer_group_of_every_stream_keda_reads() -> None:
    (line,) = [line for line in readme_block("orchestrator keda").splitlines() if line.startswith("orchestrator keda")]
    command, _, pipe = line.partition(" | ")
    assert pipe.startswith("redis-cli ")
    namespace, partitions = layout()
    assert (shared_option(command, "--namespace"), int(shared_option(command, "--partitions"))) == layout()
    output, _ = orchestrator_keda(command)
    streams = [t["metadata"]["stream"] for t in lag_and_pending()[0]]
    # the same command the workers run at start: from id 0, creating the stream if need be
    assert output.splitlines() == [f'XGROUP CREATE "{stream}" {GROUP} 0 MKSTREAM' for stream in streams]
    assert Keys(namespace, partitions).streams("default") == streams


def readme_block(first_line: str) -> str:
    """The fenced code block of deploy/README.md that starts with ``first_line``."""
    readme = (DEPLOY / "README.md").read_text()
    for block in re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", readme, re.M | re.S):
        text = textwrap.dedent(block)
        if text.startswith(first_line):
            return text
    raise AssertionError(f"no code block starting with {first_line!r} in deploy/README.md")


def test_the_readme_overlay_sets_the_image_the_workflows_the_secret_and_keda_address(tmp_path: Path) -> None:
    shutil.copytree(K8S, tmp_path / "deploy" / "k8s")
    overlay = tmp_path / "my-deploy"
    overlay.mkdir()
    kustomization = readme_block("# my-deploy/kustomization.yaml")
    (overlay / "kustomization.yaml").write_text(kustomization)
    # KEDA's patch, made by the command its comment gives
    (line,) = re.findall(r"^\s*#\s+(orchestrator keda .*)$", kustomization, re.M)
    assert (shared_option(line, "--namespace"), int(shared_option(line, "--partitions"))) == layout()
    patch, path = orchestrator_keda(line)
    assert path.startswith("my-deploy/") and f"path: {path.removeprefix('my-deploy/')}" in kustomization
    (tmp_path / path).write_text(patch)
    # the redis.env its comment describes
    env_lines = re.findall(r"^\s*#\s+(REDIS_(?:URL|PASSWORD)=\S+)$", kustomization, re.M)
    (overlay / "redis.env").write_text("\n".join(env_lines) + "\n")
    docs = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(overlay)}

    secret = {k: base64.b64decode(v).decode() for k, v in docs["Secret", "orchestrator-redis"]["data"].items()}
    assert secret == dict(line.split("=", 1) for line in env_lines) and "CHANGE-ME" not in str(secret)
    auth = docs["TriggerAuthentication", "orchestrator-redis"]
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == {"orchestrator-redis"}
    url = urlsplit(secret["REDIS_URL"])
    assert url.password == secret["REDIS_PASSWORD"]
    spec = docs["ScaledObject", "orchestrator-worker"]["spec"]
    assert spec["advanced"]["scalingModifiers"] == scaled_spec()["advanced"]["scalingModifiers"]
    assert len(spec["triggers"]) == len(scaled_spec()["triggers"])
    for trigger, base in zip(spec["triggers"], scaled_spec()["triggers"], strict=True):
        assert trigger["metadata"]["address"] == f"{url.hostname}:{url.port}"
        assert {**trigger["metadata"], "address": ""} == {**base["metadata"], "address": ""}
    for name in DEPLOYMENTS:
        (c,) = docs["Deployment", name]["spec"]["template"]["spec"]["containers"]
        assert c["image"] == "REGISTRY/orchestrator:0.1.0"
    (worker,) = docs["Deployment", "orchestrator-worker"]["spec"]["template"]["spec"]["containers"]
    assert worker["args"] == ["worker", "myapp.flows:research", "--concurrency", "16"]
