"""The Redis side of an instance: one client, the key schema, the registry, the manager."""

from __future__ import annotations

import socketio

from server.bus.connection import RedisConfig, client_options, create_redis
from server.bus.keys import Keys
from server.bus.registry import InstanceRegistry
from server.core import metrics


class RedisBackend:
    """What an instance needs from Redis besides presence: health, figures, the manager."""

    def __init__(self, config: RedisConfig, instance_id: str, heartbeat_interval: float) -> None:
        self.config = config
        self.redis = create_redis(config)
        self.keys = Keys(config.key_prefix)
        self.registry = InstanceRegistry(self.redis, self.keys, instance_id, heartbeat_interval)
        self.channel = f"{config.key_prefix}socketio"

    def manager(self) -> socketio.AsyncManager:
        """The Socket.IO manager that carries emits between instances."""
        options = client_options(self.config)
        options.pop("retry")
        if self.config.cluster:
            from server.bus.sharded import ClusterManager

            return ClusterManager(
                self.config.pubsub_url, channel=self.channel, redis_options=options
            )
        try:
            from server.bus.sharded import FastRetryRedisManager as PlainManager
        except ImportError:
            from server.bus.manager import RedisManager as PlainManager

        return PlainManager(self.config.pubsub_url, channel=self.channel, redis_options=options)

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
