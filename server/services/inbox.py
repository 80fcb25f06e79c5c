"""The room list: a user's rooms, most recent activity first, with unread counts.

A room's activity is its last message's time, or its creation time while it has none.
The order is (activity descending, room id ascending); the cursor is the last entry's
position in it, so a page never repeats a room. A room whose activity changes between
two pages moves to the front (``room:activity`` tells the client at once).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from datetime import datetime

from server.core.errors import ChatError
from server.core.models import Identity, Message, Room, iso, parse_iso
from server.services.content import ContentLimits, preview
from server.services.payloads import ListRooms
from server.services.rooms import direct_members
from server.store.base import Store

SortKey = tuple[datetime, str]


def _activity(room: Room, last: Message | None) -> datetime:
    """In milliseconds, as the wire and the cursor carry it (so the order compares it)."""
    when = last.created_at if last is not None else room.created_at
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def _encode(key: SortKey) -> str:
    raw = json.dumps([iso(key[0]), key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> SortKey:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, room_id = json.loads(raw)
        parsed = parse_iso(when)
        if parsed is None or not isinstance(room_id, str):
            raise ValueError(cursor)
        return parsed, room_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ChatError("bad_request", "cursor: not a cursor this server gave") from None


def _after(key: SortKey, cursor: SortKey) -> bool:
    """True when ``key`` comes after ``cursor`` in (activity desc, id asc) order."""
    return key[0] < cursor[0] or (key[0] == cursor[0] and key[1] > cursor[1])


class InboxService:
    def __init__(self, store: Store, limits: ContentLimits) -> None:
        self.store = store
        self.limits = limits

    async def list_rooms(self, who: Identity, request: ListRooms) -> dict:
        """One store read for the rooms, then one per listed room for its unread counts."""
        rooms = await self.store.user_rooms(who.user_id)
        keyed = [((_activity(r, m), r.id), r, m) for r, m in rooms]
        keyed.sort(key=lambda item: (-item[0][0].timestamp(), item[0][1]))
        if request.cursor is not None:
            cursor = _decode(request.cursor)
            keyed = [item for item in keyed if _after(item[0], cursor)]
        chosen = keyed[: request.limit]
        more = len(keyed) > request.limit
        unread = await asyncio.gather(
            *(
                self.store.unread(room.id, who.user_id, self.limits.unread_cap)
                for _, room, _ in chosen
            )
        )
        peers = {room.id: self._peer(room, who.user_id) for _, room, _ in chosen}
        names = await self.store.get_users([p for p in peers.values() if p])
        entries = []
        for (key, room, last), counts in zip(chosen, unread, strict=True):
            peer = peers[room.id]
            entries.append(
                {
                    "room": room.to_wire(),
                    "last_seq": last.seq if last is not None else 0,
                    "read_seq": counts.read_seq,
                    "unread": counts.unread,
                    "unread_mentions": counts.mentions,
                    "last_message": preview(last, self.limits.quote_length) if last else None,
                    "activity_at": iso(key[0]),
                    "peer": (
                        {"id": peer, "name": names[peer].name if peer in names else peer}
                        if peer
                        else None
                    ),
                }
            )
        return {"rooms": entries, "cursor": _encode(chosen[-1][0]) if more else None}

    @staticmethod
    def _peer(room: Room, user_id: str) -> str | None:
        """The other user of a direct room (None for other rooms)."""
        pair = direct_members(room.id) if room.kind == "direct" else None
        if pair is None:
            return None
        return pair[1] if pair[0] == user_id else pair[0]
