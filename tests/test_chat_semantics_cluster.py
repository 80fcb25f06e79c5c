"""Edits, deletions, reactions, replies, mentions and unread counts across real instances
(one Redis, one SQLite file), through a rejoin and through an instance crash."""

from __future__ import annotations

import asyncio

import pytest

from tests import test_multi_instance
from tests.support.clients import ChatClient
from tests.support.roomstate import RoomState
from tests.support.servers import ServerProcess, cluster_env, key_prefix, start_all


@pytest.fixture(scope="module")
def pair(redis_url, tmp_path_factory):
    prefix = key_prefix()
    tmp = tmp_path_factory.mktemp("semantics")
    servers = start_all(
        [
            ServerProcess(cluster_env(redis_url, prefix, tmp, INSTANCE_ID=f"sem-{i}"))
            for i in range(2)
        ],
        timeout=180,  # a loaded machine starts processes slowly
    )
    yield servers
    for server in servers:
        server.stop()


users = test_multi_instance.users  # the fixture: connected clients, closed at the end


async def ok(client: ChatClient, event: str, data: dict) -> dict:
    ack = await client.call(event, data)
    assert ack["ok"] is True, (event, data, ack)
    return ack


def state_of(client: ChatClient, join_ack: dict) -> RoomState:
    """The view a client built from its join ack and every live event since."""
    state = RoomState(client.user)
    state.joined(join_ack)
    for event, data in client.log:
        state.apply(event, data)
    return state


async def history_state(client: ChatClient, room: str) -> RoomState:
    state = RoomState(client.user)
    for m in (await ok(client, "message:history", {"room": room, "limit": 100}))["messages"]:
        state.message(m)
    return state


async def test_changes_and_replies_are_seen_live_on_another_instance(pair, users, uid):
    room, a_id, b_id = uid("room"), uid("a"), uid("b")
    a, b = await users(a_id, pair[0]), await users(b_id, pair[1])
    for client in (a, b):
        await ok(client, "room:join", {"room": room})
    first = (await ok(a, "message:send", {"room": room, "text": "hello", "client_id": "1"}))[
        "message"
    ]
    reply = (
        await ok(
            b,
            "message:send",
            {"room": room, "text": f"hi @{a_id}", "client_id": "2", "reply_to": first["id"]},
        )
    )["message"]
    assert reply["reply_to"]["id"] == first["id"] and reply["reply_to"]["text"] == "hello"
    assert reply["mentions"] == [a_id]
    assert (await a.wait_for("message:new")) == [reply]
    [mention] = await a.wait_for("mention")
    assert mention == {"room": room, "message": reply}

    edited = await ok(a, "message:edit", {"room": room, "id": first["id"], "text": "hello!"})
    [updated] = await b.wait_for("message:updated")
    assert updated["text"] == "hello!" and updated["revision"] == 1
    assert updated["change_seq"] == edited["message"]["change_seq"] == 1

    await ok(b, "reaction:add", {"room": room, "id": first["id"], "emoji": "👍"})
    [reactions] = await a.wait_for("message:reactions")
    assert reactions["reactions"] == [{"emoji": "👍", "count": 1}]
    assert (reactions["user"], reactions["reacted"], reactions["change_seq"]) == (b_id, True, 2)

    await ok(a, "message:delete", {"room": room, "id": first["id"]})
    [deleted] = await b.wait_for("message:deleted")
    assert (deleted["id"], deleted["seq"], deleted["change_seq"]) == (first["id"], 1, 3)
    # repeats change nothing and broadcast nothing
    await ok(a, "message:delete", {"room": room, "id": first["id"]})
    await ok(b, "reaction:remove", {"room": room, "id": reply["id"], "emoji": "x"})
    await asyncio.sleep(0.3)
    assert len(b.events["message:deleted"]) == 1 and len(a.events["message:reactions"]) == 1
    history = (await ok(b, "message:history", {"room": room}))["messages"]
    assert history[0]["deleted"] is True and history[0]["text"] == ""
    assert history[1]["reply_to"]["deleted"] is True


async def test_offline_client_recovers_every_change_once_on_rejoin(pair, users, uid):
    room, a_id, b_id, c_id = uid("room"), uid("a"), uid("b"), uid("c")
    a, b = await users(a_id, pair[0]), await users(b_id, pair[1])
    stayer = await users(c_id, pair[1])
    joins = {}
    for client in (a, b, stayer):
        joins[client.user] = await ok(client, "room:join", {"room": room})
    ids = []
    for i in range(5):
        sent = await ok(a, "message:send", {"room": room, "text": f"m{i}", "client_id": str(i)})
        ids.append(sent["message"]["id"])
    await ok(b, "reaction:add", {"room": room, "id": ids[0], "emoji": "🎉"})
    await b.wait_for("message:new", count=5)
    await b.wait_for("message:reactions")
    seen = state_of(b, joins[b_id])
    assert seen.cursor == 1 and seen.gaps == 0
    await b.disconnect()

    # while b is away: edits, deletes and reactions on old and new messages
    await ok(a, "message:edit", {"room": room, "id": ids[1], "text": "m1 v2"})
    await ok(a, "message:edit", {"room": room, "id": ids[1], "text": "m1 v3"})
    await ok(a, "message:delete", {"room": room, "id": ids[2]})
    await ok(a, "reaction:add", {"room": room, "id": ids[0], "emoji": "🎉"})
    await ok(stayer, "reaction:add", {"room": room, "id": ids[3], "emoji": "👍"})
    late = await ok(a, "message:send", {"room": room, "text": "late", "client_id": "late"})
    await ok(a, "message:edit", {"room": room, "id": late["message"]["id"], "text": "late v2"})
    await stayer.wait_for("message:updated", count=3)

    back = await users(b_id, pair[0])  # another instance this time
    rejoin = await ok(
        back,
        "room:join",
        {"room": room, "since": seen.last_seq, "changes_since": seen.cursor},
    )
    assert [m["seq"] for m in rejoin["missed"]] == [6]
    assert rejoin["missed"][0]["text"] == "late v2"
    # each message changed while away arrives once, in its current state
    assert [c["seq"] for c in rejoin["changes"]] == [2, 3, 1, 4]
    assert rejoin["changes_has_more"] is False and rejoin["change_seq"] == 7
    for m in rejoin["missed"] + rejoin["changes"]:
        seen.message(m)
    seen.cursor = rejoin["change_seq"]

    stayed = state_of(stayer, joins[c_id])
    truth = await history_state(back, room)
    assert seen.snapshot() == truth.snapshot()
    # the stayer's view differs only by its own "me"; compare it with its own history
    assert stayed.snapshot() == (await history_state(stayer, room)).snapshot()
    assert [row[:5] for row in seen.snapshot()] == [row[:5] for row in stayed.snapshot()]
    assert stayed.cursor == 7 and stayed.gaps == 0


