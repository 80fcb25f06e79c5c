"""Redis clients: standalone (TLS, ACL user, DB), Sentinel, or Redis Cluster.

Two kinds of client talk to Redis. The *state* client (:func:`create_redis`: presence,
instance registry, seq) decodes replies, so every reply is ``str``. The Socket.IO
managers build their own pub/sub clients from :func:`client_options`, which do not decode:
python-socketio compares channel names and parses payloads as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from socketio.redis_manager import parse_redis_sentinel_url

RedisClient = aioredis.Redis | RedisCluster


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Where Redis is and how to talk to it.

    ``url`` carries the state (presence, registry, seq); ``pubsub_url`` the Socket.IO
    traffic between instances (the same server unless a separate pub/sub Redis is set).
    ``cluster`` means Redis Cluster (sharded pub/sub), nothing else.
    """

    url: str
    pubsub_url: str
    cluster: bool = False
    timeout: float = 5.0
    key_prefix: str = "chat:"
    #: connections per client pool; past it a command waits up to ``timeout`` for one
    #: (redis-py's default pool refuses the 101st with "Too many connections")
    max_connections: int = 200
    #: A redis-py ``CredentialProvider`` (server/bus/credentials.py) when the password
    #: rotates; None when the URL carries the credentials.
    credentials: Any = None


def client_options(config: RedisConfig) -> dict[str, Any]:
    """Timeouts and retries shared by every client we build."""
    options: dict[str, Any] = {
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.timeout,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2),
        "health_check_interval": 15,
        "max_connections": config.max_connections,
    }
    if config.credentials is not None:
        options["credential_provider"] = config.credentials
    return options


def create_redis(
    config: RedisConfig, url: str | None = None, decode_responses: bool = True
) -> RedisClient:
    """A client of ``url`` (default: the state Redis, ``config.url``) with the shared
    options; replies are ``str`` unless ``decode_responses`` is False."""
    url = url or config.url
    options: dict[str, Any] = {**client_options(config), "decode_responses": decode_responses}
    if config.cluster:
        options.pop("health_check_interval")
        options.pop("max_connections")  # per node, unbounded by default in RedisCluster
        return RedisCluster.from_url(url, **options)
    if urlparse(url).scheme in {"redis+sentinel", "valkey+sentinel"}:
        sentinels, service, connection = parse_redis_sentinel_url(url)
        sentinel = aioredis.Sentinel(
            sentinels,
            sentinel_kwargs={"socket_timeout": config.timeout},
            **{**options, **connection},
        )
        # redis-py has no blocking Sentinel pool: the bound refuses past max_connections.
        return sentinel.master_for(service)  # configuration insists on a service name
    return blocking_client(url, options)


def blocking_client(url: str, options: dict[str, Any]) -> aioredis.Redis:
    """A client whose pool makes a command wait for a free connection (up to the socket
    timeout) instead of failing when all ``max_connections`` are busy: a burst of
    publishes or presence updates queues up rather than dropping messages."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, timeout=options.get("socket_timeout") or 5.0, **options
    )
    return aioredis.Redis.from_pool(pool)
