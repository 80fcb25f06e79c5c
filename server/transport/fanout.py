"""Outbound: events to rooms, presence announcements, and the control events between instances.

Emits go through the Socket.IO client manager, which carries them to every instance (Redis
pub/sub) or keeps them in this process (single instance). Control events are emits named
``$chat:…``; the manager hands them to :meth:`Fanout.on_control` on every instance instead
of to clients (see ``server/bus/manager.py``).

``$chat:disconnect {user, reason, issued_before}`` closes a user's sockets everywhere
(those holding tokens issued before ``issued_before`` when it is set), after telling each
socket why with ``session:closed {reason}``. Other parts subscribe to control events
with :meth:`Fanout.on_control_event` (moderation drops cached sanctions that way).

``$chat:outside {room, users, event, data}`` delivers ``event`` to the listed users'
sockets that have *not* joined ``room`` (a joined socket has the room's own broadcast):
``room:activity`` this way costs nothing per joined member, the common case. It travels
inside the room broadcast it goes with (``to_room(..., outside=...)``; the managers carry
it in the same pub/sub message, ``server/bus/manager.py``), so a sent message costs each
instance one pub/sub message; the separate control event of earlier releases is still
understood.

``$chat:members {room, users, added}`` says the listed users became (or stopped being)
members of a room: each instance follows the room's channel while members of it are
connected there, for their ``room:activity`` (``server/transport/interest.py``).

``$chat:evict {room, users}`` removes the listed users' sockets from a room wherever they
are connected. One event per request, whatever the number of users; each instance finds
the affected sockets through the per-user Socket.IO room (an index), never by scanning
every connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import socketio

from server.bus.manager import OUTSIDE
from server.core import metrics
from server.core.models import iso
from server.presence.base import Transition
from server.services.ports import Notice
from server.transport.channels import NAMESPACE, presence_channel, room_channel, user_channel
from server.transport.connections import Connection, ConnectionRegistry
from server.transport.interest import RoomInterest

EVICT = "evict"
DISCONNECT = "disconnect"
MEMBERS = "members"
ControlListener = Callable[[dict], object]


class Fanout:
    """Implements the services' ``Fanout`` and ``PresenceAnnouncer`` on Socket.IO rooms."""

    def __init__(
        self, sio: socketio.AsyncServer, registry: ConnectionRegistry, interest: RoomInterest
    ) -> None:
        self.sio = sio
        self.registry = registry
        self.interest = interest
        self._listeners: dict[str, list[ControlListener]] = {}
        self._control_counters: dict[str, Any] = {}
        #: called for each socket an eviction removes from a room (ends its typing)
        self.on_evicted: Callable[[Connection, str], Awaitable[None]] | None = None
        #: called with (room, users) for every membership change, from any instance
        self.on_members: Callable[[str, list[str]], None] | None = None

    async def to_room(
        self,
        room_id: str,
        event: str,
        data: dict,
        skip_sid: str | None = None,
        outside: Notice | None = None,
    ) -> None:
        """With ``outside``, the emit carries an ``outside`` control event (see the module
        docstring) that each instance runs after delivering ``event`` to its sockets."""
        carried = None
        if outside is not None:
            metrics.CARRIED_OUTSIDE.inc()
            carried = {
                "room": room_id,
                "users": outside.users,
                "event": outside.event,
                "data": outside.data,
            }
        # Straight to the manager: ``AsyncServer.emit`` only adds a log call and renames
        # arguments, and this is called for every message sent. Every manager of ours
        # takes ``outside`` (None: nothing carried; ``server/bus/manager.py``).
        await self.sio.manager.emit(
            event, data, NAMESPACE, room=room_channel(room_id), skip_sid=skip_sid, outside=carried
        )

    async def to_users(self, user_ids: list[str], event: str, data: dict) -> None:
        """One emit to the per-user rooms of ``user_ids``: every instance delivers it once
        to each of their sockets (a socket of two listed users still gets one copy)."""
        if not user_ids:
            return
        await self.sio.emit(
            event, data, to=[user_channel(u) for u in user_ids], namespace=NAMESPACE
        )

    async def outside_local(
        self, room_id: str, user_ids: list[str], event: str, data: dict
    ) -> None:
        """``event`` to this instance's sockets of ``user_ids`` that have not joined
        ``room_id``; O(their sockets), one encoding for all of them."""
        sids = [
            conn.sid
            for user_id in user_ids
            for conn in self.local_connections(user_id)
            if room_id not in conn.joined
        ]
        if sids:
            await self.sio.emit(event, data, to=sids, namespace=NAMESPACE, ignore_queue=True)

    def local_connections(self, user_id: str) -> list[Connection]:
        """This instance's connections of ``user_id``, found through the per-user room.

        The manager's room table (namespace → room → {sid: eio_sid}) is read in place:
        ``get_participants`` copies the room, and ``room:activity`` asks this for every
        member of a room on every instance for every message."""
        channel = self.sio.manager.rooms.get(NAMESPACE, {}).get(user_channel(user_id), ())
        registry = self.registry
        return [conn for sid in channel if (conn := registry.get(sid)) is not None]

    async def to_local_sid(self, sid: str, event: str, data: dict) -> None:
        """One socket of this instance: no round trip through Redis."""
        await self.sio.emit(event, data, to=sid, namespace=NAMESPACE, ignore_queue=True)

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

    async def evict(self, room_id: str, user_ids: list[str]) -> None:
        """Remove ``user_ids``' sockets from ``room_id`` on every instance (one control event)."""
        if user_ids:
            await self.control(EVICT, {"room": room_id, "users": user_ids})

    async def control(self, name: str, data: dict) -> None:
        """Publish control event ``name`` to every instance, this one included."""
        counter = self._control_counters.get(name)
        if counter is None:
            counter = self._control_counters[name] = metrics.CONTROL_EVENTS.labels(name)
        counter.inc()
        await self.sio.manager.emit(f"$chat:{name}", data, NAMESPACE)

    async def members_changed(self, room_id: str, user_ids: list[str], added: bool) -> None:
        """Tell every instance that ``user_ids`` joined or left ``room_id``'s members."""
        await self.control(MEMBERS, {"room": room_id, "users": user_ids, "added": added})

    async def members_local(self, room_id: str, user_ids: list[str], added: bool) -> None:
        """Count (or stop counting) this instance's connections of ``user_ids`` as members."""
        for user_id in user_ids:
            for conn in self.local_connections(user_id):
                if added:  # runs in the bus listener's task: it must not wait for itself
                    await self.interest.members(conn.sid, [room_id], wait=False)
                else:
                    self.interest.not_member(conn.sid, room_id)

    def on_control_event(self, name: str, listener: ControlListener) -> None:
        """Call ``listener(data)`` (sync) for every control event ``name`` from any instance."""
        self._listeners.setdefault(name, []).append(listener)

    async def on_control(self, name: str, data: dict) -> None:
        """A control event from any instance (this one included)."""
        if name == EVICT:
            users = data.get("users")
            if not isinstance(users, list):  # the single-user form of earlier releases
                users = [data.get("user")]
            await self.evict_local(str(data.get("room")), [str(u) for u in users])
        elif name == OUTSIDE:
            users, event, payload = data.get("users"), data.get("event"), data.get("data")
            if isinstance(users, list) and isinstance(event, str) and isinstance(payload, dict):
                await self.outside_local(
                    str(data.get("room")), [str(u) for u in users], event, payload
                )
        elif name == MEMBERS:
            users = data.get("users")
            if isinstance(users, list):
                room_id, user_ids = str(data.get("room")), [str(u) for u in users]
                if self.on_members is not None:
                    self.on_members(room_id, user_ids)
                await self.members_local(room_id, user_ids, data.get("added") is True)
        elif name == DISCONNECT:
            before = data.get("issued_before")
            await self.disconnect_local(
                str(data.get("user")),
                str(data.get("reason") or "disconnected by the server"),
                float(before) if isinstance(before, int | float) else None,
            )
        for listener in self._listeners.get(name, ()):
            listener(data)

    async def disconnect_user(
        self, user_id: str, reason: str, issued_before: float | None = None
    ) -> None:
        """Close ``user_id``'s sockets on every instance (only older tokens with ``issued_before``)."""
        await self.control(
            DISCONNECT, {"user": user_id, "reason": reason, "issued_before": issued_before}
        )

    async def disconnect_local(
        self, user_id: str, reason: str, issued_before: float | None = None
    ) -> None:
        for conn in self.local_connections(user_id):
            if issued_before is not None and conn.identity.issued_at >= issued_before:
                continue
            await self.to_local_sid(conn.sid, "session:closed", {"reason": reason})
            await self.sio.disconnect(conn.sid, namespace=NAMESPACE)

    async def evict_local(self, room_id: str, user_ids: list[str]) -> None:
        """Make this instance's sockets of ``user_ids`` leave ``room_id``; O(their sockets)."""
        manager = self.sio.manager
        for user_id in user_ids:
            for sid, _ in list(manager.get_participants(NAMESPACE, user_channel(user_id))):
                metrics.EVICTION_SOCKETS.inc()
                conn = self.registry.get(sid)
                if conn is None or room_id not in conn.joined:
                    continue
                conn.joined.discard(room_id)
                self.interest.leave(sid, room_id)
                if self.on_evicted is not None:
                    await self.on_evicted(conn, room_id)
                await self.sio.leave_room(sid, room_channel(room_id), namespace=NAMESPACE)
                await self.to_local_sid(sid, "room:removed", {"room": room_id})
