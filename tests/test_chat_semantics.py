"""Edits, deletions, reactions, replies, mentions, the room list and change recovery,
in process on the memory store (the services as the composition root wires them)."""

from __future__ import annotations

import asyncio

import pytest

from server.core import metrics
from server.core.errors import ChatError
from server.core.models import Identity
from server.services.changes import ChangeService
from server.services.content import ContentLimits, parse_mentions
from server.services.inbox import InboxService
from server.services.messages import MessageService
from server.services.payloads import (
    Changes,
    CreateRoom,
    EditMessage,
    ListRooms,
    MarkRead,
    MessageRef,
    React,
    SendMessage,
)
from server.services.ports import Notice
from server.services.rooms import RoomService
from server.store.memory import MemoryStore


class Recorder:
    """The Fanout port, recording room broadcasts and per-user events."""

    def __init__(self) -> None:
        self.rooms: list[tuple[str, str, dict]] = []
        self.users: list[tuple[list[str], str, dict]] = []
        #: the room each per-user event spares the joined sockets of (None: none spared)
        self.outside: list[str | None] = []

    async def to_room(
        self,
        room_id: str,
        event: str,
        data: dict,
        skip_sid: str | None = None,
        outside: Notice | None = None,
    ) -> None:
        self.rooms.append((room_id, event, data))
        if outside is not None:  # recorded as a per-user event sparing the room's sockets
            self.users.append((list(outside.users), outside.event, outside.data))
            self.outside.append(room_id)

    async def to_users(self, user_ids: list[str], event: str, data: dict) -> None:
        self.users.append((list(user_ids), event, data))
        self.outside.append(None)

    def room_events(self, event: str) -> list[dict]:
        return [data for _, name, data in self.rooms if name == event]

    def user_events(self, event: str) -> list[tuple[list[str], dict]]:
        return [(users, data) for users, name, data in self.users if name == event]


ALICE = Identity("alice", "Alice", expires_at=2e9)
BOB = Identity("bob", "Bob", expires_at=2e9)
CAROL = Identity("carol", "Carol", expires_at=2e9)
ADMIN = Identity("root", "Root", expires_at=2e9, role="admin")
LIMITS = ContentLimits(
    max_length=200, max_mentions=3, max_reaction_length=4, max_reactions=2, quote_length=5
)


class Chat:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.fanout = Recorder()
        self.rooms = RoomService(self.store)
        self.messages = MessageService(self.store, self.rooms, self.fanout, LIMITS)
        self.changes = ChangeService(self.store, self.rooms, self.messages, self.fanout, LIMITS)
        self.inbox = InboxService(self.store, LIMITS)
        self._ids = 0

    async def send(self, who: Identity, room: str, text: str, **extra) -> dict:
        self._ids += 1
        request = SendMessage(room=room, text=text, client_id=f"c{self._ids}", **extra)
        return await self.messages.send(who, "sid", request)


@pytest.fixture
async def chat() -> Chat:
    made = Chat()
    await made.rooms.create(ALICE, CreateRoom(room="team", private=True, members=["bob"]))
    for who in (ALICE, BOB):
        await made.rooms.open_for_join(who, "general")
    return made


async def code_of(work) -> str:
    with pytest.raises(ChatError) as info:
        await work
    return info.value.code


