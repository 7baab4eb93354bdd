"""Redis connections from a URL: single server, Redis Cluster, TLS, unix socket or Sentinel; never a
leaked password.

A Redis Cluster is recognised from a plain ``redis://`` or ``rediss://`` URL of any of its nodes,
as KEDA and redis-cli take it: :func:`connect` sends ``EXISTS`` on two keys of different hash
slots (``Keys.cluster_probe``, inside the namespace, so no extra ACL permission), which a single
server answers with 0 and a cluster node with CROSSSLOT; then it returns redis-py's cluster
client, which follows MOVED/ASK and routes every key (and every script, by its keys) to the
node that serves its slot.

TLS is ``rediss://`` (one server) or ``rediss+sentinel://`` (the sentinels and the servers they
name), with redis-py's SSL arguments as query parameters, checked by :mod:`orchestrator.tls`.

Every client retries a command on a dropped connection or timeout. That is safe only because
every write we send is idempotent (scripts check before they write, XACK/XDEL are no-ops the
second time): a write whose reply was lost may have executed, and running it again must not
change the outcome. A refused password is never retried: it would only be refused again.

URLs are checked before any connection is made (:func:`check_url`), and the errors redis-py
raises become errors of the ``OrchestratorError`` tree (:func:`redis_failure`), whose
messages name the server by its redacted URL.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
import redis.cluster
from redis.asyncio import connection as aconnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from orchestrator.errors import ConfigError, OrchestratorError, RedisRefused, RedisUnavailable
from orchestrator.redact import mask, redact_url, secrets_of, split_url
from orchestrator.tls import check_tls_files, tls_options, tls_refused, uses_tls

__all__ = ["redact_url"]  # re-exported: the one way to print a URL

SOCKET_TIMEOUT_S = 30.0  # above any XREADGROUP BLOCK we issue, below "hung forever"
CONNECT_TIMEOUT_S = 5.0
COMMAND_RETRIES = 6  # 0.05 s doubling to 1.6 s: about 3 s of outage bridged per command
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
T = TypeVar("T")
# What talking to Redis can raise: redis-py's errors, the socket's, and the one error of
# redis-py's cluster client that is no RedisError (it cannot read the slot map from any node).
REDIS_FAILURES = (redis.RedisError, OSError, redis.exceptions.RedisClusterException)


# Replies that refuse a command for a passing reason (a failover, memory, a busy script): the
# command did not run, and the same call may succeed a moment later.
_PASSING = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def server_ms(client: redis.Redis) -> int:
    """The Redis server's clock in ms (TIME: a keyless command, so never in a cluster's pipeline)."""
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def outcome_unknown_or_passing(exc: BaseException) -> bool:
    """True when resending the same call is the right answer to ``exc``.

    Either the call may or may not have run (the connection broke, the reply timed out) or it
    was refused for a passing reason. Every call the worker sends is safe to send twice, so a
    resend either does it or reports what the first one did. Any other error (a script that
    refused its arguments, a key of the wrong type) would only happen again.
    """
    if isinstance(exc, redis.ResponseError):
        return isinstance(exc, _PASSING) or str(exc).startswith("BUSY")
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError)


# How an ACL refusal reads: NOPERM at the top level; inside a script, Redis 7.0 words it as "The
# user executing the script can't run this command or subcommand" / "can't access at least one
# of the keys", later versions as a NOPERM error.
_NO_PERMISSION = re.compile(r"NOPERM|no permissions to|user executing the script can't", re.IGNORECASE)


def _without_reprs(text: str) -> str:
    """``text`` with redis-py's ``<redis.client.Redis(<...>)>`` reprs (every connection argument;
    a Sentinel error lists one per sentinel) cut to ``<redis>``."""
    out: list[str] = []
    depth = 0
    for i, char in enumerate(text):
        if char == "<" and (depth or text.startswith("<redis.", i)):
            if not depth:
                out.append("<redis>")
            depth += 1
        elif depth and char == ">":
            depth -= 1
        elif not depth:
            out.append(char)
    return "".join(out)


# What a Redis Cluster node answers a client that is not cluster-aware, as redis-py raises it: a
# key of another node (MOVED, ASK), keys of several slots in one call (CROSSSLOT), a slot on the
# move (TRYAGAIN) or not served (CLUSTERDOWN).
_CLUSTER_REPLIES: dict[type[Exception], str] = {
    redis.exceptions.MovedError: "MOVED",
    redis.exceptions.AskError: "ASK",
    redis.exceptions.ClusterCrossSlotError: "CROSSSLOT",
    redis.exceptions.TryAgainError: "TRYAGAIN",
    redis.exceptions.ClusterDownError: "CLUSTERDOWN",
}


def cluster_reply(exc: BaseException) -> str | None:
    """The reply (``MOVED``, ``CROSSSLOT``...) when ``exc`` (or the reply it was raised from, as
    our scripts module does) is one only a Redis Cluster node gives."""
    for error in (exc, exc.__cause__):
        for kind, word in _CLUSTER_REPLIES.items():
            if isinstance(error, kind):
                return word
    return None


def lacks_permission(exc: BaseException) -> bool:
    """True when Redis refused a command or key for the ACL user, also inside a script."""
    return isinstance(exc, redis.ResponseError) and bool(_NO_PERMISSION.search(str(exc)))


def _slot_map_failure(exc: BaseException, where: str, url: str) -> OrchestratorError:
    """What redis-py's cluster client means by "Redis Cluster cannot be connected": no node let
    it read the slot map. It words a refused ``CLUSTER SLOTS`` as "Cluster mode is not enabled";
    the refusal itself is further down the exception chain."""
    seen: BaseException | None = exc
    for _ in range(6):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if seen is not None and lacks_permission(seen):
            return RedisRefused(
                f"Redis at {where} is a Redis Cluster node, and the URL's user may not read the cluster's "
                f"slot map ({mask(str(seen), secrets_of(url))}): add +cluster|slots to its ACL, on every "
                "node (docs/security.md)"
            )
    detail = mask(str(exc), secrets_of(url))
    return RedisUnavailable(f"cannot use the Redis Cluster at {where}: no node answered with its slot map ({detail})")


def redis_failure(exc: BaseException, url: str) -> OrchestratorError:
    """The error of our tree for an error redis-py (or the socket) raised talking to ``url``.

    A refused password says whether the URL had one at all (Redis's NOAUTH) or had a wrong one
    (WRONGPASS); a missing ACL permission (also inside a script) and a refused TLS handshake say
    what to check. The server is named by its redacted URL, and any password in redis-py's
    message is masked.
    """
    where = redact_url(url) or "(a client given by the caller)"
    detail = mask(_without_reprs(" ".join(str(exc).split()).rstrip(".")), secrets_of(url)) or type(exc).__name__
    if isinstance(exc, redis.exceptions.RedisClusterException):
        return _slot_map_failure(exc, where, url)
    if isinstance(exc, redis.AuthenticationError):
        if not secrets_of(url):
            return RedisRefused(
                f"Redis at {where} asks for a password and the URL has none: put it in the URL "
                "before the host (':PASSWORD@host', or 'USER:PASSWORD@host' for an ACL user)"
            )
        return RedisRefused(
            f"Redis at {where} refused the credentials in the URL ({detail}): check the password "
            "(and the user name, for an ACL user)"
        )
    if reply := cluster_reply(exc):
        return ConfigError(
            f"Redis at {where} is a Redis Cluster node (it answered {reply}), but this process connected "
            "to it as to a single server: the node could not be reached when it connected (run it again), "
            "or the URL's user may not run EXISTS, which recognises a cluster (docs/security.md)"
        )
    if lacks_permission(exc):
        return RedisRefused(
            f"Redis at {where} refused a command: the URL's user lacks a permission ({detail}); give it "
            "the ACL of its role for this namespace (docs/security.md): its keys are ~<namespace>:*"
        )
    if tls_refused(exc):
        return RedisRefused(
            f"Redis at {where} refused the TLS connection ({detail}): check ssl_ca_certs (the CA that "
            "signed the server's certificate), that the certificate is valid for the URL's host (or "
            "ssl_check_hostname=false), and, if the server asks for client certificates, ssl_certfile "
            "and ssl_keyfile (with ssl_password for an encrypted key)"
        )
    if outcome_unknown_or_passing(exc):
        return RedisUnavailable(
            f"cannot reach Redis at {where}: {detail}; check that it is running and that "
            "--redis-url / ORCHESTRATOR_REDIS_URL / REDIS_URL point at it" + _tls_hint(url, detail)
        )
    return RedisRefused(f"Redis at {where} answered with an error: {detail}")


def _tls_hint(url: str, detail: str) -> str:
    """A server that wants a client certificate and gets none closes the connection right after
    the handshake (TLS 1.3): the client sees an EOF or a reset, not always the alert. A TLS-only
    server that gets plain text resets the connection too."""
    if uses_tls(url) and re.search(r"SSL|EOF occurred|reset by peer", detail):
        return "; over TLS, if the server asks for client certificates, give ssl_certfile and ssl_keyfile"
    if not uses_tls(url) and "reset by peer" in detail:
        return "; if the server speaks only TLS, use a rediss:// URL"
    return ""


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis[s]+sentinel://[user:pass@]host:port[,host:port]/service[/db]`` URL.

    ``tls`` holds the SSL arguments (``ssl=True`` and the TLS query parameters) for a
    ``rediss+sentinel://`` URL, for the sentinels and the servers they name alike; {} otherwise.
    """

    hosts: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    tls: dict[str, Any] = field(default_factory=dict)


def parse_sentinel_url(url: str) -> SentinelTarget:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, _, port = item.partition(":")
        if not host:
            raise ConfigError(f"redis_url {redact_url(url)!r}: empty sentinel host; expected host:port[,host:port]")
        number = _port(url, port or "26379", "sentinel port")
        hosts.append((host, number))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigError(f"redis_url {redact_url(url)!r}: missing service name; expected .../mymaster[/db]")
    if len(path) > 1:
        _db(url, path[1])
    query = parse_qs(parts.query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    tls = tls_options(url)
    return SentinelTarget(
        hosts=hosts,
        service=path[0],
        db=int(path[1]) if len(path) > 1 else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        sentinel_password=sentinel_password,
        tls={"ssl": True, **tls} if uses_tls(url) else {},
    )


def _options(scheme: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": 15,
    }
    if scheme != "unix":  # TCP keepalive means nothing on a unix socket, whose connection refuses the option
        options["socket_keepalive"] = True
    return options


def _port(url: str, text: str, what: str = "port") -> int:
    if text.isdigit() and 1 <= int(text) <= 65535:
        return int(text)
    raise ConfigError(f"redis_url {redact_url(url)!r}: {what} {text!r} is invalid; expected a number from 1 to 65535")


def _db(url: str, text: str) -> int:
    if text.isdigit():
        return int(text)
    raise ConfigError(f"redis_url {redact_url(url)!r}: database {text!r} is invalid; expected a number, e.g. /0")


def check_url(url: str) -> str:
    """Check ``url`` before anything connects with it; return its scheme, lower-cased.

    Raises :class:`ConfigError` naming ``redis_url`` (redacted) and what is expected, for an
    unknown scheme, a port that is not a number from 1 to 65535, a database that is not a
    number, a unix URL without a socket path, a malformed Sentinel URL, or TLS options that are
    unknown, invalid or on a scheme without TLS (:func:`tls_options`).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis+cluster", "rediss+cluster"):
        raise ConfigError(
            f"redis_url {redact_url(url)!r}: a Redis Cluster takes a plain redis:// or rediss:// URL "
            "of any of its nodes (it is recognised when connecting)"
        )
    if scheme not in SCHEMES:
        raise ConfigError(
            f"redis_url {redact_url(url)!r}: unknown scheme {scheme!r}; "
            "expected redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel://"
        )
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
        return scheme
    tls_options(url)
    parts = urlsplit(url)
    if parts.netloc.rpartition("@")[0] != split_url(url)[1]:  # redis-py would read another password
        raise ConfigError(
            f"redis_url {redact_url(url)!r}: the user name or password holds a '/', '?' or '#'; "
            "percent-encode it (%2F, %3F, %23)"
        )
    if scheme == "unix":
        if not parts.path:
            raise ConfigError(f"redis_url {redact_url(url)!r}: no socket path; expected unix:///path/to/redis.sock")
        return scheme
    hostport = parts.netloc.rpartition("@")[2]
    _host, colon, port = hostport.rpartition(":") if not hostport.endswith("]") else ("", "", "")
    if colon:
        _port(url, port)
    if parts.path.strip("/"):
        _db(url, parts.path.strip("/"))
    return scheme


def _lower_scheme(url: str, scheme: str) -> str:
    """``REDIS://...`` as ``redis://...``: redis-py before 8 refuses an upper-case scheme."""
    return scheme + url[len(scheme) :]


def _sentinel_args(url: str) -> tuple[SentinelTarget, dict[str, Any], dict[str, Any]]:
    """What Sentinel(...) and master_for(...) take, for the sync and the asyncio client alike.

    With TLS, the sentinels get the SSL arguments through ``sentinel_kwargs`` and the servers
    they name through master_for's, where ``ssl=True`` picks redis-py's SentinelManagedSSLConnection.
    """
    target = parse_sentinel_url(url)
    options = _options("redis+sentinel")
    sentinel = {k: v for k, v in options.items() if k.startswith("socket_")}  # redis-py's default
    if target.sentinel_password:
        sentinel["password"] = target.sentinel_password
    master = {"db": target.db, "username": target.username, "password": target.password, **target.tls}
    return target, {"sentinel_kwargs": {**sentinel, **target.tls}, **options}, master


_NEVER_RETRIED = (redis.AuthenticationError, redis.exceptions.AuthorizationError)


class _Refused(Exception):
    """Carries a refusal past redis-py's retry loop, which retries every connection error."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _RetryUnlessRefused(Retry):
    """redis-py's retry, except that a refused password or user, or a refused TLS handshake
    (:func:`tls_refused`), is raised at once.

    redis-py counts those as connection errors and retries them; with its retries nested
    (connect, health check, command) a URL without the password waited 24 s for a refusal.
    """

    def call_with_retry(self, do: Callable[[], T], fail: Any, *args: Any, **kwargs: Any) -> T:
        def attempt() -> T:
            try:
                return do()
            except (*_NEVER_RETRIED, redis.ConnectionError) as exc:
                if isinstance(exc, _NEVER_RETRIED) or tls_refused(exc):
                    raise _Refused(exc) from None
                raise

        try:
            return super().call_with_retry(attempt, fail, *args, **kwargs)
        except _Refused as refused:
            error = refused.error
        raise error


def closed_transport(exc: RuntimeError) -> bool:
    """Whether ``exc`` is uvloop's answer to a write on a connection the peer already closed:
    asyncio's own loop ignores such a write (the read that follows fails), uvloop raises
    ``RuntimeError`` ("... the handler is closed"), which redis-py does not take for a
    connection error. A Redis restart or a network reset then stopped the worker."""
    return "handler is closed" in str(exc)


class _AsyncRetryUnlessRefused(AsyncRetry):
    """:class:`_RetryUnlessRefused` for the asyncio client; a write on a closed transport
    (:func:`closed_transport`) is a connection error, retried as one."""

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Any, *args: Any, **kwargs: Any) -> T:
        async def attempt() -> T:
            try:
                return await do()
            except (*_NEVER_RETRIED, redis.ConnectionError) as exc:
                if isinstance(exc, _NEVER_RETRIED) or tls_refused(exc):
                    raise _Refused(exc) from None
                raise
            except RuntimeError as exc:
                if not closed_transport(exc):
                    raise
                raise redis.ConnectionError(f"the connection closed under a write: {exc}") from exc

        try:
            return await super().call_with_retry(attempt, fail, *args, **kwargs)
        except _Refused as refused:
            error = refused.error
        raise error


def _retry() -> Retry:
    return _RetryUnlessRefused(ExponentialWithJitterBackoff(cap=1.6, base=0.05), COMMAND_RETRIES)


def _async_retry() -> AsyncRetry:
    return _AsyncRetryUnlessRefused(ExponentialWithJitterBackoff(cap=1.6, base=0.05), COMMAND_RETRIES)


def probe_cluster(url: str, probe: Sequence[str], *, resend: bool = True) -> bool:
    """True when the server at ``url`` answers ``EXISTS`` on the ``probe`` keys (two keys of
    different hash slots) with CROSSSLOT, as only a Redis Cluster node does; False for a single
    server, and for a URL that names no node (Sentinel, a unix socket) or no ``probe``.

    Raises what redis-py raised when the server cannot be reached or refuses the password or the
    user's EXISTS, after the resends every command gets on a broken connection (``resend``; one
    attempt without). A worker or supervisor waits and probes again: a node that was down when
    it started is not taken for a single server.
    """
    scheme = check_url(url)
    if scheme not in ("redis", "rediss") or not probe:
        return False
    check_tls_files(url)
    options = {**_options(scheme), "health_check_interval": 0}
    retry = _retry() if resend else Retry(ExponentialWithJitterBackoff(), 0)
    try:
        with redis.Redis.from_url(_lower_scheme(url, scheme), retry=retry, **options) as plain:
            plain.exists(*probe)
    except redis.exceptions.ClusterCrossSlotError:
        return True
    return False


def is_cluster_node(url: str, probe: Sequence[str]) -> bool:
    """:func:`probe_cluster` in one attempt, taking a server that cannot be reached (or refuses
    us) for a single server: for a client call, whose first real command then says what is
    wrong, worded as it always is."""
    try:
        return probe_cluster(url, probe, resend=False)
    except (redis.RedisError, OSError):
        return False


def _cluster_options(scheme: str) -> dict[str, Any]:
    """What redis-py's cluster clients take besides the URL: our timeouts and keepalive, and
    ``require_full_coverage=False``, so that a shard without a master (between a kill and its
    replica's promotion) leaves the other shards' runs going."""
    options = _options(scheme)
    return {**options, "require_full_coverage": False}


def connect(url: str, *, probe: Sequence[str] = (), cluster: bool | None = None) -> redis.Redis:
    """A synchronous client for ``url`` that retries commands on connection errors.

    With ``probe`` (``Keys.cluster_probe``), a Redis Cluster node's URL gets redis-py's cluster
    client (:func:`is_cluster_node`); it is typed as ``redis.Redis``, whose commands it serves
    (every command we send is single-slot, or a pipeline it splits by node). ``cluster`` is the
    answer of a :func:`probe_cluster` the caller already made.
    """
    scheme = check_url(url)
    check_tls_files(url)
    if cluster if cluster is not None else is_cluster_node(url, probe):
        try:  # the synchronous client reads the slot map at once
            nodes = redis.cluster.RedisCluster.from_url(
                _lower_scheme(url, scheme), retry=_retry(), **_cluster_options(scheme)
            )
        except REDIS_FAILURES as exc:
            raise redis_failure(exc, url) from None
        return cast(redis.Redis, nodes)
    if scheme not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(_lower_scheme(url, scheme), retry=_retry(), **_options(scheme))
    from redis.sentinel import Sentinel

    target, sentinel_kwargs, master_kwargs = _sentinel_args(url)
    sentinel = Sentinel(target.hosts, **sentinel_kwargs)  # type: ignore[no-untyped-call, unused-ignore]
    client: redis.Redis = sentinel.master_for(target.service, retry=_retry(), **master_kwargs)  # type: ignore[no-untyped-call, unused-ignore]
    return client


def is_cluster(client: redis.Redis | aredis.Redis) -> bool:
    """True for a client :func:`connect` or :func:`connect_async` made for a Redis Cluster."""
    return isinstance(client, redis.cluster.RedisCluster | acluster.RedisCluster)


def check_topology(client: redis.Redis, probe: Sequence[str]) -> None:
    """Raise the CROSSSLOT reply (a :class:`ConfigError` through :func:`redis_failure`) when a
    single-server client talks to a cluster node: one made while the node could not be reached."""
    if not is_cluster(client):
        client.exists(*probe)


class _HiredisPacking:
    """Pack commands with hiredis (C) instead of redis-py's pure-Python asyncio packer.

    The worker packs a claim and a commit script call (20-30 arguments each) per step; the
    Python packer was a fifth of the worker's CPU, hiredis packs the same bytes ~9x faster.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD", "XINFO GROUPS", ...
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class _FastConnection(_HiredisPacking, aconnection.Connection):
    pass


class _FastSSLConnection(_HiredisPacking, aconnection.SSLConnection):
    pass


class _FastUnixConnection(_HiredisPacking, aconnection.UnixDomainSocketConnection):
    pass


FAST_CONNECTIONS: dict[str, type[aconnection.AbstractConnection]] = {
    "redis": _FastConnection,
    "rediss": _FastSSLConnection,
    "unix": _FastUnixConnection,
}


def connect_async(url: str, *, probe: Sequence[str] = (), cluster: bool | None = None) -> aredis.Redis:
    """An asyncio client for ``url`` with the same retry behaviour (and the same cluster
    recognition, with ``probe``) as :func:`connect`."""
    scheme = check_url(url)
    check_tls_files(url)
    if cluster if cluster is not None else is_cluster_node(url, probe):
        client = acluster.RedisCluster.from_url(
            _lower_scheme(url, scheme), retry=_async_retry(), **_cluster_options(scheme)
        )
        return cast(aredis.Redis, client)
    if scheme not in SENTINEL_SCHEMES:
        return aredis.Redis.from_url(
            _lower_scheme(url, scheme),
            retry=_async_retry(),
            connection_class=FAST_CONNECTIONS[scheme],
            **_options(scheme),
        )
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    target, sentinel_kwargs, master_kwargs = _sentinel_args(url)
    sentinel = AsyncSentinel(target.hosts, **sentinel_kwargs)  # type: ignore[no-untyped-call, unused-ignore]
    master: aredis.Redis = sentinel.master_for(target.service, retry=_async_retry(), **master_kwargs)
    return master


def close(client: redis.Redis) -> None:
    """Close a client from :func:`connect` with its pool (and a Sentinel's own connections)."""
    client.close()
    if is_cluster(client):  # its close() closed every node's connections
        return
    pool = client.connection_pool
    pool.disconnect()
    for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", []):
        sentinel.close()
        sentinel.connection_pool.disconnect()


async def aclose(client: aredis.Redis) -> None:
    """Close a client from :func:`connect_async` with its pool (and a Sentinel's connections)."""
    if is_cluster(client):
        await client.aclose()
        return
    await client.aclose(close_connection_pool=True)
    for sentinel in getattr(getattr(client.connection_pool, "sentinel_manager", None), "sentinels", []):
        await sentinel.aclose(close_connection_pool=True)
