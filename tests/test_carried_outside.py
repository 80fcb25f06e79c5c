"""A broadcast's room:activity travels in the broadcast's own pub/sub message (one per send)."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis
from socketio.async_pubsub_manager import AsyncPubSubManager

from server.bus.cluster_manager import RedisClusterManager
from server.bus.manager import OUTSIDE, CarriedOutside, ControlEvents, LocalManager
from server.bus.redis_manager import RedisManager

ACTIVITY = {"room": "r", "users": ["bob"], "event": "room:activity", "data": {"last_seq": 1}}


def test_the_managers_carry_it_above_upstreams_pubsub_emit():
    # Listed after AsyncPubSubManager, ControlEvents is the local delivery of every emit,
    # and CarriedOutside must come before both or the emit never reaches Redis.
    for manager in (RedisManager, RedisClusterManager):
        mro = manager.__mro__
        assert mro.index(CarriedOutside) < mro.index(AsyncPubSubManager) < mro.index(ControlEvents)


def recording(manager: ControlEvents) -> list[tuple[str, dict]]:
    seen: list[tuple[str, dict]] = []

    async def handler(name: str, data: dict) -> None:
        seen.append((name, data))

    manager.control_handler = handler
    return seen


async def test_one_instance_runs_it_after_the_local_emit():
    manager = LocalManager()
    seen = recording(manager)
    await manager.emit(
        "message:new", {"room": "r", "seq": 1}, "/chat", room="room:r", outside=ACTIVITY
    )
    assert seen == [(OUTSIDE, ACTIVITY)]


async def test_it_goes_in_the_same_publish_and_every_instance_runs_it_once(redis_url):
    channel = f"test-outside-{uuid.uuid4().hex}"
    listener = aioredis.Redis.from_url(redis_url)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    sender, receiver = (RedisManager(redis_url, channel=channel) for _ in range(2))
    sent_here, received_there = recording(sender), recording(receiver)
    sender._redis_connect()
    try:
        await sender.emit(
            "message:new", {"room": "r", "seq": 1}, "/chat", room="room:r", outside=ACTIVITY
        )
        assert sent_here == [(OUTSIDE, ACTIVITY)]  # this instance, at once
        published = []
        async with asyncio.timeout(10):
            while not published:
                message = await pubsub.get_message(timeout=1)
                if message is not None:
                    published.append(sender.json.loads(message["data"]))
        await asyncio.sleep(0.2)
        assert await pubsub.get_message(timeout=0.2) is None  # one publish, not two
        [carried] = published
        assert carried["event"] == "message:new" and carried[OUTSIDE] == ACTIVITY
        await receiver._handle_emit(carried)  # as the other instance's listener does
        assert received_there == [(OUTSIDE, ACTIVITY)]
    finally:
        await sender.redis.aclose()
        await pubsub.aclose()
        await listener.aclose()
