"""RoomService rules in process, on the memory store: no server, no sockets."""

from __future__ import annotations

import pytest

from server.core.errors import ChatError
from server.core.models import Identity
from server.services.payloads import ChangeMembers, CreateRoom
from server.services.rooms import RoomService, direct_members
from server.store.memory import MemoryStore

ALICE = Identity("alice", "Alice", expires_at=2e9)
BOB = Identity("bob", "Bob", expires_at=2e9)
EVE = Identity("eve", "Eve", expires_at=2e9)


@pytest.fixture
async def rooms() -> RoomService:
    store = MemoryStore()
    await store.start()
    return RoomService(store)


async def members(rooms: RoomService, who: Identity, room_id: str) -> list[str]:
    page, more = await rooms.members_for(who, room_id, limit=1000)
    assert not more
    return page


async def refused(work, code: str) -> ChatError:
    with pytest.raises(ChatError) as caught:
        await work
    assert caught.value.code == code, caught.value.message
    return caught.value


def test_direct_members_parses_sorted_pairs_only():
    assert direct_members("dm:alice:bob") == ("alice", "bob")
    assert direct_members("dm:a:b:c") is None  # two ways to split: ambiguous
    assert direct_members("dm:bob:alice") is None  # not sorted
    assert direct_members("general") is None
    assert direct_members("dm:x@y.z:zed") == ("x@y.z", "zed")


async def test_joining_a_public_room_creates_it_once_and_records_membership(rooms):
    first = await rooms.open_for_join(ALICE, "lobby")
    again = await rooms.open_for_join(BOB, "lobby")
    assert first.kind == again.kind == "public" and again.id == "lobby"
    assert sorted(await members(rooms, ALICE, "lobby")) == ["alice", "bob"]


async def test_a_direct_room_admits_its_two_users_only(rooms):
    room = await rooms.open_for_join(BOB, "dm:alice:bob")
    assert room.kind == "direct"
    assert (await rooms.open_for_join(ALICE, "dm:alice:bob")).id == "dm:alice:bob"
    assert sorted(await members(rooms, ALICE, "dm:alice:bob")) == ["alice", "bob"]
    await refused(rooms.open_for_join(EVE, "dm:alice:bob"), "forbidden")
    await refused(rooms.open_for_join(ALICE, "dm:bob:alice"), "bad_request")


async def test_private_rooms_are_managed_by_their_owner_only(rooms):
    await rooms.create(ALICE, CreateRoom(room="team", private=True, members=["bob"]))
    assert sorted(await members(rooms, BOB, "team")) == ["alice", "bob"]
    await refused(
        rooms.change_members(BOB, ChangeMembers(room="team", users=["eve"]), add=True), "forbidden"
    )
    await refused(
        rooms.change_members(ALICE, ChangeMembers(room="team", users=["alice"]), add=False),
        "bad_request",
    )
    added = await rooms.change_members(
        ALICE, ChangeMembers(room="team", users=["eve", "eve"]), add=True
    )
    assert added == ["eve"]
    removed = await rooms.change_members(
        ALICE, ChangeMembers(room="team", users=["eve", "nobody"]), add=False
    )
    assert removed == ["eve"]  # only ids that were members count as removed
    assert sorted(await members(rooms, ALICE, "team")) == ["alice", "bob"]


async def test_a_removed_member_may_no_longer_send_or_read(rooms):
    await rooms.create(ALICE, CreateRoom(room="team", private=True, members=["bob"]))
    await rooms.may_send(BOB, "team")
    await rooms.change_members(ALICE, ChangeMembers(room="team", users=["bob"]), add=False)
    with pytest.raises(ChatError):
        await rooms.may_send(BOB, "team")
    with pytest.raises(ChatError):
        await rooms.readable(BOB, "team")


async def test_public_rooms_have_no_managed_members(rooms):
    await rooms.create(ALICE, CreateRoom(room="open"))
    await refused(
        rooms.change_members(ALICE, ChangeMembers(room="open", users=["bob"]), add=True),
        "bad_request",
    )


async def test_creating_an_existing_room_is_idempotent_for_its_owner_only(rooms):
    made = await rooms.create(ALICE, CreateRoom(room="team", name="Team", private=True))
    assert (await rooms.create(ALICE, CreateRoom(room="team", private=True))).id == made.id
    await refused(rooms.create(BOB, CreateRoom(room="team", private=True)), "forbidden")
    await refused(rooms.create(ALICE, CreateRoom(room="dm:alice:bob")), "bad_request")


async def test_member_rooms_are_remembered_until_a_change_is_heard_of():
    store = MemoryStore()
    await store.start()
    heard: list[tuple[str, list[str], bool]] = []

    async def listener(room_id: str, users: list[str], added: bool) -> None:
        heard.append((room_id, users, added))

    rooms = RoomService(store, on_members_changed=listener)
    await rooms.create(ALICE, CreateRoom(room="plans", private=True, members=["bob"]))
    assert heard == [("plans", ["alice", "bob"], True)]
    assert await rooms.member_rooms("bob") == ["plans"]
    await store.add_members("elsewhere", ["bob"])  # written by another instance
    assert await rooms.member_rooms("bob") == ["plans"]  # remembered
    rooms.forget_members("elsewhere", ["bob"])  # its members control event arrives
    assert sorted(await rooms.member_rooms("bob")) == ["elsewhere", "plans"]
    await rooms.change_members(ALICE, ChangeMembers(room="plans", users=["bob"]), add=False)
    assert heard[-1] == ("plans", ["bob"], False)
    assert await rooms.member_rooms("bob") == ["elsewhere"]  # this instance's own change
    expiring = RoomService(store, member_rooms_ttl=0)
    assert await expiring.member_rooms("bob") == ["elsewhere"]
    await store.add_members("plans", ["bob"])
    assert sorted(await expiring.member_rooms("bob")) == ["elsewhere", "plans"]
