"""Socket.IO handlers of namespace ``/chat``: thin adapters from events to the services.

Each handler parses its payload with a pydantic model, calls a service and returns the ack.
Whatever goes wrong inside becomes an error ack: no exception leaves a handler, so no
connection's handler or the instance dies of bad input.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import socketio
import structlog

from . import metrics
from .auth import AuthError, Identity, token_from_connect
from .errors import ChatError, StoreUnavailable
from .models import iso, utcnow
from .payloads import (
    ChangeMembers,
    CreateRoom,
    History,
    JoinRoom,
    MarkRead,
    Payload,
    PresenceUsers,
    RefreshToken,
    RoomRef,
    SendMessage,
    Typing,
    parse,
)
from .presence.base import Transition
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from .chat import ChatServer

log = structlog.get_logger(__name__)

NAMESPACE = "/chat"
MAX_PRESENCE_SUBSCRIPTIONS = 5000


def room_channel(room_id: str) -> str:
    return f"room:{room_id}"


def user_channel(user_id: str) -> str:
    return f"user:{user_id}"


def presence_channel(user_id: str) -> str:
    return f"presence:{user_id}"


@dataclass(eq=False)
class Connection:
    """What this instance knows about one connected socket."""

    sid: str
    identity: Identity
    ip: str
    bucket: TokenBucket
    joined: set[str] = field(default_factory=set)
    presence: set[str] = field(default_factory=set)
    expiry: asyncio.Task | None = None


Handler = Callable[[Connection, Any], Awaitable[dict]]


def client_ip(environ: dict, trust_proxy: bool) -> str:
    if trust_proxy:
        forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded:
            return forwarded.split(",")[0].strip()
    client = (environ.get("asgi.scope") or {}).get("client")
    return client[0] if client else environ.get("REMOTE_ADDR", "unknown")


class Gateway:
    """Registers the ``/chat`` handlers on ``sio`` and keeps this instance's connections."""

    def __init__(self, chat: ChatServer) -> None:
        self.chat = chat
        self.sio: socketio.AsyncServer = chat.sio
        self.connections: dict[str, Connection] = {}
        self.draining = False
        self.in_flight = 0
        self._register()

    # --- registration -------------------------------------------------------------------
    def _register(self) -> None:
        on = self.sio.on
        on("connect", self._connect_handler, namespace=NAMESPACE)
        on("disconnect", self._disconnect_handler, namespace=NAMESPACE)
        on("*", self.on_unknown, namespace=NAMESPACE)
        routes: dict[str, tuple[type[Payload], Handler]] = {
            "auth:refresh": (RefreshToken, self.auth_refresh),
            "room:join": (JoinRoom, self.room_join),
            "room:leave": (RoomRef, self.room_leave),
            "room:create": (CreateRoom, self.room_create),
            "room:members": (RoomRef, self.room_members),
            "room:members:add": (ChangeMembers, self.room_members_add),
            "room:members:remove": (ChangeMembers, self.room_members_remove),
            "message:send": (SendMessage, self.message_send),
            "message:history": (History, self.message_history),
            "message:read": (MarkRead, self.message_read),
            "typing": (Typing, self.typing),
            "presence:subscribe": (PresenceUsers, self.presence_subscribe),
            "presence:unsubscribe": (PresenceUsers, self.presence_unsubscribe),
        }
        for event, (model, handler) in routes.items():
            on(event, self._guarded(event, model, handler), namespace=NAMESPACE)

    def _guarded(self, event: str, model: type[Payload], handler: Handler):
        async def run(sid: str, data: Any = None, *extra: Any) -> dict:
            conn = self.connections.get(sid)
            self.in_flight += 1
            try:
                if conn is None:
                    raise ChatError("unavailable", "connection is not established; reconnect")
                if not conn.bucket.take():
                    raise ChatError("rate_limited", "too many events; slow down")
                ack = {"ok": True, **await handler(conn, parse(model, data))}
                metrics.ACKS.labels("ok").inc()
                return ack
            except ChatError as exc:
                metrics.ACKS.labels(exc.code).inc()
                return exc.to_ack()
            except StoreUnavailable as exc:
                log.warning("store.unavailable", request=event, error=str(exc))
                metrics.ACKS.labels("unavailable").inc()
                return ChatError("unavailable", "storage is unavailable; retry shortly").to_ack()
            except Exception:
                log.exception("handler.failed", request=event, sid=sid)
                metrics.ACKS.labels("internal").inc()
                return ChatError("internal", "internal error; it has been logged").to_ack()
            finally:
                self.in_flight -= 1

        run.__name__ = f"on_{event.replace(':', '_')}"
        return run

    async def on_unknown(self, event: str, sid: str, *args: Any) -> dict:
        conn = self.connections.get(sid)
        if (
            conn is not None and not conn.bucket.take()
        ):  # unknown events count against the limit too
            metrics.ACKS.labels("rate_limited").inc()
            return ChatError("rate_limited", "too many events; slow down").to_ack()
        metrics.ACKS.labels("bad_request").inc()
        return ChatError("bad_request", f"unknown event {event!r}").to_ack()

    # --- connection lifecycle -------------------------------------------------------------
    def _spoofed_lifecycle(self, sid: str, event: str) -> dict | None:
        """An error ack when ``connect``/``disconnect`` arrives as an event from a connected socket.

        python-socketio routes a client's event named like a lifecycle handler to that
        handler; a real connect or disconnect never finds the socket fully connected.
        """
        if not self.sio.manager.is_connected(sid, NAMESPACE):
            return None
        metrics.ACKS.labels("bad_request").inc()
        return ChatError("bad_request", f"unknown event {event!r}").to_ack()

    async def _connect_handler(
        self, sid: str, environ: Any = None, auth: Any = None, *extra: Any
    ) -> dict | None:
        spoofed = self._spoofed_lifecycle(sid, "connect")
        if spoofed is not None:
            return spoofed
        await self.on_connect(sid, environ, auth)
        return None

    async def _disconnect_handler(self, sid: str, reason: Any = None, *extra: Any) -> dict | None:
        spoofed = self._spoofed_lifecycle(sid, "disconnect")
        if spoofed is not None:
            return spoofed
        await self.on_disconnect(sid, reason)
        return None

    async def on_connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        """Authenticate and register; anything unexpected refuses cleanly (never half-connects)."""
        try:
            await self._admit(sid, environ, auth)
        except socketio.exceptions.ConnectionRefusedError:
            raise
        except Exception:
            log.exception("connect.failed", sid=sid)
            self._forget(sid)
            raise socketio.exceptions.ConnectionRefusedError(
                "internal", {"code": "internal"}
            ) from None

    async def _admit(self, sid: str, environ: dict, auth: Any) -> None:
        settings = self.chat.settings
        ip = client_ip(environ, settings.TRUST_PROXY_HEADERS)
        if self.draining:
            raise socketio.exceptions.ConnectionRefusedError("unavailable", {"code": "draining"})
        try:
            identity = await self.chat.verifier.verify(token_from_connect(auth, environ))
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.code).inc()
            if not self.chat.connect_limiter.hit(ip):
                raise socketio.exceptions.ConnectionRefusedError(
                    "rate_limited", {"code": "rate_limited"}
                ) from None
            log.info("auth.refused", code=exc.code, reason=exc.reason, ip=ip)
            raise socketio.exceptions.ConnectionRefusedError(
                "unauthorized", {"code": exc.code}
            ) from None
        conn = Connection(
            sid,
            identity,
            ip,
            TokenBucket(settings.RATE_LIMIT_EVENTS_PER_SECOND, settings.RATE_LIMIT_EVENTS_BURST),
        )
        self.connections[sid] = conn
        await self.sio.enter_room(sid, user_channel(identity.user_id), namespace=NAMESPACE)
        self._schedule_expiry(conn)
        metrics.CONNECTIONS.set(len(self.connections))
        self.sio.start_background_task(self._after_connect, conn)

    async def _after_connect(self, conn: Connection) -> None:
        """Work that must not delay or fail the handshake: session event, presence, user record."""
        for _ in range(200):  # the CONNECT packet goes out after the handler returns
            if (
                self.sio.manager.is_connected(conn.sid, NAMESPACE)
                or conn.sid not in self.connections
            ):
                break
            await asyncio.sleep(0.005)
        if conn.sid not in self.connections:
            return
        who = conn.identity
        # Presence first, with no await since the check above: a disconnect from here on
        # finds the connection registered and undoes it.
        await self._quietly("presence.connect", self.chat.presence.connect(who.user_id, conn.sid))
        await self.sio.emit(
            "session",
            {
                "user": {"id": who.user_id, "name": who.name},
                "sid": conn.sid,
                "instance_id": self.chat.instance_id,
                "server_time": iso(utcnow()),
            },
            to=conn.sid,
            namespace=NAMESPACE,
            ignore_queue=True,  # a socket of this instance: no need to publish through Redis
        )
        await self._quietly("store.upsert_user", self.chat.store.upsert_user(who.user_id, who.name))

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        conn = self._forget(sid)
        if conn is not None:
            await self._quietly(
                "presence.disconnect", self.chat.presence.disconnect(conn.identity.user_id, sid)
            )

    async def close_all_transports(self) -> None:
        """Close every client's transport so that it reconnects (elsewhere) by itself."""
        eio = self.sio.eio
        for sid in list(self.connections):
            eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
            socket = eio.sockets.get(eio_sid) if eio_sid else None
            if socket is None:
                continue
            try:
                await socket.close(wait=False, reason="server shutting down")
                if socket.upgraded:  # end the websocket writer: it closes the websocket itself
                    await socket.queue.put(None)
            except Exception as exc:
                log.warning("shutdown.close_failed", sid=sid, error=str(exc))

    def _forget(self, sid: str) -> Connection | None:
        conn = self.connections.pop(sid, None)
        if conn is not None and conn.expiry is not None:
            conn.expiry.cancel()
        metrics.CONNECTIONS.set(len(self.connections))
        return conn

    async def _quietly(self, what: str, work: Awaitable[Any]) -> None:
        try:
            await work
        except Exception as exc:
            log.warning(
                f"{what}_failed",
                error=str(exc),
                hint="the instance keeps serving; state heals on reconnect",
            )

    def _schedule_expiry(self, conn: Connection) -> None:
        if conn.expiry is not None:
            conn.expiry.cancel()
        conn.expiry = asyncio.get_running_loop().create_task(
            self._expire(conn, conn.identity.expires_at)
        )

    async def _expire(self, conn: Connection, expires_at: float) -> None:
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        if self.connections.get(conn.sid) is conn and conn.identity.expires_at <= expires_at:
            log.info("auth.token_expired_disconnect", user=conn.identity.user_id, sid=conn.sid)
            await self.sio.emit(
                "auth:expired",
                {"reason": "token_expired"},
                to=conn.sid,
                namespace=NAMESPACE,
                ignore_queue=True,
            )
            await self.sio.disconnect(conn.sid, namespace=NAMESPACE)

    # --- events ---------------------------------------------------------------------------
    async def auth_refresh(self, conn: Connection, request: RefreshToken) -> dict:
        try:
            identity = await self.chat.verifier.verify(request.token)
        except AuthError as exc:
            raise ChatError("forbidden", f"token refused ({exc.code}): {exc.reason}") from None
        if identity.user_id != conn.identity.user_id:
            raise ChatError("forbidden", "the new token is for another user")
        if identity.expires_at < conn.identity.expires_at:
            raise ChatError("bad_request", "the new token expires before the current one")
        conn.identity = identity
        self._schedule_expiry(conn)
        return {"expires_at": iso_from_epoch(identity.expires_at)}

    async def room_join(self, conn: Connection, request: JoinRoom) -> dict:
        room = await self.chat.rooms.open_for_join(conn.identity, request.room)
        # Enter first, then read: a message stored meanwhile arrives live or in `missed`.
        await self.sio.enter_room(conn.sid, room_channel(room.id), namespace=NAMESPACE)
        conn.joined.add(room.id)
        last_seq, missed, has_more = await self.chat.messages.missed(room.id, request.since)
        return {
            "room": room.to_wire(),
            "last_seq": last_seq,
            "missed": [m.to_wire() for m in missed],
            "has_more": has_more,
        }

    async def room_leave(self, conn: Connection, request: RoomRef) -> dict:
        await self.sio.leave_room(conn.sid, room_channel(request.room), namespace=NAMESPACE)
        conn.joined.discard(request.room)
        return {}

    async def room_create(self, conn: Connection, request: CreateRoom) -> dict:
        room = await self.chat.rooms.create(conn.identity, request)
        return {"room": room.to_wire()}

    async def room_members(self, conn: Connection, request: RoomRef) -> dict:
        members = await self.chat.rooms.members_for(conn.identity, request.room)
        states = await self.chat.presence_states(members)
        return {"members": [{"id": uid, "status": states[uid]["status"]} for uid in members]}

    async def room_members_add(self, conn: Connection, request: ChangeMembers) -> dict:
        added = await self.chat.rooms.change_members(conn.identity, request, add=True)
        return {"room": request.room, "members": added}

    async def room_members_remove(self, conn: Connection, request: ChangeMembers) -> dict:
        removed = await self.chat.rooms.change_members(conn.identity, request, add=False)
        for user_id in removed:
            await self.sio.emit(
                "$chat:evict", {"user": user_id, "room": request.room}, namespace=NAMESPACE
            )
        return {"room": request.room, "removed": removed}

    async def evict_local(self, user_id: str, room_id: str) -> None:
        """Make this instance's sockets of ``user_id`` leave ``room_id`` (control event)."""
        for conn in list(self.connections.values()):
            if conn.identity.user_id == user_id and room_id in conn.joined:
                conn.joined.discard(room_id)
                await self.sio.leave_room(conn.sid, room_channel(room_id), namespace=NAMESPACE)
                await self.sio.emit(
                    "room:removed",
                    {"room": room_id},
                    to=conn.sid,
                    namespace=NAMESPACE,
                    ignore_queue=True,
                )

    def _require_joined(self, conn: Connection, room_id: str) -> None:
        if room_id not in conn.joined:
            raise ChatError("forbidden", f"join room {room_id!r} first")

    async def message_send(self, conn: Connection, request: SendMessage) -> dict:
        self._require_joined(conn, request.room)
        message = await self.chat.messages.send(conn.identity, conn.sid, request)
        return {"message": message.to_wire()}

    async def message_history(self, conn: Connection, request: History) -> dict:
        messages, has_more = await self.chat.messages.history(conn.identity, request)
        return {"messages": [m.to_wire() for m in messages], "has_more": has_more}

    async def message_read(self, conn: Connection, request: MarkRead) -> dict:
        seq = await self.chat.messages.mark_read(conn.identity, request)
        return {"room": request.room, "seq": seq}

    async def typing(self, conn: Connection, request: Typing) -> dict:
        self._require_joined(conn, request.room)
        await self.chat.messages.typing(conn.identity, conn.sid, request.room, request.typing)
        return {}

    async def presence_subscribe(self, conn: Connection, request: PresenceUsers) -> dict:
        users = list(dict.fromkeys(request.users))
        if len(conn.presence | set(users)) > MAX_PRESENCE_SUBSCRIPTIONS:
            raise ChatError(
                "too_large", f"a connection may follow at most {MAX_PRESENCE_SUBSCRIPTIONS} users"
            )
        for user_id in users:
            if user_id not in conn.presence:
                await self.sio.enter_room(conn.sid, presence_channel(user_id), namespace=NAMESPACE)
                conn.presence.add(user_id)
        return {"presence": await self.chat.presence_states(users)}

    async def presence_unsubscribe(self, conn: Connection, request: PresenceUsers) -> dict:
        for user_id in set(request.users) & conn.presence:
            await self.sio.leave_room(conn.sid, presence_channel(user_id), namespace=NAMESPACE)
            conn.presence.discard(user_id)
        return {}

    # --- outbound -------------------------------------------------------------------------
    async def to_room(
        self, room_id: str, event: str, data: dict, skip_sid: str | None = None
    ) -> None:
        await self.sio.emit(
            event, data, room=room_channel(room_id), skip_sid=skip_sid, namespace=NAMESPACE
        )

    async def announce(self, transition: Transition) -> None:
        await self.sio.emit(
            "presence",
            {
                "user": transition.user_id,
                "status": transition.status,
                "last_seen": iso(transition.last_seen),
            },
            room=presence_channel(transition.user_id),
            namespace=NAMESPACE,
        )

    async def on_control(self, name: str, data: dict) -> None:
        if name == "evict":
            await self.evict_local(str(data.get("user")), str(data.get("room")))


def iso_from_epoch(seconds: float) -> str | None:
    from datetime import UTC, datetime

    try:
        return iso(datetime.fromtimestamp(seconds, UTC))
    except (OverflowError, ValueError, OSError):  # beyond what a datetime holds (year > 9999)
        return None
