"""Rooms: who may join, read and manage each kind (public, private, direct)."""

from __future__ import annotations

from server.core.errors import ChatError
from server.core.ids import is_user_id
from server.core.models import Identity, Room, RoomKind
from server.services.moderation import Moderation
from server.services.payloads import ChangeMembers, CreateRoom
from server.store.base import Store


def direct_members(room_id: str) -> tuple[str, str] | None:
    """The two users of ``dm:<a>:<b>`` (sorted, a < b), or None when the id is not one.

    User ids may contain ``:``, so every split point is tried; exactly one must give two
    valid ids in sorted order.
    """
    if not room_id.startswith("dm:"):
        return None
    rest = room_id[3:]
    found = []
    for index, char in enumerate(rest):
        if char == ":":
            a, b = rest[:index], rest[index + 1 :]
            if is_user_id(a) and is_user_id(b) and a < b:
                found.append((a, b))
    return found[0] if len(found) == 1 else None


class RoomService:
    """Room rules on top of the store. Every check happens here, on the server."""

    def __init__(self, store: Store, moderation: Moderation | None = None) -> None:
        self.store = store
        self.moderation = moderation

    async def open_for_join(self, who: Identity, room_id: str) -> Room:
        """The room ``who`` may join, creating public and direct rooms on first join."""
        await self._check_sanctions(who, room_id, joining=True)
        room = await self.store.get_room(room_id)
        if room is None:
            return await self._create_on_join(who, room_id)
        if room.kind == "public":
            if not await self.store.is_member(room_id, who.user_id):
                await self.store.add_members(room_id, [who.user_id])
            return room
        await self._require_member(who, room)
        return room

    async def _create_on_join(self, who: Identity, room_id: str) -> Room:
        if room_id.startswith("dm:"):
            pair = direct_members(room_id)
            if pair is None:
                raise ChatError(
                    "bad_request", "direct room ids are dm:<a>:<b> with the two user ids sorted"
                )
            if who.user_id not in pair:
                raise ChatError("forbidden", "only the two users of a direct room may join it")
            room, created = await self.store.create_room(
                Room(room_id, "direct", room_id), list(pair)
            )
        else:
            room, created = await self.store.create_room(
                Room(room_id, "public", room_id), [who.user_id]
            )
        if room.kind == "public":
            if not created:  # someone else created it first; the creator is already a member
                await self.store.add_members(room_id, [who.user_id])
        else:
            await self._require_member(who, room)
        return room

    async def _existing(self, room_id: str) -> Room:
        room = await self.store.get_room(room_id)
        if room is None:
            raise ChatError("not_found", f"room {room_id!r} does not exist")
        return room

    async def _require_member(self, who: Identity, room: Room) -> None:
        if not await self.store.is_member(room.id, who.user_id):
            raise ChatError("forbidden", f"{room.kind} room {room.id!r}: you are not a member")

    async def readable(self, who: Identity, room_id: str) -> Room:
        """The room if ``who`` may read its history and members, else not_found/forbidden."""
        room = await self._existing(room_id)
        if room.kind != "public" and not who.is_system:
            await self._require_member(who, room)
        return room

    async def members_for(self, who: Identity, room_id: str) -> list[str]:
        """The room's member ids, for members only (of public rooms too: those who joined)."""
        room = await self._existing(room_id)
        await self._require_member(who, room)
        return await self.store.list_members(room_id)

    async def _check_sanctions(self, who: Identity, room_id: str, joining: bool) -> None:
        """Bans (and, when sending, mutes) in the room; blocks between a direct room's users."""
        if self.moderation is None or who.is_system:
            return
        if joining:
            await self.moderation.check_join(room_id, who.user_id)
        else:
            await self.moderation.check_send(room_id, who.user_id)
        pair = direct_members(room_id)
        if pair is not None and who.user_id in pair:
            other = pair[1] if pair[0] == who.user_id else pair[0]
            await self.moderation.check_direct(who.user_id, other)

    async def may_send(self, who: Identity, room_id: str) -> None:
        """Membership of private rooms is re-checked at send (a removal may be in flight);
        bans, mutes and blocks are checked on every send."""
        room = await self._existing(room_id)
        await self._check_sanctions(who, room_id, joining=False)
        if room.kind == "private" and not who.is_system:
            await self._require_member(who, room)

    async def create(self, who: Identity, request: CreateRoom) -> Room:
        if request.room.startswith("dm:"):
            raise ChatError("bad_request", "direct rooms are created by joining dm:<a>:<b>")
        kind: RoomKind = "private" if request.private else "public"
        creator = set() if who.is_system else {who.user_id}
        members = sorted(creator | set(request.members))
        room, created = await self.store.create_room(
            Room(request.room, kind, request.name or request.room, owner=who.user_id), members
        )
        if not created and room.owner != who.user_id:
            raise ChatError("forbidden", f"room {request.room!r} exists and you are not its owner")
        return room

    async def change_members(self, who: Identity, request: ChangeMembers, add: bool) -> list[str]:
        """Add or remove members as the owner; returns the ids whose membership changed."""
        room = await self._existing(request.room)
        if room.owner != who.user_id:
            raise ChatError("forbidden", "only the room's owner manages its members")
        if room.kind != "private":
            raise ChatError("bad_request", "only private rooms have managed members")
        users = sorted(set(request.users))
        if add:
            await self.store.add_members(room.id, users)
            return users
        if room.owner in users:
            raise ChatError("bad_request", "the owner cannot be removed from their room")
        current = set(await self.store.list_members(room.id))
        removed = [u for u in users if u in current]
        await self.store.remove_members(room.id, removed)
        return removed

    async def set_members(self, room_id: str, users: list[str], add: bool) -> list[str]:
        """Add or remove members of any room on behalf of the application (server API).

        Returns the ids whose membership changed. The owner of a private room stays.
        """
        room = await self._existing(room_id)
        wanted = sorted(set(users))
        current = set(await self.store.list_members(room.id))
        if add:
            added = [u for u in wanted if u not in current]
            await self.store.add_members(room.id, added)
            return added
        if room.owner in wanted:
            raise ChatError("bad_request", "the owner cannot be removed from their room")
        removed = [u for u in wanted if u in current]
        await self.store.remove_members(room.id, removed)
        return removed
