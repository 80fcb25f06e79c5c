"""One behaviour suite for every Store implementation (see the ``store`` fixture)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from server.core.errors import SeqTaken
from server.core.models import MessageDraft, OutboxEntry, OutboxItem, Outgoing, Room, Unread


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


# --- the webhook outbox ----------------------------------------------------------------------
# The Firestore emulator is shared by the whole test session: every check looks at the
# queues of its own rooms only.

DRAIN_AT = 10_000.0


async def drain(store, ordering: str) -> list[OutboxEntry]:
    """Deliver every entry of ``ordering``'s queues, heads first, and return them in order."""
    delivered: list[OutboxEntry] = []
    for _ in range(20):
        claimed = await store.outbox_claim("drain", now=DRAIN_AT, lease=1.0, limit=1000)
        mine = [i for i in claimed if i.entry.ordering == ordering]
        if not mine:
            return delivered
        assert len({i.entry.endpoint for i in mine}) == len(mine)  # one head per queue
        for item in mine:
            assert await store.outbox_finish(item, "drain", delivered=True) is True
            delivered.append(item.entry)
    raise AssertionError(f"the queues of {ordering!r} do not empty")


async def test_every_store_keeps_an_outbox(store):
    assert store.supports_outbox


async def test_the_outbox_hands_out_each_queue_in_order_one_at_a_time(store, uid):
    room_a, room_b = uid("a"), uid("b")
    entries = [
        OutboxEntry(uid("e"), "0", room_a, "a1"),
        OutboxEntry(uid("e"), "0", room_b, "b1"),
        OutboxEntry(uid("e"), "0", room_a, "a2"),
    ]
    await store.outbox_add(entries)
    await store.outbox_add(entries[:1])  # the same event again: ignored

    def ours(items: list[OutboxItem]) -> list[OutboxItem]:
        return [i for i in items if i.entry.ordering in (room_a, room_b)]

    mine = ours(await store.outbox_claim("one", now=100.0, lease=10.0, limit=1000))
    assert [i.entry.body for i in mine] == ["a1", "b1"]  # heads only: a2 waits for a1
    assert ours(await store.outbox_claim("two", now=105.0, lease=10.0, limit=1000)) == []
    a1 = next(i for i in mine if i.entry.body == "a1")
    b1 = next(i for i in mine if i.entry.body == "b1")
    assert await store.outbox_finish(a1, "two", delivered=True) is False  # not its lease
    assert await store.outbox_finish(a1, "one", delivered=True) is True
    assert await store.outbox_finish(b1, "one", delivered=False, next_at=200.0) is True
    again = await store.outbox_claim("two", now=106.0, lease=10.0, limit=1000)
    assert [i.entry.body for i in ours(again)] == ["a2"]
    later = await store.outbox_claim("two", now=300.0, lease=10.0, limit=1000)
    retried = [i for i in later if i.entry.ordering == room_b]
    assert [(i.entry.body, i.attempts) for i in retried] == [("b1", 1)]
    assert await store.outbox_finish(retried[0], "two", delivered=False, dead=True) is True
    assert await store.outbox_finish(retried[0], "two", delivered=True) is False  # settled
    counts = await store.outbox_counts()
    assert counts["dead"] >= 1 and counts["pending"] >= 1  # a2 is still leased, pending
    # A dead entry no longer holds up its queue; nothing else is left in it.
    assert [e.body for e in await drain(store, room_a)] == ["a2"]
    assert await drain(store, room_b) == []


async def test_a_new_message_records_its_outgoing_events_in_the_same_write(store, uid):
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
    claimed = await store.outbox_claim("x", now=1.0, lease=5.0, limit=1000)
    bodies = sorted((i.entry.endpoint, i.entry.body) for i in claimed if i.entry.ordering == room)
    assert bodies == [("0", f"{room}#1"), ("1", f"{room}#1")]  # once per endpoint, not twice
    for item in claimed:
        if item.entry.ordering == room:
            assert await store.outbox_finish(item, "x", delivered=True) is True
    assert await drain(store, room) == []


async def test_messages_sent_together_record_their_events_in_seq_order(store, uid):
    room = uid("r")
    outgoing = Outgoing(lambda m: f"evt_{m.id}", ("0",), lambda m: str(m.seq))
    sends = [store.add_message(replace(draft(room, f"c{i}"), outgoing=outgoing)) for i in range(8)]
    stored = await asyncio.gather(*sends)
    assert sorted(a.message.seq for a in stored) == list(range(1, 9))
    assert [e.body for e in await drain(store, room)] == [str(n) for n in range(1, 9)]


