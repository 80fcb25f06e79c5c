"""Changes to stored messages: edit, delete, reactions; and their recovery after a rejoin.

Invariants:
- each stored change bumps its room's *change seq* by exactly one and stamps the message
  with it (the store does both atomically), so a room's changes are dense: 1, 2, 3 …;
- a request that changes nothing (the same edit, a second delete, a reaction that exists)
  stores nothing and broadcasts nothing, and acks the message as it is;
- a change whose store call failed may have been stored all the same (its answer was
  lost): its retry finds nothing to change and broadcasts the current state then, once
  (the same rule as ``message:send``);
- a room the caller may not read answers ``not_found``, exactly like a missing room.

Recovery: a client keeps, per room, the highest change seq it has applied. Rejoining
with it (``room:join {since, changes_since}``) returns every message changed after it,
once, in its current state (several changes of one message arrive as one); messages
above ``since`` come in ``missed`` in their current state instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from server.core import metrics
from server.core.errors import ChatError, StoreUnavailable
from server.core.models import (
    ChangeResult,
    Identity,
    Message,
    Outgoing,
    iso,
    reactions_wire,
    utcnow,
)
from server.services.content import (
    ContentLimits,
    Views,
    check_emoji,
    clean_text,
    parse_mentions,
)
from server.services.messages import MessageService, RecentIds, page
from server.services.payloads import Changes, EditMessage, MessageRef, React
from server.services.ports import Fanout
from server.services.rooms import ADMIN_ROLE, RoomService, refuse
from server.store.base import Store

log = structlog.get_logger(__name__)

RECOVERY_LIMIT = 100


class ChangeService:
    def __init__(
        self,
        store: Store,
        rooms: RoomService,
        messages: MessageService,
        fanout: Fanout,
        limits: ContentLimits,
        outgoing: Callable[[str], Outgoing] | None = None,
    ) -> None:
        self.store = store
        #: "updated" | "deleted" -> the events (webhooks) the store records with the change
        self.outgoing = outgoing
        self.rooms = rooms
        self.messages = messages
        self.fanout = fanout
        self.limits = limits
        self.views = Views(store, limits)
        self._unconfirmed = RecentIds(10_000)

    async def _message(self, room_id: str, message_id: str) -> Message:
        found = await self.store.get_messages(room_id, [message_id])
        if message_id not in found:
            raise ChatError("not_found", f"message {message_id!r} does not exist in this room")
        return found[message_id]

    async def _apply(self, key: str, change: Awaitable[ChangeResult]) -> tuple[ChangeResult, bool]:
        """Run the store ``change``; (result, broadcast?) with the lost-answer rule."""
        try:
            result = await change
        except StoreUnavailable:
            self._unconfirmed.remember(key)
            raise
        if result.message is None:
            raise ChatError("not_found", "the message does not exist in this room")
        unconfirmed = self._unconfirmed.forget(key)
        return result, result.changed or (unconfirmed and result.refused is None)

    async def _announce(
        self, kind: str, event: str, room_id: str, message: Message, **fields: Any
    ) -> None:
        """Count a change of ``kind`` and send ``event`` to the room: where the message
        stands (room, id, seq, change_seq) plus ``fields``."""
        metrics.MESSAGE_CHANGES.labels(kind).inc()
        await self.fanout.to_room(
            room_id,
            event,
            {
                "room": room_id,
                "id": message.id,
                "seq": message.seq,
                "change_seq": message.change_seq,
                **fields,
            },
        )

    async def edit(self, who: Identity, request: EditMessage) -> dict:
        text = clean_text(request.text, self.limits)
        mentioned = parse_mentions(text, self.limits)
        room = await self.rooms.may_change(who, request.room)
        current = await self._message(room.id, request.id)
        if current.sender_id != who.user_id:
            raise ChatError("forbidden", "only the sender may edit a message")
        if current.deleted:
            raise ChatError("bad_request", "the message is deleted")
        members = [] if room.kind == "public" else await self.store.list_members(room.id)
        mentions = tuple(self.rooms.readers(room, members, mentioned))
        key = f"edit\x00{room.id}\x00{request.id}\x00{text}"
        events = self.outgoing("updated") if self.outgoing is not None else None
        result, broadcast = await self._apply(
            key, self.store.edit_message(room.id, request.id, text, mentions, utcnow(), events)
        )
        if result.refused == "deleted":
            raise ChatError("bad_request", "the message is deleted")
        message = result.message
        assert message is not None
        wire = await self.views.one(message, who.user_id)
        if broadcast:
            await self._announce(
                "edit",
                "message:updated",
                room.id,
                message,
                text=message.text,
                mentions=list(message.mentions),
                edited_at=iso(message.edited_at),
                revision=message.revision,
            )
            added = [u for u in message.mentions if u not in current.mentions]
            await self.messages.notify_mentioned(message, added, wire)
        return wire

    async def delete(self, who: Identity, request: MessageRef) -> dict:
        """The sender, the owner of a private room, or an admin anywhere may delete."""
        room = await self.rooms.visible(who, request.room, admin_sees_all=True)
        current = await self._message(room.id, request.id)
        allowed = (
            current.sender_id == who.user_id
            or who.role == ADMIN_ROLE
            or (room.kind == "private" and room.owner == who.user_id)
        )
        if not allowed:
            raise ChatError("forbidden", "you may not delete this message")
        key = f"delete\x00{room.id}\x00{request.id}"
        events = self.outgoing("deleted") if self.outgoing is not None else None
        result, broadcast = await self._apply(
            key, self.store.delete_message(room.id, request.id, utcnow(), events)
        )
        message = result.message
        assert message is not None
        if broadcast:
            await self._announce(
                "delete", "message:deleted", room.id, message, deleted_at=iso(message.deleted_at)
            )
        return await self.views.one(message, who.user_id)

    async def react(self, who: Identity, request: React, add: bool) -> dict:
        emoji = check_emoji(request.emoji, self.limits)
        room = await self.rooms.may_change(who, request.room)
        key = f"react\x00{room.id}\x00{request.id}\x00{who.user_id}\x00{emoji}\x00{add}"
        change = (
            self.store.add_reaction(
                room.id, request.id, who.user_id, emoji, self.limits.max_reactions
            )
            if add
            else self.store.remove_reaction(room.id, request.id, who.user_id, emoji)
        )
        result, broadcast = await self._apply(key, change)
        if result.refused == "deleted":
            raise ChatError("bad_request", "the message is deleted")
        if result.refused == "full":
            raise refuse(
                "reactions",
                "too_large",
                f"a message holds at most {self.limits.max_reactions} different reactions",
            )
        message = result.message
        assert message is not None
        if broadcast:
            await self._announce(
                "reaction_add" if add else "reaction_remove",
                "message:reactions",
                room.id,
                message,
                user=who.user_id,
                emoji=emoji,
                reacted=add,
                reactions=reactions_wire(message.reactions, None),
            )
        return await self.views.one(message, who.user_id)

    async def current(self, room_id: str) -> int:
        """The room's change seq: where a client that saw nothing yet starts counting."""
        return await self.store.change_seq(room_id)

    async def since(
        self, room_id: str, after: int, above_seq: int | None, viewer: str
    ) -> tuple[list[dict], bool, int]:
        """Recovery at ``room:join``: up to 100 changes after ``after`` (see ``_page``)."""
        return await self._page(room_id, after, RECOVERY_LIMIT, above_seq, viewer)

    async def changes(self, who: Identity, request: Changes) -> dict:
        room = await self.rooms.visible(who, request.room)
        changes, has_more, cursor = await self._page(
            room.id, request.after, request.limit, None, who.user_id
        )
        return {"changes": changes, "has_more": has_more, "change_seq": cursor}

    async def _page(
        self, room_id: str, after: int, limit: int, above_seq: int | None, viewer: str
    ) -> tuple[list[dict], bool, int]:
        """(changed messages, has_more, cursor) after change seq ``after``.

        Messages with a seq above ``above_seq`` are left out (the caller has them in their
        current state already). ``cursor`` is the change seq the answer is complete up to:
        the client continues from it (``message:changes {after: cursor}``) when has_more.
        The room's change seq is read first: a change stored after it is in the page or
        reaches the (already joined) socket live.
        """
        current = await self.store.change_seq(room_id)
        fetched, has_more = page(
            await self.store.changes_after(room_id, after, limit + 1), limit, False
        )
        last_fetched = fetched[-1].change_seq if fetched else after
        cursor = last_fetched if has_more else max(current, last_fetched, after)
        kept = [m for m in fetched if above_seq is None or m.seq <= above_seq]
        return await self.views.render(room_id, kept, viewer), has_more, cursor
