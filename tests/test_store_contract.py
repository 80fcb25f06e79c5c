"""One behaviour suite for every Store implementation (see the ``store`` fixture)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from server.core.errors import SeqTaken
from server.core.models import MessageDraft, Room


def draft(room: str, client_id: str, text: str = "hi", sender: str = "alice") -> MessageDraft:
    return MessageDraft(
        room=room, sender_id=sender, sender_name=sender.title(), text=text, client_id=client_id
    )


async def test_ping(store):
    await store.ping()


async def test_room_create_is_idempotent_and_keeps_owner(store, uid):
    room = Room(id=uid("r"), kind="private", name="Team", owner="alice")
    stored, created = await store.create_room(room, ["alice", "bob"])
    assert created and stored.owner == "alice"
    again, created_again = await store.create_room(
        Room(id=room.id, kind="public", name="x"), ["eve"]
    )
    assert not created_again
    assert again.kind == "private" and again.owner == "alice" and again.name == "Team"
    assert await store.list_members(room.id) == ["alice", "bob"]
    assert await store.get_room(uid("missing")) is None


async def test_members_add_remove(store, uid):
    rid = uid("r")
    await store.create_room(Room(id=rid, kind="private", name=rid, owner="a"), ["a"])
    await store.add_members(rid, ["c", "b", "b"])
    assert await store.list_members(rid) == ["a", "b", "c"]
    assert await store.is_member(rid, "b")
    await store.remove_members(rid, ["b", "zz"])
    assert await store.list_members(rid) == ["a", "c"]
    assert not await store.is_member(rid, "b")


async def test_members_in_pages_and_counted(store, uid):
    rid = uid("r")
    await store.create_room(Room(id=rid, kind="private", name=rid, owner="a"), ["a"])
    await store.add_members(rid, ["e", "c", "b", "d"])
    assert await store.count_members(rid) == 5
    assert await store.list_members(rid, limit=2) == ["a", "b"]
    assert await store.list_members(rid, after="b", limit=2) == ["c", "d"]
    assert await store.list_members(rid, after="d", limit=2) == ["e"]
    assert await store.list_members(rid, after="e") == []
    assert await store.count_members(uid("none")) == 0


async def test_seq_starts_at_one_and_increases(store, uid):
    rid = uid("r")
    assert await store.last_seq(rid) == 0
    first = await store.add_message(draft(rid, "c1"))
    second = await store.add_message(draft(rid, "c2"))
    assert (first.message.seq, second.message.seq) == (1, 2)
    assert first.created and second.created
    assert await store.last_seq(rid) == 2
    assert first.message.created_at.tzinfo is not None


async def test_client_id_is_idempotent_per_sender_and_room(store, uid):
    rid = uid("r")
    original = await store.add_message(draft(rid, "same", text="one"))
    repeat = await store.add_message(draft(rid, "same", text="changed"))
    assert not repeat.created
    assert repeat.message == original.message
    other_sender = await store.add_message(draft(rid, "same", sender="bob"))
    assert other_sender.created and other_sender.message.seq == 2
    found = await store.find_message(rid, "alice", "same")
    assert found == original.message
    assert await store.find_message(rid, "alice", "nope") is None


async def test_concurrent_adds_get_unique_dense_seqs(store, uid):
    rid = uid("r")
    results = await asyncio.gather(*(store.add_message(draft(rid, f"c{i}")) for i in range(30)))
    seqs = sorted(r.message.seq for r in results)
    assert seqs == list(range(1, 31))


async def test_explicit_seq_and_conflict(store, uid):
    rid = uid("r")
    added = await store.add_message(draft(rid, "a"), seq=5)
    assert added.message.seq == 5
    with pytest.raises(SeqTaken) as info:
        await store.add_message(draft(rid, "b"), seq=5)
    assert info.value.max_seq >= 5
    assert await store.find_message(rid, "alice", "b") is None
    # an explicit seq on a repeated client_id returns the original, no conflict
    repeat = await store.add_message(draft(rid, "a"), seq=9)
    assert not repeat.created and repeat.message.seq == 5


async def test_history_paging(store, uid):
    rid = uid("r")
    for i in range(1, 11):
        await store.add_message(draft(rid, f"c{i}", text=f"m{i}"))
    latest = await store.messages_before(rid, None, 3)
    assert [m.seq for m in latest] == [8, 9, 10]
    before = await store.messages_before(rid, 8, 3)
    assert [m.seq for m in before] == [5, 6, 7]
    assert [m.seq for m in await store.messages_before(rid, 2, 5)] == [1]
    after = await store.messages_after(rid, 7, 10)
    assert [m.seq for m in after] == [8, 9, 10]
    assert [m.seq for m in await store.messages_after(rid, 0, 2)] == [1, 2]
    assert await store.messages_after(rid, 10, 5) == []
    assert after[0].text == "m8" and after[0].sender_name == "Alice"
    assert await store.messages_after(uid("empty"), 0, 5) == []


async def test_read_marker_never_moves_backwards(store, uid):
    rid = uid("r")
    assert await store.get_read_marker(rid, "alice") == 0
    assert await store.set_read_marker(rid, "alice", 5) == 5
    assert await store.set_read_marker(rid, "alice", 3) == 5
    assert await store.get_read_marker(rid, "alice") == 5
    assert await store.set_read_marker(rid, "alice", 7) == 7
    assert await store.get_read_marker(rid, "bob") == 0


async def test_advance_read_marker_says_what_it_was_and_what_it_is(store, uid):
    rid = uid("r")
    assert await store.advance_read_marker(rid, "alice", 4) == (0, 4)
    assert await store.advance_read_marker(rid, "alice", 2) == (4, 4)
    assert await store.advance_read_marker(rid, "alice", 4) == (4, 4)
    assert await store.advance_read_marker(rid, "alice", 6) == (4, 6)
    assert await store.get_read_marker(rid, "alice") == 6


async def test_user_records_and_last_seen(store, uid):
    u = uid("u")
    await store.upsert_user(u, "Alice")
    users = await store.get_users([u, uid("nobody")])
    assert list(users) == [u]
    assert users[u].name == "Alice" and users[u].last_seen is None
    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    await store.set_last_seen(u, when)
    await store.upsert_user(u, "Alice B")
    record = (await store.get_users([u]))[u]
    assert record.name == "Alice B"
    assert record.last_seen == when
    stranger = uid("s")
    await store.set_last_seen(stranger, when)
    assert (await store.get_users([stranger]))[stranger].last_seen == when


async def test_sanctions_are_put_replaced_read_and_deleted(store, uid):
    from server.core.models import SanctionKey

    room, user, other = uid("r"), uid("u"), uid("o")
    ban = SanctionKey("ban", room, user)
    mute = SanctionKey("mute", room, user)
    block = SanctionKey("block", other, user)
    revoke = SanctionKey("revoke", "", user)
    assert await store.get_sanctions([ban, mute, block, revoke]) == {}
    await store.put_sanction(ban, None)
    await store.put_sanction(mute, 1_000.5)
    await store.put_sanction(mute, 2_000.25)  # replaced, not added
    await store.put_sanction(revoke, 1_700_000_000.0)
    found = await store.get_sanctions([ban, mute, block, revoke, ban])
    assert found == {ban: None, mute: 2_000.25, revoke: 1_700_000_000.0}
    await store.delete_sanction(mute)
    await store.delete_sanction(block)  # deleting what is not there is fine
    assert await store.get_sanctions([mute, ban]) == {ban: None}
    # Another room's or user's sanction is another key.
    assert await store.get_sanctions([SanctionKey("ban", uid("r"), user)]) == {}


async def test_the_outbox_hands_out_each_queue_in_order_one_at_a_time(store, uid):
    from server.core.models import OutboxEntry

    if not store.supports_outbox:
        pytest.skip("this store keeps no webhook outbox (webhooks refused at start)")
    room_a, room_b = uid("a"), uid("b")
    entries = [
        OutboxEntry(uid("e"), "0", room_a, "a1"),
        OutboxEntry(uid("e"), "0", room_b, "b1"),
        OutboxEntry(uid("e"), "0", room_a, "a2"),
    ]
    await store.outbox_add(entries)
    await store.outbox_add(entries[:1])  # the same event again: ignored
    claimed = await store.outbox_claim("one", now=100.0, lease=10.0, limit=10)
    mine = [i for i in claimed if i.entry.ordering in (room_a, room_b)]
    assert [i.entry.body for i in mine] == ["a1", "b1"]  # heads only: a2 waits for a1
    assert await store.outbox_claim("two", now=105.0, lease=10.0, limit=10) == []  # leased
    a1 = next(i for i in mine if i.entry.body == "a1")
    b1 = next(i for i in mine if i.entry.body == "b1")
    assert await store.outbox_finish(a1, "two", delivered=True) is False  # not its lease
    assert await store.outbox_finish(a1, "one", delivered=True) is True
    assert await store.outbox_finish(b1, "one", delivered=False, next_at=200.0) is True
    again = await store.outbox_claim("two", now=106.0, lease=10.0, limit=10)
    assert [i.entry.body for i in again if i.entry.ordering in (room_a, room_b)] == ["a2"]
    later = await store.outbox_claim("two", now=300.0, lease=10.0, limit=10)
    retried = [i for i in later if i.entry.ordering == room_b]
    assert [(i.entry.body, i.attempts) for i in retried] == [("b1", 1)]
    assert await store.outbox_finish(retried[0], "two", delivered=False, dead=True) is True
    counts = await store.outbox_counts()
    assert counts["dead"] >= 1 and counts["pending"] >= 1  # a2 is still leased, pending


async def test_a_new_message_records_its_outgoing_events_in_the_same_write(store, uid):
    from server.core.models import Outgoing

    if not store.supports_outbox:
        pytest.skip("this store keeps no webhook outbox (webhooks refused at start)")
    room = uid("r")
    outgoing = Outgoing(uid("evt"), ("0", "1"), lambda m: f"{m.room}#{m.seq}")
    first = draft(room, "c1")
    stored = await store.add_message(
        MessageDraft(first.room, first.sender_id, first.sender_name, first.text, "c1", outgoing)
    )
    repeat = await store.add_message(
        MessageDraft(first.room, first.sender_id, first.sender_name, first.text, "c1", outgoing)
    )
    assert stored.created and not repeat.created
    claimed = await store.outbox_claim("x", now=1.0, lease=5.0, limit=100)
    bodies = sorted((i.entry.endpoint, i.entry.body) for i in claimed if i.entry.ordering == room)
    assert bodies == [("0", f"{room}#1"), ("1", f"{room}#1")]  # once per endpoint, not twice
