"""The Redis side of an instance: the state client, the key schema, the instance registry,
and the Socket.IO manager that carries emits between instances."""

from __future__ import annotations

from server.bus.cluster_manager import RedisClusterManager
from server.bus.connection import RedisConfig, client_options, create_redis
from server.bus.direct import ClusterChannel, DirectChannel, PlainChannel
from server.bus.keys import Keys
from server.bus.redis_manager import RedisManager
from server.bus.registry import InstanceRegistry
from server.core import metrics


class RedisBus:
    """What an instance needs from Redis besides presence: health, figures, the manager.

    ``redis`` is the state client (replies are ``str``); the manager opens its own
    pub/sub connections on ``config.pubsub_url``.
    """

    def __init__(
        self,
        config: RedisConfig,
        instance_id: str,
        heartbeat_interval: float,
        instance: str | None = None,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.redis = create_redis(config)
        self.keys = Keys(config.key_prefix)
        self.registry = InstanceRegistry(
            self.redis, self.keys, instance_id, heartbeat_interval, instance=instance, owner=owner
        )
        self.channel = f"{config.key_prefix}socketio"

    def manager(
        self, room_prefix: str | None = None, publish_rooms: bool = True
    ) -> RedisManager | RedisClusterManager:
        """The Socket.IO manager for this topology: Redis Cluster, or one Redis; Socket.IO
        rooms named ``room_prefix…`` get channels of their own (``room_channels.py``)."""
        options = client_options(self.config)
        options.pop("retry")  # the manager's Delivery retries; redis-py's would stack on it
        manager_class = RedisClusterManager if self.config.cluster else RedisManager
        return manager_class(
            self.config.pubsub_url,
            channel=self.channel,
            redis_options=options,
            room_prefix=room_prefix,
            publish_rooms=publish_rooms,
        )

    def direct_channel(self, name: str) -> DirectChannel:
        """This process's own channel ``name`` on the pub/sub Redis (the state Redis unless
        REDIS_PUBSUB_URL is set), for messages addressed to this process alone."""
        if self.config.cluster:
            options = client_options(self.config)
            options.pop("retry")
            return ClusterChannel(
                RedisClusterManager(self.config.pubsub_url, channel=name, redis_options=options)
            )
        client = create_redis(self.config, url=self.config.pubsub_url, decode_responses=False)
        return PlainChannel(client, name)

    async def ping(self) -> None:
        with metrics.timed(metrics.REDIS_LATENCY, "ping"):
            await self.redis.ping()

    async def used_memory(self) -> int | None:
        info = await self.redis.info("memory")
        if isinstance(info, dict) and "used_memory" in info:
            return int(info["used_memory"])
        if isinstance(info, dict):  # Redis Cluster: {node: info}
            return sum(
                int(node.get("used_memory", 0)) for node in info.values() if isinstance(node, dict)
            )
        return None

    async def close(self) -> None:
        await self.redis.aclose()
