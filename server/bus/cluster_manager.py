"""The Socket.IO manager for Redis Cluster (``REDIS_CLUSTER=true``, e.g. ElastiCache in
cluster mode). python-socketio has no Redis Cluster manager:
https://github.com/miguelgrinberg/python-socketio/issues/1172

On Redis 7+ it uses *sharded* pub/sub (SPUBLISH / SSUBSCRIBE): the channel hashes to one
slot, so all its traffic stays on the shard that owns that slot (master and replicas)
instead of crossing the cluster bus to every node. One channel means one shard carries
all of it; that is the price of the simple design and is fine at our scale. Older servers
get plain PUBLISH / SUBSCRIBE through one node (Redis Cluster forwards those everywhere).

Invariants, on top of :class:`~server.bus.delivery.Delivery`'s:

* Every client (publisher and listener) is built from the nodes that answer a PING, asked
  all at once; the URL's node and every node seen so far are candidates. A node that hangs
  never stalls topology discovery, which would otherwise wait a full socket timeout on
  each one in turn.
* A publish attempt that fails or times out drops the publisher; the next attempt builds a
  new one. redis-py re-reads the topology only after errors it sees itself, not after our
  timeout, so the old client would keep sending to the same hung master.
* The listener's subscription lives on the slot owner. It is given up (and the listener
  starts over with a fresh client and slot map) when the server ends it (SUNSUBSCRIBE
  after a failover or a slot move), when no shard subscription is left, or when a PING
  sent after ``idle_probe`` quiet seconds is not answered within ``probe_timeout``.
* A replaced client is closed node by node (see :func:`close_cluster_client`).

The listener also subscribes to the channels of the rooms this instance follows
(``server/bus/room_channels.py``): they share the main channel's slot, so one shard and one
connection carry them all. An unsubscription the server sends counts as a lost subscription
only for a channel still followed (``unfollow`` gets its own confirmations too).

Messages reach python-socketio as bytes, as from its own Redis manager: the pub/sub clients
never set ``decode_responses``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from socketio.async_pubsub_manager import AsyncPubSubManager

from server.bus.delivery import Delivery, SubscriptionLost
from server.bus.manager import CarriedOutside, ControlEvents
from server.bus.room_channels import RoomChannels
from server.core import metrics

log = structlog.get_logger(__name__)

PROBE_MESSAGE = "chat-listener-probe"


class RedisClusterManager(CarriedOutside, AsyncPubSubManager, ControlEvents):
    """Many instances on one Redis Cluster, over sharded pub/sub when the server has it.

    Override points of ``AsyncPubSubManager`` used: ``_publish`` and ``_listen``.

    :param url: ``redis://`` or ``rediss://`` URL of any cluster node or of the configuration
        endpoint; the other nodes are discovered.
    :param channel: pub/sub channel, the same on every instance.
    :param write_only: publish only, never listen.
    :param redis_options: keyword arguments for ``redis.asyncio.cluster.RedisCluster``.
    :param sharded: ``None`` decides from the server version (7.0+: sharded); ``True`` /
        ``False`` force it. All instances must agree (they do when they all decide).
    :param idle_probe: after this many seconds without traffic the listener PINGs its node and
        resubscribes if no answer comes within ``probe_timeout`` (catches half-open links).
    :param delivery: the publishing and listening policy (default: ``Delivery(channel)``).
    :param room_prefix: Socket.IO rooms with names starting with it have channels of their
        own (None: none; see ``RoomChannels``).
    :param publish_rooms: publish those rooms' emits on their channels (False: on the main one).
    """

    name = "rediscluster"

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        channel: str = "socketio",
        write_only: bool = False,
        logger: Any = None,
        json: Any = None,
        redis_options: dict[str, Any] | None = None,
        *,
        sharded: bool | None = None,
        idle_probe: float = 15.0,
        probe_timeout: float = 5.0,
        poll_interval: float = 1.0,
        delivery: Delivery | None = None,
        room_prefix: str | None = None,
        publish_rooms: bool = True,
    ) -> None:
        super().__init__(channel=channel, write_only=write_only, logger=logger, json=json)
        self.delivery = delivery or Delivery(channel)
        self.redis_url = url
        self.redis_options = dict(redis_options or {})
        self.sharded = sharded
        self.idle_probe = idle_probe
        self.probe_timeout = probe_timeout
        self.poll_interval = poll_interval
        self.redis: RedisCluster | None = None  # publishing
        self._listen_redis: RedisCluster | None = None
        self._known_nodes: list[tuple[str, int]] = []
        self._connect_lock = asyncio.Lock()
        self._channel_bytes = channel.encode()
        self.room_channels = RoomChannels(channel, room_prefix, publish=publish_rooms)
        self._pubsub: ClusterPubSub | None = None  # the listener's, while subscribed

    # ------------------------------------------------------------------ clients

    async def _new_client(self) -> RedisCluster:
        """A client whose topology was read from nodes that answer.

        Candidates are the URL's node *and* every node seen so far, so losing the node named
        in the URL (or a DNS endpoint briefly resolving to a dead node) is survivable. When
        no candidate answers (e.g. the only known node hangs) this raises at once.
        """
        options = dict(self.redis_options)
        options.pop("max_connections", None)  # per node, unbounded by default in RedisCluster
        startup = list(options.pop("startup_nodes", None) or [])
        startup += [ClusterNode(host, port) for host, port in self._known_nodes]
        if startup:
            options["startup_nodes"] = startup
        client = RedisCluster.from_url(self.redis_url, **options)
        try:
            manager = client.nodes_manager
            candidates = list(manager.startup_nodes.values())
            window = probe_window(manager.connection_kwargs)
            answering = await answering_nodes(candidates, window)
            if not answering:
                raise RedisConnectionError(
                    f"no Redis Cluster node answered a PING within {window:g}s: "
                    + ", ".join(node.name for node in candidates)
                )
            for node in candidates:
                if node not in answering:
                    manager.startup_nodes.pop(node.name, None)
            await client.initialize()
            await self._decide_mode(client, answering)
        except BaseException:
            await close_cluster_client(client)
            raise
        self._known_nodes = [(node.host, int(node.port)) for node in client.get_nodes()]
        return client

    async def _decide_mode(self, client: RedisCluster, answering: list[ClusterNode]) -> None:
        if self.sharded is not None:
            return
        # Ask a node that just answered (the default node may be a master that hangs).
        node = (
            next(
                (
                    found
                    for found in (client.get_node(node_name=n.name) for n in answering)
                    if found is not None
                ),
                None,
            )
            or client.get_default_node()
        )
        try:
            info = await client.info("server", target_nodes=node)
            version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
            sharded = version >= (7, 0)
        except ResponseError:  # INFO renamed or forbidden: ask for a 7.0 command instead
            try:
                await client.execute_command("PUBSUB", "SHARDCHANNELS", target_nodes=node)
                sharded = True
            except ResponseError:
                sharded = False
        if self.sharded is None:
            self.sharded = sharded
            log.info(
                "bus.pubsub_mode",
                channel=self.channel,
                mode="sharded (SPUBLISH/SSUBSCRIBE)" if sharded else "plain (PUBLISH/SUBSCRIBE)",
            )

    async def _publisher(self) -> RedisCluster:
        if self.redis is None:
            async with self._connect_lock:
                if self.redis is None:
                    self.redis = await self._new_client()
        return self.redis

    async def _reset_publisher(self) -> None:
        client, self.redis = self.redis, None
        if client is not None:
            await close_cluster_client(client)

    async def aclose(self) -> None:
        """Close both Redis clients (the listener task, if any, is the server's to stop)."""
        await self._reset_publisher()
        client, self._listen_redis = self._listen_redis, None
        if client is not None:
            await close_cluster_client(client)

    # ------------------------------------------------------------------ publish

    async def _publish(self, data: Any) -> bool:
        payload = self.json.dumps(data)
        channel = self.room_channels.channel_for(data) or self.channel
        used: list[RedisCluster] = []

        async def send() -> Any:
            client = await self._publisher()
            used.append(client)
            if self.sharded:
                return await client.spublish(channel, payload)
            return await client.publish(channel, payload)

        async def start_over() -> None:
            # The next attempt builds a client from the nodes that answer, unless another
            # publish already did.
            if used and self.redis is used[-1]:
                await self._reset_publisher()

        return await self.delivery.publish(send, after_failure=start_over)

    async def publish_to(self, channel: str, data: bytes) -> int:
        """Publish ``data`` once on any ``channel``, the way this manager publishes (sharded
        or not); how many subscribers received it. A failure drops the publisher, as in
        ``_publish``, and raises."""
        client = await self._publisher()
        try:
            if self.sharded:
                return int(await client.spublish(channel, data))
            return int(await client.publish(channel, data))
        except Exception:
            if self.redis is client:
                await self._reset_publisher()
            raise

    # ------------------------------------------------------------------ listen

    def _send(self, pubsub: ClusterPubSub, subscribe: bool) -> Any:
        """How to (un)subscribe a list of channels on ``pubsub``, sharded or not."""
        command: Any
        if subscribe:
            command = pubsub.ssubscribe if self.sharded else pubsub.subscribe
        else:
            command = pubsub.sunsubscribe if self.sharded else pubsub.unsubscribe
        return lambda names: command(*names)

    async def follow(self, rooms: list[str], wait: bool = True) -> None:
        pubsub = self._pubsub if self.delivery.subscribed.is_set() else None
        send = self._send(pubsub, True) if pubsub is not None else None
        await self.room_channels.follow(rooms, send, wait)

    async def unfollow(self, rooms: list[str]) -> None:
        pubsub = self._pubsub if self.delivery.subscribed.is_set() else None
        send = self._send(pubsub, False) if pubsub is not None else None
        await self.room_channels.unfollow(rooms, send)

    async def _subscribe(self) -> ClusterPubSub:
        self._pubsub = None
        old, self._listen_redis = self._listen_redis, None
        if old is not None:  # a fresh client: fresh slot map, no stale per-node state
            await close_cluster_client(old)
        self._listen_redis = await self._new_client()
        pubsub = self._listen_redis.pubsub()
        try:
            if self.sharded:
                await pubsub.ssubscribe(self.channel)
                expected = "ssubscribe"
            else:
                await pubsub.subscribe(self.channel)
                expected = "subscribe"
            # Wait for the confirmation: a MOVED or a dead node shows up here, not later.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(self.probe_timeout, self.poll_interval)
            while True:
                message = await self._next_message(pubsub, self.poll_interval)
                if message is not None and message["type"] == expected:
                    if message["channel"] == self._channel_bytes:
                        break
                    self.room_channels.confirmed(message["channel"])
                if loop.time() > deadline:
                    raise SubscriptionLost(f"no {expected} confirmation for {self.channel!r}")
            await self.room_channels.settle(
                set(), self._send(pubsub, True), self._send(pubsub, False)
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        self._pubsub = pubsub
        return pubsub

    async def _next_message(self, pubsub: ClusterPubSub, timeout: float) -> dict | None:
        if self.sharded:
            # With no shard subscription, get_sharded_message returns None at once: a busy loop.
            if not pubsub.node_pubsub_mapping:
                raise SubscriptionLost("no shard subscription left")
            return await pubsub.get_sharded_message(timeout=timeout)
        return await pubsub.get_message(timeout=timeout)

    async def _probe(self, pubsub: ClusterPubSub) -> None:
        if self.sharded:  # PING on the shard connection, not on a random node
            node_pubsub = next(iter(pubsub.node_pubsub_mapping.values()))
            await node_pubsub.ping(PROBE_MESSAGE)
        else:
            await pubsub.ping(PROBE_MESSAGE)

    async def _messages(self, pubsub: ClusterPubSub) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        probe_sent: float | None = None
        data_types = ("smessage", "message")
        while True:
            message = await self._next_message(pubsub, self.poll_interval)
            now = loop.time()
            if message is None:
                if probe_sent is not None and now - probe_sent > self.probe_timeout:
                    raise SubscriptionLost(f"no answer to PING within {self.probe_timeout}s")
                if probe_sent is None and now - last_seen > self.idle_probe:
                    await self._probe(pubsub)
                    probe_sent = now
                continue
            last_seen, probe_sent = now, None
            kind = message["type"]  # redis-py decodes the type; channel and data stay bytes
            channel: bytes = message.get("channel") or b""
            if kind in data_types:
                if channel == self._channel_bytes or self.room_channels.is_room_channel(channel):
                    yield message["data"]
            elif kind in ("ssubscribe", "subscribe"):
                self.room_channels.confirmed(channel)
            elif kind in ("sunsubscribe", "unsubscribe") and not self._ours(channel):
                # Redis ends shard subscriptions when the node stops owning the slot
                # (https://github.com/redis/redis/pull/12577); redis-py's own follow-up
                # (https://github.com/redis/redis-py/pull/4044) is not relied upon.
                raise SubscriptionLost(f"server ended the subscription ({kind})")

    def _ours(self, channel: bytes) -> bool:
        """An unsubscription ``unfollow`` asked for, or from a room no longer followed."""
        return channel != self._channel_bytes and self.room_channels.unsubscribed(channel)

    async def _listen(self) -> AsyncIterator[bytes]:
        async for data in self.listen_raw():
            metrics.BUS_MESSAGES_IN.inc()
            yield data

    async def listen_raw(self) -> AsyncIterator[bytes]:
        """The payloads published on this manager's channel, as bytes, forever."""
        async for data in self.delivery.listen(self._subscribe, self._messages):
            yield data


async def close_cluster_client(client: RedisCluster) -> None:
    """Disconnect every node of ``client``.

    ``RedisCluster.aclose()`` does nothing while the client is flagged for re-discovery
    (which any connection error sets), so its sockets would stay open:
    https://github.com/redis/redis-py/issues/3846
    """
    with contextlib.suppress(Exception):
        await client.aclose()
    for attr in ("nodes_cache", "startup_nodes"):
        with contextlib.suppress(Exception):
            await client.nodes_manager.aclose(attr)


def probe_window(connection_kwargs: dict[str, Any]) -> float:
    """How long a node may take to answer a PING before it counts as unreachable: the longer
    of the connect and read timeouts the client uses anyway (redis-py's default is 5 s)."""
    timeouts = [connection_kwargs.get(k) for k in ("socket_connect_timeout", "socket_timeout")]
    return max((float(t) for t in timeouts if t), default=5.0)


async def answering_nodes(nodes: list[ClusterNode], window: float) -> list[ClusterNode]:
    """PING all ``nodes`` at once; return those that answered by the time the first one did.

    Empty when none answers within ``window`` seconds; the others are disconnected. A hung
    node (a stopped process, a frozen VM) accepts the TCP connection and never replies, and
    redis-py's topology discovery asks startup nodes one at a time with the command timeout:
    https://github.com/redis/redis-py/issues/3800
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    pings = {asyncio.ensure_future(node.execute_command("PING")): node for node in nodes}
    pending = set(pings)
    answered: list[ClusterNode] = []
    try:
        while pending and not answered and loop.time() < deadline:
            done, pending = await asyncio.wait(
                pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            answered += [pings[t] for t in done if not t.cancelled() and t.exception() is None]
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pings, return_exceptions=True)
        silent = [node for node in nodes if node not in answered]
        await asyncio.gather(*(node.disconnect() for node in silent), return_exceptions=True)
    return answered
