"""Instances sharing Firestore and Redis: seq by Redis INCR, outages of Firestore mid-test."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.clients import QUIET, ChatClient
from tests.support.firestore_emulator import FirestoreEmulator
from tests.support.servers import ServerProcess, key_prefix, start_all


def firestore_env(
    redis_url: str, prefix: str, emulator: FirestoreEmulator, **extra
) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "STORE": "firestore",
        "FIRESTORE_EMULATOR_HOST": emulator.host,
        "FIRESTORE_PROJECT": "chat-test",
        "STORE_TIMEOUT": "1.5",
        "WS_GRACE_PERIOD": "1",
        "WS_HEARTBEAT_INTERVAL": "0.5",
        **extra,
    }


@pytest.fixture(scope="module")
def emulator():
    instance = FirestoreEmulator.launch()
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def fs_pair(redis_url, emulator):
    prefix = key_prefix()
    servers = start_all(
        [
            ServerProcess(firestore_env(redis_url, prefix, emulator, INSTANCE_ID=f"f{i}"))
            for i in range(2)
        ],
        timeout=120,  # two servers importing at once on a loaded machine
    )
    yield servers
    for server in servers:
        server.stop()


async def joined(url: str, user: str, room: str) -> ChatClient:
    client = await ChatClient(user).connect(url)
    assert (await client.call("room:join", {"room": room}))["ok"]
    return client


async def test_concurrent_sends_on_two_instances_share_one_seq_line(fs_pair, uid):
    room = uid("room")
    a = await joined(fs_pair[0].url, uid("a"), room)
    b = await joined(fs_pair[1].url, uid("b"), room)
    try:

        async def burst(client: ChatClient) -> list[int]:
            acks = await asyncio.gather(
                *(
                    client.call(
                        "message:send",
                        {"room": room, "text": f"{client.user} {i}", "client_id": str(i)},
                    )
                    for i in range(25)
                )
            )
            assert all(ack["ok"] for ack in acks), acks
            return [ack["message"]["seq"] for ack in acks]

        seqs = sorted(sum(await asyncio.gather(burst(a), burst(b)), []))
        assert seqs == list(range(1, 51))
        await b.wait_for("message:new", count=25)
        await a.wait_for("message:new", count=25)
        page = await a.call("message:history", {"room": room, "limit": 100})
        assert [m["seq"] for m in page["messages"]] == list(range(1, 51))
        # a's retry of its client_id "0" through the other instance (a new connection, as
        # after a reconnect through the load balancer) acks the original message, and
        # nobody receives it a second time.
        original = next(
            m for m in page["messages"] if m["sender"]["id"] == a.user and m["client_id"] == "0"
        )
        a_elsewhere = await joined(fs_pair[1].url, a.user, room)
        try:
            again = await a_elsewhere.call(
                "message:send", {"room": room, "text": "a 0 again", "client_id": "0"}
            )
            assert again == {"ok": True, "message": original}
            await asyncio.sleep(QUIET)
            assert len(b.events["message:new"]) == 25 and len(a.events["message:new"]) == 25
            assert a_elsewhere.events["message:new"] == []
            after = await a.call("message:history", {"room": room, "limit": 100})
            assert after["messages"] == page["messages"]
        finally:
            await a_elsewhere.disconnect()
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_firestore_outage_fails_cleanly_then_recovers(fs_pair, emulator, uid):
    room = uid("room")
    a = await joined(fs_pair[0].url, uid("a"), room)
    b = await joined(fs_pair[1].url, uid("b"), room)
    try:
        first = await a.call("message:send", {"room": room, "text": "before", "client_id": "1"})
        assert first["ok"]
        await b.wait_for("message:new")

        emulator.pause()  # the store stops answering (state kept)
        try:
            started = asyncio.get_running_loop().time()
            failed = await a.call(
                "message:send", {"room": room, "text": "during", "client_id": "2"}, timeout=20
            )
            assert failed == {
                "ok": False,
                "error": {"code": "unavailable", "message": failed["error"]["message"]},
            }
            # One store call's budget is 2 x STORE_TIMEOUT (3 s); 2.5 s more for a loaded machine.
            assert asyncio.get_running_loop().time() - started < 2 * 1.5 + 2.5
            async with httpx.AsyncClient(timeout=10) as http:
                health = await http.get(f"{fs_pair[0].url}/api/health")
            assert health.status_code == 503 and health.json()["checks"]["store"]["ok"] is False
        finally:
            emulator.resume()
        await asyncio.sleep(0.3)
        assert b.events["message:new"] == [first["message"]]  # nothing broadcast for the failure

        retried = await a.call(
            "message:send", {"room": room, "text": "during", "client_id": "2"}, timeout=20
        )
        assert retried["ok"], retried
        await b.wait_for("message:new", count=2)
        history = await b.call("message:history", {"room": room})
        assert [m["text"] for m in history["messages"]] == ["before", "during"]
        seqs = [m["seq"] for m in history["messages"]]
        assert seqs[0] == 1 and seqs[1] > 1
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_emulator_restart_mid_test(fs_pair, emulator, uid):
    """A stopped store answers `unavailable`; once it is back, sends succeed without restarts."""
    room = uid("room")
    a = await joined(fs_pair[0].url, uid("a"), room)
    try:
        assert (await a.call("message:send", {"room": room, "text": "one", "client_id": "1"}))["ok"]
        emulator.stop()
        try:
            down = await a.call(
                "message:send", {"room": room, "text": "two", "client_id": "2"}, timeout=20
            )
            assert down["ok"] is False and down["error"]["code"] == "unavailable"
        finally:
            emulator.start()  # in-memory emulator: it comes back empty
        deadline = asyncio.get_running_loop().time() + 15
        while True:  # the emptied emulator lost the room: join again (public rooms recreate)
            rejoin = await a.call("room:join", {"room": room}, timeout=20)
            if rejoin["ok"]:
                break
            assert rejoin["error"]["code"] == "unavailable"
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.5)
        ack = await a.call(
            "message:send", {"room": room, "text": "two", "client_id": "2"}, timeout=20
        )
        assert ack["ok"], ack
        assert ack["message"]["seq"] >= 2  # the Redis counter never hands out a seq again
    finally:
        await a.disconnect()


async def test_seq_never_repeats_after_redis_loses_its_counters(private_redis, emulator, uid):
    """Redis restarted empty, or a failover that lost the latest INCRs: seq still only grows."""
    import redis as redis_sync

    prefix = key_prefix()
    server = ServerProcess(firestore_env(private_redis.url, prefix, emulator)).start(timeout=120)
    room = uid("room")
    a = await joined(server.url, uid("a"), room)
    try:
        for i in range(3):
            assert (
                await a.call("message:send", {"room": room, "text": f"m{i}", "client_id": f"a{i}"})
            )["ok"]
        private_redis.restart()  # data lost: the counter is re-seeded from the store
        server.wait_healthy()
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            ack = await a.call(
                "message:send", {"room": room, "text": "after restart", "client_id": "b"}
            )
            if ack["ok"]:
                break
            assert asyncio.get_running_loop().time() < deadline, ack
            await asyncio.sleep(0.3)
        assert ack["message"]["seq"] == 4
        # A counter behind the store (as after a failover to a lagging replica) is moved past it.
        redis_sync.Redis.from_url(private_redis.url).set(f"{prefix}seq:{room}", 1)
        behind = await a.call(
            "message:send", {"room": room, "text": "after rewind", "client_id": "c"}
        )
        assert behind["ok"] and behind["message"]["seq"] == 5
        history = await a.call("message:history", {"room": room})
        assert [m["seq"] for m in history["messages"]] == [1, 2, 3, 4, 5]
    finally:
        await a.disconnect()
        server.stop()


async def test_firestore_database_setting_picks_the_database(emulator, uid):
    """FIRESTORE_DATABASE: the server's data lands in that database, not in "(default)"."""
    from server.store.firestore import FirestoreStore

    database = uid("chat-db").lower()
    server = ServerProcess(
        {
            "STORE": "firestore",
            "FIRESTORE_EMULATOR_HOST": emulator.host,
            "FIRESTORE_PROJECT": "chat-test",
            "FIRESTORE_DATABASE": database,
        }
    ).start()
    room = uid("room")
    named = FirestoreStore(project="chat-test", emulator_host=emulator.host, database=database)
    default = FirestoreStore(project="chat-test", emulator_host=emulator.host)
    try:
        a = await joined(server.url, uid("a"), room)
        sent = await a.call("message:send", {"room": room, "text": "where?", "client_id": "1"})
        assert sent["ok"], sent
        await a.disconnect()
        await named.start()
        await default.start()
        assert [m.text for m in await named.messages_after(room, 0, 10)] == ["where?"]
        assert await default.get_room(room) is None
        assert await default.messages_after(room, 0, 10) == []
    finally:
        await named.close()
        await default.close()
        server.stop()
