"""What the application's backend may do through the server API, on top of the services.

Every action here behaves exactly like its socket counterpart where one exists: a posted
message is stored durably, acked after the write, and broadcast to the room on every
instance; a removed or banned member loses live access at once, cluster-wide.
"""

from __future__ import annotations

import time

from server.core.models import SYSTEM_USER_ID, Identity, Message, Room, SanctionKey, SanctionKind
from server.services.messages import MessageService
from server.services.moderation import Moderation
from server.services.payloads import CreateRoom, History, SendMessage
from server.services.ports import Sessions
from server.services.presence import PresenceService
from server.services.rooms import RoomService

SYSTEM = Identity(SYSTEM_USER_ID, "System", expires_at=float("inf"))


def acting_as(user_id: str | None, name: str | None = None) -> Identity:
    """The identity a request acts as: a user, or the system when no user is given."""
    if user_id is None:
        return SYSTEM
    return Identity(user_id, name or user_id, expires_at=float("inf"))


class Admin:
    def __init__(
        self,
        rooms: RoomService,
        messages: MessageService,
        presence: PresenceService,
        moderation: Moderation,
        sessions: Sessions,
    ) -> None:
        self.rooms = rooms
        self.messages = messages
        self.presence = presence
        self.moderation = moderation
        self.sessions = sessions

    async def post(self, who: Identity, request: SendMessage) -> tuple[Message, bool]:
        """Store and broadcast like a socket send; (message, created) — a repeat is not new."""
        return await self.messages.send_reporting(who, None, request)

    async def history(self, request: History) -> tuple[list[Message], bool]:
        return await self.messages.history(SYSTEM, request)

    async def render(self, room_id: str, messages: list[Message]) -> list[dict]:
        """Messages as clients see them (reply quotes; no viewer, so every ``me`` is false)."""
        return await self.messages.views.render(room_id, messages, None)

    async def create_room(self, owner: str | None, request: CreateRoom) -> Room:
        return await self.rooms.create(acting_as(owner), request)

    async def add_members(self, room_id: str, users: list[str]) -> list[str]:
        return await self.rooms.set_members(room_id, users, add=True)

    async def remove_members(self, room_id: str, users: list[str]) -> list[str]:
        removed = await self.rooms.set_members(room_id, users, add=False)
        await self.sessions.evict(room_id, removed)
        return removed

    async def presence_of(self, users: list[str]) -> dict[str, dict]:
        return await self.presence.states(list(dict.fromkeys(users)))

    async def disconnect(self, user_id: str, reason: str) -> None:
        await self.sessions.disconnect_user(user_id, reason)

    async def revoke_tokens(self, user_id: str, before: float | None) -> float:
        """Refuse ``user_id``'s tokens issued before ``before`` (default: now); close those live."""
        cutoff = time.time() if before is None else before
        await self.moderation.revoke_tokens(user_id, cutoff)
        await self.sessions.disconnect_user(user_id, "token revoked", issued_before=cutoff)
        return cutoff

    async def ban(self, room_id: str, user_id: str, until: float | None) -> None:
        """Ban from the room: membership ends, live sockets leave it, joins and sends refused."""
        await self.rooms.readable(SYSTEM, room_id)  # not_found for an unknown room
        await self.moderation.set(SanctionKey("ban", room_id, user_id), until)
        current = await self.rooms.store.list_members(room_id)
        if user_id in current:
            await self.rooms.remove(room_id, [user_id])
        await self.sessions.evict(room_id, [user_id])

    async def mute(self, room_id: str, user_id: str, until: float) -> None:
        await self.rooms.readable(SYSTEM, room_id)
        await self.moderation.set(SanctionKey("mute", room_id, user_id), until)

    async def lift(self, kind: SanctionKind, scope: str, user_id: str) -> None:
        await self.moderation.lift(SanctionKey(kind, scope, user_id))

    async def block(self, user_id: str, other: str) -> None:
        """``user_id`` blocks ``other``: direct messages between them are refused both ways."""
        await self.moderation.set(SanctionKey("block", other, user_id), None)
