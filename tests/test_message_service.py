"""MessageService rules that need a store failing at a precise moment (in-process)."""

from __future__ import annotations

import pytest

from server.core.errors import StoreUnavailable
from server.core.models import Identity, MessageDraft
from server.services.content import ContentLimits
from server.services.messages import MessageService
from server.services.payloads import SendMessage
from server.services.rooms import RoomService
from server.store.memory import MemoryStore


class AnswerLostStore(MemoryStore):
    """Stores the next message, then fails as if the answer had been lost on the way back."""

    lose_next_answer = False

    async def add_message(self, draft: MessageDraft, seq: int | None = None):
        result = await super().add_message(draft, seq)
        if self.lose_next_answer:
            self.lose_next_answer = False
            raise StoreUnavailable("answer lost")
        return result


class RecordingFanout:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict, str | None]] = []
        self.to_user: list[tuple[list[str], str, dict]] = []

    async def to_users(self, user_ids: list[str], event: str, data: dict) -> None:
        self.to_user.append((list(user_ids), event, data))

    async def to_room(
        self, room_id: str, event: str, data: dict, skip_sid: str | None = None, outside=None
    ) -> None:
        self.sent.append((room_id, event, data, skip_sid))


async def setup() -> tuple[AnswerLostStore, RecordingFanout, MessageService, Identity, SendMessage]:
    """A service on a fresh store, alice joined to "general", and her request to send "hello"."""
    store = AnswerLostStore()
    fanout = RecordingFanout()
    service = MessageService(store, RoomService(store), fanout, ContentLimits(max_length=100))
    alice = Identity("alice", "Alice", expires_at=2e9)
    await RoomService(store).open_for_join(alice, "general")
    return store, fanout, service, alice, SendMessage(room="general", text="hello", client_id="c1")


async def send_losing_the_answer(store, service, alice, request) -> None:
    """Send once; the store keeps the message but its answer is lost (StoreUnavailable)."""
    store.lose_next_answer = True
    with pytest.raises(StoreUnavailable):
        await service.send(alice, "sid-1", request)


async def test_a_send_stored_despite_a_failed_answer_is_broadcast_by_its_retry():
    store, fanout, service, alice, request = await setup()

    await send_losing_the_answer(store, service, alice, request)
    assert fanout.sent == []  # nothing broadcast for a failed ack

    retried = await service.send(alice, "sid-1", request)
    assert retried["seq"] == 1
    assert [(room, event, data["seq"]) for room, event, data, _ in fanout.sent] == [
        ("general", "message:new", 1)
    ]

    again = await service.send(alice, "sid-1", request)  # an ordinary repeat: no second broadcast
    assert again == retried and len(fanout.sent) == 1


async def test_a_failed_send_that_was_not_stored_is_broadcast_once_by_its_retry():
    store, fanout, service, alice, request = await setup()
    service._unconfirmed.remember(
        request_id := MessageDraft("general", "alice", "Alice", "hello", "c1").message_id
    )
    first = await service.send(alice, "sid-1", request)  # stored now: broadcast as created
    assert first["id"] == request_id and len(fanout.sent) == 1
    await service.send(alice, "sid-1", request)
    await service.send(alice, "sid-1", request)
    assert len(fanout.sent) == 1


async def test_a_retry_through_another_instance_after_unavailable_only_acks():
    """The instance that answered ``unavailable`` is the only one that knows the send may be
    unconfirmed: a retry through another instance acks the stored message, broadcasts nothing
    (the room's members find it through the seq gap and history)."""
    store, first_fanout, first, alice, request = await setup()
    other_fanout = RecordingFanout()
    other = MessageService(store, RoomService(store), other_fanout, ContentLimits(max_length=100))

    await send_losing_the_answer(store, first, alice, request)
    retried = await other.send(alice, "sid-2", request)
    assert retried["seq"] == 1 and retried["text"] == "hello"
    assert other_fanout.sent == [] and first_fanout.sent == []
    assert [m.id for m in await store.messages_after("general", 0, 10)] == [retried["id"]]
