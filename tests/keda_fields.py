"""The trigger metadata KEDA documents for its Redis stream scalers: the manifests' checks
(tests/deploy/test_k8s.py) and the generator's (tests/unit/test_keda.py) use the same lists."""

from __future__ import annotations

# Trigger metadata of KEDA's redis-streams scaler (https://keda.sh/docs/latest/scalers/redis-streams/).
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
# The same for redis-cluster-streams (https://keda.sh/docs/2.13/scalers/redis-cluster-streams/):
# `addresses` of the cluster's nodes, and no database index.
REDIS_CLUSTER_STREAMS_METADATA = {
    "addresses",
    "hosts",
    "ports",
    "addressesFromEnv",
    "hostsFromEnv",
    "portsFromEnv",
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
