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


class RedisManager(CarriedOutside, socketio.AsyncRedisManager, ControlEvents):
    """Many instances on one Redis, through plain pub/sub on one channel.

    :param delivery: the publishing and listening policy (default: ``Delivery(channel)``);
        it holds the counters and the ``subscribed`` event.
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
        **options: Any,
    ) -> None:
        super().__init__(url=url, channel=channel, **options)
        self.delivery = delivery or Delivery(channel)
        self._publishes: Batcher[bytes | str] = Batcher(self._publish_batch, "publish")

    def _redis_connect(self) -> None:
        if urlparse(self.redis_url).scheme in {"redis+sentinel", "valkey+sentinel"}:
            super()._redis_connect()
            return
        self.redis = blocking_client(self.redis_url, dict(self.redis_options))
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.connected = True

    async def _publish(self, data: Any) -> bool:
        payload = self.json.dumps(data)

        return await self.delivery.publish(lambda: self._publishes.call(payload))

    async def _publish_batch(self, payloads: list[bytes | str]) -> list[Any]:
        """One pipeline of PUBLISHes on one connection; a connection error fails them all."""
        if not self.connected:
            self._redis_connect()  # through Sentinel this finds the current master
        try:
            async with asyncio.timeout(self.delivery.publish_timeout):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for payload in payloads:
                        pipe.publish(self.channel, payload)
                    return list(await pipe.execute(raise_on_error=False))
        except Exception:
            self.connected = False
            raise

    async def _redis_listen_with_retries(self) -> Any:
        async def subscribe() -> Any:
            self._redis_connect()  # through Sentinel this finds the current master
            await self.pubsub.subscribe(self.channel)
            return self.pubsub

        async for message in self.delivery.listen(subscribe, lambda pubsub: pubsub.listen()):
            yield message
