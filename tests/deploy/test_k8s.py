"""deploy/k8s: built-in kinds against Kubernetes' schemas, KEDA's resources against the fields of
its CRDs, and every setting and name against the code that reads it."""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic import TypeAdapter

from orchestrator._version import __version__
from orchestrator.keys import GROUP, Keys
from orchestrator.settings import Settings
from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    SETTINGS_PREFIX,
    compose,
    container_env,
    k8s_documents,
    k8s_files,
    k8s_find,
    plain,
)

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
# Trigger metadata of KEDA's redis-streams scaler (https://keda.sh/docs/latest/scalers/redis-streams/)
# and the parameters its TriggerAuthentication can fill.
REDIS_STREAMS_METADATA = {
    "address",
    "host",
    "port",
    "addressFromEnv",
    "hostFromEnv",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "stream",
    "consumerGroup",
    "pendingEntriesCount",
    "streamLength",
    "lagCount",
    "activationLagCount",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
}
REDIS_STREAMS_AUTH_PARAMETERS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword"}


def builtin_documents() -> list[dict[str, Any]]:
    return [d for d in k8s_documents() if d["apiVersion"] != KEDA_API]


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = k8s_find("Deployment", name)["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    found: dict[str, Any] = pod_spec(name)["containers"][0]
    return found


def triggers() -> dict[str, dict[str, Any]]:
    scaled = k8s_find("ScaledObject", "orchestrator-worker")
    return {t["name"]: t for t in scaled["spec"]["triggers"]}


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


def test_keda_scales_the_worker_deployment_on_its_real_stream_and_group() -> None:
    scaled = k8s_find("ScaledObject", "orchestrator-worker")["spec"]
    target = scaled["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    k8s_find("Deployment", target["name"])
    namespace = k8s_find("ConfigMap", "orchestrator-config")["data"].get("ORCHESTRATOR_NAMESPACE", "orch")
    assert len(triggers()) == 2
    for trigger in triggers().values():
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert set(meta) <= REDIS_STREAMS_METADATA, set(meta) - REDIS_STREAMS_METADATA
        assert meta["stream"] == Keys(namespace).queue("default").stream == "orch:queue:{default}"
        assert meta["consumerGroup"] == GROUP
        assert "password" not in meta and "passwordFromEnv" not in meta, "the password comes from the Secret"
        auth = k8s_find("TriggerAuthentication", trigger["authenticationRef"]["name"])
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["parameter"] in REDIS_STREAMS_AUTH_PARAMETERS
            assert ref["key"] in k8s_find("Secret", ref["name"])["stringData"]


def test_lag_wakes_workers_from_zero_and_pending_keeps_them_while_steps_run() -> None:
    lag, pending = triggers()["undelivered-steps"]["metadata"], triggers()["steps-in-flight"]["metadata"]
    # KEDA picks the mode by key: lagCount makes a lag trigger (and then requires activationLagCount)
    assert int(lag["lagCount"]) >= 1 and int(lag["activationLagCount"]) == 0
    assert "pendingEntriesCount" not in lag and "streamLength" not in lag
    assert int(pending["pendingEntriesCount"]) >= 1
    assert not {"lagCount", "activationLagCount", "streamLength"} & set(pending), "it would become a lag trigger"
    assert k8s_find("ScaledObject", "orchestrator-worker")["spec"]["minReplicaCount"] == 0
    # below a worker's concurrency, so that full workers ask for more even while the lag is unknown
    args = container("orchestrator-worker")["args"]
    concurrency = int(args[args.index("--concurrency") + 1])
    assert int(pending["pendingEntriesCount"]) < concurrency


def test_keda_reaches_the_redis_the_workers_use() -> None:
    url = urlsplit(redis_url())
    secret = k8s_find("Secret", "orchestrator-redis")["stringData"]
    for trigger in triggers().values():
        meta = trigger["metadata"]
        assert meta["address"] == f"{url.hostname}:{url.port or 6379}"
        assert "." in (url.hostname or ""), "KEDA resolves the address from its own namespace: use a qualified name"
        assert int(meta.get("databaseIndex", "0")) == int(url.path.strip("/") or 0)
        assert (meta.get("enableTLS", "false") == "true") == (url.scheme == "rediss")
    assert url.password == secret["REDIS_PASSWORD"] == "CHANGE-ME", "placeholders, documented in secret.yaml"


def test_the_readme_tells_how_to_create_the_consumer_group_for_scale_from_zero() -> None:
    readme = (DEPLOY / "README.md").read_text()
    stream = triggers()["undelivered-steps"]["metadata"]["stream"]
    # the same command the workers run at start: from id 0, creating the stream if need be
    assert f"XGROUP CREATE '{stream}' {GROUP} 0 MKSTREAM" in readme


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
    for trigger in docs["ScaledObject", "orchestrator-worker"]["spec"]["triggers"]:
        assert trigger["metadata"]["address"] == f"{url.hostname}:{url.port}"
    for name in DEPLOYMENTS:
        (c,) = docs["Deployment", name]["spec"]["template"]["spec"]["containers"]
        assert c["image"] == "REGISTRY/orchestrator:0.1.0"
    (worker,) = docs["Deployment", "orchestrator-worker"]["spec"]["template"]["spec"]["containers"]
    assert worker["args"] == ["worker", "myapp.flows:research", "--concurrency", "16"]