async def test_edit_only_by_sender_once_broadcast(chat):
    sent = await chat.send(ALICE, "general", "hello")
    edit = EditMessage(room="general", id=sent["id"], text="  hello @bob  ")
    first = await chat.changes.edit(ALICE, edit)
    again = await chat.changes.edit(ALICE, edit)
    assert first == again
    assert (first["text"], first["revision"], first["mentions"]) == ("hello @bob", 1, ["bob"])
    assert first["edited_at"].endswith("Z") and first["change_seq"] == 1
    [updated] = chat.fanout.room_events("message:updated")
    assert updated == {
        "room": "general",
        "id": sent["id"],
        "seq": 1,
        "text": "hello @bob",
        "mentions": ["bob"],
        "edited_at": first["edited_at"],
        "revision": 1,
        "change_seq": 1,
    }
    # bob was newly mentioned by the edit: one mention event, to him only
    [(users, mention)] = chat.fanout.user_events("mention")
    assert users == ["bob"] and mention["message"]["text"] == "hello @bob"
    assert await code_of(chat.changes.edit(BOB, edit)) == "forbidden"
    assert await code_of(chat.changes.edit(ALICE, edit.model_copy(update={"text": " "}))) == (
        "bad_request"
    )
    missing = EditMessage(room="general", id="nope", text="x")
    assert await code_of(chat.changes.edit(ALICE, missing)) == "not_found"


async def test_delete_permissions_and_tombstone(chat):
    mine = await chat.send(BOB, "team", "secret")
    other = await chat.send(BOB, "team", "other")
    public = await chat.send(BOB, "general", "pub")
    await chat.changes.react(ALICE, React(room="team", id=mine["id"], emoji="👍"), add=True)
    # carol cannot read the private room: not_found, as for a room that does not exist
    for room in ("team", "no-such-room"):
        request = MessageRef(room=room, id=mine["id"])
        assert await code_of(chat.changes.delete(CAROL, request)) == "not_found"
    # alice owns the private room: she may delete bob's message there, not in public rooms
    assert await code_of(
        chat.changes.delete(ALICE, MessageRef(room="general", id=public["id"]))
    ) == ("forbidden")
    tomb = await chat.changes.delete(ALICE, MessageRef(room="team", id=mine["id"]))
    again = await chat.changes.delete(BOB, MessageRef(room="team", id=mine["id"]))
    assert tomb == again
    assert (tomb["deleted"], tomb["text"], tomb["reactions"], tomb["seq"]) == (True, "", [], 1)
    assert len(chat.fanout.room_events("message:deleted")) == 1
    # an admin may delete anywhere, even in a private room they are not in
    gone = await chat.changes.delete(ADMIN, MessageRef(room="team", id=other["id"]))
    assert gone["deleted"]
    # a tombstone takes neither edits nor reactions
    edit = EditMessage(room="team", id=mine["id"], text="back")
    assert await code_of(chat.changes.edit(BOB, edit)) == "bad_request"
    react = React(room="team", id=mine["id"], emoji="x")
    assert await code_of(chat.changes.react(BOB, react, add=True)) == "bad_request"
    history = await chat.store.messages_after("team", 0, 10)
    assert [(m.seq, m.deleted, m.text) for m in history] == [(1, True, ""), (2, True, "")]


async def test_reactions_counts_me_limits_and_one_broadcast(chat):
    sent = await chat.send(ALICE, "general", "hi")
    thumbs = React(room="general", id=sent["id"], emoji="👍")
    await chat.changes.react(BOB, thumbs, add=True)
    mine = await chat.changes.react(ALICE, thumbs, add=True)
    assert mine["reactions"] == [{"emoji": "👍", "count": 2, "me": True}]
    assert await chat.changes.react(ALICE, thumbs, add=True) == mine  # repeat: no change
    events = chat.fanout.room_events("message:reactions")
    assert len(events) == 2
    assert events[-1] == {
        "room": "general",
        "id": sent["id"],
        "seq": 1,
        "change_seq": 2,
        "user": "alice",
        "emoji": "👍",
        "reacted": True,
        "reactions": [{"emoji": "👍", "count": 2}],
    }
    await chat.changes.react(BOB, React(room="general", id=sent["id"], emoji="🎉"), add=True)
    third = React(room="general", id=sent["id"], emoji="ok")
    refused = metrics.LIMIT_REFUSALS.labels("reactions")
    before = refused._value.get()
    assert await code_of(chat.changes.react(BOB, third, add=True)) == "too_large"
    assert refused._value.get() == before + 1
    too_long = React(room="general", id=sent["id"], emoji="abcde")
    assert await code_of(chat.changes.react(BOB, too_long, add=True)) == "too_large"
    spaced = React(room="general", id=sent["id"], emoji="a b")
    assert await code_of(chat.changes.react(BOB, spaced, add=True)) == "bad_request"
    missing = React(room="general", id="abc123", emoji="x")
    assert await code_of(chat.changes.react(BOB, missing, add=True)) == "not_found"
    removed = await chat.changes.react(ALICE, thumbs, add=False)
    assert removed["reactions"] == [
        {"emoji": "🎉", "count": 1, "me": False},
        {"emoji": "👍", "count": 1, "me": False},
    ]
    assert await chat.changes.react(ALICE, thumbs, add=False) == removed
    assert len(chat.fanout.room_events("message:reactions")) == 4
    [view] = await chat.messages.views.render(
        "general", await chat.store.messages_after("general", 0, 1), "bob"
    )
    assert view["reactions"] == [
        {"emoji": "🎉", "count": 1, "me": True},
        {"emoji": "👍", "count": 1, "me": True},
    ]


