"""Messages: send (validate → allocate seq → store durably → fan out), history, read, typing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog

from server.core import metrics
from server.core.errors import ChatError, SeqTaken, StoreUnavailable
from server.core.models import AddResult, Identity, Message, MessageDraft, Outgoing
from server.services.payloads import History, MarkRead, SendMessage
from server.services.ports import Fanout, SeqAllocator
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
        max_length: int,
        allocator: SeqAllocator | None = None,
        outgoing: Callable[[MessageDraft], Awaitable[Outgoing | None]] | None = None,
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.fanout = fanout
        self.max_length = max_length
        self.allocator = allocator
        #: webhook events to store with each new message (None: no webhooks)
        self.outgoing = outgoing
        self._unconfirmed = RecentIds(10_000)

    def _text(self, raw: str) -> str:
        text = raw.strip()
        if not text:
            raise ChatError("bad_request", "text is empty after trimming")
        if len(text) > self.max_length:
            raise ChatError(
                "too_large", f"text is {len(text)} characters; the limit is {self.max_length}"
            )
        return text

    async def send(self, who: Identity, sid: str | None, request: SendMessage) -> Message:
        """Store the message, then broadcast it to the room except the sending socket."""
        message, _ = await self.send_reporting(who, sid, request)
        return message

    async def send_reporting(
        self, who: Identity, sid: str | None, request: SendMessage
    ) -> tuple[Message, bool]:
        """``send``, also saying whether this call stored the message (False for a repeat)."""
        text = self._text(request.text)
        await self.rooms.may_send(who, request.room)
        draft = MessageDraft(request.room, who.user_id, who.name, text, request.client_id)
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
        if result.created or unconfirmed:
            metrics.MESSAGES_RECEIVED.inc()
            await self.fanout.to_room(
                request.room, "message:new", result.message.to_wire(), skip_sid=sid
            )
        return result.message, result.created

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
        """Members only (public rooms too: a read marker is broadcast into the room)."""
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
        return stored

    async def typing(self, who: Identity, sid: str, room_id: str, typing: bool) -> None:
        await self.fanout.to_room(
            room_id,
            "typing",
            {"room": room_id, "user": who.user_id, "typing": typing},
            skip_sid=sid,
        )