async def test_unread_counts_follow_reads_from_a_second_device(pair, users, uid):
    room, a_id, b_id = uid("room"), uid("a"), uid("b")
    phone, laptop = await users(a_id, pair[0]), await users(a_id, pair[1])
    sender = await users(b_id, pair[1])
    await ok(phone, "room:join", {"room": room})
    await ok(sender, "room:join", {"room": room})
    for i in range(3):
        text = f"@{a_id} look" if i == 2 else f"n{i}"
        await ok(sender, "message:send", {"room": room, "text": text, "client_id": str(i)})
    # both devices hear of each message once: the phone, joined, as message:new; the
    # laptop, which has not joined the room, as room:activity
    arrived = await phone.wait_for("message:new", count=3)
    assert [m["seq"] for m in arrived] == [1, 2, 3]
    activity = await laptop.wait_for("room:activity", count=3)
    assert activity[-1]["room"] == room and activity[-1]["last_seq"] == 3
    assert [a["last_seq"] for a in activity] == [1, 2, 3]
    await ok(phone, "rooms:list", {"limit": 1})  # a round trip after the laptop's last event
    assert phone.events.get("room:activity", []) == []
    listed = await ok(laptop, "rooms:list", {"limit": 10})
    [entry] = [r for r in listed["rooms"] if r["room"]["id"] == room]
    assert (entry["last_seq"], entry["read_seq"], entry["unread"], entry["unread_mentions"]) == (
        3,
        0,
        3,
        1,
    )
    assert entry["last_message"]["text"] == f"@{a_id} look"
    await ok(phone, "message:read", {"room": room, "seq": 3})
    [synced] = await laptop.wait_for("room:read")
    assert synced == {"room": room, "seq": 3, "unread": 0, "unread_mentions": 0}
    listed = await ok(laptop, "rooms:list", {"limit": 10})
    [entry] = [r for r in listed["rooms"] if r["room"]["id"] == room]
    assert (entry["read_seq"], entry["unread"], entry["unread_mentions"]) == (3, 0, 0)


async def test_mention_reaches_a_user_in_no_room(pair, users, uid):
    room, a_id, idle_id = uid("room"), uid("a"), uid("idle")
    idle = [await users(idle_id, pair[0]), await users(idle_id, pair[1])]
    a = await users(a_id, pair[1])
    await ok(a, "room:join", {"room": room})
    sent = await ok(a, "message:send", {"room": room, "text": f"ping @{idle_id}", "client_id": "m"})
    for connection in idle:
        assert (await connection.wait_for("mention")) == [
            {"room": room, "message": sent["message"]}
        ]
        assert connection.events["message:new"] == []


async def test_changes_recovered_after_an_instance_crash(pair, redis_url, tmp_path, users, uid):
    env = {**pair[0].env, "INSTANCE_ID": uid("doomed")}
    doomed = ServerProcess(env).start(timeout=180)
    try:
        room, a_id, b_id = uid("room"), uid("a"), uid("b")
        a = await users(a_id, pair[1])
        victim = await ChatClient(b_id).connect(doomed.url)
        await ok(a, "room:join", {"room": room})
        join = await ok(victim, "room:join", {"room": room})
        ids = []
        for i in range(3):
            sent = await ok(a, "message:send", {"room": room, "text": f"m{i}", "client_id": str(i)})
            ids.append(sent["message"]["id"])
        await ok(victim, "reaction:add", {"room": room, "id": ids[0], "emoji": "👍"})
        await ok(a, "message:edit", {"room": room, "id": ids[1], "text": "m1 v2"})
        await victim.wait_for("message:updated")
        seen = state_of(victim, join)
        doomed.kill()
        await ok(a, "message:delete", {"room": room, "id": ids[2]})
        await ok(a, "reaction:add", {"room": room, "id": ids[0], "emoji": "👍"})
        await ok(a, "message:edit", {"room": room, "id": ids[1], "text": "m1 v3"})
        back = await users(b_id, pair[0])
        rejoin = await ok(
            back,
            "room:join",
            {"room": room, "since": seen.last_seq, "changes_since": seen.cursor},
        )
        assert rejoin["missed"] == []
        assert [c["change_seq"] for c in rejoin["changes"]] == [3, 4, 5]
        for m in rejoin["changes"]:
            seen.message(m)
        assert seen.snapshot() == (await history_state(back, room)).snapshot()
        assert seen.snapshot()[0][5] == (("👍", 2, True),)
    finally:
        await victim.disconnect()
        doomed.stop()
