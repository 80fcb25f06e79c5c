"""Rooms cost O(what they touch) and hide what they should: caps, pages, quotas, oracles,
read markers for members only, typing that ends on the server, seq keys that expire.

Real uvicorn processes and a real Redis.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from server.bus.keys import Keys
from server.bus.seq import RedisSeqAllocator
from tests.support.clients import QUIET, ChatClient, error_code, metrics_of, send
from tests.support.servers import ServerProcess, key_prefix


@pytest.fixture(scope="module")
def limits():
    proc = ServerProcess(
        {
            "STORE": "memory",
            "MAX_ROOM_MEMBERS": "5",
            "MAX_JOINED_ROOMS": "3",
            "ROOM_MEMBERS_PAGE": "2",
            "ROOM_CREATES_PER_HOUR": "3",
            "MEMBER_CHANGES_PER_HOUR": "4",
            "TYPING_TIMEOUT": "5",
        }
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def on_limits(limits, clients):
    """Connected clients of ``limits`` (disconnected at the end by ``clients``)."""
    return lambda user: clients(user, url=limits.url)


async def metric(url: str, name: str) -> float:
    return (await metrics_of(url)).get(name, 0.0)


def code_of(ack: dict) -> str | None:
    return error_code(ack)


async def private_room(room: str, owner: ChatClient, *members: ChatClient) -> str:
    """``room``, private, made by ``owner`` with ``members``; everyone has joined it."""
    ack = await owner.call(
        "room:create", {"room": room, "private": True, "members": [m.user for m in members]}
    )
    assert ack["ok"] is True
    for client in (owner, *members):
        assert (await client.call("room:join", {"room": room}))["ok"] is True
    return room


# --- caps -------------------------------------------------------------------------------------
async def test_room_member_cap(limits, on_limits, uid):
    room = uid("public")
    clients = [await on_limits(uid("m")) for _ in range(6)]
    for client in clients[:5]:
        assert (await client.call("room:join", {"room": room}))["ok"] is True
    assert code_of(await clients[5].call("room:join", {"room": room})) == "too_large"
    owner = clients[0]
    too_many = [uid("x") for _ in range(5)]
    ack = await owner.call("room:create", {"room": uid("p"), "private": True, "members": too_many})
    assert code_of(ack) == "too_large"
    private = uid("p")
    ack = await owner.call("room:create", {"room": private, "private": True, "members": [uid("y")]})
    assert ack["ok"] is True
    ack = await owner.call(
        "room:members:add", {"room": private, "users": [uid("z") for _ in range(4)]}
    )
    assert code_of(ack) == "too_large"
    assert await metric(limits.url, 'chat_limit_refusals_total{limit="room_members"}') >= 3


async def test_joined_rooms_cap_per_connection(limits, on_limits, uid):
    alice = await on_limits(uid("alice"))
    rooms = [uid("r") for _ in range(4)]
    for room in rooms[:3]:
        assert (await alice.call("room:join", {"room": room}))["ok"] is True
    assert code_of(await alice.call("room:join", {"room": rooms[3]})) == "too_large"
    assert (await alice.call("room:join", {"room": rooms[0]}))["ok"] is True  # already joined
    assert (await alice.call("room:leave", {"room": rooms[0]}))["ok"] is True
    assert (await alice.call("room:join", {"room": rooms[3]}))["ok"] is True
    other = await on_limits(uid("alice2"))  # the cap is per connection
    assert (await other.call("room:join", {"room": rooms[0]}))["ok"] is True
    assert await metric(limits.url, 'chat_limit_refusals_total{limit="joined_rooms"}') >= 1


async def test_room_members_paged(on_limits, uid):
    owner = await on_limits(uid("owner"))
    members = sorted(uid("member") for _ in range(4))
    room = uid("team")
    ack = await owner.call("room:create", {"room": room, "private": True, "members": members})
    assert ack["ok"] is True
    everyone = sorted([owner.user, *members])
    first = await owner.call("room:members", {"room": room})  # a caller that does not page
    assert [m["id"] for m in first["members"]] == everyone[:2] and first["next"] == everyone[1]
    second = await owner.call("room:members", {"room": room, "after": first["next"]})
    assert [m["id"] for m in second["members"]] == everyone[2:4]
    third = await owner.call("room:members", {"room": room, "after": second["next"]})
    assert [m["id"] for m in third["members"]] == everyone[4:] and "next" not in third
    whole = await owner.call("room:members", {"room": room, "limit": 10})
    assert [m["id"] for m in whole["members"]] == everyone and "next" not in whole
    assert whole["members"][0]["status"] in ("online", "offline")
    for bad in (
        {"room": room, "limit": 0},
        {"room": room, "limit": 1001},
        {"room": room, "after": 5},
    ):
        assert code_of(await owner.call("room:members", bad)) == "bad_request"


async def test_room_creation_quota(limits, on_limits, uid):
    alice = await on_limits(uid("alice"))
    for _ in range(3):
        assert (await alice.call("room:create", {"room": uid("made")}))["ok"] is True
    assert code_of(await alice.call("room:create", {"room": uid("made")})) == "rate_limited"
    bob = await on_limits(uid("bob"))  # per user
    assert (await bob.call("room:create", {"room": uid("made")}))["ok"] is True
    assert await metric(limits.url, 'chat_limit_refusals_total{limit="room_creates"}') >= 1


async def test_membership_change_quota(limits, on_limits, uid):
    owner = await on_limits(uid("owner"))
    room = uid("team")
    assert (await owner.call("room:create", {"room": room, "private": True}))["ok"] is True
    pair = [uid("a"), uid("b")]
    assert (await owner.call("room:members:add", {"room": room, "users": pair}))["ok"] is True
    assert (await owner.call("room:members:remove", {"room": room, "users": pair}))["ok"] is True
    ack = await owner.call("room:members:add", {"room": room, "users": [uid("c")]})
    assert code_of(ack) == "rate_limited"
    assert await metric(limits.url, 'chat_limit_refusals_total{limit="member_changes"}') >= 1


# --- eviction costs what it touches ---------------------------------------------------------------
async def test_eviction_touches_only_the_removed_users_sockets(limits, on_limits, uid):
    owner, kept, removed = [await on_limits(uid(n)) for n in ("owner", "kept", "removed")]
    idle = [await ChatClient(uid("idle")).connect(limits.url) for _ in range(20)]
    try:
        room = await private_room(uid("team"), owner, kept, removed)
        events_before = await metric(limits.url, 'chat_control_events_total{name="evict"}')
        checked_before = await metric(limits.url, "chat_eviction_sockets_checked_total")
        strangers = [uid("ghost") for _ in range(2)]  # 3 listed users: within the quota of 4
        ack = await owner.call(
            "room:members:remove", {"room": room, "users": [removed.user, *strangers]}
        )
        assert ack["ok"] is True and ack["removed"] == [removed.user]
        await removed.wait_for("room:removed")
        assert await metric(limits.url, 'chat_control_events_total{name="evict"}') == (
            events_before + 1
        )
        # One socket looked at: the removed user's; not the 20 idle ones nor the bystanders.
        assert await metric(limits.url, "chat_eviction_sockets_checked_total") == checked_before + 1
        assert (await send(owner, room, "still here"))["ok"] is True
        await kept.wait_for("message:new", where=lambda m: m["text"] == "still here")
        await asyncio.sleep(QUIET)
        assert not [m for m in removed.events["message:new"] if m["text"] == "still here"]
    finally:
        for client in idle:
            await client.disconnect()


# --- oracles -------------------------------------------------------------------------------------
async def test_hidden_rooms_answer_as_missing_ones(on_limits, uid):
    owner = await on_limits(uid("owner"))
    outsider = await on_limits(uid("outsider"))
    hidden = uid("secret")
    assert (await owner.call("room:create", {"room": hidden, "private": True}))["ok"] is True
    nowhere = uid("secret")  # same shape of id, never created

    def strip(ack: dict, room: str) -> dict:
        text = str(ack).replace(room, "ROOM")
        return {"text": text}

    for event, extra in [
        ("message:history", {}),
        ("room:members", {}),
        ("message:read", {"seq": 0}),
        ("room:members:add", {"users": [outsider.user]}),
        ("room:members:remove", {"users": [owner.user]}),
    ]:
        a = await outsider.call(event, {"room": hidden, **extra})
        b = await outsider.call(event, {"room": nowhere, **extra})
        assert error_code(a) == "not_found", (event, a)
        assert strip(a, hidden) == strip(b, nowhere), event
    joined = await outsider.call("room:join", {"room": hidden})
    assert error_code(joined) == "not_found"
    assert strip(joined, hidden) == strip(
        await outsider.call("message:history", {"room": nowhere}), nowhere
    )


async def test_direct_rooms_of_others_answer_alike(on_limits, uid):
    a, b, c, d = sorted(uid("u") for _ in range(4))
    first = await on_limits(a)
    outsider = await on_limits(d)
    existing = f"dm:{a}:{b}"
    assert (await first.call("room:join", {"room": existing}))["ok"] is True
    never = f"dm:{a}:{c}"
    for event in ("room:join", "message:history", "room:members"):
        one = await outsider.call(event, {"room": existing})
        two = await outsider.call(event, {"room": never})
        assert str(one).replace(existing, "R") == str(two).replace(never, "R"), event


async def test_read_markers_need_membership(on_limits, uid):
    alice, bob = await on_limits(uid("alice")), await on_limits(uid("bob"))
    room = uid("public")
    assert (await alice.call("room:join", {"room": room}))["ok"] is True
    assert (await send(alice, room, "one"))["ok"] is True
    assert error_code(await bob.call("message:read", {"room": room, "seq": 1})) == "forbidden"
    await asyncio.sleep(QUIET)
    assert alice.events["message:read"] == []  # nothing was broadcast
    assert (await bob.call("room:join", {"room": room}))["ok"] is True
    assert (await bob.call("message:read", {"room": room, "seq": 1}))["ok"] is True
    await alice.wait_for("message:read", where=lambda e: e["user"] == bob.user)


# --- typing ends on the server -------------------------------------------------------------------
def typing_of(client: ChatClient, user: str, state: bool):
    return client.wait_for("typing", where=lambda e: e["user"] == user and e["typing"] is state)


async def test_typing_expires_on_the_server(on_limits, uid):
    alice, bob = await on_limits(uid("alice")), await on_limits(uid("bob"))
    room = uid("room")
    for client in (alice, bob):
        assert (await client.call("room:join", {"room": room}))["ok"] is True
    assert (await alice.call("typing", {"room": room, "typing": True}))["ok"] is True
    await typing_of(bob, alice.user, True)
    await bob.wait_for(  # TYPING_TIMEOUT=5 and nobody said false
        "typing", where=lambda e: e["user"] == alice.user and e["typing"] is False, timeout=30
    )


@pytest.mark.parametrize("how", ["leave", "disconnect", "eviction"])
async def test_typing_ends_when_the_typist_goes(limits, on_limits, uid, how):
    owner, bob = await on_limits(uid("owner")), await on_limits(uid("bob"))
    typist = await ChatClient(uid("typist")).connect(limits.url)
    room = await private_room(uid("team"), owner, bob, typist)
    assert (await typist.call("typing", {"room": room, "typing": True}))["ok"] is True
    await typing_of(bob, typist.user, True)
    why = {"leave": "leave", "disconnect": "disconnect", "eviction": "evicted"}[how]
    before = await metric(limits.url, f'chat_typing_expired_total{{why="{why}"}}')
    if how == "leave":
        assert (await typist.call("room:leave", {"room": room}))["ok"] is True
    elif how == "disconnect":
        await typist.disconnect()
    else:
        ack = await owner.call("room:members:remove", {"room": room, "users": [typist.user]})
        assert ack["ok"] is True
    await typing_of(bob, typist.user, False)
    # Ended by the departure itself, not by the timeout.
    assert await metric(limits.url, f'chat_typing_expired_total{{why="{why}"}}') == before + 1
    await typist.disconnect()


# --- seq counters expire ---------------------------------------------------------------------------
async def test_seq_keys_carry_a_ttl_refreshed_on_use(redis_url):
    redis = aioredis.Redis.from_url(redis_url)
    keys = Keys(key_prefix())

    async def stored_max(room: str) -> int:
        return 41

    allocator = RedisSeqAllocator(redis, keys, stored_max, ttl=3600)
    try:
        assert await allocator.next("r1") == 42  # seeded from the store
        assert 3590 <= await redis.ttl(keys.seq("r1")) <= 3600
        await redis.expire(keys.seq("r1"), 10)
        assert await allocator.next("r1") == 43
        assert await redis.ttl(keys.seq("r1")) > 3000  # refreshed on use
        await redis.expire(keys.seq("r1"), 10)
        await allocator.advance("r1", 50)
        assert await redis.ttl(keys.seq("r1")) > 3000
        assert await allocator.next("r1") == 51
    finally:
        await redis.delete(keys.seq("r1"))
        await redis.aclose()