def change_events(kind: str) -> Outgoing:
    return Outgoing(
        lambda m: f"evt_{kind}_{m.id}_{m.change_seq}",
        ("0",),
        lambda m: f"{kind}:{m.seq}:{m.change_seq}:{m.revision}:{m.text}",
    )


async def test_edits_and_deletions_record_their_events_with_the_change(store, uid):
    rid = uid("r")
    m1, m2, _ = await three_messages(store, rid)
    edited = await store.edit_message(rid, m2.id, "new", (), WHEN, change_events("upd"))
    same = await store.edit_message(rid, m2.id, "new", (), WHEN, change_events("upd"))
    deleted = await store.delete_message(rid, m1.id, WHEN, change_events("del"))
    again = await store.delete_message(rid, m1.id, WHEN, change_events("del"))
    refused = await store.edit_message(rid, m1.id, "back", (), WHEN, change_events("upd"))
    react = await store.add_reaction(rid, m2.id, "bob", "👍", 20)
    assert edited.changed and deleted.changed and react.changed
    assert not same.changed and not again.changed and refused.refused == "deleted"
    entries = await drain(store, rid)  # one event per stored edit or deletion, in order
    assert [(e.event_id, e.endpoint, e.body) for e in entries] == [
        (f"evt_upd_{m2.id}_1", "0", "upd:2:1:1:new"),
        (f"evt_del_{m1.id}_2", "0", "del:1:2:0:"),
    ]


async def test_membership_changes_record_their_events_with_the_change(store, uid):
    rid = uid("r")

    def event(body: str) -> list[OutboxEntry]:
        event_id = uid("evt")
        return [OutboxEntry(event_id, endpoint, rid, body) for endpoint in ("0", "1")]

    room = Room(id=rid, kind="private", name=rid, owner="alice")
    created, added, removed = event("created"), event("added"), event("removed")
    assert (await store.create_room(room, ["alice"], created))[1] is True
    taken = Room(id=rid, kind="public", name="x")  # another creator: the room exists
    assert (await store.create_room(taken, ["eve"], event("not created")))[1] is False
    await store.add_members(rid, ["bob", "carol"], added)
    await store.add_members(rid, ["bob"], added)  # the same event again: recorded once
    await store.remove_members(rid, ["bob"], removed)
    assert await store.list_members(rid) == ["alice", "carol"]
    entries = await drain(store, rid)
    for endpoint in ("0", "1"):
        assert [(e.event_id, e.body) for e in entries if e.endpoint == endpoint] == [
            (created[0].event_id, "created"),
            (added[0].event_id, "added"),
            (removed[0].event_id, "removed"),
        ]


# --- edits, deletions, reactions, replies, mentions, the room list -------------------------

WHEN = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)


async def three_messages(store, rid: str) -> list:
    await store.create_room(Room(id=rid, kind="private", name=rid, owner="alice"), ["alice", "bob"])
    added = [await store.add_message(draft(rid, f"c{i}", text=f"m{i}")) for i in range(1, 4)]
    return [a.message for a in added]


async def test_reply_and_mentions_are_stored(store, uid):
    rid = uid("r")
    first = (await store.add_message(draft(rid, "p"))).message
    child = MessageDraft(
        rid, "bob", "Bob", "@alice yes", "c", reply_to=first.id, mentions=("alice",)
    )
    stored = (await store.add_message(child)).message
    assert (stored.reply_to, stored.mentions) == (first.id, ("alice",))
    [again] = await store.messages_after(rid, 1, 5)
    assert again == stored and again.revision == 0 and again.change_seq == 0
    found = await store.get_messages(rid, [first.id, stored.id, "nope"])
    assert found == {first.id: first, stored.id: stored}
    assert await store.get_messages(uid("other"), [first.id]) == {}


