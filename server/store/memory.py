"""In-process store: the fastest backend, for tests and throwaway single instances."""

from __future__ import annotations

import bisect
from dataclasses import replace
from datetime import datetime

from server.core.errors import SeqTaken
from server.core.models import (
    AddResult,
    ChangeResult,
    Message,
    MessageDraft,
    OutboxEntry,
    OutboxItem,
    Outgoing,
    Room,
    SanctionKey,
    Unread,
    UserRecord,
    message_id,
    utcnow,
)
from server.store.base import Store


class MemoryStore(Store):
    """Keeps everything in dicts; nothing survives a restart."""

    def __init__(self) -> None:
        self._rooms: dict[str, Room] = {}
        self._members: dict[str, set[str]] = {}
        self._messages: dict[str, list[Message]] = {}  # room -> ascending by seq
        self._by_id: dict[str, Message] = {}
        self._markers: dict[tuple[str, str], int] = {}
        self._users: dict[str, UserRecord] = {}
        self._sanctions: dict[SanctionKey, float | None] = {}
        #: pos -> [entry, state, attempts, next_at, lease_owner, lease_until]
        self._outbox: dict[int, list] = {}
        self._outbox_keys: set[tuple[str, str]] = set()
        self._outbox_pos = 0
        self._reactions: dict[str, dict[str, set[str]]] = {}  # message -> emoji -> users
        self._change_seqs: dict[str, int] = {}

    async def ping(self) -> None:
        return None

    async def get_room(self, room_id: str) -> Room | None:
        return self._rooms.get(room_id)

    async def create_room(
        self, room: Room, members: list[str], outbox: list[OutboxEntry] | None = None
    ) -> tuple[Room, bool]:
        existing = self._rooms.get(room.id)
        if existing is not None:
            return existing, False
        self._rooms[room.id] = room
        self._members[room.id] = set(members)
        self._outbox_insert(outbox or [])
        return room, True

    async def add_members(
        self, room_id: str, user_ids: list[str], outbox: list[OutboxEntry] | None = None
    ) -> None:
        self._members.setdefault(room_id, set()).update(user_ids)
        self._outbox_insert(outbox or [])

    async def remove_members(
        self, room_id: str, user_ids: list[str], outbox: list[OutboxEntry] | None = None
    ) -> None:
        self._members.get(room_id, set()).difference_update(user_ids)
        self._outbox_insert(outbox or [])

    async def is_member(self, room_id: str, user_id: str) -> bool:
        return user_id in self._members.get(room_id, ())

    async def list_members(
        self, room_id: str, after: str = "", limit: int | None = None
    ) -> list[str]:
        members = sorted(m for m in self._members.get(room_id, ()) if m > after)
        return members if limit is None else members[:limit]

    async def count_members(self, room_id: str) -> int:
        return len(self._members.get(room_id, ()))

    async def add_message(self, draft: MessageDraft, seq: int | None = None) -> AddResult:
        mid = draft.message_id
        existing = self._by_id.get(mid)
        if existing is not None:
            return AddResult(existing, created=False)
        room_messages = self._messages.setdefault(draft.room, [])
        last = room_messages[-1].seq if room_messages else 0
        if seq is None:
            seq = last + 1
        elif self._has_seq(room_messages, seq):
            raise SeqTaken(draft.room, last)
        message = draft.stored(seq, utcnow())
        bisect.insort(room_messages, message, key=lambda m: m.seq)
        self._by_id[mid] = message
        if draft.outgoing is not None:
            self._outbox_insert(draft.outgoing.entries(message))
        return AddResult(message, created=True)

    @staticmethod
    def _has_seq(messages: list[Message], seq: int) -> bool:
        index = bisect.bisect_left(messages, seq, key=lambda m: m.seq)
        return index < len(messages) and messages[index].seq == seq

    async def find_message(self, room_id: str, sender_id: str, client_id: str) -> Message | None:
        return self._by_id.get(message_id(room_id, sender_id, client_id))

    async def last_seq(self, room_id: str) -> int:
        messages = self._messages.get(room_id)
        return messages[-1].seq if messages else 0

    async def messages_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        messages = self._messages.get(room_id, [])
        start = bisect.bisect_right(messages, after, key=lambda m: m.seq)
        return messages[start : start + limit]

    async def messages_before(self, room_id: str, before: int | None, limit: int) -> list[Message]:
        messages = self._messages.get(room_id, [])
        end = (
            len(messages)
            if before is None
            else bisect.bisect_left(messages, before, key=lambda m: m.seq)
        )
        return messages[max(0, end - limit) : end]

    async def get_messages(self, room_id: str, ids: list[str]) -> dict[str, Message]:
        found = (self._by_id.get(mid) for mid in ids)
        return {m.id: m for m in found if m is not None and m.room == room_id}

    async def change_seq(self, room_id: str) -> int:
        return self._change_seqs.get(room_id, 0)

    async def changes_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        changed = [m for m in self._messages.get(room_id, []) if m.change_seq > after]
        return sorted(changed, key=lambda m: m.change_seq)[:limit]

    def _find(self, room_id: str, mid: str) -> Message | None:
        message = self._by_id.get(mid)
        return message if message is not None and message.room == room_id else None

    def _change(
        self, message: Message, outgoing: Outgoing | None = None, **fields: object
    ) -> ChangeResult:
        """Store ``message`` with ``fields`` and the room's next change seq; record
        ``outgoing``'s entries for the changed message."""
        change = self._change_seqs.get(message.room, 0) + 1
        self._change_seqs[message.room] = change
        emojis = self._reactions.get(message.id, {})
        counts = tuple(sorted((e, len(users)) for e, users in emojis.items()))
        fields = {"reactions": counts, **fields}
        updated = replace(message, change_seq=change, **fields)  # type: ignore[arg-type]
        room_messages = self._messages[message.room]
        index = bisect.bisect_left(room_messages, message.seq, key=lambda m: m.seq)
        room_messages[index] = updated
        self._by_id[message.id] = updated
        if outgoing is not None:
            self._outbox_insert(outgoing.entries(updated))
        return ChangeResult(updated, changed=True)

    async def edit_message(
        self,
        room_id: str,
        message_id: str,
        text: str,
        mentions: tuple[str, ...],
        at: datetime,
        outgoing: Outgoing | None = None,
    ) -> ChangeResult:
        message = self._find(room_id, message_id)
        if message is None or message.deleted:
            return ChangeResult(message, False, "deleted" if message else None)
        if message.text == text:
            return ChangeResult(message, changed=False)
        return self._change(
            message,
            outgoing,
            text=text,
            mentions=mentions,
            edited_at=at,
            revision=message.revision + 1,
        )

    async def delete_message(
        self, room_id: str, message_id: str, at: datetime, outgoing: Outgoing | None = None
    ) -> ChangeResult:
        message = self._find(room_id, message_id)
        if message is None or message.deleted:
            return ChangeResult(message, changed=False)
        self._reactions.pop(message_id, None)
        return self._change(message, outgoing, text="", mentions=(), deleted_at=at)

    async def add_reaction(
        self, room_id: str, message_id: str, user_id: str, emoji: str, max_distinct: int
    ) -> ChangeResult:
        message = self._find(room_id, message_id)
        if message is None or message.deleted:
            return ChangeResult(message, False, "deleted" if message else None)
        emojis = self._reactions.setdefault(message_id, {})
        if user_id in emojis.get(emoji, ()):
            return ChangeResult(message, changed=False)
        if emoji not in emojis and len(emojis) >= max_distinct:
            return ChangeResult(message, False, "full")
        emojis.setdefault(emoji, set()).add(user_id)
        return self._change(message)

    async def remove_reaction(
        self, room_id: str, message_id: str, user_id: str, emoji: str
    ) -> ChangeResult:
        message = self._find(room_id, message_id)
        emojis = self._reactions.get(message_id, {})
        if message is None or user_id not in emojis.get(emoji, ()):
            return ChangeResult(message, changed=False)
        emojis[emoji].discard(user_id)
        if not emojis[emoji]:
            del emojis[emoji]
        return self._change(message)

    async def my_reactions(
        self, room_id: str, user_id: str, message_ids: list[str]
    ) -> dict[str, frozenset[str]]:
        mine = {}
        for mid in message_ids:
            emojis = self._reactions.get(mid, {}) if self._find(room_id, mid) else {}
            chosen = frozenset(e for e, users in emojis.items() if user_id in users)
            if chosen:
                mine[mid] = chosen
        return mine

    async def member_rooms(self, user_id: str, limit: int | None = None) -> list[str]:
        found = sorted(room_id for room_id, members in self._members.items() if user_id in members)
        return found if limit is None else found[:limit]

    async def user_rooms(self, user_id: str) -> list[tuple[Room, Message | None]]:
        found: list[tuple[Room, Message | None]] = []
        for room in self._rooms.values():
            if user_id in self._members.get(room.id, ()):
                messages = self._messages.get(room.id)
                found.append((room, messages[-1] if messages else None))
        return found

    async def unread(
        self, room_id: str, user_id: str, cap: int, marker: int | None = None
    ) -> Unread:
        if marker is None:
            marker = self._markers.get((room_id, user_id), 0)
        messages = self._messages.get(room_id, [])
        start = bisect.bisect_right(messages, marker, key=lambda m: m.seq)
        unread = mentions = 0
        for message in messages[start:]:
            if message.deleted or message.sender_id == user_id:
                continue
            unread += 1
            mentions += user_id in message.mentions
            if unread >= cap and mentions >= cap:
                break
        return Unread(marker, min(unread, cap), min(mentions, cap))

    async def set_read_marker(self, room_id: str, user_id: str, seq: int) -> int:
        key = (room_id, user_id)
        value = max(self._markers.get(key, 0), seq)
        self._markers[key] = value
        return value

    async def get_read_marker(self, room_id: str, user_id: str) -> int:
        return self._markers.get((room_id, user_id), 0)

    async def upsert_user(self, user_id: str, name: str) -> None:
        current = self._users.get(user_id)
        self._users[user_id] = replace(current, name=name) if current else UserRecord(user_id, name)

    async def set_last_seen(self, user_id: str, when: datetime) -> None:
        current = self._users.get(user_id) or UserRecord(user_id, user_id)
        self._users[user_id] = replace(current, last_seen=when)

    async def get_users(self, user_ids: list[str]) -> dict[str, UserRecord]:
        return {uid: self._users[uid] for uid in user_ids if uid in self._users}

    async def put_sanction(self, key: SanctionKey, until: float | None) -> None:
        self._sanctions[key] = until

    async def delete_sanction(self, key: SanctionKey) -> None:
        self._sanctions.pop(key, None)

    async def get_sanctions(self, keys: list[SanctionKey]) -> dict[SanctionKey, float | None]:
        return {key: self._sanctions[key] for key in keys if key in self._sanctions}

    # ------------------------------------------------------------------ webhook outbox
    supports_outbox = True

    async def outbox_add(self, entries: list[OutboxEntry]) -> None:
        self._outbox_insert(entries)

    def _outbox_insert(self, entries: list[OutboxEntry]) -> None:
        for entry in entries:
            key = (entry.event_id, entry.endpoint)
            if key in self._outbox_keys:
                continue
            self._outbox_keys.add(key)
            self._outbox_pos += 1
            self._outbox[self._outbox_pos] = [entry, "pending", 0, 0.0, None, 0.0]

    async def outbox_claim(
        self, owner: str, now: float, lease: float, limit: int
    ) -> list[OutboxItem]:
        heads: dict[tuple[str, str], int] = {}
        for pos, row in self._outbox.items():  # insertion order is pos order
            queue = (row[0].endpoint, row[0].ordering)
            if row[1] == "pending" and queue not in heads:
                heads[queue] = pos
        claimed: list[OutboxItem] = []
        for pos in sorted(heads.values()):
            row = self._outbox[pos]
            if row[3] <= now and row[5] <= now and len(claimed) < limit:
                row[4], row[5] = owner, now + lease
                claimed.append(OutboxItem(pos, row[0], row[2]))
        return claimed

    async def outbox_finish(
        self,
        item: OutboxItem,
        owner: str,
        delivered: bool,
        next_at: float = 0.0,
        dead: bool = False,
        error: str = "",
    ) -> bool:
        row = self._outbox.get(item.pos)
        if row is None or row[4] != owner:
            return False
        if delivered:
            del self._outbox[item.pos]
            return True
        row[1], row[2], row[3], row[4], row[5] = (
            "dead" if dead else "pending",
            row[2] + 1,
            next_at,
            None,
            0.0,
        )
        return True

    async def outbox_counts(self) -> dict[str, int]:
        counts = {"pending": 0, "dead": 0}
        for row in self._outbox.values():
            counts[row[1]] += 1
        return counts
