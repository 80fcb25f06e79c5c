"""Socket.IO managers that ride out Redis failovers: Redis Cluster and a faster plain Redis.

:class:`ClusterManager` is for Redis Cluster (``REDIS_CLUSTER=true``, e.g. ElastiCache in
cluster mode). On Redis 7+ it uses *sharded* pub/sub (SPUBLISH / SSUBSCRIBE): the channel
hashes to one slot, so all traffic for it lives on the one shard that owns that slot (its
master and replicas) instead of being broadcast over the cluster bus to every node. One
channel means one shard carries all of it; that is the price of the simple design and is fine
at our scale. Older servers get plain PUBLISH / SUBSCRIBE through one node (Redis Cluster
forwards those to every node).

Both managers publish with a few quick retries and then give up without raising (the local
clients already have the message); every message given up is counted in
``publish_failures`` and logged at error level. No single attempt may use more than half of
``publish_timeout``, so a master that hangs (accepts connections, never answers) costs one
attempt, not the whole budget; the cluster publisher then starts over with a fresh client
built from the nodes that answer. Their listeners resubscribe with exponential
backoff capped at a few seconds (python-socketio's own listener waits up to 60 s), and after a
master failover the cluster listener rediscovers the topology and subscribes on the new owner.
``subscribed`` (an :class:`asyncio.Event`) is set while the listener is subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from socketio.async_pubsub_manager import AsyncPubSubManager

from server.bus.manager import ControlEvents, RedisManager

log = structlog.get_logger(__name__)

PROBE_MESSAGE = "chat-listener-probe"


class SubscriptionLost(ConnectionError):
    """The server ended our subscription (slot moved, node demoted) or the link went silent."""


class _Delivery:
    """Publish retries and listener bookkeeping shared by the managers below."""

    channel: str

    def _init_delivery(
        self,
        *,
        publish_attempts: int = 4,
        publish_backoff: float = 0.1,
        publish_timeout: float = 2.0,
        listen_backoff: float = 0.25,
        listen_max_backoff: float = 5.0,
    ) -> None:
        """Delivery options, the same for every manager below (their ``**delivery``)."""
        self.publish_attempts = max(1, publish_attempts)
        self.publish_backoff = publish_backoff
        self.publish_timeout = publish_timeout
        self.listen_backoff = listen_backoff
        self.listen_max_backoff = listen_max_backoff
        #: messages given up after all attempts (other instances never saw them)
        self.publish_failures = 0
        #: times the listener lost its subscription and started over
        self.listener_reconnects = 0
        #: set while the listener is subscribed
        self.subscribed = asyncio.Event()

    async def _publish_with_retries(
        self,
        send: Callable[[], Awaitable[Any]],
        after_failure: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """``send()`` up to ``publish_attempts`` times within ``publish_timeout`` seconds.

        An attempt gets at most half of ``publish_timeout`` (all of it when there is a single
        attempt): Redis socket timeouts (``REDIS_TIMEOUT``, 5 s by default) are longer than the
        whole budget, so without this cap one hung node would use up every attempt.
        ``after_failure()`` runs after every failed attempt, before the next one.
        Returns False (never raises) when it gives up; that is counted and logged.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        per_attempt = self.publish_timeout / (1 if self.publish_attempts == 1 else 2)
        delay = self.publish_backoff
        for attempt in range(1, self.publish_attempts + 1):
            try:
                await asyncio.wait_for(send(), max(min(deadline - loop.time(), per_attempt), 0.001))
                return True
            except Exception as exc:
                if after_failure is not None:
                    with contextlib.suppress(Exception):
                        await after_failure()
                if attempt == self.publish_attempts or loop.time() + delay >= deadline:
                    self.publish_failures += 1
                    log.error(
                        "cluster.publish_failed",
                        channel=self.channel,
                        attempts=attempt,
                        error=_describe(exc),
                        publish_failures=self.publish_failures,
                        impact="only this instance's clients got the message; other instances missed it",
                        action="check that Redis is reachable and healthy (failover in progress? "
                        "REDIS_URL, network, auth); publishing resumes by itself when it answers",
                    )
                    return False
                log.warning(
                    "cluster.publish_retry",
                    channel=self.channel,
                    attempt=attempt,
                    error=_describe(exc),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        return False  # pragma: no cover - the loop always returns

    async def _subscribed_forever(
        self, subscribe: Callable[[], Awaitable[Any]], messages: Callable[[Any], AsyncIterator[Any]]
    ) -> AsyncIterator[Any]:
        """Yield ``messages(pubsub)`` of a ``subscribe()``d pubsub, subscribing again with a
        capped backoff whenever it fails or ends; the pubsub is closed on every way out."""
        failures = 0  # since the last successful subscription
        while True:
            pubsub = None
            try:
                pubsub = await subscribe()
                failures = 0
                self.subscribed.set()
                log.info(
                    "cluster.listener_subscribed",
                    channel=self.channel,
                    reconnects=self.listener_reconnects,
                )
                async for item in messages(pubsub):
                    yield item
                raise SubscriptionLost("subscription ended")
            except Exception as exc:
                self.subscribed.clear()
                self.listener_reconnects += 1
                failures += 1
                sleep = self._listen_delay(failures)
                log.warning(
                    "cluster.listener_retry",
                    channel=self.channel,
                    error=_describe(exc),
                    retry_in=sleep,
                    reconnects=self.listener_reconnects,
                )
                await _close_quietly(pubsub)
                await asyncio.sleep(sleep)
            except BaseException:  # cancelled or closed: leave no connection behind
                self.subscribed.clear()
                await _close_quietly(pubsub)
                raise

    def _listen_delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts since the last subscription."""
        return min(self.listen_backoff * 2 ** (failures - 1), self.listen_max_backoff)


async def _close_quietly(pubsub: Any) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pubsub.aclose(), 2)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        text = "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _close_cluster_client(client: RedisCluster) -> None:
    """Disconnect every node of ``client``. ``RedisCluster.aclose()`` alone does nothing while
    the client is flagged for re-discovery (after any connection error), leaking sockets."""
    with contextlib.suppress(Exception):
        await client.aclose()
    for attr in ("nodes_cache", "startup_nodes"):
        with contextlib.suppress(Exception):
            await client.nodes_manager.aclose(attr)


def _probe_window(connection_kwargs: dict[str, Any]) -> float:
    """How long a node may take to answer a PING before it counts as unreachable: the longer
    of the connect and read timeouts the client uses anyway (redis-py's default is 5 s)."""
    timeouts = [connection_kwargs.get(k) for k in ("socket_connect_timeout", "socket_timeout")]
    return max((float(t) for t in timeouts if t), default=5.0)


async def _answering_nodes(nodes: list[ClusterNode], window: float) -> list[ClusterNode]:
    """PING all ``nodes`` at once; return those that answered by the time the first one did.

    Empty when none answers within ``window`` seconds. The others are disconnected: a hung
    node (a stopped process, a frozen VM) accepts the TCP connection and then never replies, so waiting
    for it one node at a time, as topology discovery does, costs a full socket timeout.
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


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ClusterManager(AsyncPubSubManager, ControlEvents, _Delivery):
    """Many instances on one Redis Cluster, over sharded pub/sub when the server has it.

    :param url: ``redis://`` or ``rediss://`` URL of any cluster node or of the configuration
        endpoint; the other nodes are discovered.
    :param channel: pub/sub channel, the same on every instance.
    :param write_only: publish only, never listen.
    :param redis_options: keyword arguments for ``redis.asyncio.cluster.RedisCluster``.
    :param sharded: ``None`` decides from the server version (7.0+: sharded); ``True`` /
        ``False`` force it. All instances must agree (they do when they all decide).
    :param idle_probe: after this many seconds without traffic the listener PINGs its node and
        resubscribes if no answer comes within ``probe_timeout`` (catches half-open links).
    """

    name = "rediscluster"

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        channel: str = "socketio",
        write_only: bool = False,
        logger=None,
        json=None,
        redis_options: dict | None = None,
        *,
        sharded: bool | None = None,
        idle_probe: float = 15.0,
        probe_timeout: float = 5.0,
        poll_interval: float = 1.0,
        **delivery: float,
    ):
        super().__init__(channel=channel, write_only=write_only, logger=logger, json=json)
        self._init_delivery(**delivery)
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

    # ------------------------------------------------------------------ clients

    async def _new_client(self) -> RedisCluster:
        """A client that starts from the URL *and* every node seen so far, so losing the
        node named in the URL (or a DNS endpoint briefly resolving to a dead node) is survivable.

        Topology discovery (``CLUSTER SLOTS``) asks the startup nodes one at a time and waits
        a full socket timeout on a node that hangs; with a 5 s timeout that outlasts a publish
        attempt, so whenever a hung node came early in the (random) order the attempt failed.
        So all candidates are PINGed at once first, and discovery starts only from those that
        answered.
        A node known only to be silent cannot be replaced by anything: when no node answers
        (e.g. the only known node, the one in the URL, hangs) this raises at once.
        """
        options = dict(self.redis_options)
        startup = list(options.pop("startup_nodes", None) or [])
        startup += [ClusterNode(host, port) for host, port in self._known_nodes]
        if startup:
            options["startup_nodes"] = startup
        client = RedisCluster.from_url(self.redis_url, **options)
        try:
            manager = client.nodes_manager
            candidates = list(manager.startup_nodes.values())
            window = _probe_window(manager.connection_kwargs)
            answering = await _answering_nodes(candidates, window)
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
            await _close_cluster_client(client)
            raise
        self._known_nodes = [(node.host, node.port) for node in client.get_nodes()]
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
                "cluster.pubsub_mode",
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
            await _close_cluster_client(client)

    async def aclose(self) -> None:
        """Close both Redis clients (the listener task, if any, is the server's to stop)."""
        await self._reset_publisher()
        client, self._listen_redis = self._listen_redis, None
        if client is not None:
            await _close_cluster_client(client)

    # ------------------------------------------------------------------ publish

    async def _publish(self, data):
        payload = self.json.dumps(data)
        used: list[RedisCluster] = []

        async def send():
            client = await self._publisher()
            used.append(client)
            if self.sharded:
                return await client.spublish(self.channel, payload)
            return await client.publish(self.channel, payload)

        async def start_over():
            # The next attempt builds a client from the nodes that answer, unless another
            # publish already did. Needed after an attempt cut short by our timeout: redis-py
            # only re-reads the topology after errors it sees itself, so the old client would
            # send every further attempt to the same hung master.
            if used and self.redis is used[-1]:
                await self._reset_publisher()

        return await self._publish_with_retries(send, after_failure=start_over)

    # ------------------------------------------------------------------ listen

    async def _subscribe(self) -> ClusterPubSub:
        old, self._listen_redis = self._listen_redis, None
        if old is not None:  # a fresh client: fresh slot map, no stale per-node state
            await _close_cluster_client(old)
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
                if message is not None and _text(message["type"]) == expected:
                    break
                if loop.time() > deadline:
                    raise SubscriptionLost(f"no {expected} confirmation for {self.channel!r}")
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        return pubsub

    async def _next_message(self, pubsub: ClusterPubSub, timeout: float) -> dict | None:
        if self.sharded:
            if not pubsub.node_pubsub_mapping:  # would return None at once: a busy loop
                raise SubscriptionLost("no shard subscription left")
            return await pubsub.get_sharded_message(timeout=timeout)
        return await pubsub.get_message(timeout=timeout)

    async def _probe(self, pubsub: ClusterPubSub) -> None:
        if self.sharded:  # PING on the shard connection, not on a random node
            node_pubsub = next(iter(pubsub.node_pubsub_mapping.values()))
            await node_pubsub.ping(PROBE_MESSAGE)
        else:
            await pubsub.ping(PROBE_MESSAGE)

    async def _messages(self, pubsub: ClusterPubSub) -> AsyncIterator[bytes | str]:
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
            kind = _text(message["type"])
            if kind in data_types and _text(message["channel"]) == self.channel:
                yield message["data"]
            elif kind in ("sunsubscribe", "unsubscribe"):
                # Redis drops shard subscriptions when the node stops owning the slot.
                raise SubscriptionLost(f"server ended the subscription ({kind})")

    async def _listen(self):
        async for data in self._subscribed_forever(self._subscribe, self._messages):
            yield data


class FastRetryRedisManager(RedisManager, _Delivery):
    """:class:`~server.cluster.manager.RedisManager` (standalone, TLS, Sentinel) whose listener
    resubscribes after 0.25, 0.5, 1, 2, 4, 5, 5 … s instead of python-socketio's 1 … 60 s, and
    whose publishing retries with a short backoff and counts what it gives up.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        channel: str = "socketio",
        write_only: bool = False,
        logger=None,
        json=None,
        redis_options: dict | None = None,
        **delivery: float,
    ):
        super().__init__(
            url=url,
            channel=channel,
            write_only=write_only,
            logger=logger,
            json=json,
            redis_options=redis_options,
        )
        self._init_delivery(**delivery)

    async def _publish(self, data):
        payload = self.json.dumps(data)

        async def send():
            if not self.connected:
                self._redis_connect()  # through Sentinel this finds the current master
            try:
                return await self.redis.publish(self.channel, payload)
            except Exception:
                self.connected = False
                raise

        return await self._publish_with_retries(send)

    async def _redis_listen_with_retries(self):
        async def subscribe():
            self._redis_connect()  # through Sentinel this finds the current master
            await self.pubsub.subscribe(self.channel)
            return self.pubsub

        async for message in self._subscribed_forever(subscribe, lambda pubsub: pubsub.listen()):
            yield message
