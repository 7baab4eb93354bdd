"""One Redis, two kinds of client: ours decodes replies to ``str``, RQ's must not (it stores
compressed bytes). Each is made from the other's pool settings (host, TLS, password, Sentinel
service), so an RQ job reaches the Redis its worker read it from, and a worker enqueues on the
Redis it runs on. RQ does not support Redis Cluster: a cluster client is refused here, once,
with the reason."""

from __future__ import annotations

import redis
from redis.sentinel import SentinelConnectionPool

from orchestrator.connection import is_cluster
from orchestrator.errors import ConfigError

# what redis-py (8.x) keeps in a pool's connection kwargs for that pool alone: a new pool makes its own
POOL_BOUND = frozenset({"maint_notifications_pool_handler", "himport_registry", "connection_pool"})


class RQOnClusterRefused(ConfigError):
    """RQ keeps a job in keys of different hash slots: it cannot run on a Redis Cluster."""


def _recoded(client: redis.Redis, decode: bool, what: str) -> redis.Redis:
    if is_cluster(client):
        raise RQOnClusterRefused(
            f"{what}: RQ does not support Redis Cluster (a job's keys span hash slots); run the steps "
            "with executor=RQ(...) and the RQ workers on a single Redis or Sentinel deployment"
        )
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in POOL_BOUND and not k.startswith("orig_")}
    kwargs["decode_responses"] = decode
    if isinstance(pool, SentinelConnectionPool):
        same = SentinelConnectionPool(pool.service_name, pool.sentinel_manager, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        return redis.Redis(connection_pool=same)
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


def decoded_client(rq_connection: redis.Redis) -> redis.Redis:
    """Our kind of client (``decode_responses=True``) on the Redis of an RQ connection."""
    return _recoded(rq_connection, True, "a bridged step's RQ job")


def rq_client(client: redis.Redis) -> redis.Redis:
    """RQ's kind of client (bytes replies) on the Redis of one of ours."""
    return _recoded(client, False, "a step with executor=RQ(...)")
