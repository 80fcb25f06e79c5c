"""The Socket.IO manager for one Redis: standalone, TLS (``rediss://``) or Sentinel.

python-socketio's ``AsyncRedisManager`` with the publishing and listening policy of
:class:`~server.bus.delivery.Delivery` instead of its own (two quick publish attempts,
then a silent drop; a listener that backs off up to 60 s). Connecting, the Sentinel
lookup of the current master and the message format stay python-socketio's: the
pub/sub client gets bytes (``decode_responses`` off), which its ``_listen`` expects.

Override points used: ``_publish``, ``_redis_listen_with_retries`` and ``_redis_connect``
(outside Sentinel, the client's pool waits for a free connection instead of refusing the
101st concurrent publish: redis-py's default pool raises "Too many connections").
Publishes made while one is in flight go together in the next pipeline, one connection,
in call order (``server/bus/pipeline.py``); upstream awaits one PUBLISH per emit.

The listener subscribes to the main channel and to the channels of the rooms this instance
follows (``server/bus/room_channels.py``), on one connection; ``_listen`` replaces
upstream's, which reads the main channel only. The pub/sub connection yields subscription
confirmations (``ignore_subscribe_messages`` off): ``follow`` waits for them.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlparse

import socketio

from server.bus.connection import blocking_client
from server.bus.delivery import Delivery
from server.bus.manager import CarriedOutside, ControlEvents
from server.bus.pipeline import Batcher
from server.bus.room_channels import RoomChannels
from server.core import metrics


class RedisManager(CarriedOutside, socketio.AsyncRedisManager, ControlEvents):
    """Many instances on one Redis, through plain pub/sub on one channel.

    :param delivery: the publishing and listening policy (default: ``Delivery(channel)``);
        it holds the counters and the ``subscribed`` event.
    :param room_prefix: Socket.IO rooms with names starting with it have channels of their
        own (None: none; see ``RoomChannels``).
    :param publish_rooms: publish those rooms' emits on their channels (False: on the main one).
    :param options: python-socketio's (``write_only``, ``logger``, ``json``,
        ``redis_options``).
    """

    connected: bool

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        channel: str = "socketio",
        *,
        delivery: Delivery | None = None,
        room_prefix: str | None = None,
        publish_rooms: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(url=url, channel=channel, **options)
        self.delivery = delivery or Delivery(channel)
        self.room_channels = RoomChannels(channel, room_prefix, publish=publish_rooms)
        self._publishes: Batcher[tuple[str, bytes | str]] = Batcher(self._publish_batch, "publish")
        self._listening: Any = None  # the listener's pub/sub, where follow subscribes

    def _redis_connect(self) -> None:
        if urlparse(self.redis_url).scheme in {"redis+sentinel", "valkey+sentinel"}:
            super()._redis_connect()
        else:
            self.redis = blocking_client(self.redis_url, dict(self.redis_options))
            self.connected = True
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=False)

    async def _publish(self, data: Any) -> bool:
        message = (self.room_channels.channel_for(data) or self.channel, self.json.dumps(data))

        return await self.delivery.publish(lambda: self._publishes.call(message))

    async def follow(self, rooms: list[str], wait: bool = True) -> None:
        pubsub = self._listening if self.delivery.subscribed.is_set() else None
        await self.room_channels.follow(
            rooms, None if pubsub is None else lambda names: pubsub.subscribe(*names), wait
        )

    async def unfollow(self, rooms: list[str]) -> None:
        pubsub = self._listening if self.delivery.subscribed.is_set() else None
        await self.room_channels.unfollow(
            rooms, None if pubsub is None else lambda names: pubsub.unsubscribe(*names)
        )

    async def _publish_batch(self, messages: list[tuple[str, bytes | str]]) -> list[Any]:
        """One pipeline of PUBLISHes on one connection; a connection error fails them all."""
        if not self.connected:
            self._redis_connect()  # through Sentinel this finds the current master
        try:
            async with asyncio.timeout(self.delivery.publish_timeout):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for channel, payload in messages:
                        pipe.publish(channel, payload)
                    return list(await pipe.execute(raise_on_error=False))
        except Exception:
            self.connected = False
            raise

    async def _redis_listen_with_retries(self) -> Any:
        async def subscribe() -> Any:
            self._redis_connect()  # through Sentinel this finds the current master
            pubsub = self.pubsub
            await pubsub.subscribe(self.channel)
            await self.room_channels.settle(
                set(),
                lambda names: pubsub.subscribe(*names),
                lambda names: pubsub.unsubscribe(*names),
            )
            # Its own reference: a publish that reconnects replaces ``self.pubsub``.
            self._listening = pubsub
            return pubsub

        async for message in self.delivery.listen(subscribe, lambda pubsub: pubsub.listen()):
            yield message

    async def _listen(self) -> Any:
        """The data of every message on the main channel and the followed rooms' channels."""
        async for message in self._redis_listen_with_retries():
            kind = message["type"]
            if kind == "message":
                metrics.BUS_MESSAGES_IN.inc()
                yield message["data"]
            elif kind == "subscribe":
                self.room_channels.confirmed(message["channel"])
