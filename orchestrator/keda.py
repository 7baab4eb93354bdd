"""KEDA autoscaling of the workers: the ScaledObject's triggers and ``scalingModifiers`` for a
namespace's partitioned queues, and the manifest, kustomize patch and group commands that
``orchestrator keda`` prints. Pure: no Redis connection, no YAML library (the output is written
here, and tests/deploy reads it back with PyYAML and pins deploy/k8s/keda.yaml to it).

A queue is one stream per partition (:meth:`orchestrator.keys.Keys.streams`), each read by the
consumer group ``workers``. Per stream there are two triggers of KEDA's ``redis-streams`` scaler
(``redis-cluster-streams`` on a Redis Cluster):

- ``lagNN``: ``lagCount``, the group's lag (``XINFO GROUPS``; Redis >= 7): entries not yet
  delivered. The only signal with zero workers, so what wakes the Deployment from zero.
- ``pendingNN``: ``pendingEntriesCount`` (``XPENDING``): delivered and not yet acknowledged,
  i.e. steps in flight; it keeps workers while long steps run (the lag is 0 then).

KEDA's HPA scales to the largest value over a ScaledObject's triggers, not their sum
(https://keda.sh/docs/latest/faq): 16 partitions with 10 queued steps each would look like 10
steps. ``advanced.scalingModifiers`` (KEDA >= 2.13) turns the triggers into one composite
metric: ``formula`` (an expr-lang expression over the triggers' names) adds them up, the HPA
scales to ``ceil(formula / target)`` replicas (``metricType: AverageValue``), and KEDA
activates the Deployment from zero when the formula exceeds ``activationTarget``
(https://keda.sh/docs/2.13/concepts/scaling-deployments/, "scalingModifiers"). A lag Redis
cannot compute (``XINFO GROUPS`` gives NULL; go-redis, KEDA's client, reads that as -1 or 0)
counts as 0: the formula takes ``(lagNN > 0 ? lagNN : 0)``, not ``lagNN``.

Each trigger keeps a ``lagCount`` / ``pendingEntriesCount`` of its own: KEDA's scaler picks its
mode by them (a non-zero ``lagCount`` makes a lag trigger, else ``pendingEntriesCount`` a
pending one), but with ``scalingModifiers`` the HPA sees only the composite metric and its
target. They are set to the target, which is what they mean if the modifiers are ever removed.
"""

from __future__ import annotations

import json
import re
import shlex
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ConfigError
from orchestrator.keys import GROUP, MAX_PARTITIONS, QUEUE_PATTERN, Keys
from orchestrator.settings import NAME_PATTERN

AUTHENTICATION = "orchestrator-redis"  # the TriggerAuthentication of deploy/k8s/keda.yaml
SCALED_OBJECT = "orchestrator-worker"  # and the ScaledObject, named after the Deployment it scales
DEFAULT_TARGET = 12  # steps (undelivered + in flight) per worker; below deploy/k8s's --concurrency 16
DEFAULT_ADDRESS = "redis.orchestrator.svc.cluster.local:6379"  # deploy/k8s's placeholder
STANDALONE, CLUSTER = "redis-streams", "redis-cluster-streams"
_ADDRESS = re.compile(r"^(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_./-]*$")  # strings YAML reads back as the same string
_NOT_PLAIN = frozenset({"true", "false", "yes", "no", "on", "off", "null", "y", "n"})
_WIDTH = 96


