"""Rooms (contract §4): public, private and direct rooms, membership, join and leave."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.clients import QUIET, error_code, first_join_ack, send


# --- public rooms -------------------------------------------------------------------------
async def test_public_room_created_on_first_join(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    assert error_code(await alice.call("message:history", {"room": room})) == "not_found"
    first = await alice.call("room:join", {"room": room})
    assert first == first_join_ack(room)
    second = await bob.call("room:join", {"room": room})
    assert second == first
    assert (await alice.call("message:history", {"room": room})) == {
        "ok": True,
        "messages": [],
        "has_more": False,
    }


async def test_joining_twice_is_harmless(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    for _ in range(2):
        assert (await alice.call("room:join", {"room": room}))["ok"] is True
    await bob.call("room:join", {"room": room})
    await send(bob, room, "once")
    assert len(await alice.wait_for("message:new")) == 1
    await asyncio.sleep(QUIET)
    assert len(alice.events["message:new"]) == 1


async def test_room_leave_stops_delivery(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await alice.call("room:join", {"room": room})
    await bob.call("room:join", {"room": room})
    await send(alice, room, "first")
    await bob.wait_for("message:new")
    assert await bob.call("room:leave", {"room": room}) == {"ok": True}
    await send(alice, room, "second")
    await asyncio.sleep(QUIET)
    assert [m["text"] for m in bob.events["message:new"]] == ["first"]
    assert error_code(await send(bob, room, "after leaving")) == "forbidden"
    # Joining again restores delivery; the missed message is in `missed`.
    again = await bob.call("room:join", {"room": room, "since": 1})
    assert [m["text"] for m in again["missed"]] == ["second"] and again["last_seq"] == 2
    await send(alice, room, "third")
    assert [m["text"] for m in await bob.wait_for("message:new", 2)] == ["first", "third"]


async def test_leave_of_a_room_never_joined_is_ok(clients, uid):
    alice = await clients(uid("alice"))
    assert await alice.call("room:leave", {"room": uid("room")}) == {"ok": True}


async def test_leave_affects_only_that_socket(clients, uid):
    room, user = uid("room"), uid("u")
    tab1, tab2, carol = await clients(user), await clients(user), await clients(uid("carol"))
    for client in (tab1, tab2, carol):
        await client.call("room:join", {"room": room})
    await tab1.call("room:leave", {"room": room})
    await send(carol, room, "hi")
    await tab2.wait_for("message:new")
    await asyncio.sleep(QUIET)
    assert tab1.events["message:new"] == []


# --- private rooms ------------------------------------------------------------------------
async def test_private_room_create_and_membership(clients, uid):
    room = uid("priv")
    owner, member, outsider = (
        await clients(uid("owner")),
        await clients(uid("member")),
        await clients(uid("out")),
    )
    ack = await owner.call(
        "room:create", {"room": room, "name": "Team", "private": True, "members": [member.user]}
    )
    assert ack == {"ok": True, "room": {"id": room, "kind": "private", "name": "Team"}}
    assert (await owner.call("room:join", {"room": room}))["room"] == ack["room"]
    joined = await member.call("room:join", {"room": room})
    assert joined["ok"] is True and joined["room"]["kind"] == "private"
    assert error_code(await outsider.call("room:join", {"room": room})) == "not_found"
    assert error_code(await outsider.call("message:history", {"room": room})) == "not_found"
    assert error_code(await outsider.call("room:members", {"room": room})) == "not_found"
    assert error_code(await send(outsider, room, "sneak")) == "forbidden"
    await send(owner, room, "hello team")
    assert [m["text"] for m in await member.wait_for("message:new")] == ["hello team"]
    await asyncio.sleep(QUIET)
    assert outsider.events["message:new"] == []


async def test_room_create_defaults_name_to_id(clients, uid):
    room = uid("priv")
    owner = await clients(uid("owner"))
    ack = await owner.call("room:create", {"room": room, "private": True})
    assert ack == {"ok": True, "room": {"id": room, "kind": "private", "name": room}}


async def test_room_create_public(clients, uid):
    room = uid("pub")
    owner, anyone = await clients(uid("owner")), await clients(uid("anyone"))
    ack = await owner.call("room:create", {"room": room, "name": "Lobby"})
    assert ack == {"ok": True, "room": {"id": room, "kind": "public", "name": "Lobby"}}
    joined = await anyone.call("room:join", {"room": room})
    assert joined["room"] == {"id": room, "kind": "public", "name": "Lobby"}


async def test_room_create_on_existing_room(clients, uid):
    room, public = uid("priv"), uid("pub")
    owner, other = await clients(uid("owner")), await clients(uid("other"))
    created = await owner.call("room:create", {"room": room, "name": "Team", "private": True})
    # The owner repeating the creation gets the existing room back.
    again = await owner.call("room:create", {"room": room, "name": "Renamed", "private": True})
    assert again == created
    assert (
        error_code(
            await other.call(
                "room:create", {"room": room, "private": True, "members": [other.user]}
            )
        )
        == "forbidden"
    )
    assert error_code(await other.call("room:join", {"room": room})) == "not_found"
    # A public room made by joining has no owner: nobody may take it over.
    await owner.call("room:join", {"room": public})
    assert (
        error_code(await other.call("room:create", {"room": public, "private": True}))
        == "forbidden"
    )
    assert (
        error_code(await owner.call("room:create", {"room": public, "private": True}))
        == "forbidden"
    )
    assert (await other.call("room:join", {"room": public}))["room"]["kind"] == "public"


async def test_room_create_refuses_direct_ids(clients, uid):
    a = uid("a")
    client = await clients(a)
    assert (
        error_code(await client.call("room:create", {"room": f"dm:{a}:{a}z", "private": True}))
        == "bad_request"
    )


async def test_members_add_and_remove_by_owner_only(clients, uid):
    room = uid("priv")
    owner, bob, carol = (
        await clients(uid("owner")),
        await clients(uid("bob")),
        await clients(uid("carol")),
    )
    await owner.call("room:create", {"room": room, "private": True})
    await owner.call("room:join", {"room": room})
    assert error_code(await bob.call("room:join", {"room": room})) == "not_found"
    assert (
        error_code(await bob.call("room:members:add", {"room": room, "users": [bob.user]}))
        == "not_found"
    )
    added = await owner.call("room:members:add", {"room": room, "users": [bob.user]})
    assert added == {"ok": True, "room": room, "members": [bob.user]}
    assert (await bob.call("room:join", {"room": room}))["ok"] is True
    # A member who is not the owner still cannot manage members.
    assert (
        error_code(await bob.call("room:members:add", {"room": room, "users": [carol.user]}))
        == "forbidden"
    )
    assert (
        error_code(await bob.call("room:members:remove", {"room": room, "users": [owner.user]}))
        == "forbidden"
    )
    assert error_code(await carol.call("room:join", {"room": room})) == "not_found"
    members = await owner.call("room:members", {"room": room})
    assert sorted(m["id"] for m in members["members"]) == sorted([owner.user, bob.user])


@pytest.mark.parametrize("event", ["room:members:add", "room:members:remove"])
async def test_members_change_on_unknown_room(clients, uid, event):
    alice = await clients(uid("alice"))
    assert (
        error_code(await alice.call(event, {"room": uid("nowhere"), "users": [uid("bob")]}))
        == "not_found"
    )


async def test_removed_member_leaves_the_room(clients, uid):
    room = uid("priv")
    owner, bob, carol = (
        await clients(uid("owner")),
        await clients(uid("bob")),
        await clients(uid("carol")),
    )
    bob_tab2 = await clients(bob.user)
    await owner.call(
        "room:create", {"room": room, "private": True, "members": [bob.user, carol.user]}
    )
    for client in (owner, bob, bob_tab2, carol):
        assert (await client.call("room:join", {"room": room}))["ok"] is True
    await send(owner, room, "before")
    for client in (bob, bob_tab2, carol):
        await client.wait_for("message:new")

    removed = await owner.call(
        "room:members:remove", {"room": room, "users": [bob.user, uid("never-a-member")]}
    )
    assert removed == {"ok": True, "room": room, "removed": [bob.user]}
    for tab in (bob, bob_tab2):
        assert await tab.wait_for("room:removed") == [{"room": room}]
    await send(owner, room, "after")
    await carol.wait_for("message:new", 2)
    await asyncio.sleep(QUIET)
    for tab in (bob, bob_tab2):
        assert [m["text"] for m in tab.events["message:new"]] == ["before"]
        assert error_code(await send(tab, room, "still here?")) == "forbidden"
        assert error_code(await tab.call("room:join", {"room": room})) == "not_found"
        assert error_code(await tab.call("message:history", {"room": room})) == "not_found"
    assert carol.events["room:removed"] == []
    members = await owner.call("room:members", {"room": room})
    assert sorted(m["id"] for m in members["members"]) == sorted([owner.user, carol.user])


async def test_removed_member_who_never_joined_gets_no_event(clients, uid):
    room = uid("priv")
    owner, bob = await clients(uid("owner")), await clients(uid("bob"))
    await owner.call("room:create", {"room": room, "private": True, "members": [bob.user]})
    assert (await owner.call("room:members:remove", {"room": room, "users": [bob.user]}))[
        "ok"
    ] is True
    await asyncio.sleep(QUIET)
    assert bob.events["room:removed"] == []
    assert error_code(await bob.call("room:join", {"room": room})) == "not_found"


async def test_owner_cannot_be_removed(clients, uid):
    room = uid("priv")
    owner = await clients(uid("owner"))
    await owner.call("room:create", {"room": room, "private": True})
    assert (
        error_code(await owner.call("room:members:remove", {"room": room, "users": [owner.user]}))
        == "bad_request"
    )
    assert (await owner.call("room:join", {"room": room}))["ok"] is True


@pytest.mark.parametrize("event", ["room:members:add", "room:members:remove"])
async def test_members_change_on_public_and_direct_rooms_refused(clients, uid, event):
    public = uid("pub")
    a, b = sorted([uid("a"), uid("b")])
    alice, bob = await clients(a), await clients(b)
    await alice.call("room:create", {"room": public})  # alice owns it
    await bob.call("room:join", {"room": public})
    direct = f"dm:{a}:{b}"
    assert (await alice.call("room:join", {"room": direct}))["ok"] is True
    # Its owner still cannot manage a public room's members; a direct room has no owner.
    assert error_code(await alice.call(event, {"room": public, "users": [b]})) == "bad_request"
    assert error_code(await alice.call(event, {"room": direct, "users": [b]})) == "forbidden"
    # Nothing changed: both are still members of both rooms.
    for room in (public, direct):
        assert (await bob.call("room:join", {"room": room}))["ok"] is True
        members = await alice.call("room:members", {"room": room})
        assert sorted(m["id"] for m in members["members"]) == [a, b], room


async def test_leave_keeps_the_membership(clients, uid):
    room = uid("pub")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    for client in (alice, bob):
        assert (await client.call("room:join", {"room": room}))["ok"] is True
    assert await bob.call("room:leave", {"room": room}) == {"ok": True}
    members = await alice.call("room:members", {"room": room})
    assert sorted(m["id"] for m in members["members"]) == sorted([alice.user, bob.user])
    # Still a member: bob may list the members without joining again.
    assert (await bob.call("room:members", {"room": room}))["ok"] is True


# --- direct rooms -------------------------------------------------------------------------
async def test_direct_room_only_for_its_two_users(clients, uid):
    a, b = sorted([uid("a"), uid("b")])
    room = f"dm:{a}:{b}"
    alice, bob, eve = await clients(a), await clients(b), await clients(uid("eve"))
    assert error_code(await eve.call("room:join", {"room": room})) == "forbidden"
    joined = await alice.call("room:join", {"room": room})
    assert joined["ok"] is True and joined["room"] == {"id": room, "kind": "direct", "name": room}
    assert error_code(await eve.call("room:join", {"room": room})) == "forbidden"
    assert error_code(await eve.call("message:history", {"room": room})) == "forbidden"
    assert (await bob.call("room:join", {"room": room}))["room"]["kind"] == "direct"
    await send(alice, room, "psst")
    assert [m["text"] for m in await bob.wait_for("message:new")] == ["psst"]
    members = await alice.call("room:members", {"room": room})
    assert sorted(m["id"] for m in members["members"]) == [a, b]


async def test_direct_room_second_user_may_open_it_first(clients, uid):
    a, b = sorted([uid("a"), uid("b")])
    bob = await clients(b)
    joined = await bob.call("room:join", {"room": f"dm:{a}:{b}"})
    assert joined["ok"] is True and joined["room"]["kind"] == "direct"


async def test_direct_room_ids_must_be_sorted_and_valid(clients, uid):
    a, b = sorted([uid("a"), uid("b")])
    alice = await clients(a)
    assert error_code(await alice.call("room:join", {"room": f"dm:{b}:{a}"})) == "bad_request"
    assert error_code(await alice.call("room:join", {"room": f"dm:{a}:{a}"})) == "bad_request"
    assert error_code(await alice.call("room:join", {"room": f"dm:{a}"})) == "bad_request"
    assert error_code(await alice.call("room:join", {"room": "dm:"})) == "bad_request"


# --- members listing ----------------------------------------------------------------------
async def test_room_members_with_status(clients, uid):
    room = uid("priv")
    offline = uid("offline")
    owner, bob = await clients(uid("owner")), await clients(uid("bob"))
    await owner.call("room:create", {"room": room, "private": True, "members": [bob.user, offline]})
    ack = await owner.call("room:members", {"room": room})
    assert ack["ok"] is True
    expected = sorted(
        [
            {"id": owner.user, "status": "online"},
            {"id": bob.user, "status": "online"},
            {"id": offline, "status": "offline"},
        ],
        key=lambda m: m["id"],
    )
    assert sorted(ack["members"], key=lambda m: m["id"]) == expected
    assert (await bob.call("room:members", {"room": room}))["members"] == ack["members"]


async def test_room_members_of_public_room(clients, uid):
    room = uid("pub")
    alice, bob, carol = (
        await clients(uid("alice")),
        await clients(uid("bob")),
        await clients(uid("carol")),
    )
    await alice.call("room:join", {"room": room})
    await bob.call("room:join", {"room": room})
    ack = await alice.call("room:members", {"room": room})
    assert sorted(ack["members"], key=lambda m: m["id"]) == sorted(
        [{"id": alice.user, "status": "online"}, {"id": bob.user, "status": "online"}],
        key=lambda m: m["id"],
    )
    assert error_code(await carol.call("room:members", {"room": room})) == "forbidden"
    assert error_code(await carol.call("room:members", {"room": uid("nowhere")})) == "not_found"


async def test_direct_room_between_users_with_at_signs(clients, uid):
    first, second = sorted([f"{uid('ann')}@example.com", f"{uid('bob')}@example.com"])
    room = f"dm:{first}:{second}"
    a, b = await clients(first), await clients(second)
    for client in (a, b):
        joined_ack = await client.call("room:join", {"room": room})
        assert joined_ack["ok"] and joined_ack["room"]["kind"] == "direct"
    sent = await a.call("message:send", {"room": room, "text": "hi", "client_id": "1"})
    assert (await b.wait_for("message:new")) == [sent["message"]]
    assert (await a.call("room:join", {"room": f"{uid('x')}@example.com"}))["error"][
        "code"
    ] == "bad_request"
