"""Messages: send (validate → allocate seq → store durably → fan out), history, read, typing.

A stored message reaches the sockets joined to its room (``message:new``), every other
connection of every member (``room:activity``, for live badges) and every connection of
each mentioned user who may read the room (``mention``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog

from server.core import metrics
from server.core.errors import ChatError, SeqTaken, StoreUnavailable
from server.core.models import AddResult, Identity, Message, MessageDraft, Outgoing, Room
from server.services.content import ContentLimits, Views, clean_text, parse_mentions, preview
from server.services.payloads import History, MarkRead, SendMessage
from server.services.ports import Fanout, Notice, SeqAllocator
from server.services.rooms import RoomService
from server.store.base import Store

log = structlog.get_logger(__name__)

SEQ_ATTEMPTS = 8
MISSED_LIMIT = 100


def page(
    messages: list[Message], limit: int, newest_first_trim: bool
) -> tuple[list[Message], bool]:
    """Trim a ``limit + 1`` fetch to ``limit`` and say whether more exist that way."""
    if len(messages) <= limit:
        return messages, False
    return (messages[1:] if newest_first_trim else messages[:limit]), True


class RecentIds:
    """A bounded set of ids, oldest dropped first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def remember(self, item: str) -> None:
        self._ids[item] = None
        self._ids.move_to_end(item)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def forget(self, item: str) -> bool:
        """Drop ``item``; True if it was there."""
        return self._ids.pop(item, False) is None


