"""The chat server of one instance: builds its parts from settings and runs their lifecycle."""

from __future__ import annotations

import asyncio
import gc
from datetime import UTC, datetime

import socketio
import structlog

from . import __version__, metrics
from .auth import TokenVerifier
from .cluster.backend import RedisBackend
from .cluster.manager import LocalManager
from .cluster.seq import RedisSeqAllocator
from .config import Settings
from .gateway import Gateway
from .jsoncodec import OrjsonCodec
from .messages import MessageService
from .models import iso, utcnow
from .presence.base import Presence, Transition
from .presence.memory import MemoryPresence
from .presence.redis import RedisPresence
from .ratelimit import WindowCounter
from .rooms import RoomService
from .shutdown import Drainer
from .store import Store, create_store

log = structlog.get_logger(__name__)


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections: objects made at start-up are frozen out of every
    collection, and young collections run every 50 000 allocations instead of 700. Full
    collections of a busy instance otherwise pause the event loop for 100 ms or more."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class ChatServer:
    """Owns the store, presence, Socket.IO server and services of this instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance_id = settings.instance_id
        self.version = __version__
        self.store: Store = metrics.TimedStore(create_store(settings))  # type: ignore[assignment]
        self.verifier = TokenVerifier(settings)
        self.connect_limiter = WindowCounter(settings.RATE_LIMIT_CONNECTS_PER_MINUTE, 60.0)
        self.cluster = (
            RedisBackend(settings, self.instance_id) if settings.redis_configured else None
        )
        #: Cluster-wide figures sampled every heartbeat (served by /api/health without extra calls).
        self.cluster_summary: dict | None = None
        manager = self.cluster.manager() if self.cluster else LocalManager()
        self.sio = socketio.AsyncServer(
            async_mode="asgi",
            client_manager=manager,
            # Empty: same origin only (clients without an Origin header, like apps, always pass).
            cors_allowed_origins=settings.CORS_ORIGINS or None,
            ping_interval=settings.WS_HEARTBEAT_INTERVAL,
            ping_timeout=max(5.0, settings.WS_HEARTBEAT_INTERVAL),
            max_http_buffer_size=settings.MAX_FRAME_BYTES,
            json=OrjsonCodec,
            logger=False,
            engineio_logger=False,
        )
        self.gateway = Gateway(self)
        self.drainer = Drainer(self)
        manager.control_handler = self.gateway.on_control
        self.presence: Presence = self._presence()
        self.rooms = RoomService(self.store)
        self.messages = MessageService(
            self.store,
            self.rooms,
            self.gateway,
            settings.MAX_MESSAGE_LENGTH,
            allocator=self._allocator(),
        )

    def _presence(self) -> Presence:
        grace = self.settings.WS_GRACE_PERIOD
        if self.cluster is None:
            return MemoryPresence(grace, self.on_transition)
        return RedisPresence(
            grace, self.on_transition, self.cluster.redis, self.cluster.keys, self.cluster.registry
        )

    def _allocator(self) -> RedisSeqAllocator | None:
        """Redis INCR for stores whose own seq allocation is slow (Firestore), when Redis is there."""
        if self.cluster is None or self.store.allocates_seq_cheaply:
            return None
        return RedisSeqAllocator(self.cluster.redis, self.cluster.keys, self.store.last_seq)

    async def start(self) -> None:
        try:
            await self.store.start()
            await self.presence.start()
        except Exception as exc:
            log.error("server.start_failed", error=str(exc), error_type=type(exc).__name__)
            await self._close_backends()
            raise
        # The manager's listener would otherwise start on the first connection only.
        if not self.sio.manager_initialized:
            self.sio.manager_initialized = True
            self.sio.manager.initialize()
        self.drainer.install()
        tune_garbage_collector()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_metrics())
        log.info(
            "server.started",
            instance_id=self.instance_id,
            store=self.settings.STORE,
            redis=bool(self.settings.redis_configured),
            version=self.version,
        )

    async def stop(self) -> None:
        if getattr(self, "_sampler", None) is not None:
            self._sampler.cancel()
        for sid in list(self.gateway.connections):
            await self.gateway.on_disconnect(sid, "server shutdown")
        await self.presence.close()
        await self.sio.shutdown()
        if self.cluster is not None:
            try:
                await self.cluster.registry.deregister()
            except Exception as exc:
                log.warning("cluster.deregister_failed", error=str(exc))
        await self._close_backends()

    async def _close_backends(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
        await self.store.close()

    async def on_transition(self, transition: Transition) -> None:
        """A user went online/offline cluster-wide: remember last_seen, tell subscribers."""
        if transition.status == "offline" and transition.last_seen is not None:
            try:
                await self.store.set_last_seen(transition.user_id, transition.last_seen)
            except Exception as exc:
                log.warning(
                    "presence.last_seen_not_stored", user=transition.user_id, error=str(exc)
                )
        await self.gateway.announce(transition)

    async def figures(self) -> dict:
        """This instance and the cluster: live instances with their connections and heartbeats."""
        local = len(self.gateway.connections)
        if self.cluster is None:
            instances = [
                {"id": self.instance_id, "connections": local, "last_heartbeat": iso(utcnow())}
            ]
        else:
            instances = [
                {
                    "id": info.id,
                    "connections": info.connections,
                    "last_heartbeat": iso(datetime.fromtimestamp(info.heartbeat_at, UTC)),
                }
                for info in await self.cluster.registry.live()
            ]
        return {
            "instance": {
                "id": self.instance_id,
                "version": self.version,
                "connections": local,
                "in_flight": self.gateway.in_flight,
                "draining": self.gateway.draining,
            },
            "cluster": {
                "instances": instances,
                "connections": sum(i["connections"] for i in instances),
                "online_users": await self.presence.online_users(),
            },
        }

    async def _sample_metrics(self) -> None:
        """Refresh the cluster-wide gauges every heartbeat interval."""
        while True:
            try:
                figures = await self.figures()
                self.cluster_summary = {
                    "instances": len(figures["cluster"]["instances"]),
                    "connections": figures["cluster"]["connections"],
                    "online_users": figures["cluster"]["online_users"],
                    "sampled_at": iso(utcnow()),
                }
                metrics.CLUSTER_CONNECTIONS.set(figures["cluster"]["connections"])
                metrics.ONLINE_USERS.set(figures["cluster"]["online_users"])
                if self.cluster is not None:
                    used = await self.cluster.used_memory()
                    if used is not None:
                        metrics.REDIS_MEMORY.set(used)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("metrics.sample_failed", error=str(exc))
            await asyncio.sleep(self.settings.WS_HEARTBEAT_INTERVAL)

    async def presence_states(self, user_ids: list[str]) -> dict[str, dict]:
        """``{id: {status, last_seen}}``; offline users without a live last_seen use the store's."""
        states = await self.presence.states(user_ids)
        unknown = [
            uid for uid, s in states.items() if s.status == "offline" and s.last_seen is None
        ]
        records = await self.store.get_users(unknown) if unknown else {}
        result = {}
        for uid, state in states.items():
            last_seen = state.last_seen or (records[uid].last_seen if uid in records else None)
            result[uid] = {"status": state.status, "last_seen": iso(last_seen)}
        return result