async def test_edit_bumps_revision_and_change_seq_once(store, uid):
    rid = uid("r")
    m1, m2, _ = await three_messages(store, rid)
    assert await store.change_seq(rid) == 0
    edited = await store.edit_message(rid, m2.id, "new", ("bob",), WHEN)
    assert edited.changed and edited.refused is None
    msg = edited.message
    assert (msg.text, msg.mentions, msg.revision, msg.edited_at, msg.change_seq) == (
        "new",
        ("bob",),
        1,
        WHEN,
        1,
    )
    repeat = await store.edit_message(rid, m2.id, "new", ("bob",), WHEN)
    assert not repeat.changed and repeat.message == msg
    assert await store.change_seq(rid) == 1
    missing = await store.edit_message(rid, "nope", "x", (), WHEN)
    assert missing.message is None and not missing.changed
    assert (await store.edit_message(uid("other"), m1.id, "x", (), WHEN)).message is None
    assert (await store.get_messages(rid, [m2.id]))[m2.id] == msg


async def test_delete_makes_a_tombstone_and_erases_reactions(store, uid):
    rid = uid("r")
    m1, _, _ = await three_messages(store, rid)
    await store.add_reaction(rid, m1.id, "bob", "👍", 20)
    deleted = await store.delete_message(rid, m1.id, WHEN)
    tomb = deleted.message
    assert deleted.changed and tomb.deleted and tomb.deleted_at == WHEN
    assert (tomb.text, tomb.mentions, tomb.reactions, tomb.seq) == ("", (), (), 1)
    assert tomb.change_seq == 2
    again = await store.delete_message(rid, m1.id, WHEN)
    assert not again.changed and again.message == tomb
    assert await store.my_reactions(rid, "bob", [m1.id]) == {}
    refused = await store.edit_message(rid, m1.id, "back", (), WHEN)
    assert refused.refused == "deleted" and not refused.changed
    react = await store.add_reaction(rid, m1.id, "bob", "👍", 20)
    assert react.refused == "deleted"
    assert [m.seq for m in await store.messages_after(rid, 0, 5)] == [1, 2, 3]
    assert await store.change_seq(rid) == 2


async def test_reactions_aggregate_and_are_idempotent(store, uid):
    rid = uid("r")
    m1, m2, _ = await three_messages(store, rid)
    for user, emoji in (("bob", "👍"), ("alice", "👍"), ("bob", "🎉"), ("bob", "👍")):
        await store.add_reaction(rid, m1.id, user, emoji, 20)
    [msg] = (await store.get_messages(rid, [m1.id])).values()
    assert msg.reactions == (("🎉", 1), ("👍", 2))
    assert msg.change_seq == 3  # the repeat changed nothing
    mine = await store.my_reactions(rid, "bob", [m1.id, m2.id])
    assert mine == {m1.id: frozenset({"👍", "🎉"})}
    removed = await store.remove_reaction(rid, m1.id, "bob", "👍")
    assert removed.changed and removed.message.reactions == (("🎉", 1), ("👍", 1))
    assert not (await store.remove_reaction(rid, m1.id, "bob", "👍")).changed
    assert (await store.remove_reaction(rid, "nope", "bob", "👍")).message is None
    assert await store.change_seq(rid) == 4


async def test_distinct_reactions_are_bounded(store, uid):
    rid = uid("r")
    m1, _, _ = await three_messages(store, rid)
    for emoji in ("a", "b"):
        assert (await store.add_reaction(rid, m1.id, "bob", emoji, 2)).changed
    full = await store.add_reaction(rid, m1.id, "bob", "c", 2)
    assert full.refused == "full" and not full.changed
    assert (await store.add_reaction(rid, m1.id, "alice", "a", 2)).changed  # existing emoji
    assert (await store.get_messages(rid, [m1.id]))[m1.id].reactions == (("a", 2), ("b", 1))


async def test_concurrent_changes_get_dense_change_seqs(store, uid):
    rid = uid("r")
    m1, m2, m3 = await three_messages(store, rid)
    results = await asyncio.gather(
        *(store.add_reaction(rid, m.id, f"u{i}", "x", 20) for i in range(6) for m in (m1, m2, m3))
    )
    assert sorted(r.message.change_seq for r in results) == list(range(1, 19))
    assert await store.change_seq(rid) == 18


