"""The Redis side of an instance: one client, the key schema, the registry, the manager."""

from __future__ import annotations

import socketio

from .. import metrics
from ..config import Settings
from .connection import client_options, create_redis
from .keys import Keys
from .registry import InstanceRegistry


class RedisBackend:
    """What an instance needs from Redis besides presence: health, figures, the manager."""

    def __init__(self, settings: Settings, instance_id: str) -> None:
        self.settings = settings
        self.redis = create_redis(settings)
        self.keys = Keys(settings.REDIS_KEY_PREFIX)
        self.registry = InstanceRegistry(
            self.redis, self.keys, instance_id, settings.WS_HEARTBEAT_INTERVAL
        )
        self.channel = f"{settings.REDIS_KEY_PREFIX}socketio"

    def manager(self) -> socketio.AsyncManager:
        """The Socket.IO manager that carries emits between instances."""
        options = client_options(self.settings)
        options.pop("retry")
        if self.settings.REDIS_CLUSTER:
            from .sharded import ClusterManager

            return ClusterManager(
                self.settings.pubsub_url, channel=self.channel, redis_options=options
            )
        try:
            from .sharded import FastRetryRedisManager as PlainManager
        except ImportError:
            from .manager import RedisManager as PlainManager

        return PlainManager(self.settings.pubsub_url, channel=self.channel, redis_options=options)

    async def ping(self) -> None:
        with metrics.timed(metrics.REDIS_LATENCY, "ping"):
            await self.redis.ping()

    async def used_memory(self) -> int | None:
        info = await self.redis.info("memory")
        if isinstance(info, dict) and "used_memory" in info:
            return int(info["used_memory"])
        if isinstance(info, dict):  # cluster: {node: info}
            return sum(
                int(node.get("used_memory", 0)) for node in info.values() if isinstance(node, dict)
            )
        return None

    async def close(self) -> None:
        await self.redis.aclose()
