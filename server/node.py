"""The composition root: builds one instance's parts from settings and runs their lifecycle.

Nothing here decides anything about chat; it only wires. Only ``server.main`` imports
this module, and only this module and the CLI read :class:`Settings`: every part below
receives the plain values it needs.

The parts, from the wire inwards (docs/architecture.md draws them):
transport (``ChatNamespace``, ``Admission``, ``Fanout``, ``Drainer``, HTTP) → services
(rooms, messages, presence, figures, health) → backends (store, presence backend) → the
Redis bus (``RedisBus``: state client, instance registry, Socket.IO manager) → core.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable

import structlog

from server import __version__
from server.auth import ApiKeys
from server.bus.ledger import DeliveryLedger
from server.bus.manager import LocalManager
from server.bus.redis_bus import RedisBus
from server.bus.refusals import RedisRefusals
from server.bus.seq import RedisSeqAllocator
from server.config import ConfigError, Settings
from server.core import metrics, workers
from server.core.clientip import ClientAddress
from server.core.jsoncodec import OrjsonCodec
from server.core.models import iso
from server.core.refusals import LocalRefusals, Quota, RefusalCounter, Refusals
from server.core.state import InstanceState
from server.factories import (
    build_store,
    build_verifier,
    dev_tokens,
    redis_config,
    webhook_endpoints,
)
from server.presence.base import Presence, Transition, TransitionHandler
from server.presence.memory import MemoryPresence
from server.presence.redis import RedisPresence
from server.resources import DEMO_DIR
from server.services.admin import Admin
from server.services.changes import ChangeService
from server.services.content import ContentLimits
from server.services.figures import Figures
from server.services.health import Health
from server.services.inbox import InboxService
from server.services.messages import MessageService
from server.services.moderation import SANCTION, Moderation
from server.services.presence import PresenceService
from server.services.rooms import RoomService
from server.services.webhooks import Dispatcher, Webhooks
from server.transport.catchup import CatchUp
from server.transport.channels import NAMESPACE, room_channel
from server.transport.connections import Admission, ConnectionRegistry
from server.transport.engine import ChatSocketServer
from server.transport.fanout import Fanout
from server.transport.http import HttpContext
from server.transport.indicators import TypingTimers
from server.transport.interest import RoomInterest
from server.transport.lifecycle import Drainer
from server.transport.namespace import ChatNamespace
from server.transport.server_api import ServerApiContext
from server.transport.sessions import (
    RoutedChatSocketServer,
    SessionRouter,
    new_route_tag,
    session_channel,
)

log = structlog.get_logger(__name__)

MAX_PRESENCE_SUBSCRIPTIONS = 5000
STOP_STEP_TIMEOUT = 5.0


async def _bounded(step: str, work: Awaitable[object]) -> None:
    try:
        await asyncio.wait_for(work, STOP_STEP_TIMEOUT)
    except TimeoutError:
        log.warning("server.stop_step_timed_out", step=step, seconds=STOP_STEP_TIMEOUT)
    except Exception as exc:
        log.warning("server.stop_step_failed", step=step, error=str(exc))


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections: objects made at start-up are frozen out of every
    collection, and young collections run every 50 000 allocations instead of 700. Full
    collections of a busy instance otherwise pause the event loop for 100 ms or more."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class Node:
    """One instance: every part, wired once, started and stopped in order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        instance = settings.instance_id
        self.state = InstanceState(workers.member_id(instance), __version__, instance=instance)
        self.store = build_store(settings)
        self.bus = (
            RedisBus(
                redis_config(settings),
                self.state.instance_id,
                settings.WS_HEARTBEAT_INTERVAL,
                instance=instance,
                owner=workers.owner_token(),
            )
            if settings.redis_configured
            else None
        )
        self._sole_worker = workers.SoleWorkerLock()
        bus_manager = (
            self.bus.manager(room_channel(""), publish_rooms=settings.BUS_ROOM_CHANNELS)
            if self.bus
            else None
        )
        manager = bus_manager or LocalManager()
        route_tag = new_route_tag()
        # With Redis, sessions carry their owner's route tag and any process serves them.
        server_class = RoutedChatSocketServer if self.bus else ChatSocketServer
        self.sio = server_class(
            **({"route_tag": route_tag} if self.bus else {}),
            namespace=NAMESPACE,
            connect_timeout=settings.WS_CONNECT_TIMEOUT,
            max_backlog_packets=settings.WS_MAX_BACKLOG_PACKETS,
            max_backlog_bytes=settings.WS_MAX_BACKLOG_BYTES,
            async_mode="asgi",
            client_manager=manager,
            # Empty: same origin only (clients without an Origin header, like apps, always pass).
            cors_allowed_origins=settings.CORS_ORIGINS or None,
            ping_interval=settings.WS_HEARTBEAT_INTERVAL,
            ping_timeout=max(5.0, settings.WS_HEARTBEAT_INTERVAL),  # = ping_timeout below
            max_http_buffer_size=settings.MAX_FRAME_BYTES,
            json=OrjsonCodec,
            logger=False,
            engineio_logger=False,
        )
        ping_timeout = max(5.0, settings.WS_HEARTBEAT_INTERVAL)
        self.sessions = (
            SessionRouter(
                self.bus.direct_channel(session_channel(settings.REDIS_KEY_PREFIX, route_tag)),
                settings.REDIS_KEY_PREFIX,
                route_tag,
                request_timeout=settings.WS_HEARTBEAT_INTERVAL + ping_timeout + 5,
                max_body=settings.MAX_FRAME_BYTES,
            )
            if self.bus
            else None
        )
        self.registry = ConnectionRegistry(worker=self.state.instance_id)
        # Only with Redis can a subscription be lost; one instance has nothing to catch up.
        ledger = DeliveryLedger() if bus_manager is not None else None
        interest = RoomInterest(manager, ledger, settings.BUS_ROOM_LINGER)
        self.fanout = Fanout(self.sio, self.registry, interest)
        manager.control_handler = self.fanout.on_control
        self.webhooks = Webhooks(self.store, webhook_endpoints(settings), self._online)
        self.presence = PresenceService(
            self._presence_backend,
            self.store,
            self.fanout,
            on_change=self._presence_webhook if self.webhooks.enabled else None,
        )
        self.moderation = Moderation(self.store, self.fanout)
        self.fanout.on_control_event(SANCTION, self.moderation.forget)
        hour = 3600.0
        self.rooms = RoomService(
            self.store,
            self.moderation,
            max_members=settings.MAX_ROOM_MEMBERS,
            members_page=settings.ROOM_MEMBERS_PAGE,
            creates=Quota(settings.ROOM_CREATES_PER_HOUR, hour),
            member_changes=Quota(settings.MEMBER_CHANGES_PER_HOUR, hour),
            member_events=self.webhooks.for_members if self.webhooks.enabled else None,
            on_members_changed=self.fanout.members_changed if self.bus else None,
        )
        self.fanout.on_members = self.rooms.forget_members
        limits = ContentLimits(
            max_length=settings.MAX_MESSAGE_LENGTH,
            max_mentions=settings.MAX_MENTIONS_PER_MESSAGE,
            max_reaction_length=settings.MAX_REACTION_LENGTH,
            max_reactions=settings.MAX_REACTIONS_PER_MESSAGE,
            quote_length=settings.QUOTE_LENGTH,
            unread_cap=settings.UNREAD_COUNT_CAP,
        )
        self.messages = MessageService(
            self.store,
            self.rooms,
            self.fanout,
            limits,
            allocator=self._allocator(),
            outgoing=self.webhooks.for_message if self.webhooks.enabled else None,
        )
        self.changes = ChangeService(
            self.store,
            self.rooms,
            self.messages,
            self.fanout,
            limits,
            outgoing=self.webhooks.for_change if self.webhooks.enabled else None,
        )
        self.dispatcher = Dispatcher(
            self.store,
            self.webhooks,
            self.state.instance_id,
            timeout=settings.WEBHOOK_TIMEOUT,
            max_attempts=settings.WEBHOOK_MAX_ATTEMPTS,
            backoff_base=settings.WEBHOOK_BACKOFF_BASE,
            backoff_max=settings.WEBHOOK_BACKOFF_MAX,
        )
        self.verifier = build_verifier(settings)
        self.admission = Admission(
            self.sio,
            self.registry,
            self.state,
            self.verifier,
            self.presence,
            self.store.upsert_user,
            self.moderation,
            refusals=self._refusals(),
            client_address=ClientAddress(settings.TRUST_PROXY_HEADERS, settings.TRUSTED_PROXIES),
            max_connections_per_user=settings.MAX_CONNECTIONS_PER_USER,
            max_connections_per_ip=settings.MAX_CONNECTIONS_PER_IP,
            events_per_second=settings.RATE_LIMIT_EVENTS_PER_SECOND,
            events_burst=settings.RATE_LIMIT_EVENTS_BURST,
            interest=interest,
            member_rooms=self.rooms.member_rooms if self.bus else None,
            max_followed_member_rooms=settings.MAX_FOLLOWED_MEMBER_ROOMS,
        )
        typing = TypingTimers(self.messages, settings.TYPING_TIMEOUT)
        self.fanout.on_evicted = lambda conn, room: typing.stop(conn, room, "evicted")
        self.sio.register_namespace(
            ChatNamespace(
                state=self.state,
                registry=self.registry,
                admission=self.admission,
                verifier=self.verifier,
                rooms=self.rooms,
                messages=self.messages,
                changes=self.changes,
                inbox=InboxService(self.store, limits),
                presence=self.presence,
                fanout=self.fanout,
                typing=typing,
                max_presence_subscriptions=MAX_PRESENCE_SUBSCRIPTIONS,
                max_joined_rooms=settings.MAX_JOINED_ROOMS,
                interest=interest,
                ledger=ledger,
            )
        )
        if bus_manager is not None and ledger is not None:
            # What other instances publish while this one is not subscribed is read back
            # from the store once it is again (server/transport/catchup.py).
            bus_manager.ledger = ledger
            bus_manager.delivery.on_resubscribed = CatchUp(self.sio, ledger, self.messages).run
        self.drainer = Drainer(self.sio, self.registry, self.state, settings.SHUTDOWN_TIMEOUT)
        self.figures = Figures(
            self.state,
            local_connections=lambda: len(self.registry),
            online_users=self.presence.online_users,
            live_instances=self.bus.registry.live if self.bus else None,
            used_memory=self.bus.used_memory if self.bus else None,
            outbox_counts=self.store.outbox_counts if self.webhooks.enabled else None,
        )
        self.health = Health(
            self.state,
            self.figures,
            {"store": self.store.ping, "redis": self.bus.ping if self.bus else None},
            settings.HEALTH_CHECK_TIMEOUT,
        )
        self.server_api = ServerApiContext(
            admin=Admin(self.rooms, self.messages, self.presence, self.moderation, self.fanout),
            keys=ApiKeys(settings.SERVER_API_KEYS),
            rate_per_second=settings.SERVER_API_RATE_PER_SECOND,
            burst=settings.SERVER_API_BURST,
        )
        minter, off = dev_tokens(settings)
        self.http = HttpContext(
            health=self.health,
            figures=self.figures,
            verifier=self.verifier,
            dev_tokens=minter,
            dev_tokens_off=off,
            demo_dir=DEMO_DIR,
            metrics_token=settings.METRICS_TOKEN,
        )

    async def _online(self, user_ids: list[str]) -> set[str]:
        states = await self.presence.states(user_ids)
        return {uid for uid, state in states.items() if state["status"] == "online"}

    async def _presence_webhook(self, transition: Transition) -> None:
        await self.webhooks.presence_changed(
            transition.user_id, transition.status, iso(transition.last_seen)
        )

    def _presence_backend(self, on_transition: TransitionHandler) -> Presence:
        grace = self.settings.WS_GRACE_PERIOD
        if self.bus is None:
            return MemoryPresence(grace, on_transition)
        return RedisPresence(grace, on_transition, self.bus.redis, self.bus.keys, self.bus.registry)

    def _refusals(self) -> Refusals:
        """Refused attempts per address: in this process, and shared through Redis if there."""
        window = 60.0
        local = RefusalCounter(
            self.settings.RATE_LIMIT_CONNECTS_PER_MINUTE,
            window,
            self.settings.REFUSAL_LIMITER_MAX_KEYS,
        )
        if self.bus is None:
            return LocalRefusals(local)
        return RedisRefusals(self.bus.redis, self.bus.keys, local, window)

    def _allocator(self) -> RedisSeqAllocator | None:
        """Redis INCR for stores whose own seq allocation is slow (Firestore), when Redis is there."""
        if self.bus is None or self.store.allocates_seq_cheaply:
            return None
        return RedisSeqAllocator(
            self.bus.redis, self.bus.keys, self.store.last_seq, self.settings.SEQ_KEY_TTL
        )

    def _refuse_workers_without_redis(self) -> None:
        """Several workers of one instance share rooms and presence through Redis only."""
        if self.bus is None and not self._sole_worker.acquire():
            raise ConfigError(
                "uvicorn --workers N needs Redis: without it each worker would be a separate "
                "server behind the same port (its own rooms, presence and sessions). Set "
                "REDIS_URL or REDIS_HOST, or run one worker."
            )

    async def start(self) -> None:
        try:
            self._refuse_workers_without_redis()
            workers.stop_with_supervisor()  # no orphaned worker if uvicorn's parent is killed
            await self.store.start()
            await self.presence.start()
            if self.sessions is not None:
                await self.sessions.start()
        except Exception as exc:
            log.error("server.start_failed", error=str(exc), error_type=type(exc).__name__)
            await self._close_backends()
            raise
        # The manager's listener would otherwise start on the first connection only.
        if not self.sio.manager_initialized:
            self.sio.manager_initialized = True
            self.sio.manager.initialize()
        self.drainer.install()
        self.dispatcher.start()
        tune_garbage_collector()
        self._sampler = asyncio.get_running_loop().create_task(
            self.figures.sample_forever(self.settings.WS_HEARTBEAT_INTERVAL)
        )
        if self.http.dev_tokens is not None:
            log.warning(
                "auth.dev_tokens_enabled",
                hint="POST /api/dev/token mints a token for any user id (loopback clients "
                "only); set DEV_TOKENS=false outside development",
            )
        log.info(
            "server.started",
            instance_id=self.state.instance_id,
            instance=self.state.instance_name,
            store=self.settings.STORE,
            redis=self.bus is not None,
            version=self.state.version,
        )

    async def stop(self) -> None:
        """Stop every part in order; a step that hangs is abandoned after ``STOP_STEP_TIMEOUT``
        seconds and logged, so that a SIGTERM always ends the process."""
        metrics.worker_exiting()
        self._sole_worker.release()
        if getattr(self, "_sampler", None) is not None:
            self._sampler.cancel()

        async def goodbyes() -> None:
            for sid in self.registry.sids():
                await self.admission.disconnect(sid)

        await _bounded("disconnect", goodbyes())
        await _bounded("dispatcher", self.dispatcher.close())
        await _bounded("presence", self.presence.close())
        await _bounded("socketio", self.sio.shutdown())
        if self.sessions is not None:
            await _bounded("sessions", self.sessions.stop())
        if self.bus is not None:
            await _bounded("deregister", self.bus.registry.deregister())
        await _bounded("backends", self._close_backends())

    async def _close_backends(self) -> None:
        if self.bus is not None:
            await self.bus.close()
        await self.store.close()
