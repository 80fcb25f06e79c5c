"""Messages end to end through real Socket.IO clients against a real server process."""

from __future__ import annotations

import asyncio
import re
import signal

import pytest

from tests.support.clients import QUIET, ChatClient, error_code, send
from tests.support.servers import ServerProcess, make_token

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MAX_LENGTH = 4000  # MAX_MESSAGE_LENGTH of the shared test server (the default)


async def joined(room: str, *members):
    for member in members:
        ack = await member.call("room:join", {"room": room})
        assert ack["ok"] is True, ack


async def fill(client, room: str, count: int, prefix: str = "m") -> list[dict]:
    """Send ``count`` messages one after the other; returns the stored messages."""
    messages = []
    for index in range(count):
        ack = await send(client, room, f"{prefix}{index + 1}")
        assert ack["ok"] is True, ack
        messages.append(ack["message"])
    return messages


def seqs(messages: list[dict]) -> list[int]:
    return [m["seq"] for m in messages]


# --- send and fan-out -----------------------------------------------------------------------
async def test_send_receive_between_two_clients(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    joined_ack = await alice.call("room:join", {"room": room})
    assert joined_ack["ok"] is True
    assert joined_ack["room"] == {"id": room, "kind": "public", "name": room}
    assert (
        joined_ack["last_seq"] == 0
        and joined_ack["missed"] == []
        and joined_ack["has_more"] is False
    )
    assert (await bob.call("room:join", {"room": room}))["ok"]
    ack = await alice.call("message:send", {"room": room, "text": "  hello  ", "client_id": "c1"})
    assert set(ack) == {"ok", "message"} and ack["ok"] is True
    message = ack["message"]
    assert set(message) >= {"id", "room", "seq", "sender", "text", "client_id", "created_at"}
    assert message["seq"] == 1 and message["text"] == "hello" and message["room"] == room
    assert message["sender"] == {"id": alice.user, "name": alice.user}
    assert message["client_id"] == "c1" and ISO_MS.match(message["created_at"])
    assert isinstance(message["id"], str) and message["id"]
    received = await bob.wait_for("message:new")
    assert received == [message]
    await asyncio.sleep(QUIET)
    assert alice.events["message:new"] == []  # never echoed to the sending socket


async def test_sender_name_comes_from_the_token(clients, uid):
    room, user = uid("room"), uid("alice")
    alice = await clients(user, token=make_token(user, "Alice Liddell"))
    bob = await clients(uid("bob"))
    await joined(room, alice, bob)
    ack = await send(alice, room, "x")
    assert ack["message"]["sender"] == {"id": user, "name": "Alice Liddell"}
    assert (await bob.wait_for("message:new"))[0]["sender"] == {"id": user, "name": "Alice Liddell"}


async def test_fan_out_reaches_every_other_socket_in_the_room(clients, uid):
    room, user = uid("room"), uid("alice")
    tab1, tab2 = await clients(user), await clients(user)
    bob, carol, outsider = (
        await clients(uid("bob")),
        await clients(uid("carol")),
        await clients(uid("out")),
    )
    await joined(room, tab1, tab2, bob, carol)
    await outsider.call("room:join", {"room": uid("elsewhere")})
    ack = await send(tab1, room, "to everyone")
    for client in (tab2, bob, carol):
        assert await client.wait_for("message:new") == [ack["message"]]
    await asyncio.sleep(QUIET)
    assert tab1.events["message:new"] == [] and outsider.events["message:new"] == []


async def test_no_ack_before_the_write_is_durable(tmp_path, uid):
    """While another process holds SQLite's write lock, the send is neither acked nor
    broadcast; once the lock goes, the ack comes, and the message survives a crash."""
    import sqlite3

    env = {"STORE": "sqlite", "SQLITE_PATH": str(tmp_path / "chat.db"), "STORE_TIMEOUT": "30"}
    proc = ServerProcess(env).start()
    room = uid("room")
    alice, bob = ChatClient(uid("alice")), ChatClient(uid("bob"))
    locker = sqlite3.connect(env["SQLITE_PATH"], isolation_level=None, timeout=5)
    try:
        await alice.connect(proc.url)
        await bob.connect(proc.url)
        await joined(room, alice, bob)
        locker.execute("BEGIN EXCLUSIVE")
        pending = asyncio.create_task(send(alice, room, "held", "c1"))
        await asyncio.sleep(1.0)  # nothing may happen while the write cannot commit
        assert not pending.done(), pending.result()
        assert bob.events["message:new"] == []
        locker.execute("ROLLBACK")
        ack = await pending
        assert ack["ok"] is True and ack["message"]["seq"] == 1, ack
        assert await bob.wait_for("message:new") == [ack["message"]]
    finally:
        locker.close()
        await alice.disconnect()
        await bob.disconnect()
        proc.kill()
    proc.start()
    try:
        reader = await ChatClient(uid("reader")).connect(proc.url)
        assert (await history(reader, room))["messages"] == [ack["message"]]
        await reader.disconnect()
    finally:
        proc.stop()


async def test_ack_comes_after_the_message_is_stored(clients, uid):
    room = uid("room")
    alice, reader = await clients(uid("alice")), await clients(uid("reader"))
    await joined(room, alice)
    for index in range(5):
        ack = await send(alice, room, f"n{index}")
        history = await reader.call("message:history", {"room": room})
        assert history["messages"][-1] == ack["message"]


async def test_send_requires_join(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    assert error_code(await send(alice, uid("never-created"), "hi")) == "forbidden"
    await joined(room, bob)
    assert error_code(await send(alice, room, "hi")) == "forbidden"
    await asyncio.sleep(QUIET)
    assert bob.events["message:new"] == []
    assert (await bob.call("message:history", {"room": room}))["messages"] == []


@pytest.mark.parametrize("text", ["", " ", "   \n\t  "], ids=["empty", "space", "whitespace"])
async def test_empty_text_refused(clients, uid, text):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await joined(room, alice, bob)
    assert error_code(await send(alice, room, text, "c")) == "bad_request"
    await asyncio.sleep(QUIET)
    assert bob.events["message:new"] == []
    assert (await send(alice, room, "real", "c"))["message"]["seq"] == 1


async def test_text_length_limit(clients, uid):
    room = uid("room")
    alice = await clients(uid("alice"))
    await joined(room, alice)
    assert error_code(await send(alice, room, "a" * (MAX_LENGTH + 1), "over")) == "too_large"
    exact = await send(alice, room, "b" * MAX_LENGTH, "exact")
    assert exact["ok"] is True and exact["message"]["text"] == "b" * MAX_LENGTH
    padded = await send(alice, room, "  " + "c" * MAX_LENGTH + "\n ", "padded")
    assert padded["ok"] is True and padded["message"]["text"] == "c" * MAX_LENGTH
    accented = await send(alice, room, "é" * MAX_LENGTH, "accented")  # characters, not bytes
    assert accented["ok"] is True and accented["message"]["text"] == "é" * MAX_LENGTH
    history = await alice.call("message:history", {"room": room})
    assert [m["client_id"] for m in history["messages"]] == ["exact", "padded", "accented"]
    assert seqs(history["messages"]) == [1, 2, 3]


async def test_unicode_text_round_trips(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await joined(room, alice, bob)
    text = 'héllo 👋 мир 世界 \u200b<script>alert(1)</script> "quotes" \\ back'
    ack = await send(alice, room, text, "u")
    assert ack["message"]["text"] == text
    assert (await bob.wait_for("message:new"))[0]["text"] == text


# --- idempotency ----------------------------------------------------------------------------
async def test_client_id_repeat_returns_the_original(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await joined(room, alice, bob)
    first = await send(alice, room, "original", "cid-1")
    repeat = await send(alice, room, "original", "cid-1")
    changed = await send(alice, room, "edited on retry", "cid-1")
    assert repeat == first and changed == first
    await bob.wait_for("message:new")
    await asyncio.sleep(QUIET)
    assert bob.events["message:new"] == [first["message"]]
    following = await send(alice, room, "next", "cid-2")
    assert following["message"]["seq"] == 2
    history = await bob.call("message:history", {"room": room})
    assert [(m["seq"], m["text"]) for m in history["messages"]] == [(1, "original"), (2, "next")]


async def test_client_id_repeat_from_a_new_connection(clients, uid):
    """A client retrying after a reconnect (new socket, same user) gets the original back."""
    room, user = uid("room"), uid("alice")
    first_socket, bob = await clients(user), await clients(uid("bob"))
    await joined(room, first_socket, bob)
    original = await send(first_socket, room, "sent before the reconnect", "retry-me")
    await first_socket.disconnect()
    second_socket = await clients(user)
    await joined(room, second_socket)
    assert await send(second_socket, room, "sent before the reconnect", "retry-me") == original
    await asyncio.sleep(QUIET)
    assert bob.events["message:new"] == [original["message"]]


async def test_client_id_is_scoped_to_sender_and_room(clients, uid):
    room, other_room = uid("room"), uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await joined(room, alice, bob)
    await joined(other_room, alice)
    a = await send(alice, room, "from alice", "same")
    b = await send(bob, room, "from bob", "same")
    c = await send(alice, other_room, "elsewhere", "same")
    assert (a["message"]["seq"], b["message"]["seq"], c["message"]["seq"]) == (1, 2, 1)
    assert len({a["message"]["id"], b["message"]["id"], c["message"]["id"]}) == 3
    assert b["message"]["sender"]["id"] == bob.user and b["message"]["text"] == "from bob"


# --- seq ------------------------------------------------------------------------------------
async def concurrent_senders(url: str, room: str, uid, senders: int = 5, each: int = 20) -> None:
    users = [ChatClient(uid("s")) for _ in range(senders)]
    await asyncio.gather(*(u.connect(url) for u in users))
    try:
        await joined(room, *users)

        async def burst(client: ChatClient) -> list[dict]:
            return list(
                await asyncio.gather(
                    *(send(client, room, f"{client.user} #{i}", f"c{i}") for i in range(each))
                )
            )

        acks = [ack for acks in await asyncio.gather(*(burst(u) for u in users)) for ack in acks]
        total = senders * each
        assert all(ack["ok"] is True for ack in acks), [a for a in acks if not a["ok"]][:3]
        assert sorted(ack["message"]["seq"] for ack in acks) == list(range(1, total + 1))
        # Every socket gets the others' messages exactly once.
        for client in users:
            received = await client.wait_for("message:new", total - each, timeout=15)
            assert len(received) == total - each
            assert {m["sender"]["id"] for m in received} == {u.user for u in users} - {client.user}
            assert len({m["seq"] for m in received}) == total - each
        history = []
        after = 0
        while True:
            page = await users[0].call(
                "message:history", {"room": room, "after": after, "limit": 100}
            )
            history += page["messages"]
            if not page["has_more"]:
                break
            after = page["messages"][-1]["seq"]
        assert seqs(history) == list(range(1, total + 1))
        by_seq = {ack["message"]["seq"]: ack["message"] for ack in acks}
        assert history == [by_seq[seq] for seq in range(1, total + 1)]
    finally:
        await asyncio.gather(*(u.disconnect() for u in users))


async def test_seq_unique_and_dense_under_concurrency(server, uid):
    """On SQLite (the shared server's store): concurrent transactions on the writer thread."""
    await concurrent_senders(server.url, uid("room"), uid)


async def test_seq_is_per_room(clients, uid):
    first, second = uid("room"), uid("room")
    alice = await clients(uid("alice"))
    await joined(first, alice)
    await joined(second, alice)
    await fill(alice, first, 3)
    assert (await send(alice, second, "one"))["message"]["seq"] == 1
    assert (await send(alice, first, "four"))["message"]["seq"] == 4


# --- history --------------------------------------------------------------------------------
@pytest.fixture
async def seven(clients, uid):
    """A room with messages seq 1..7 and a reader who never joined it (public: may read)."""
    room = uid("room")
    writer, reader = await clients(uid("writer")), await clients(uid("reader"))
    await joined(room, writer)
    stored = await fill(writer, room, 7)
    return room, reader, stored


async def history(client, room: str, **params) -> dict:
    ack = await client.call("message:history", {"room": room, **params})
    assert set(ack) == {"ok", "messages", "has_more"} and ack["ok"] is True, ack
    return ack


async def test_history_latest(seven):
    room, reader, stored = seven
    everything = await history(reader, room)
    assert everything["messages"] == stored and everything["has_more"] is False
    latest = await history(reader, room, limit=3)
    assert latest["messages"] == stored[4:] and latest["has_more"] is True
    exact = await history(reader, room, limit=7)
    assert seqs(exact["messages"]) == [1, 2, 3, 4, 5, 6, 7] and exact["has_more"] is False


async def test_history_before(seven):
    room, reader, _ = seven
    cases = [
        ({"before": 5, "limit": 3}, [2, 3, 4], True),
        ({"before": 4, "limit": 3}, [1, 2, 3], False),
        ({"before": 3, "limit": 3}, [1, 2], False),
        ({"before": 1}, [], False),
        ({"before": 8, "limit": 2}, [6, 7], True),
        ({"before": 1000}, [1, 2, 3, 4, 5, 6, 7], False),
    ]
    for params, expected, more in cases:
        page = await history(reader, room, **params)
        assert (seqs(page["messages"]), page["has_more"]) == (expected, more), params


async def test_history_after(seven):
    room, reader, _ = seven
    cases = [
        ({"after": 0}, [1, 2, 3, 4, 5, 6, 7], False),
        ({"after": 2, "limit": 3}, [3, 4, 5], True),
        ({"after": 4, "limit": 3}, [5, 6, 7], False),
        ({"after": 5, "limit": 3}, [6, 7], False),
        ({"after": 7}, [], False),
        ({"after": 1000}, [], False),
        ({"after": 0, "limit": 1}, [1], True),
    ]
    for params, expected, more in cases:
        page = await history(reader, room, **params)
        assert (seqs(page["messages"]), page["has_more"]) == (expected, more), params


async def test_history_paging_walks_everything(seven):
    room, reader, stored = seven
    backwards, before = [], None
    while True:
        page = await history(reader, room, limit=2, **({"before": before} if before else {}))
        backwards = page["messages"] + backwards
        if not page["has_more"]:
            break
        before = page["messages"][0]["seq"]
    assert backwards == stored


async def test_history_limit_bounds(seven):
    room, reader, _ = seven
    for limit in (0, -1, 101, 1000):
        assert (
            error_code(await reader.call("message:history", {"room": room, "limit": limit}))
            == "bad_request"
        )
    assert seqs((await history(reader, room, limit=100))["messages"]) == [1, 2, 3, 4, 5, 6, 7]
    assert seqs((await history(reader, room, limit=1))["messages"]) == [7]


async def test_history_default_limit_is_50(clients, uid):
    room = uid("room")
    alice = await clients(uid("alice"))
    await joined(room, alice)
    await asyncio.gather(*(send(alice, room, f"m{i}") for i in range(55)))
    page = await history(alice, room)
    assert seqs(page["messages"]) == list(range(6, 56)) and page["has_more"] is True


async def test_history_before_and_after_together_refused(seven):
    room, reader, _ = seven
    ack = await reader.call("message:history", {"room": room, "before": 5, "after": 1})
    assert error_code(ack) == "bad_request"


async def test_history_access(clients, uid):
    room = uid("priv")
    owner, member, outsider = (
        await clients(uid("owner")),
        await clients(uid("member")),
        await clients(uid("out")),
    )
    await owner.call("room:create", {"room": room, "private": True, "members": [member.user]})
    await joined(room, owner)
    stored = await fill(owner, room, 2)
    # Members may read without joining; others may not read at all.
    assert (await history(member, room))["messages"] == stored
    assert error_code(await outsider.call("message:history", {"room": room})) == "not_found"
    assert (
        error_code(await outsider.call("message:history", {"room": uid("missing")})) == "not_found"
    )


# --- missed messages on join ----------------------------------------------------------------
async def test_join_since_returns_missed(clients, uid):
    room = uid("room")
    writer, reader = await clients(uid("writer")), await clients(uid("reader"))
    await joined(room, writer)
    await asyncio.gather(*(send(writer, room, f"m{i}") for i in range(105)))
    cases = [
        (0, list(range(1, 101)), True),
        (4, list(range(5, 105)), True),
        (5, list(range(6, 106)), False),
        (100, [101, 102, 103, 104, 105], False),
        (105, [], False),
        (500, [], False),
        (None, [], False),
    ]
    for since, expected, more in cases:
        ack = await reader.call(
            "room:join", {"room": room, **({"since": since} if since is not None else {})}
        )
        assert ack["ok"] is True and ack["last_seq"] == 105
        assert (seqs(ack["missed"]), ack["has_more"]) == (expected, more), since
    full = await history(reader, room, after=100)
    assert (await reader.call("room:join", {"room": room, "since": 100}))["missed"] == full[
        "messages"
    ]


# --- read markers ---------------------------------------------------------------------------
async def test_read_marker_moves_forward_only(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await joined(room, alice, bob)
    await fill(bob, room, 6)
    expected = [{"room": room, "user": alice.user, "seq": 3}]
    assert (await alice.call("message:read", {"room": room, "seq": 3}))["ok"] is True
    assert await bob.wait_for("message:read") == expected
    for seq in (3, 2, 0):  # not forward: acked, nothing broadcast
        assert (await alice.call("message:read", {"room": room, "seq": seq}))["ok"] is True
    await asyncio.sleep(QUIET)
    assert bob.events["message:read"] == expected
    # Still at 3 (not moved back to 0): reading 2 again says nothing, reading 5 moves it.
    assert (await alice.call("message:read", {"room": room, "seq": 5}))["ok"] is True
    expected.append({"room": room, "user": alice.user, "seq": 5})
    assert await bob.wait_for("message:read", 2) == expected
    assert (await alice.call("message:read", {"room": room, "seq": 4}))["ok"] is True
    await asyncio.sleep(QUIET)
    assert bob.events["message:read"] == expected
    # The reader's own socket hears its marker move too (it is in the room).
    assert alice.events["message:read"] == expected


async def test_read_marker_beyond_last_seq_refused(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await joined(room, alice, bob)
    await fill(alice, room, 2)
    assert error_code(await bob.call("message:read", {"room": room, "seq": 3})) == "bad_request"
    assert (await bob.call("message:read", {"room": room, "seq": 2}))["ok"] is True
    assert await alice.wait_for("message:read") == [{"room": room, "user": bob.user, "seq": 2}]


async def test_read_marker_access(clients, uid):
    room = uid("priv")
    owner, outsider = await clients(uid("owner")), await clients(uid("out"))
    await owner.call("room:create", {"room": room, "private": True})
    await joined(room, owner)
    await fill(owner, room, 1)
    assert error_code(await outsider.call("message:read", {"room": room, "seq": 1})) == "not_found"
    assert (
        error_code(await outsider.call("message:read", {"room": uid("missing"), "seq": 0}))
        == "not_found"
    )
    await asyncio.sleep(QUIET)
    assert owner.events["message:read"] == []


# --- typing ---------------------------------------------------------------------------------
async def test_typing_broadcast_to_others_not_stored(clients, uid):
    room = uid("room")
    alice, bob, carol = (
        await clients(uid("alice")),
        await clients(uid("bob")),
        await clients(uid("carol")),
    )
    await joined(room, alice, bob)
    assert await alice.call("typing", {"room": room, "typing": True}) == {"ok": True}
    assert await alice.call("typing", {"room": room, "typing": False}) == {"ok": True}
    assert await bob.wait_for("typing", 2) == [
        {"room": room, "user": alice.user, "typing": True},
        {"room": room, "user": alice.user, "typing": False},
    ]
    await asyncio.sleep(QUIET)
    assert alice.events["typing"] == [] and carol.events["typing"] == []
    assert await history(bob, room) == {"ok": True, "messages": [], "has_more": False}
    assert (await carol.call("room:join", {"room": room}))["last_seq"] == 0


async def test_typing_requires_join(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await joined(room, bob)
    assert error_code(await alice.call("typing", {"room": room, "typing": True})) == "forbidden"
    await asyncio.sleep(QUIET)
    assert bob.events["typing"] == []


# --- SQLite: durability across restarts -----------------------------------------------------
async def test_sqlite_messages_survive_restarts(tmp_path, uid):
    env = {"STORE": "sqlite", "SQLITE_PATH": str(tmp_path / "chat.db")}
    room, private = uid("room"), uid("priv")
    alice_id, bob_id, eve_id = uid("alice"), uid("bob"), uid("eve")

    async def connect(proc, user):
        return await ChatClient(user).connect(proc.url)

    first = ServerProcess(env).start()
    try:
        alice = await connect(first, alice_id)
        await joined(room, alice)
        stored = await fill(alice, room, 3)
        await alice.call("room:create", {"room": private, "private": True, "members": [bob_id]})
        await joined(private, alice)
        await fill(alice, private, 1, prefix="secret")
        await alice.call("message:read", {"room": room, "seq": 2})
        await alice.disconnect()
    finally:
        first.stop(signal.SIGTERM)

    second = ServerProcess(env).start()
    try:
        alice = await connect(second, alice_id)
        rejoined = await alice.call("room:join", {"room": room, "since": 0})
        assert rejoined["last_seq"] == 3 and rejoined["missed"] == stored
        assert (await history(alice, room))["messages"] == stored
        # Idempotency survives the restart; seq continues after the stored ones.
        assert await send(alice, room, "m2", "m2") == {"ok": True, "message": stored[1]}
        fourth = await send(alice, room, "after restart")
        assert fourth["message"]["seq"] == 4
        stored.append(fourth["message"])
        # The read marker did not go back to 0: reading seq 1 is not a move.
        assert (await alice.call("message:read", {"room": room, "seq": 1}))["ok"] is True
        await asyncio.sleep(QUIET)
        assert alice.events["message:read"] == []
        fifth = await send(alice, room, "acked just before a crash")
        stored.append(fifth["message"])
        await alice.disconnect()
    finally:
        second.kill()  # no graceful shutdown: acked messages must still be there

    third = ServerProcess(env).start()
    try:
        alice, bob, eve = (
            await connect(third, alice_id),
            await connect(third, bob_id),
            await connect(third, eve_id),
        )
        assert (await history(alice, room))["messages"] == stored
        await joined(room, alice)
        after_crash = await send(alice, room, "after the crash")
        assert after_crash["message"]["seq"] == 6, after_crash
        # Room kinds and membership are durable too.
        assert (await bob.call("room:join", {"room": private}))["room"]["kind"] == "private"
        assert [m["text"] for m in (await history(bob, private))["messages"]] == ["secret1"]
        assert error_code(await eve.call("room:join", {"room": private})) == "not_found"
        for client in (alice, bob, eve):
            await client.disconnect()
    finally:
        third.stop()


async def test_store_unavailable_then_retry_is_safe(tmp_path, uid):
    """A store that cannot write answers `unavailable`, broadcasts nothing; the retry stores once."""
    import sqlite3

    path = tmp_path / "chat.db"
    proc = ServerProcess(
        {"STORE": "sqlite", "SQLITE_PATH": str(path), "STORE_TIMEOUT": "1"}
    ).start()
    room = uid("room")
    alice, bob = ChatClient(uid("alice")), ChatClient(uid("bob"))
    locker = None
    try:
        await alice.connect(proc.url)
        await bob.connect(proc.url)
        await joined(room, alice, bob)
        before = await send(alice, room, "before", "c1")
        await bob.wait_for("message:new")
        locker = sqlite3.connect(path, isolation_level=None, timeout=5)
        locker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
        failed = await send(alice, room, "during", "c2")
        assert error_code(failed) == "unavailable"
        await asyncio.sleep(QUIET)
        assert bob.events["message:new"] == [before["message"]]
        locker.execute("ROLLBACK")
        locker.close()
        locker = None
        retried = await send(alice, room, "during", "c2")
        assert retried["ok"] is True and retried["message"]["seq"] == 2
        assert await send(alice, room, "during", "c2") == retried
        received = await bob.wait_for("message:new", 2)
        await asyncio.sleep(QUIET)
        assert bob.events["message:new"] == [before["message"], retried["message"]] == received
        assert (await history(bob, room))["messages"] == [before["message"], retried["message"]]
        third = await send(alice, room, "after", "c3")
        assert third["message"]["seq"] == 3
    finally:
        if locker is not None:
            locker.close()
        await alice.disconnect()
        await bob.disconnect()
        proc.stop()


async def test_store_recovers_when_a_lock_ends_after_the_timeout(tmp_path, uid):
    """A write that timed out while its BEGIN was still waiting must not leave the store stuck.

    The second send waits for the first, so its BEGIN is still queued in SQLite when its own
    timeout fires; the other writer lets go as soon as that timeout has been answered (no
    fixed delay to race). Later writes must work again.
    """
    import sqlite3

    path = tmp_path / "chat.db"
    proc = ServerProcess(
        {"STORE": "sqlite", "SQLITE_PATH": str(path), "STORE_TIMEOUT": "3"}
    ).start()
    room = uid("room")
    alice = ChatClient(uid("alice"))
    try:
        await alice.connect(proc.url)
        await joined(room, alice)
        assert (await send(alice, room, "first", "c0"))["ok"] is True
        locker = sqlite3.connect(path, isolation_level=None, timeout=5)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            # first's BEGIN waits 0-3 s; second's batch begins at 3 s, its caller gives up
            # at 4 s while that BEGIN still waits (until 6 s).
            first = asyncio.create_task(send(alice, room, "b", "b"))
            await asyncio.sleep(1.0)
            second = asyncio.create_task(send(alice, room, "c", "c"))
            assert error_code(await first) == "unavailable"
            assert error_code(await second) == "unavailable"
            locker.execute("ROLLBACK")
        finally:
            locker.close()
        for index in range(3):
            ack = await send(alice, room, f"later {index}", f"later-{index}")
            assert ack["ok"] is True and ack["message"]["seq"] == 2 + index, ack
    finally:
        await alice.disconnect()
        proc.stop()


async def test_client_id_length_bounds(clients, uid):
    room = uid("room")
    alice = await clients(uid("alice"))
    await joined(room, alice)
    longest = await send(alice, room, "x", "k" * 64)
    assert longest["ok"] is True and longest["message"]["client_id"] == "k" * 64
    assert error_code(await send(alice, room, "x", "k" * 65)) == "bad_request"
    shortest = await send(alice, room, "y", "k")
    assert shortest["message"]["seq"] == 2