async def test_reply_quotes_its_parent_and_shows_a_deletion(chat):
    parent = await chat.send(ALICE, "general", "the original text")
    reply = await chat.send(BOB, "general", "agreed", reply_to=parent["id"])
    assert reply["reply_to"] == {
        "id": parent["id"],
        "seq": 1,
        "sender": {"id": "alice", "name": "Alice"},
        "text": "the o",
        "deleted": False,
    }
    [broadcast] = [m for m in chat.fanout.room_events("message:new") if m["seq"] == 2]
    assert broadcast == reply
    await chat.changes.delete(ALICE, MessageRef(room="general", id=parent["id"]))
    [view] = await chat.messages.views.render(
        "general", await chat.store.messages_after("general", 1, 1), "bob"
    )
    assert view["reply_to"]["deleted"] is True and view["reply_to"]["text"] == ""
    other_room = await chat.send(ALICE, "team", "elsewhere")
    bad = chat.send(BOB, "general", "x", reply_to=other_room["id"])
    assert await code_of(bad) == "bad_request"


def test_mentions_are_parsed_on_the_server():
    text = "hi @bob, @carol. mail a@b.c @bob again @x:y: and @dana@corp.com"
    assert parse_mentions(text, ContentLimits()) == ["bob", "carol", "x:y", "dana@corp.com"]
    refused = metrics.LIMIT_REFUSALS.labels("mentions")
    before = refused._value.get()
    with pytest.raises(ChatError) as info:
        parse_mentions("@a @b @c @d", LIMITS)
    assert info.value.code == "too_large" and refused._value.get() == before + 1


async def test_mentions_reach_readers_only(chat):
    sent = await chat.send(ALICE, "team", "@bob and @carol and @alice look")
    assert sent["mentions"] == ["bob", "alice"]  # carol may not read the private room
    [(users, event)] = chat.fanout.user_events("mention")
    assert users == ["bob"] and event == {"room": "team", "message": sent}
    public = await chat.send(ALICE, "general", "@carol see this")
    assert public["mentions"] == ["carol"]  # anyone may read a public room
    assert chat.fanout.user_events("mention")[-1][0] == ["carol"]


async def test_room_activity_goes_to_every_member_outside_the_room(chat):
    await chat.send(BOB, "team", "hello team")
    [(users, activity)] = chat.fanout.user_events("room:activity")
    assert sorted(users) == ["alice", "bob"]
    # sockets joined to the room have message:new instead
    assert chat.fanout.outside == ["team"]
    assert activity["room"] == "team" and activity["last_seq"] == 1
    assert activity["message"]["text"] == "hello" and activity["message"]["sender"]["id"] == "bob"