@dataclass(frozen=True)
class KedaScaling:
    """What ``orchestrator keda`` was asked for; builds the triggers, modifiers and texts."""

    namespace: str
    partitions: int
    queues: tuple[str, ...]
    addresses: tuple[str, ...]
    target: int = DEFAULT_TARGET
    activation_target: int = 0
    cluster: bool = False
    database: int = 0

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise ConfigError(problem)

    # -- the data -------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        """The trigger names of one kind (``lag`` or ``pending``), queue by queue, in partition
        order. Numbers are zero-padded to one width so that no name is a prefix of another."""
        width = len(str(self.partitions - 1))
        qwidth = len(str(len(self.queues) - 1))
        suffixes = [""] if len(self.queues) == 1 else [f"q{k:0{qwidth}d}" for k in range(len(self.queues))]
        return [f"{kind}{p:0{width}d}{suffix}" for suffix in suffixes for p in range(self.partitions)]

    def streams(self) -> list[str]:
        """The streams the triggers read, in the order of :meth:`names`."""
        keys = Keys(self.namespace, self.partitions)
        return [stream for queue in self.queues for stream in keys.streams(queue)]

    def triggers(self) -> list[dict[str, Any]]:
        """The ScaledObject's ``spec.triggers``: every lag trigger, then every pending trigger.
        Every metadata value is a string, as KEDA's CRD requires."""
        kind = CLUSTER if self.cluster else STANDALONE
        where = {"addresses": ",".join(self.addresses)} if self.cluster else {"address": self.addresses[0]}
        if not self.cluster:  # a Redis Cluster has database 0 only; KEDA's cluster scaler takes no index
            where["databaseIndex"] = str(self.database)
        modes = {
            "lag": {"lagCount": str(self.target), "activationLagCount": "0"},
            "pending": {"pendingEntriesCount": str(self.target)},
        }
        return [
            {
                "type": kind,
                "name": name,
                "metadata": {**where, "stream": stream, "consumerGroup": GROUP, **mode},
                "authenticationRef": {"name": AUTHENTICATION},
            }
            for kind_name, mode in modes.items()
            for name, stream in zip(self.names(kind_name), self.streams(), strict=True)
        ]

    def formula(self) -> str:
        """The sum of every trigger's value, each lag taken as 0 when KEDA reads it negative."""
        lags = [f"({name} > 0 ? {name} : 0)" for name in self.names("lag")]
        return " + ".join(lags + self.names("pending"))

    def scaling_modifiers(self) -> dict[str, str]:
        """The ScaledObject's ``spec.advanced.scalingModifiers``."""
        return {
            "formula": self.formula(),
            "target": str(self.target),
            "activationTarget": str(self.activation_target),
            "metricType": "AverageValue",
        }

    # -- the texts ------------------------------------------------------------------------

    def command(self, what: str = "manifest") -> str:
        """The ``orchestrator keda`` command line that prints this (``what``) again."""
        args = ["orchestrator", "keda", "--namespace", self.namespace, "--partitions", str(self.partitions)]
        for queue in self.queues:
            args += ["--queue", queue]
        if what != "groups":
            args += ["--cluster"] if self.cluster else []
            for address in self.addresses:
                args += ["--address", address]
            args += ["--target", str(self.target)]
            args += ["--database", str(self.database)] if self.database else []
        args += ["--print", what] if what != "manifest" else []
        return shlex.join(args)

    def manifest(self) -> str:
        """deploy/k8s/keda.yaml: the TriggerAuthentication and the worker's ScaledObject."""
        header = _MANIFEST_HEADER.format(
            command=self.command(),
            kind=CLUSTER if self.cluster else STANDALONE,
            count=len(self.streams()),
            triggers=2 * len(self.streams()),
            target=self.target,
            activation=self.activation_target,
        )
        spec = _SCALED_OBJECT.format(
            triggers="\n".join(to_yaml(self.triggers(), 4)),
            modifiers="\n".join(to_yaml(self.scaling_modifiers(), 6)),
        )
        return header + _TRIGGER_AUTHENTICATION + "---\n" + spec

    def patch(self) -> str:
        """A kustomize (JSON 6902) patch of deploy/k8s's ScaledObject with these triggers."""
        ops = [
            {"op": "replace", "path": "/spec/triggers", "value": self.triggers()},
            {"op": "replace", "path": "/spec/advanced/scalingModifiers", "value": self.scaling_modifiers()},
        ]
        head = (
            f"# KEDA triggers for {len(self.queues)} queue(s) x {self.partitions} partitions of namespace "
            f"{self.namespace!r}: a kustomize patch\n# of the ScaledObject {SCALED_OBJECT} (deploy/k8s/keda.yaml), "
            f"made by\n#   {self.command('patch')}\n"
        )
        return head + "\n".join(to_yaml(ops, 0)) + "\n"

    def group_commands(self) -> str:
        """``XGROUP CREATE`` for every stream, for ``redis-cli``: what workers and supervisors do
        at start, from id 0 so that runs submitted before the group existed are not skipped.
        ``BUSYGROUP`` in reply means that group exists already."""
        return "".join(f"XGROUP CREATE {json.dumps(stream)} {GROUP} 0 MKSTREAM\n" for stream in self.streams())


