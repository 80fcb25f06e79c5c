"""Redis clients from settings: standalone (TLS, ACL user, DB), Sentinel, or Cluster."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from socketio.redis_manager import parse_redis_sentinel_url

from ..config import Settings

RedisClient = aioredis.Redis | RedisCluster


def client_options(settings: Settings) -> dict[str, Any]:
    """Timeouts and retries shared by every client we build."""
    return {
        "socket_timeout": settings.REDIS_TIMEOUT,
        "socket_connect_timeout": settings.REDIS_TIMEOUT,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2),
        "health_check_interval": 15,
    }


def create_redis(settings: Settings, url: str | None = None) -> RedisClient:
    url = url or settings.redis_url
    options = client_options(settings)
    if settings.REDIS_CLUSTER:
        options.pop("health_check_interval")
        return RedisCluster.from_url(url, **options)
    if urlparse(url).scheme in {"redis+sentinel", "valkey+sentinel"}:
        sentinels, service, connection = parse_redis_sentinel_url(url)
        sentinel = aioredis.Sentinel(
            sentinels,
            sentinel_kwargs={"socket_timeout": settings.REDIS_TIMEOUT},
            **{**options, **connection},
        )
        return sentinel.master_for(service)  # settings insist on a service name
    return aioredis.Redis.from_url(url, **options)
