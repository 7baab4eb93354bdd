"""Reading the files of deploy/ the way their tools do: compose, Kubernetes manifests, settings."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from orchestrator.cli import cli
from orchestrator.embedded import find_redis_server
from orchestrator.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CLUSTER = DEPLOY / "compose.cluster.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
K8S = DEPLOY / "k8s"
SETTINGS_PREFIX = "ORCHESTRATOR_"

_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<colon>:?)(?P<op>[-?])(?P<arg>[^}]*))?\}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


@cache
def compose_cluster() -> dict[str, Any]:
    """deploy/compose.cluster.yaml, the stack on a Redis Cluster."""
    data: dict[str, Any] = load_yaml(COMPOSE_CLUSTER)
    return data


class MissingVariable(KeyError):
    """A ``${VAR:?message}`` whose variable is unset or empty: compose refuses to start."""


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's interpolation with an empty environment unless given: ``${VAR}``,
    ``${VAR:-default}`` / ``${VAR-default}``, ``${VAR:?message}`` / ``${VAR?message}`` (an error
    when unset, with ``:`` also when empty), and ``$$`` for a literal ``$``."""
    env = env or {}

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, value = m["name"], env.get(m["name"])
        missing = value is None or (m["colon"] == ":" and value == "")
        if m["op"] == "?" and missing:
            raise MissingVariable(f"{name}: {m['arg']}")
        if m["op"] == "-" and missing:
            return str(m["arg"])
        return value or ""

    return _INTERPOLATION.sub(repl, value)


def duration_s(value: str) -> float:
    """A compose duration (``45s``, ``1m30s``) in seconds."""
    parts = _DURATION.findall(value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a compose duration: {value!r}"
    return sum(float(n) * _DURATION_S[u] for n, u in parts)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's ``environment`` (map or list form) as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def k8s_files() -> list[Path]:
    """The manifests the kustomization lists, in its order."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return [K8S / name for name in kustomization["resources"]]


def k8s_documents() -> list[dict[str, Any]]:
    """Every resource of the kustomization, with its namespace applied as kustomize does."""
    namespace = load_yaml(K8S / "kustomization.yaml").get("namespace")
    docs = [doc for path in k8s_files() for doc in load_all(path)]
    for doc in docs:
        if namespace and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
    return docs


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The environment the first container of ``deployment`` gets: envFrom ConfigMaps, then env,
    with secretKeyRef / configMapKeyRef resolved from the manifests of deploy/k8s."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(k8s_find("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            secret = k8s_find("Secret", ref["secretKeyRef"]["name"])
            env[item["name"]] = secret.get("stringData", {})[ref["secretKeyRef"]["key"]]
        else:
            cm = k8s_find("ConfigMap", ref["configMapKeyRef"]["name"])
            env[item["name"]] = cm["data"][ref["configMapKeyRef"]["key"]]
    return env


def plain(value: object) -> object:
    """A setting's value, with a secret's revealed (``SecretStr``), to compare with what was set."""
    reveal = getattr(value, "get_secret_value", None)
    return reveal() if callable(reveal) else value


def clean_environ() -> dict[str, str]:
    """This process's environment without any orchestrator setting or Redis URL."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIX) and k != "REDIS_URL"}


def redis_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    assert match, f"cannot read the version of {binary}: {out!r}"
    return tuple(int(part) for part in match.groups())


@cache
def redis_binaries() -> dict[str, tuple[int, ...]]:
    """Every distinct redis-server here (the one orchestrator uses, any on PATH, Debian's), by version."""
    candidates: list[str] = []
    with contextlib.suppress(ConfigError):
        candidates.append(find_redis_server())
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("redis-server", path=folder)
        if found:
            candidates.append(found)
    candidates += ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    versions: dict[str, tuple[int, ...]] = {}
    for path in candidates:
        if Path(path).exists() and os.access(path, os.X_OK):
            version = redis_version(path)
            if version not in versions.values():
                versions[path] = version
    return versions


def redis_7_binary() -> str | None:
    return next((path for path, version in redis_binaries().items() if version >= (7,)), None)


# -- KEDA: what its scalingModifiers and the HPA do with the triggers' values ------------------

_LAG_TERM = re.compile(r"^\((?P<name>[A-Za-z_][A-Za-z0-9_]*) > 0 \? (?P=name) : 0\)$")
_NAME_TERM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def formula_terms(formula: str) -> list[tuple[str, bool]]:
    """The terms of a scalingModifiers formula of the form this project generates: a sum of
    ``name`` and ``(name > 0 ? name : 0)`` terms, as (trigger name, clamped at 0). Anything
    else fails, so that a change of the formula's shape is seen here first."""
    terms = []
    for term in formula.split(" + "):
        clamped = _LAG_TERM.match(term)
        if clamped:
            terms.append((clamped["name"], True))
        else:
            assert _NAME_TERM.match(term), f"a term this simulation does not know: {term!r}"
            terms.append((term, False))
    return terms


def formula_value(formula: str, values: Mapping[str, float]) -> float:
    """The formula evaluated as expr-lang does for KEDA, every trigger's value given (KEDA
    cannot evaluate it, and fails the composite metric, while a trigger has no value)."""
    terms = formula_terms(formula)
    assert {name for name, _ in terms} == set(values), "every trigger, and only those, has a value"
    return float(sum(max(values[name], 0) if clamped else values[name] for name, clamped in terms))


def keda_replicas(spec: dict[str, Any], values: Mapping[str, float]) -> int:
    """The worker replicas KEDA and its HPA settle on for the triggers' ``values``: 0 while the
    formula is at or below ``activationTarget`` (after the cooldown), else ``ceil(formula /
    target)`` (an AverageValue target) within ``minReplicaCount`` (at least 1: KEDA activated
    it) and ``maxReplicaCount``."""
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers.get("metricType", "AverageValue") == "AverageValue"
    value = formula_value(modifiers["formula"], values)
    lowest = spec.get("minReplicaCount", 0)
    if value <= float(modifiers.get("activationTarget", "0")) and lowest == 0:
        return 0
    wanted = math.ceil(value / float(modifiers["target"]))
    return int(min(max(wanted, lowest, 1), spec.get("maxReplicaCount", 100)))


def keda_lag(xinfo_lag: int | None) -> int:
    """A lag as KEDA's scaler gets it from go-redis: NULL (Redis cannot tell) reads as -1."""
    return -1 if xinfo_lag is None else xinfo_lag


def orchestrator_keda(line: str) -> tuple[str, str]:
    """Run a documented ``orchestrator keda ...`` command line (in-process, with no
    ``ORCHESTRATOR_*`` variable of this process): its output, and the file it is redirected to
    (``> path``), if any."""
    args = shlex.split(line)
    target = ""
    if ">" in args:
        target = args[args.index(">") + 1]
        args = args[: args.index(">")]
    assert args[:2] == ["orchestrator", "keda"], line
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith(SETTINGS_PREFIX)}
    result = CliRunner().invoke(cli, args[1:], env=unset, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout, target


def shared_option(line: str, option: str) -> str:
    """The value of ``--option VALUE`` in a documented command line."""
    args = shlex.split(line)
    assert option in args, f"{option} not given in {line!r}"
    return args[args.index(option) + 1]
