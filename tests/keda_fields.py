"""The trigger metadata KEDA documents for its Redis stream scalers: the manifests' checks
(tests/deploy/test_k8s.py) and the generator's (tests/unit/test_keda.py) use the same lists."""

from __future__ import annotations

# What KEDA's two Redis stream scalers share: credentials, the stream, the modes, TLS.
_SHARED = {
    "usernameFromEnv",
    "passwordFromEnv",
    "stream",
    "consumerGroup",
    "pendingEntriesCount",
    "streamLength",
    "lagCount",
    "activationLagCount",
    "enableTLS",
    "unsafeSsl",
}
# Trigger metadata of KEDA's redis-streams scaler (https://keda.sh/docs/latest/scalers/redis-streams/).
REDIS_STREAMS_METADATA = _SHARED | {"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv"}
REDIS_STREAMS_METADATA |= {"databaseIndex"}
# The same for redis-cluster-streams (https://keda.sh/docs/2.13/scalers/redis-cluster-streams/):
# `addresses` of the cluster's nodes, and no database index.
REDIS_CLUSTER_STREAMS_METADATA = _SHARED | {
    "addresses",
    "hosts",
    "ports",
    "addressesFromEnv",
    "hostsFromEnv",
    "portsFromEnv",
}