class MessageService:
    def __init__(
        self,
        store: Store,
        rooms: RoomService,
        fanout: Fanout,
        limits: ContentLimits,
        allocator: SeqAllocator | None = None,
        outgoing: Callable[[MessageDraft], Awaitable[Outgoing | None]] | None = None,
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.fanout = fanout
        self.limits = limits
        self.views = Views(store, limits)
        self.allocator = allocator
        #: webhook events to store with each new message (None: no webhooks)
        self.outgoing = outgoing
        self._unconfirmed = RecentIds(10_000)

    async def send(self, who: Identity, sid: str | None, request: SendMessage) -> dict:
        """Store the message, then broadcast it to the room except the sending socket;
        return it as clients see it."""
        _, _, wire = await self._send(who, sid, request)
        return wire

    async def send_reporting(
        self, who: Identity, sid: str | None, request: SendMessage
    ) -> tuple[Message, bool]:
        """``send``, also saying whether this call stored the message (False for a repeat)."""
        message, created, _ = await self._send(who, sid, request)
        return message, created

    async def _send(
        self, who: Identity, sid: str | None, request: SendMessage
    ) -> tuple[Message, bool, dict]:
        text = clean_text(request.text, self.limits)
        mentioned = parse_mentions(text, self.limits)
        room = await self.rooms.may_send(who, request.room)
        members = await self.rooms.members_recent(room.id)
        if mentioned and room.kind != "public":  # who may read it decides who is mentioned
            members = await self.store.list_members(room.id)
        if request.reply_to is not None:
            parents = await self.store.get_messages(room.id, [request.reply_to])
            if request.reply_to not in parents:
                raise ChatError("bad_request", "reply_to: no such message in this room")
        draft = MessageDraft(
            request.room,
            who.user_id,
            who.name,
            text,
            request.client_id,
            reply_to=request.reply_to,
            mentions=tuple(self.rooms.readers(room, members, mentioned)),
        )
        if self.outgoing is not None:
            draft = replace(draft, outgoing=await self.outgoing(draft))
        try:
            result = await self._store(draft)
        except StoreUnavailable:
            self._unconfirmed.remember(draft.message_id)
            raise
        # A send whose store call failed may have been stored all the same (the write landed,
        # its answer did not): its retry finds it and broadcasts it then, once.
        unconfirmed = self._unconfirmed.forget(result.message.id)
        wire = await self.views.one(result.message, None)
        if result.created or unconfirmed:
            metrics.MESSAGES_RECEIVED.inc()
            await self.fanout.to_room(
                request.room,
                "message:new",
                wire,
                skip_sid=sid,
                outside=self._activity(room, members, result.message),
            )
            await self.notify_mentioned(result.message, list(result.message.mentions), wire)
        return result.message, result.created, wire

    def _activity(self, room: Room, members: list[str], message: Message) -> Notice | None:
        """``room:activity`` for every connection of every member that has not joined the
        room: a joined connection has ``message:new`` (or, the sending one, its ack), which
        says all that and more, so a busy room costs one frame per member, not two. It
        travels with the ``message:new`` broadcast: one delivery to each instance."""
        if not members:
            return None
        return Notice(
            members,
            "room:activity",
            {
                "room": room.id,
                "last_seq": message.seq,
                "message": preview(message, self.limits.quote_length),
            },
        )

    async def notify_mentioned(self, message: Message, users: list[str], wire: dict) -> None:
        """``mention {room, message}`` to each of ``users`` but the sender, cluster-wide."""
        targets = [u for u in users if u != message.sender_id]
        if targets:
            metrics.MENTIONS.inc(len(targets))
            await self.fanout.to_users(targets, "mention", {"room": message.room, "message": wire})

    async def _store(self, draft: MessageDraft) -> AddResult:
        allocator = self.allocator
        if allocator is None:
            return await self.store.add_message(draft)
        existing = await self.store.find_message(draft.room, draft.sender_id, draft.client_id)
        if existing is not None:
            return AddResult(existing, created=False)
        for _ in range(SEQ_ATTEMPTS):
            seq = await self._next_seq(allocator, draft.room)
            try:
                return await self.store.add_message(draft, seq)
            except SeqTaken as taken:
                log.warning(
                    "messages.seq_taken", room=draft.room, seq=seq, stored_max=taken.max_seq
                )
                await self._advance(allocator, draft.room, taken.max_seq)
        raise StoreUnavailable(f"could not allocate a free seq in room {draft.room!r}")

    async def _next_seq(self, allocator: SeqAllocator, room_id: str) -> int:
        """Seq from the allocator; when it is down, the store's max + 1 (conflicts retried)."""
        try:
            return await allocator.next(room_id)
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.warning("messages.allocator_unavailable", room=room_id, error=str(exc))
            return await self.store.last_seq(room_id) + 1

    async def _advance(self, allocator: SeqAllocator, room_id: str, at_least: int) -> None:
        try:
            await allocator.advance(room_id, at_least)
        except Exception as exc:
            log.warning("messages.allocator_advance_failed", room=room_id, error=str(exc))

    async def missed(self, room_id: str, since: int | None) -> tuple[int, list[Message], bool]:
        """(last_seq, messages after ``since`` up to 100, has_more) for ``room:join``."""
        last_seq = await self.store.last_seq(room_id)
        if since is None or since >= last_seq:
            return last_seq, [], False
        messages, has_more = page(
            await self.store.messages_after(room_id, since, MISSED_LIMIT + 1), MISSED_LIMIT, False
        )
        return last_seq, messages, has_more

    async def after(self, room_id: str, after: int, limit: int) -> list[dict]:
        """Up to ``limit`` messages of ``room_id`` after seq ``after``, oldest first, as
        ``message:new`` carries them (no viewer's own reactions)."""
        return await self.views.render(
            room_id, await self.store.messages_after(room_id, after, limit), None
        )

    async def history(self, who: Identity, request: History) -> tuple[list[Message], bool]:
        await self.rooms.readable(who, request.room)
        if request.before is not None and request.after is not None:
            raise ChatError("bad_request", "give before or after, not both")
        if request.after is not None:
            fetched = await self.store.messages_after(
                request.room, request.after, request.limit + 1
            )
            return page(fetched, request.limit, newest_first_trim=False)
        fetched = await self.store.messages_before(request.room, request.before, request.limit + 1)
        return page(fetched, request.limit, newest_first_trim=True)

    async def mark_read(self, who: Identity, request: MarkRead) -> int:
        """Members only (public rooms too: a read marker is broadcast into the room). A
        forward move is broadcast to the room (``message:read``) and to the reader's own
        connections with the new counts (``room:read``)."""
        await self.rooms.require_member(who, request.room)
        last_seq = await self.store.last_seq(request.room)
        if request.seq > last_seq:
            raise ChatError(
                "bad_request", f"seq {request.seq} is beyond the room's last message ({last_seq})"
            )
        previous, stored = await self.store.advance_read_marker(
            request.room, who.user_id, request.seq
        )
        if stored > previous:
            await self.fanout.to_room(
                request.room,
                "message:read",
                {"room": request.room, "user": who.user_id, "seq": stored},
            )
            unread = await self.store.unread(
                request.room, who.user_id, self.limits.unread_cap, marker=stored
            )
            await self.fanout.to_users(
                [who.user_id],
                "room:read",
                {
                    "room": request.room,
                    "seq": unread.read_seq,
                    "unread": unread.unread,
                    "unread_mentions": unread.mentions,
                },
            )
        return stored

    async def typing(self, who: Identity, sid: str, room_id: str, typing: bool) -> None:
        await self.fanout.to_room(
            room_id,
            "typing",
            {"room": room_id, "user": who.user_id, "typing": typing},
            skip_sid=sid,
        )