async def test_changes_after_lists_each_changed_message_once(store, uid):
    rid = uid("r")
    m1, m2, m3 = await three_messages(store, rid)
    await store.edit_message(rid, m1.id, "a", (), WHEN)  # 1
    await store.add_reaction(rid, m3.id, "bob", "x", 20)  # 2
    await store.edit_message(rid, m1.id, "b", (), WHEN)  # 3
    await store.delete_message(rid, m2.id, WHEN)  # 4
    changes = await store.changes_after(rid, 0, 10)
    assert [(m.seq, m.change_seq) for m in changes] == [(3, 2), (1, 3), (2, 4)]
    assert changes[1].text == "b" and changes[2].deleted
    assert [m.seq for m in await store.changes_after(rid, 2, 10)] == [1, 2]
    assert [m.seq for m in await store.changes_after(rid, 0, 1)] == [3]
    assert await store.changes_after(rid, 4, 10) == []


async def test_user_rooms_with_last_message(store, uid):
    me, rid, empty = uid("u"), uid("r"), uid("r")
    await store.create_room(Room(id=rid, kind="public", name="R"), [me])
    await store.create_room(Room(id=empty, kind="private", name="E", owner=me), [me, "x"])
    await store.create_room(Room(id=uid("r"), kind="public", name="not mine"), ["x"])
    await store.add_message(draft(rid, "1", text="first"))
    last = (await store.add_message(draft(rid, "2", text="last"))).message
    rooms = {room.id: (room, message) for room, message in await store.user_rooms(me)}
    assert set(rooms) == {rid, empty}
    assert rooms[rid][1] == last and rooms[rid][0].name == "R"
    assert rooms[empty] == (rooms[empty][0], None) and rooms[empty][0].kind == "private"
    assert await store.user_rooms(uid("nobody")) == []


async def test_member_rooms_are_the_memberships_alone(store, uid):
    me, public, private, other = uid("u"), uid("r"), uid("r"), uid("r")
    await store.create_room(Room(id=public, kind="public", name="P"), [me])
    await store.create_room(Room(id=private, kind="private", name="Q", owner="x"), ["x", me])
    await store.create_room(Room(id=other, kind="public", name="not mine"), ["x"])
    assert sorted(await store.member_rooms(me)) == sorted([public, private])
    await store.remove_members(private, [me])
    await store.add_members(other, [me])
    assert await store.member_rooms(me) == sorted([public, other])  # in room id order
    assert await store.member_rooms(me, 1) == [min(public, other)]
    assert await store.member_rooms(uid("nobody")) == []


async def test_unread_counts_skip_own_deleted_and_read(store, uid):
    rid, me = uid("r"), uid("me")
    await store.create_room(Room(id=rid, kind="public", name=rid), [me])
    for i in range(1, 7):
        mentions = (me,) if i in (2, 5) else ()
        sender = me if i == 3 else "bob"
        await store.add_message(
            MessageDraft(rid, sender, sender, f"m{i}", f"c{i}", mentions=mentions)
        )
    assert await store.unread(rid, me, 100) == Unread(0, 5, 2)
    [sixth] = await store.messages_after(rid, 5, 1)
    await store.delete_message(rid, sixth.id, WHEN)
    assert await store.unread(rid, me, 100) == Unread(0, 4, 2)
    assert await store.unread(rid, me, 3) == Unread(0, 3, 2)
    await store.set_read_marker(rid, me, 2)
    assert await store.unread(rid, me, 100) == Unread(2, 2, 1)
    [fifth] = await store.messages_after(rid, 4, 1)
    await store.edit_message(rid, fifth.id, "no mention now", (), WHEN)
    assert await store.unread(rid, me, 100) == Unread(2, 2, 0)
    await store.edit_message(rid, fifth.id, "again", (me,), WHEN)
    assert await store.unread(rid, me, 100) == Unread(2, 2, 1)
    await store.delete_message(rid, fifth.id, WHEN)
    assert await store.unread(rid, me, 100) == Unread(2, 1, 0)
    own = MessageDraft(rid, me, me, f"@{me}", "self", mentions=(me,))
    await store.add_message(own)
    assert await store.unread(rid, me, 100) == Unread(2, 1, 0)


async def test_unread_with_a_known_marker(store, uid):
    rid, me = uid("r"), uid("me")
    for i in range(1, 4):
        await store.add_message(MessageDraft(rid, "bob", "Bob", f"m{i}", f"c{i}"))
    await store.set_read_marker(rid, me, 1)
    assert await store.unread(rid, me, 100, marker=2) == Unread(2, 1, 0)
    assert await store.unread(rid, me, 100) == Unread(1, 2, 0)
