"""Each chat room's traffic on a pub/sub channel of its own, heard only where it is needed.

From the rules of one manager (names, routing, resubscription), through the interest count
of one instance, to real managers on Redis and Redis Cluster and real server processes:
an instance with no member of a room gets none of its traffic from Redis.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from server.bus.cluster_manager import RedisClusterManager
from server.bus.ledger import DeliveryLedger
from server.bus.redis_manager import RedisManager
from server.bus.room_channels import RoomChannels, hash_tag_of
from server.transport.interest import RoomInterest
from tests.support.clients import ChatClient, metric_values, until
from tests.support.fake_sio import FakeManager, FakeServer
from tests.support.servers import ServerProcess, deployment
from tests.test_cluster_manager import (
    _close_redis_manager,
    listening,
    shard_subscribers,
    unique,
)

# --- the rules of one manager ----------------------------------------------------------------


def test_room_channels_share_the_main_channels_cluster_slot():
    for main in ("chat:socketio", "{chat}:socketio", "x"):
        rooms = RoomChannels(main, "room:")
        name = rooms.name("room:general")
        assert key_slot(name.encode()) == key_slot(main.encode()), (main, name)
        assert name.endswith(":room:general")
    assert hash_tag_of("{a}b") == "a" and hash_tag_of("a{}b") is None and hash_tag_of("ab") is None


def test_only_emits_to_prefixed_rooms_get_their_own_channel():
    rooms = RoomChannels("main", "room:")
    emit = {"method": "emit", "event": "message:new", "room": "room:r"}
    assert rooms.channel_for(emit) == rooms.name("room:r")
    assert rooms.channel_for({**emit, "room": "user:u"}) is None  # per-user: main channel
    assert rooms.channel_for({**emit, "room": ["room:r", "room:s"]}) is None
    assert rooms.channel_for({**emit, "room": None}) is None
    assert rooms.channel_for({"method": "callback", "room": "room:r"}) is None
    assert RoomChannels("main", "room:", publish=False).channel_for(emit) is None
    assert RoomChannels("main", None).channel_for(emit) is None


async def test_follow_waits_for_the_confirmation_and_not_when_not_subscribed():
    rooms = RoomChannels("main", "room:", confirm_timeout=5)
    sent: list[list[str]] = []

    async def subscribe(names: list[str]) -> None:
        sent.append(names)

    await rooms.follow(["room:a"], None)  # listener down: recorded, nothing sent, no wait
    assert sent == [] and rooms.followed == {rooms.name("room:a")}
    waiting = asyncio.create_task(rooms.follow(["room:a", "room:b"], subscribe))
    await asyncio.sleep(0.05)
    assert sent == [[rooms.name("room:b")]] and not waiting.done()
    rooms.confirmed(rooms.name("room:b").encode())
    await asyncio.wait_for(waiting, 1)
    again = asyncio.create_task(rooms.follow(["room:b"], subscribe))  # confirmed: no wait
    await asyncio.wait_for(again, 1)
    assert len(sent) == 1


async def test_a_new_subscription_takes_in_what_changed_while_it_was_made():
    rooms = RoomChannels("main", "room:")
    await rooms.follow(["room:a", "room:b"], None)
    subscribed: set[str] = set()
    calls: list[tuple[str, list[str]]] = []

    async def subscribe(names: list[str]) -> None:
        calls.append(("sub", names))
        if len(calls) == 1:  # a join and a leave happen while the first command is sent
            await rooms.follow(["room:c"], None)
            await rooms.unfollow(["room:a"], None)

    async def unsubscribe(names: list[str]) -> None:
        calls.append(("unsub", names))

    await rooms.settle(subscribed, subscribe, unsubscribe)
    assert subscribed == rooms.followed == {rooms.name("room:b"), rooms.name("room:c")}
    assert calls == [
        ("sub", [rooms.name("room:a"), rooms.name("room:b")]),
        ("sub", [rooms.name("room:c")]),
        ("unsub", [rooms.name("room:a")]),
    ]
    assert rooms.unsubscribed(rooms.name("room:a").encode())  # asked for: not a loss
    assert not rooms.unsubscribed(rooms.name("room:b").encode())  # still followed: a loss


# --- the interest of one instance --------------------------------------------------------------


def interest(linger: float = 0) -> tuple[RoomInterest, FakeManager, DeliveryLedger]:
    manager = FakeServer().manager
    ledger = DeliveryLedger()
    return RoomInterest(manager, ledger, linger=linger), manager, ledger  # type: ignore[arg-type]


async def test_a_room_is_followed_while_a_connection_joined_it_or_its_user_is_a_member():
    rooms, manager, ledger = interest()
    for sid in ("s1", "s2"):
        rooms.open(sid)
    await rooms.join("s1", "r")
    await rooms.members("s2", ["r", "q"])
    assert manager.followed == {"room:r", "room:q"}
    rooms.leave("s1", "r")
    await asyncio.sleep(0)
    assert "r" in rooms and manager.followed == {"room:r", "room:q"}  # s2's user is a member
    ledger.first_delivery("r", 5)
    rooms.not_member("s2", "r")
    await until(lambda: manager.followed == {"room:q"}, "r to be unfollowed", timeout=2)
    assert ledger.catch_up_from("r") is None  # forgotten with the subscription
    rooms.drop("s2")
    await until(lambda: manager.followed == set(), "q to be unfollowed", timeout=2)


async def test_a_connection_counts_once_and_not_after_it_is_gone():
    rooms, manager, _ = interest()
    rooms.open("s1")
    await rooms.join("s1", "r")
    await rooms.members("s1", ["r"])
    rooms.leave("s1", "r")
    rooms.leave("s1", "r")  # twice: the member reason stays
    await asyncio.sleep(0)
    assert manager.followed == {"room:r"}
    rooms.drop("s1")
    await until(lambda: "room:r" not in manager.followed, "r to be unfollowed", timeout=2)
    await rooms.join("s1", "late")  # a handler that finished after the disconnect
    await rooms.members("never-opened", ["x"])
    assert "late" not in rooms and "x" not in rooms
    assert manager.followed == set()  # nothing followed that nothing would unfollow


async def test_a_room_lingers_after_its_last_member_left():
    rooms, manager, _ = interest(linger=0.3)
    rooms.open("s1")
    await rooms.join("s1", "r")
    rooms.leave("s1", "r")
    await asyncio.sleep(0.1)
    await rooms.join("s1", "r")  # back within the linger: never unfollowed
    await asyncio.sleep(0.4)
    assert manager.followed == {"room:r"}
    rooms.leave("s1", "r")
    await asyncio.sleep(0.1)
    assert manager.followed == {"room:r"}
    await until(lambda: manager.followed == set(), "r to be unfollowed after the linger", 2)


# --- real managers ---------------------------------------------------------------------------


def emit(room: str, n: int) -> dict:
    return {"method": "emit", "event": "message:new", "room": room, "n": n, "namespace": "/chat"}


async def numsub(client: aioredis.Redis, channel: str) -> int:
    return int((await client.pubsub_numsub(channel))[0][1])


async def quiet_numsub(client: aioredis.Redis, channel: str) -> int:
    """``numsub``, 0 while the server does not answer (being restarted)."""
    try:
        return await numsub(client, channel)
    except (ConnectionError, aioredis.ConnectionError):
        return 0


async def test_redis_manager_hears_only_the_rooms_it_follows(private_redis):
    channel = unique()
    publisher = RedisManager(private_redis.url, channel=channel, room_prefix="room:")
    listener = RedisManager(private_redis.url, channel=channel, room_prefix="room:")
    probe = aioredis.Redis.from_url(private_redis.url)
    try:
        async with listening(listener) as inbox:
            await asyncio.wait_for(listener.delivery.subscribed.wait(), 5)
            await listener.follow(["room:here"])
            assert await numsub(probe, listener.room_channels.name("room:here")) == 1
            for n, room in enumerate(["room:elsewhere", "room:here", "user:u", "room:here"]):
                await publisher._publish(emit(room, n))
            got = [await asyncio.wait_for(inbox.get(), 5) for _ in range(3)]
            assert [(m["room"], m["n"]) for m in got] == [
                ("room:here", 1),
                ("user:u", 2),  # the main channel, heard by every instance
                ("room:here", 3),
            ]
            assert await numsub(probe, listener.room_channels.name("room:elsewhere")) == 0
            # A publish that reconnects replaces the manager's pub/sub object: a room
            # followed afterwards must still be subscribed on the listener's connection.
            listener.connected = False
            await listener._publish(emit("user:u", 4))
            assert (await asyncio.wait_for(inbox.get(), 5))["n"] == 4
            started = asyncio.get_running_loop().time()
            await listener.follow(["room:later"])
            assert asyncio.get_running_loop().time() - started < 2  # confirmed, not timed out
            await publisher._publish(emit("room:later", 5))
            assert (await asyncio.wait_for(inbox.get(), 5))["n"] == 5
            # A restart of Redis: the new subscription names the followed room again.
            await asyncio.to_thread(private_redis.restart)
            await until(
                lambda: quiet_numsub(probe, listener.room_channels.name("room:here")),
                "the followed room to be subscribed again",
                timeout=15,
            )
            await listener.unfollow(["room:here"])
            assert await numsub(probe, listener.room_channels.name("room:here")) == 0
            await publisher._publish(emit("room:here", 9))
            await publisher._publish(emit("user:u", 10))
            assert (await asyncio.wait_for(inbox.get(), 5))["n"] == 10
    finally:
        await _close_redis_manager(publisher)
        await _close_redis_manager(listener)
        await probe.aclose()


async def test_publish_rooms_off_keeps_room_emits_on_the_main_channel(redis_url):
    channel = unique()
    old_style = RedisManager(redis_url, channel=channel, room_prefix="room:", publish_rooms=False)
    listener = RedisManager(redis_url, channel=channel)  # follows nothing, like 0.1.0
    try:
        async with listening(listener) as inbox:
            await asyncio.wait_for(listener.delivery.subscribed.wait(), 5)
            await old_style._publish(emit("room:r", 1))
            assert (await asyncio.wait_for(inbox.get(), 5))["n"] == 1
    finally:
        await _close_redis_manager(old_style)
        await _close_redis_manager(listener)


async def test_cluster_manager_follows_rooms_on_the_main_channels_shard(redis_cluster):
    channel = unique()
    publisher = RedisClusterManager(
        redis_cluster.url, channel=channel, write_only=True, room_prefix="room:"
    )
    listener = RedisClusterManager(redis_cluster.url, channel=channel, room_prefix="room:")
    try:
        async with listening(listener) as inbox:
            await asyncio.wait_for(listener.delivery.subscribed.wait(), 10)
            await listener.follow(["room:here"])
            room_channel = listener.room_channels.name("room:here")
            owner = redis_cluster.master_for_key(channel)
            assert shard_subscribers(redis_cluster, owner, room_channel) == 1
            for n, room in enumerate(["room:elsewhere", "room:here", "user:u"]):
                await publisher._publish(emit(room, n))
            got = [await asyncio.wait_for(inbox.get(), 5) for _ in range(2)]
            assert [m["n"] for m in got] == [1, 2]
            # Our own unsubscription is not a lost subscription.
            await listener.unfollow(["room:here"])
            await publisher._publish(emit("room:here", 3))
            await publisher._publish(emit("user:u", 4))
            assert (await asyncio.wait_for(inbox.get(), 5))["n"] == 4
            assert shard_subscribers(redis_cluster, owner, room_channel) == 0
            assert listener.delivery.listener_reconnects == 0
            await listener.follow(["room:here"])  # and again, on the same connection
            await publisher._publish(emit("room:here", 5))
            assert (await asyncio.wait_for(inbox.get(), 5))["n"] == 5
    finally:
        await publisher.aclose()
        await listener.aclose()


# --- real server processes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(redis_url, tmp_path_factory):
    """Two instances on one Redis; a room stops being heard 0.5 s after its last member."""
    with deployment(
        redis_url, tmp_path_factory.mktemp("pair"), 2, "rc", BUS_ROOM_LINGER=0.5
    ) as servers:
        yield servers, servers[0].env["REDIS_KEY_PREFIX"]


async def bus_messages_in(server: ServerProcess) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.url}/metrics")).text
    return metric_values(text).get("chat_bus_messages_in_total", 0.0)


async def test_an_instance_without_members_of_a_room_gets_none_of_its_traffic(pair, redis_url, uid):
    (a, b), prefix = pair
    room, sender_id, member_id = uid("busy"), uid("s"), uid("m")
    probe = aioredis.Redis.from_url(redis_url)
    name = RoomChannels(f"{prefix}socketio", "room:").name(f"room:{room}")

    async def subscribers(count: int) -> bool:
        return await numsub(probe, name) == count

    sender = await ChatClient(sender_id).connect(a.url)
    try:
        assert (await sender.call("room:join", {"room": room}))["ok"]
        assert await subscribers(1)  # a alone
        before = await bus_messages_in(b)
        for n in range(20):
            sent = await sender.call(
                "message:send", {"room": room, "text": f"m{n}", "client_id": f"c{n}"}
            )
            assert sent["ok"], sent
        await asyncio.sleep(0.5)
        assert await bus_messages_in(b) - before < 5  # heartbeat presence at most, not 20

        member = await ChatClient(member_id).connect(b.url)
        joined = await member.call("room:join", {"room": room})  # a public room: now a member
        assert joined["ok"], joined
        assert await subscribers(2)  # followed before the join read the last seq
        await sender.call("message:send", {"room": room, "text": "live", "client_id": "l"})
        [live] = await member.wait_for("message:new")
        assert live["text"] == "live" and live["seq"] == 21
        assert (await member.call("room:leave", {"room": room}))["ok"]
        await asyncio.sleep(1.0)  # past the linger: still a member, so still followed
        assert await subscribers(2)
        await member.disconnect()
        await until(lambda: subscribers(1), "b to stop hearing the room", timeout=10)

        # A member connecting makes its instance follow the member's rooms before the
        # session starts: room:activity reaches it without a join.
        member = await ChatClient(member_id).connect(b.url)
        assert await subscribers(2)
        await sender.call("message:send", {"room": room, "text": "late", "client_id": "t"})
        [activity] = await member.wait_for("room:activity")
        assert activity["room"] == room and activity["last_seq"] == 22
        await member.disconnect()
    finally:
        await sender.disconnect()
        await probe.aclose()


async def test_a_member_added_through_another_instance_gets_room_activity(pair, uid):
    (a, b), _ = pair
    room, owner_id, member_id = uid("priv"), uid("o"), uid("m")
    owner = await ChatClient(owner_id).connect(a.url)
    member = await ChatClient(member_id).connect(b.url)  # before it is a member
    try:
        created = await owner.call("room:create", {"room": room, "private": True})
        assert created["ok"], created
        assert (await owner.call("room:join", {"room": room}))["ok"]
        added = await owner.call("room:members:add", {"room": room, "users": [member_id]})
        assert added["ok"], added

        async def activity_arrives() -> bool:  # b follows once the control event is in
            await owner.call("message:send", {"room": room, "text": "hello", "client_id": uid("c")})
            await asyncio.sleep(0.3)
            return bool(member.events["room:activity"])

        await until(activity_arrives, "room:activity on the other instance", timeout=10)
        assert member.events["room:activity"][0]["room"] == room
    finally:
        await owner.disconnect()
        await member.disconnect()