def keda_scaling(
    namespace: str,
    partitions: int,
    queues: str | Sequence[str],
    addresses: str | Sequence[str],
    *,
    target: int = DEFAULT_TARGET,
    activation_target: int = 0,
    cluster: bool = False,
    database: int = 0,
) -> dict[str, Any]:
    """``{"triggers": [...], "scalingModifiers": {...}}`` for a ScaledObject's ``spec.triggers``
    and ``spec.advanced.scalingModifiers``; raises :class:`ConfigError` for invalid input."""
    scaling = KedaScaling(
        namespace,
        partitions,
        (queues,) if isinstance(queues, str) else tuple(queues),
        (addresses,) if isinstance(addresses, str) else tuple(addresses),
        target=target,
        activation_target=activation_target,
        cluster=cluster,
        database=database,
    )
    return {"triggers": scaling.triggers(), "scalingModifiers": scaling.scaling_modifiers()}


def _problem(s: KedaScaling) -> str | None:  # noqa: C901 - one check a line
    if not NAME_PATTERN.match(s.namespace):
        return f"namespace {s.namespace!r} is invalid: expected 1-64 characters of A-Z a-z 0-9 _ . -"
    if not 1 <= s.partitions <= MAX_PARTITIONS:
        return f"partitions must be 1..{MAX_PARTITIONS}, not {s.partitions}"
    if not s.queues:
        return "give at least one queue"
    for queue in s.queues:
        if not QUEUE_PATTERN.match(queue):
            return f"queue {queue!r} is invalid: expected 1-100 characters of A-Z a-z 0-9 _ . : -"
    if len(set(s.queues)) != len(s.queues):
        return "a queue is given twice"
    if not s.addresses:
        return "give Redis' address as HOST:PORT (--address), as KEDA reaches it from its own namespace"
    for address in s.addresses:
        match = _ADDRESS.match(address)
        if not match or not 1 <= int(match["port"]) <= 65535:
            return f"address {address!r} is invalid: expected HOST:PORT, e.g. {DEFAULT_ADDRESS}"
    if len(s.addresses) > 1 and not s.cluster:
        return "several addresses are for a Redis Cluster (--cluster); a single server has one"
    if s.cluster and s.database:
        return "a Redis Cluster has database 0 only"
    if s.database < 0:
        return f"database must be 0 or more, not {s.database}"
    if s.target < 1:  # KEDA's fallback needs an integer target > 0 with scalingModifiers
        return f"target must be a whole number of steps per worker, 1 or more, not {s.target}"
    if s.activation_target < 0:
        return f"activation target must be 0 or more, not {s.activation_target}"
    return None


# -- YAML -------------------------------------------------------------------------------


def scalar(value: str | int | bool) -> str:
    """One YAML scalar that reads back as ``value``: strings plain when that is safe, else
    double-quoted (JSON's escapes are a subset of YAML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if _PLAIN.match(value) and value.lower() not in _NOT_PLAIN:
        return value
    return json.dumps(value)


def to_yaml(value: Any, indent: int) -> list[str]:
    """Block-style YAML lines of dicts, lists and scalars (no anchors, no flow style). A long
    string with spaces is written folded (``>-``), which reads back with single spaces."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list):
                lines.append(f"{pad}{key}:")
                lines += to_yaml(item, indent + 2)
            elif isinstance(item, str) and len(item) > _WIDTH - indent and " " in item:
                lines.append(f"{pad}{key}: >-")
                lines += [f"{pad}  {line}" for line in _fold(item, max(_WIDTH - indent - 2, 40))]
            else:
                lines.append(f"{pad}{key}: {scalar(item)}")
        return lines
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list):
                inner = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {inner[0][indent + 2 :]}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {scalar(item)}")
        return lines
    return [f"{pad}{scalar(value)}"]


def _fold(text: str, width: int) -> list[str]:
    """Lines for a folded scalar: breaks after a `` + `` where there is one (a formula's terms
    stay whole), else between words; folding joins them again with single spaces."""
    if " + " not in text:
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)
    lines: list[str] = []
    for term in text.split(" + "):
        if lines and len(lines[-1]) + len(term) + 3 <= width:
            lines[-1] += f" + {term}"
        elif lines:
            lines[-1] += " +"
            lines.append(term)
        else:
            lines.append(term)
    return lines


