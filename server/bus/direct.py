"""One process's own pub/sub channel, and publishing to another's: :class:`DirectChannel`.

The session router (``server/transport/sessions.py``) sends each request it forwards to
the one process that owns its Engine.IO session, on that process's channel, and gets the
answer on its own. Two implementations, one per topology:

* :class:`PlainChannel`: one Redis (standalone, TLS, Sentinel), PUBLISH / SUBSCRIBE.
* :class:`ClusterChannel`: Redis Cluster, through a
  :class:`~server.bus.cluster_manager.RedisClusterManager` of the channel: sharded pub/sub
  on Redis 7+ (SPUBLISH reaches the shard that owns the channel's slot), and its listener,
  which resubscribes after a failover, a slot move or a silent link. A plain client's
  SUBSCRIBE fails on a cluster client, so forwarding needs this.

Both listen with :class:`~server.bus.delivery.Delivery`'s resubscribing loop; ``subscribed``
is set while the subscription is live.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from server.bus.cluster_manager import RedisClusterManager
from server.bus.connection import RedisClient
from server.bus.delivery import Delivery


class DirectChannel(Protocol):
    """``name`` is this process's channel; any process may publish to it."""

    name: str
    subscribed: asyncio.Event

    async def publish(self, channel: str, data: bytes) -> int:
        """Publish ``data`` once on ``channel``; how many subscribers received it."""
        ...

    def listen(self) -> AsyncIterator[bytes]:
        """The messages of ``name``, forever (resubscribing after any loss)."""
        ...

    async def aclose(self) -> None: ...


class PlainChannel:
    """A :class:`DirectChannel` on one Redis; ``redis`` must not decode replies."""

    def __init__(self, redis: RedisClient, name: str) -> None:
        self.redis = redis
        self.name = name
        self.delivery = Delivery(name)
        self.subscribed = self.delivery.subscribed

    async def publish(self, channel: str, data: bytes) -> int:
        return int(await self.redis.publish(channel, data))

    async def listen(self) -> AsyncIterator[bytes]:
        async def subscribe() -> Any:
            pubsub = self.redis.pubsub()
            await pubsub.subscribe(self.name)
            return pubsub

        async def messages(pubsub: Any) -> AsyncIterator[bytes]:
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield message["data"]

        async for data in self.delivery.listen(subscribe, messages):
            yield data

    async def aclose(self) -> None:
        await self.redis.aclose()


class ClusterChannel:
    """A :class:`DirectChannel` on Redis Cluster, through a manager of channel ``name``."""

    def __init__(self, manager: RedisClusterManager) -> None:
        self.manager = manager
        self.name = manager.channel
        self.subscribed = manager.delivery.subscribed

    async def publish(self, channel: str, data: bytes) -> int:
        return await self.manager.publish_to(channel, data)

    def listen(self) -> AsyncIterator[bytes]:
        return self.manager.listen_raw()

    async def aclose(self) -> None:
        await self.manager.aclose()
