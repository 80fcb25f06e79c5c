"""Socket.IO namespace ``/chat``: the route table and the one guard every event passes.

Each handler parses its payload with a pydantic model, calls a service and returns the ack.
:meth:`ChatNamespace.trigger_event` is the single guard: it routes, rate-limits, counts
work in flight and turns whatever goes wrong into an error ack. No exception leaves it,
so bad input never kills a handler, a connection or the instance.

To add an event: a payload model in ``server/services/payloads.py``, a service method,
a handler here, one line in ``ROUTES``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import socketio
import structlog

from server.auth import AuthError, TokenVerifier
from server.bus.ledger import DeliveryLedger
from server.core import metrics
from server.core.errors import ChatError, StoreUnavailable
from server.core.models import iso_from_epoch
from server.core.state import InstanceState
from server.services.changes import ChangeService
from server.services.inbox import InboxService
from server.services.messages import MessageService
from server.services.payloads import (
    ChangeMembers,
    Changes,
    CreateRoom,
    EditMessage,
    History,
    JoinRoom,
    ListRooms,
    MarkRead,
    MembersPage,
    MessageRef,
    Payload,
    PresenceUsers,
    React,
    RefreshToken,
    RoomRef,
    SendMessage,
    Typing,
    parse,
)
from server.services.presence import PresenceService
from server.services.rooms import RoomService
from server.transport.channels import NAMESPACE, presence_channel, room_channel
from server.transport.connections import Admission, Connection, ConnectionRegistry
from server.transport.fanout import Fanout
from server.transport.indicators import TypingTimers
from server.transport.interest import RoomInterest

log = structlog.get_logger(__name__)
_ACKS_OK = metrics.ACKS.labels("ok")  # every successful request: no label lookup

Handler = Callable[["ChatNamespace", Connection, Any], Awaitable[dict]]
LIFECYCLE = ("connect", "disconnect")


class ChatNamespace(socketio.AsyncNamespace):
    """Handlers of ``/chat``; state lives in the services and the connection registry."""

    def __init__(
        self,
        *,
        state: InstanceState,
        registry: ConnectionRegistry,
        admission: Admission,
        verifier: TokenVerifier,
        rooms: RoomService,
        messages: MessageService,
        changes: ChangeService,
        inbox: InboxService,
        presence: PresenceService,
        fanout: Fanout,
        typing: TypingTimers,
        max_presence_subscriptions: int,
        max_joined_rooms: int,
        interest: RoomInterest,
        ledger: DeliveryLedger | None = None,
    ) -> None:
        super().__init__(NAMESPACE)
        self.state = state
        self.registry = registry
        self.admission = admission
        self.verifier = verifier
        self.rooms = rooms
        self.messages = messages
        self.changes = changes
        self.inbox = inbox
        self.presence = presence
        self.fanout = fanout
        self.typing_timers = typing
        self.max_presence_subscriptions = max_presence_subscriptions
        self.max_joined_rooms = max_joined_rooms
        #: which rooms this instance hears from the others
        self.interest = interest
        #: what this instance delivered, for catching up after a lost subscription
        self.ledger = ledger

    # --- the guard ------------------------------------------------------------------------
    async def trigger_event(self, event: str, *args: Any) -> Any:
        sid = args[0] if args else ""
        if event in LIFECYCLE and not self._is_connected(sid):
            if event == "connect":
                environ = args[1] if len(args) > 1 else {}
                auth = args[2] if len(args) > 2 else None
                await self.admission.connect(sid, environ, auth)
            else:
                conn = self.registry.get(sid)
                if conn is not None:
                    await self.typing_timers.stop_all(conn, "disconnect")
                await self.admission.disconnect(sid)
            return None
        # A client event named like a lifecycle handler arrives from a connected socket:
        # python-socketio routes it here like any event; it is unknown to the protocol.
        route = ROUTES.get(event) if isinstance(event, str) else None
        if route is None:
            return self._unknown(sid, event)
        model, handler = route
        data = args[1] if len(args) > 1 else None
        return await self._guarded(event, sid, model, handler, data)

    def _is_connected(self, sid: str) -> bool:
        return bool(sid) and self.server.manager.is_connected(sid, NAMESPACE)

    async def _guarded(
        self, event: str, sid: str, model: type[Payload], handler: Handler, data: Any
    ) -> dict:
        conn = self.registry.get(sid)
        self.state.in_flight += 1
        try:
            if conn is None:
                raise ChatError("unavailable", "connection is not established; reconnect")
            if not conn.bucket.take():
                raise ChatError("rate_limited", "too many events; slow down")
            ack = {"ok": True, **await handler(self, conn, parse(model, data))}
            _ACKS_OK.inc()
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
            self.state.in_flight -= 1

    def _unknown(self, sid: str, event: Any) -> dict:
        conn = self.registry.get(sid)
        if conn is not None and not conn.bucket.take():  # unknown events count too
            metrics.ACKS.labels("rate_limited").inc()
            return ChatError("rate_limited", "too many events; slow down").to_ack()
        metrics.ACKS.labels("bad_request").inc()
        return ChatError("bad_request", f"unknown event {event!r}").to_ack()

    # --- handlers -------------------------------------------------------------------------
    async def auth_refresh(self, conn: Connection, request: RefreshToken) -> dict:
        try:
            identity = await self.verifier.verify(request.token)
        except AuthError as exc:
            raise ChatError("forbidden", f"token refused ({exc.code}): {exc.reason}") from None
        if identity.user_id != conn.identity.user_id:
            raise ChatError("forbidden", "the new token is for another user")
        if await self.admission.moderation.revoked(identity):
            raise ChatError(
                "forbidden", "token refused (token_revoked): issued before a revocation"
            )
        if identity.expires_at < conn.identity.expires_at:
            raise ChatError("bad_request", "the new token expires before the current one")
        conn.identity = identity
        self.admission.schedule_expiry(conn)
        return {"expires_at": iso_from_epoch(identity.expires_at)}

    async def room_join(self, conn: Connection, request: JoinRoom) -> dict:
        if request.room not in conn.joined and len(conn.joined) >= self.max_joined_rooms:
            metrics.LIMIT_REFUSALS.labels("joined_rooms").inc()
            raise ChatError(
                "too_large", f"a connection may join at most {self.max_joined_rooms} rooms"
            )
        room = await self.rooms.open_for_join(conn.identity, request.room)
        # Hear the room, enter it, then read: a message stored meanwhile arrives live or in
        # `missed` (the room's channel is followed once `join` returns).
        await self.interest.join(conn.sid, room.id)
        await self.enter_room(conn.sid, room_channel(room.id))
        conn.joined.add(room.id)
        last_seq, missed, has_more = await self.messages.missed(room.id, request.since)
        if self.ledger is not None:
            self.ledger.joined(room.id, last_seq)
        user = conn.identity.user_id
        ack = {
            "room": room.to_wire(),
            "last_seq": last_seq,
            "missed": await self.messages.views.render(room.id, missed, user),
            "has_more": has_more,
        }
        changes: list[dict] = []
        if request.changes_since is None:
            changes_more, cursor = False, await self.changes.current(room.id)
        else:
            changes, changes_more, cursor = await self.changes.since(
                room.id, request.changes_since, request.since, user
            )
        return {**ack, "change_seq": cursor, "changes": changes, "changes_has_more": changes_more}

    async def room_leave(self, conn: Connection, request: RoomRef) -> dict:
        await self.typing_timers.stop(conn, request.room, "leave")
        await self.leave_room(conn.sid, room_channel(request.room))
        conn.joined.discard(request.room)
        self.interest.leave(conn.sid, request.room)
        return {}

    async def room_create(self, conn: Connection, request: CreateRoom) -> dict:
        room = await self.rooms.create(conn.identity, request)
        return {"room": room.to_wire()}

    async def room_members(self, conn: Connection, request: MembersPage) -> dict:
        """One page of members: ``after`` the last id of the previous page, ``next`` when more."""
        members, more = await self.rooms.members_for(
            conn.identity, request.room, request.after or "", request.limit
        )
        statuses = await self.presence.statuses(members)  # no last_seen: no store read
        ack: dict = {"members": [{"id": uid, "status": statuses[uid]} for uid in members]}
        if more:
            ack["next"] = members[-1]
        return ack

    async def room_members_add(self, conn: Connection, request: ChangeMembers) -> dict:
        added = await self.rooms.change_members(conn.identity, request, add=True)
        return {"room": request.room, "members": added}

    async def room_members_remove(self, conn: Connection, request: ChangeMembers) -> dict:
        removed = await self.rooms.change_members(conn.identity, request, add=False)
        await self.fanout.evict(request.room, removed)
        return {"room": request.room, "removed": removed}

    def _require_joined(self, conn: Connection, room_id: str) -> None:
        if room_id not in conn.joined:
            raise ChatError("forbidden", f"join room {room_id!r} first")

    async def message_send(self, conn: Connection, request: SendMessage) -> dict:
        self._require_joined(conn, request.room)
        return {"message": await self.messages.send(conn.identity, conn.sid, request)}

    async def message_history(self, conn: Connection, request: History) -> dict:
        messages, has_more = await self.messages.history(conn.identity, request)
        views = await self.messages.views.render(request.room, messages, conn.identity.user_id)
        return {"messages": views, "has_more": has_more}

    async def message_edit(self, conn: Connection, request: EditMessage) -> dict:
        return {"message": await self.changes.edit(conn.identity, request)}

    async def message_delete(self, conn: Connection, request: MessageRef) -> dict:
        return {"message": await self.changes.delete(conn.identity, request)}

    async def reaction_add(self, conn: Connection, request: React) -> dict:
        return {"message": await self.changes.react(conn.identity, request, add=True)}

    async def reaction_remove(self, conn: Connection, request: React) -> dict:
        return {"message": await self.changes.react(conn.identity, request, add=False)}

    async def message_changes(self, conn: Connection, request: Changes) -> dict:
        return await self.changes.changes(conn.identity, request)

    async def rooms_list(self, conn: Connection, request: ListRooms) -> dict:
        return await self.inbox.list_rooms(conn.identity, request)

    async def message_read(self, conn: Connection, request: MarkRead) -> dict:
        seq = await self.messages.mark_read(conn.identity, request)
        return {"room": request.room, "seq": seq}

    async def typing(self, conn: Connection, request: Typing) -> dict:
        self._require_joined(conn, request.room)
        if request.typing:
            self.typing_timers.started(conn, request.room)
        else:
            self.typing_timers.cancel(conn, request.room)
        await self.messages.typing(conn.identity, conn.sid, request.room, request.typing)
        return {}

    async def presence_subscribe(self, conn: Connection, request: PresenceUsers) -> dict:
        users = list(dict.fromkeys(request.users))
        cap = self.max_presence_subscriptions
        if len(conn.presence | set(users)) > cap:
            raise ChatError("too_large", f"a connection may follow at most {cap} users")
        for user_id in users:
            if user_id not in conn.presence:
                await self.enter_room(conn.sid, presence_channel(user_id))
                conn.presence.add(user_id)
        return {"presence": await self.presence.states(users)}

    async def presence_unsubscribe(self, conn: Connection, request: PresenceUsers) -> dict:
        for user_id in set(request.users) & conn.presence:
            await self.leave_room(conn.sid, presence_channel(user_id))
            conn.presence.discard(user_id)
        return {}


#: event → (payload model, handler). The only place an event name meets its handler.
ROUTES: dict[str, tuple[type[Payload], Handler]] = {
    "auth:refresh": (RefreshToken, ChatNamespace.auth_refresh),
    "room:join": (JoinRoom, ChatNamespace.room_join),
    "room:leave": (RoomRef, ChatNamespace.room_leave),
    "room:create": (CreateRoom, ChatNamespace.room_create),
    "room:members": (MembersPage, ChatNamespace.room_members),
    "room:members:add": (ChangeMembers, ChatNamespace.room_members_add),
    "room:members:remove": (ChangeMembers, ChatNamespace.room_members_remove),
    "message:send": (SendMessage, ChatNamespace.message_send),
    "message:history": (History, ChatNamespace.message_history),
    "message:read": (MarkRead, ChatNamespace.message_read),
    "message:edit": (EditMessage, ChatNamespace.message_edit),
    "message:delete": (MessageRef, ChatNamespace.message_delete),
    "message:changes": (Changes, ChatNamespace.message_changes),
    "reaction:add": (React, ChatNamespace.reaction_add),
    "reaction:remove": (React, ChatNamespace.reaction_remove),
    "rooms:list": (ListRooms, ChatNamespace.rooms_list),
    "typing": (Typing, ChatNamespace.typing),
    "presence:subscribe": (PresenceUsers, ChatNamespace.presence_subscribe),
    "presence:unsubscribe": (PresenceUsers, ChatNamespace.presence_unsubscribe),
}