async def test_room_list_order_unread_cursor_and_read_sync(chat):
    await chat.rooms.open_for_join(ALICE, "dm:alice:bob")
    for room, text in (
        ("general", "one @alice"),
        ("team", "two"),
        ("team", "three @alice"),
        ("dm:alice:bob", "psst"),
    ):
        await asyncio.sleep(0.005)  # activity is compared in milliseconds
        await chat.send(BOB, room, text)
    listed = await chat.inbox.list_rooms(ALICE, ListRooms())
    assert [r["room"]["id"] for r in listed["rooms"]] == ["dm:alice:bob", "team", "general"]
    assert listed["cursor"] is None
    dm, team, general = listed["rooms"]
    assert dm["peer"] == {"id": "bob", "name": "bob"} and dm["room"]["kind"] == "direct"
    assert (team["last_seq"], team["read_seq"], team["unread"], team["unread_mentions"]) == (
        2,
        0,
        2,
        1,
    )
    assert team["last_message"]["text"] == "three" and team["peer"] is None
    assert (general["unread"], general["unread_mentions"]) == (1, 1)
    first = await chat.inbox.list_rooms(ALICE, ListRooms(limit=2))
    assert [r["room"]["id"] for r in first["rooms"]] == ["dm:alice:bob", "team"]
    rest = await chat.inbox.list_rooms(ALICE, ListRooms(limit=2, cursor=first["cursor"]))
    assert [r["room"]["id"] for r in rest["rooms"]] == ["general"] and rest["cursor"] is None
    assert await code_of(chat.inbox.list_rooms(ALICE, ListRooms(cursor="garbage"))) == (
        "bad_request"
    )
    await chat.messages.mark_read(ALICE, MarkRead(room="team", seq=1))
    [(users, synced)] = chat.fanout.user_events("room:read")
    assert users == ["alice"]
    assert synced == {"room": "team", "seq": 1, "unread": 1, "unread_mentions": 1}
    again = await chat.inbox.list_rooms(ALICE, ListRooms())
    assert [(r["room"]["id"], r["unread"]) for r in again["rooms"]][1] == ("team", 1)
    # bob's own messages are never unread for him
    assert all(r["unread"] == 0 for r in (await chat.inbox.list_rooms(BOB, ListRooms()))["rooms"])


async def test_recovery_returns_each_changed_message_once_in_its_current_state(chat):
    ids = [(await chat.send(ALICE, "general", f"m{i}"))["id"] for i in range(4)]
    # a client saw everything up to seq 3 and change seq 0, then went away
    await chat.changes.edit(ALICE, EditMessage(room="general", id=ids[0], text="m0 v2"))
    await chat.changes.react(BOB, React(room="general", id=ids[1], emoji="👍"), add=True)
    await chat.changes.edit(ALICE, EditMessage(room="general", id=ids[0], text="m0 v3"))
    await chat.changes.delete(ALICE, MessageRef(room="general", id=ids[2]))
    await chat.changes.react(BOB, React(room="general", id=ids[3], emoji="x"), add=True)
    changes, more, cursor = await chat.changes.since("general", 0, 3, "bob")
    assert (more, cursor) == (False, 5)
    assert [(c["seq"], c["change_seq"]) for c in changes] == [(2, 2), (1, 3), (3, 4)]
    assert changes[1]["text"] == "m0 v3" and changes[1]["revision"] == 2
    assert changes[0]["reactions"] == [{"emoji": "👍", "count": 1, "me": True}]
    assert changes[2]["deleted"] is True
    assert await chat.changes.since("general", 5, 4, "bob") == ([], False, 5)
    paged = await chat.changes.changes(BOB, Changes(room="general", after=0, limit=2))
    assert [c["change_seq"] for c in paged["changes"]] == [2, 3]
    assert paged["has_more"] is True and paged["change_seq"] == 3
    tail = await chat.changes.changes(BOB, Changes(room="general", after=3, limit=2))
    assert [c["change_seq"] for c in tail["changes"]] == [4, 5] and tail["change_seq"] == 5
    assert await code_of(chat.changes.changes(CAROL, Changes(room="team", after=0))) == (
        "not_found"
    )