_MANIFEST_HEADER = """\
# Autoscaling of the workers with KEDA (>= 2.13). GENERATED: do not edit; made by
#
#   {command}
#
# from orchestrator/keda.py. Run it again (into this file, or with `--print patch` for an
# overlay) whenever the namespace or its partition count change (ORCHESTRATOR_NAMESPACE and
# ORCHESTRATOR_PARTITIONS, configmap.yaml), or the queues the workers read, Redis' address or
# the target; tests/deploy/test_k8s.py fails while this file differs from that output.
#
# How it scales. A queue is one stream per partition ({count} streams here),
# `<namespace>:queue:{{<partition tag>}}:<queue>`, each read by the consumer group `workers`.
# Each stream has two triggers of KEDA's {kind} scaler:
#   - lagNN: entries not yet delivered to any worker (XINFO GROUPS lag; Redis >= 7). The only
#     signal there is with zero workers, so what wakes the Deployment from zero.
#   - pendingNN: entries delivered and not yet acknowledged (XPENDING), i.e. steps in flight.
#     It keeps workers while long steps run (the lag is 0 then).
# KEDA's HPA would scale to the largest of these {triggers} values, one stream's share of the work;
# advanced.scalingModifiers makes one metric of their sum instead (`formula`, every lag counted
# as 0 when Redis cannot tell it: XINFO GROUPS gives NULL, which KEDA's client reads as -1 or
# 0), and KEDA asks for ceil(sum / {target}) workers (`target`), waking the Deployment as soon as
# the sum exceeds {activation} (`activationTarget`: the first undelivered step does). The target
# stays below a worker's --concurrency (16, worker.yaml), so that full workers ask for more
# also while Redis cannot tell the lag (XINFO GROUPS gives NULL after some deletions of
# entries: Redis 7 reports no lag when it cannot count past them). A trigger's own lagCount or
# pendingEntriesCount only selects its mode (a non-zero lagCount makes a lag trigger): the HPA
# sees the composite metric alone. Retries waiting out a backoff are in a delayed set, not in
# the streams; the supervisors (never scaled to zero) move them to the streams when due.
#
# The consumer groups must exist when KEDA polls (an older KEDA fails on a missing one and then
# holds fallback.replicas workers): workers and the leading supervisor create them, and on a
# fresh Redis `orchestrator keda --print groups | redis-cli` does (`redis-cli -c` on a Redis
# Cluster; deploy/README.md).
#
# Credentials: the TriggerAuthentication below passes a password only, which Redis checks as
# its `default` user. For a Redis ACL user of KEDA's own (read-only, the queue streams only: the
# `orch-keda` line of docs/security.md), add components/redis-acl to your overlay; for TLS
# (the CA, and a client certificate for mutual TLS), components/redis-tls. Both are kustomize
# components in this folder; docs/security.md shows an overlay with the two.
"""

_TRIGGER_AUTHENTICATION = """\
apiVersion: keda.sh/v1alpha1
kind: TriggerAuthentication
metadata:
  name: orchestrator-redis
  labels:
    app.kubernetes.io/name: orchestrator
    app.kubernetes.io/part-of: orchestrator
spec:
  secretTargetRef:
    - parameter: password
      name: orchestrator-redis
      key: REDIS_PASSWORD
"""

_SCALED_OBJECT = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: orchestrator-worker
  labels:
    app.kubernetes.io/name: orchestrator
    app.kubernetes.io/component: worker
    app.kubernetes.io/part-of: orchestrator
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: orchestrator-worker
  pollingInterval: 5
  # after the last queued or running step, stay up this long before going to zero
  cooldownPeriod: 120
  minReplicaCount: 0
  maxReplicaCount: 20
  # if Redis cannot be read 3 times in a row, hold 2 workers rather than guessing
  fallback:
    failureThreshold: 3
    replicas: 2
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        scaleDown:
          # scale down gently: every removed worker drains (up to 30 s) and hands back the rest
          stabilizationWindowSeconds: 120
          policies:
            - type: Pods
              value: 2
              periodSeconds: 60
    # one metric for the HPA: the sum over every stream of undelivered and in-flight steps
    scalingModifiers:
{modifiers}
  triggers:
{triggers}
"""
