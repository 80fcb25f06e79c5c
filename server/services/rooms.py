"""Rooms: who may join, read and manage each kind (public, private, direct).

Invariants:
- a private or direct room that ``who`` may not see answers exactly as a room that does
  not exist (``not_found``, same message), so answers never tell which hidden rooms exist;
  a direct room id names its two users, so anyone else is refused before any lookup;
- every request costs O(what it touches): member caps use the store's count, pages of
  members come from the store in order, membership changes read only the listed users;
- a room holds at most ``max_members`` members; room creation and membership changes are
  spent from per-user quotas (sliding hour, per instance).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from server.core import metrics
from server.core.errors import ChatError, ErrorCode
from server.core.ids import is_user_id
from server.core.models import Identity, OutboxEntry, Room, RoomKind
from server.core.refusals import Quota
from server.services.moderation import Moderation
from server.services.payloads import ChangeMembers, CreateRoom
from server.store.base import Store

#: (room, users, added) -> the webhook entries to record with that membership change
MemberEvents = Callable[[str, list[str], bool], list[OutboxEntry]]
#: (room, users, added), after the change is stored: tells the live side (every instance)
MembershipListener = Callable[[str, list[str], bool], Awaitable[None]]


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


#: Rooms whose member lists ``members_recent`` keeps at most (oldest dropped first).
MEMBERS_REMEMBERED = 10_000
#: Users whose room ids ``member_rooms`` keeps at most (oldest dropped first).
USER_ROOMS_REMEMBERED = 100_000


class Remembered:
    """Lists read from the store, kept per key for ``ttl`` seconds, at most ``most`` keys
    (the oldest dropped first); :meth:`forget` drops one at once."""

    def __init__(self, ttl: float, most: int) -> None:
        self.ttl = ttl
        self.most = most
        self._held: dict[str, tuple[float, list[str]]] = {}  # key -> (expiry, list)

    async def get(self, key: str, read: Callable[[str], Awaitable[list[str]]]) -> list[str]:
        """The list held for ``key``, or ``await read(key)`` when there is none or it expired."""
        now = time.monotonic()
        held = self._held.get(key)
        if held is not None and held[0] > now:
            return held[1]
        found = await read(key)
        self._held[key] = (now + self.ttl, found)
        while len(self._held) > self.most:
            self._held.pop(next(iter(self._held)))
        return found

    def forget(self, key: str) -> None:
        self._held.pop(key, None)


#: The token role that may delete any message, anywhere.
ADMIN_ROLE = "admin"


def missing(room_id: str) -> ChatError:
    """The one answer for a room that does not exist or that the caller may not see."""
    return ChatError("not_found", f"room {room_id!r} does not exist")


def refuse(limit: str, code: ErrorCode, message: str) -> ChatError:
    metrics.LIMIT_REFUSALS.labels(limit).inc()
    return ChatError(code, message)


class RoomService:
    """Room rules on top of the store. Every check happens here, on the server."""

    def __init__(
        self,
        store: Store,
        moderation: Moderation | None = None,
        *,
        max_members: int = 10_000,
        members_page: int = 500,
        creates: Quota | None = None,
        member_changes: Quota | None = None,
        member_events: MemberEvents | None = None,
        members_ttl: float = 5.0,
        on_members_changed: MembershipListener | None = None,
        member_rooms_ttl: float = 60.0,
    ) -> None:
        self.store = store
        self.moderation = moderation
        self.max_members = max_members
        self.members_page = members_page
        self.creates = creates
        self.member_changes = member_changes
        #: the events (webhooks) each membership change records in the same store write
        self.member_events = member_events
        self._members = Remembered(members_ttl, MEMBERS_REMEMBERED)  # room -> members
        #: called after every stored membership change (the instances that hear a room
        #: follow its members: ``server/transport/interest.py``)
        self.on_members_changed = on_members_changed
        self._user_rooms = Remembered(member_rooms_ttl, USER_ROOMS_REMEMBERED)  # user -> rooms

    def _events(self, room_id: str, users: list[str], added: bool) -> list[OutboxEntry] | None:
        if self.member_events is None or not users:
            return None
        return self.member_events(room_id, users, added)

    async def add(self, room_id: str, users: list[str]) -> None:
        """Add ``users`` to the room, with their ``room.member_added`` event."""
        await self.store.add_members(room_id, users, self._events(room_id, users, True))
        self.forget_members(room_id, users)
        await self._changed(room_id, users, True)

    async def remove(self, room_id: str, users: list[str]) -> None:
        """Remove ``users`` from the room, with their ``room.member_removed`` event."""
        await self.store.remove_members(room_id, users, self._events(room_id, users, False))
        self.forget_members(room_id, users)
        await self._changed(room_id, users, False)

    async def _changed(self, room_id: str, users: list[str], added: bool) -> None:
        if self.on_members_changed is not None and users:
            await self.on_members_changed(room_id, users, added)

    async def _create_room(self, room: Room, members: list[str]) -> tuple[Room, bool]:
        """Create the room with its members and their ``room.member_added`` event."""
        stored, created = await self.store.create_room(
            room, members, self._events(room.id, members, True)
        )
        if created:
            self.forget_members(room.id, members)
            await self._changed(room.id, members, True)
        return stored, created

    async def members_recent(self, room_id: str) -> list[str]:
        """The room's members, remembered for ``members_ttl`` seconds: for deliveries that
        tolerate it (``room:activity``), never for an access check. This instance forgets a
        room's list when it changes the membership, and when another instance says it did
        (``forget_members``, on the ``members`` control event); the TTL bounds the rest.
        Saves a store read (Firestore: one per member) on most sends."""
        return await self._members.get(room_id, self.store.list_members)

    def forget_members(self, room_id: str, users: list[str]) -> None:
        """``users`` joined or left ``room_id``'s members (here, or through another instance,
        which says so with the ``members`` control event): read both afresh next time."""
        self._members.forget(room_id)
        for user_id in users:
            self._user_rooms.forget(user_id)

    async def member_rooms(self, user_id: str, limit: int | None = None) -> list[str]:
        """The ids of the rooms ``user_id`` is a member of (at most ``limit``, in room id
        order; one caller, one limit: the list is remembered per user), remembered for
        ``member_rooms_ttl`` seconds or until a membership change of the user is heard of
        (``forget_members``): for following rooms at connect, never for an access check.
        A reconnect or a second tab costs no store read (Firestore: one per room)."""
        return await self._user_rooms.get(
            user_id, lambda user: self.store.member_rooms(user, limit)
        )

    def _check_direct(self, who: Identity, room_id: str) -> None:
        """A direct room id names its users: anyone else is refused, whether it exists or not."""
        if not room_id.startswith("dm:") or who.is_system:
            return
        pair = direct_members(room_id)
        if pair is None:
            raise ChatError(
                "bad_request", "direct room ids are dm:<a>:<b> with the two user ids sorted"
            )
        if who.user_id not in pair:
            raise ChatError("forbidden", "only the two users of a direct room may join it")

    async def _room_is_full(self, room_id: str, adding: int) -> None:
        if adding and await self.store.count_members(room_id) + adding > self.max_members:
            raise refuse(
                "room_members", "too_large", f"room {room_id!r} is full ({self.max_members})"
            )

    async def _spend(self, quota: Quota | None, who: Identity, amount: int, what: str) -> None:
        if quota is not None and not who.is_system and not quota.take(who.user_id, amount):
            raise refuse(
                what, "rate_limited", f"quota of {what.replace('_', ' ')} spent; try later"
            )

    async def open_for_join(self, who: Identity, room_id: str) -> Room:
        """The room ``who`` may join, creating public and direct rooms on first join."""
        self._check_direct(who, room_id)
        await self._check_sanctions(who, room_id, joining=True)
        room = await self.store.get_room(room_id)
        if room is None:
            return await self._create_on_join(who, room_id)
        if room.kind == "public":
            if not await self.store.is_member(room_id, who.user_id):
                await self._room_is_full(room_id, 1)
                await self.add(room_id, [who.user_id])
            return room
        await self._require_member(who, room)
        return room

    async def _create_on_join(self, who: Identity, room_id: str) -> Room:
        pair = direct_members(room_id)
        if pair is not None:  # _check_direct has made sure ``who`` is one of the two
            room, created = await self._create_room(Room(room_id, "direct", room_id), list(pair))
        else:
            room, created = await self._create_room(Room(room_id, "public", room_id), [who.user_id])
        if room.kind == "public":
            # someone else created it first; the creator is already a member
            if not created and not await self.store.is_member(room_id, who.user_id):
                await self._room_is_full(room_id, 1)
                await self.add(room_id, [who.user_id])
        else:
            await self._require_member(who, room)
        return room

    async def _existing(self, room_id: str) -> Room:
        room = await self.store.get_room(room_id)
        if room is None:
            raise missing(room_id)
        return room

    async def _require_member(self, who: Identity, room: Room) -> None:
        """Members only: a hidden room answers as a missing one, a public one says join."""
        if who.is_system:
            return
        if not await self.store.is_member(room.id, who.user_id):
            if room.kind == "public":
                raise ChatError("forbidden", f"join room {room.id!r} first")
            raise missing(room.id)

    async def _visible(self, who: Identity, room_id: str) -> Room:
        """The room unless it is hidden from ``who`` (then: as if it did not exist)."""
        self._check_direct(who, room_id)
        room = await self._existing(room_id)
        if room.kind != "public":
            await self._require_member(who, room)
        return room

    async def readable(self, who: Identity, room_id: str) -> Room:
        """The room if ``who`` may read its history, else not_found."""
        return await self._visible(who, room_id)

    async def require_member(self, who: Identity, room_id: str) -> Room:
        """The room if ``who`` is a member (of public rooms too: those who joined)."""
        room = await self._visible(who, room_id)
        await self._require_member(who, room)
        return room

    async def members_for(
        self, who: Identity, room_id: str, after: str = "", limit: int | None = None
    ) -> tuple[list[str], bool]:
        """One page of member ids above ``after`` (members only) and whether more follow."""
        await self.require_member(who, room_id)
        size = limit or self.members_page
        page = await self.store.list_members(room_id, after=after, limit=size + 1)
        return page[:size], len(page) > size

    async def _members_among(self, room_id: str, users: list[str]) -> set[str]:
        """Which of ``users`` are members: O(len(users)), never a listing of the room."""
        present = await asyncio.gather(*(self.store.is_member(room_id, u) for u in users))
        return {u for u, member in zip(users, present, strict=True) if member}

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

    async def may_send(self, who: Identity, room_id: str) -> Room:
        """Membership of private rooms is re-checked at send (a removal may be in flight);
        bans, mutes and blocks are checked on every send."""
        room = await self._existing(room_id)
        await self._check_sanctions(who, room_id, joining=False)
        if room.kind == "private" and not who.is_system:
            await self._require_member(who, room)
        return room

    async def visible(self, who: Identity, room_id: str, *, admin_sees_all: bool = False) -> Room:
        """The room if ``who`` may read it; a room they may not read answers exactly like a
        room that does not exist (``not_found``). ``admin_sees_all``: a token with the admin
        role sees every room."""
        if admin_sees_all and who.role == ADMIN_ROLE:
            return await self._existing(room_id)
        return await self._visible(who, room_id)

    async def may_change(self, who: Identity, room_id: str) -> Room:
        """``visible``, and the sanctions that stop a send (ban, mute, block) stop an edit
        or a reaction too."""
        room = await self._visible(who, room_id)
        await self._check_sanctions(who, room_id, joining=False)
        return room

    @staticmethod
    def readers(room: Room, members: list[str], user_ids: list[str]) -> list[str]:
        """Those of ``user_ids`` who may read ``room`` (anyone for public rooms)."""
        if room.kind == "public":
            return user_ids
        allowed = set(members)
        return [u for u in user_ids if u in allowed]

    async def create(self, who: Identity, request: CreateRoom) -> Room:
        if request.room.startswith("dm:"):
            raise ChatError("bad_request", "direct rooms are created by joining dm:<a>:<b>")
        kind: RoomKind = "private" if request.private else "public"
        creator = set() if who.is_system else {who.user_id}
        members = sorted(creator | set(request.members))
        if len(members) > self.max_members:
            raise refuse("room_members", "too_large", f"a room holds {self.max_members} members")
        await self._spend(self.creates, who, 1, "room_creates")
        room, created = await self._create_room(
            Room(request.room, kind, request.name or request.room, owner=who.user_id), members
        )
        if not created and room.owner != who.user_id:
            # Any room's id is taken the same way: this says nothing about its kind.
            raise ChatError("forbidden", f"room id {request.room!r} is taken")
        return room

    async def change_members(self, who: Identity, request: ChangeMembers, add: bool) -> list[str]:
        """Add or remove members as the owner; returns the ids whose membership changed
        (for an add: every listed id, as before)."""
        room = await self._visible(who, request.room)
        if room.owner != who.user_id:
            raise ChatError("forbidden", "only the room's owner manages its members")
        if room.kind != "private":
            raise ChatError("bad_request", "only private rooms have managed members")
        users = sorted(set(request.users))
        if not add and room.owner in users:
            raise ChatError("bad_request", "the owner cannot be removed from their room")
        current = await self._members_among(room.id, users)
        changing = [u for u in users if (u in current) != add]
        await self._spend(self.member_changes, who, max(1, len(changing)), "member_changes")
        if add:
            await self._room_is_full(room.id, len(changing))
            await self.add(room.id, changing)
            return users
        await self.remove(room.id, changing)
        return changing

    async def set_members(self, room_id: str, users: list[str], add: bool) -> list[str]:
        """Add or remove members of any room on behalf of the application (server API).

        Returns the ids whose membership changed. The owner of a private room stays.
        """
        room = await self._existing(room_id)
        wanted = sorted(set(users))
        current = await self._members_among(room.id, wanted)
        if add:
            added = [u for u in wanted if u not in current]
            await self._room_is_full(room.id, len(added))
            await self.add(room.id, added)
            return added
        if room.owner in wanted:
            raise ChatError("bad_request", "the owner cannot be removed from their room")
        removed = [u for u in wanted if u in current]
        await self.remove(room.id, removed)
        return removed
