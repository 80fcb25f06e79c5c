"""Publishes made together go to Redis together: one pipeline, one connection, call order."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from server.bus.pipeline import Batcher
from server.bus.redis_manager import RedisManager


async def test_calls_made_during_a_batch_go_together_in_the_next_one_in_order():
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[object]:
        batches.append(items)
        if len(batches) == 1:
            await release.wait()  # the first batch is in flight while the rest are called
        return [item * 10 for item in items]

    batcher: Batcher[int] = Batcher(run, "test")
    first = asyncio.create_task(batcher.call(0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.call(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
    assert batches == [[0], [1, 2, 3, 4, 5]]


async def test_a_failed_batch_fails_each_call_and_the_next_batch_runs():
    calls = 0

    async def run(items: list[str]) -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("link down")
        return [ValueError(item) if item == "bad" else item.upper() for item in items]

    batcher: Batcher[str] = Batcher(run, "test")
    with pytest.raises(ConnectionError):
        await batcher.call("lost")
    results = await asyncio.gather(
        batcher.call("a"), batcher.call("bad"), batcher.call("b"), return_exceptions=True
    )
    assert results[0] == "A" and results[2] == "B"
    assert isinstance(results[1], ValueError)


async def test_a_caller_that_gives_up_does_not_stop_its_batch():
    done: list[list[int]] = []

    async def run(items: list[int]) -> list[object]:
        await asyncio.sleep(0.05)
        done.append(items)
        return items

    batcher: Batcher[int] = Batcher(run, "test")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await batcher.call(1)
    assert await batcher.call(2) == 2
    assert done == [[1], [2]]


async def test_a_burst_of_publishes_uses_one_connection_and_keeps_its_order(redis_url):
    channel, name = f"test-batches-{uuid.uuid4().hex}", f"pub-{uuid.uuid4().hex[:12]}"
    listener = aioredis.Redis.from_url(redis_url)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    manager = RedisManager(
        redis_url,
        channel=channel,
        redis_options={"socket_timeout": 10, "max_connections": 50, "client_name": name},
    )
    manager._redis_connect()
    try:
        sent = 500
        await asyncio.gather(*(manager._publish({"n": i}) for i in range(sent)))
        assert manager.delivery.publish_failures == 0
        clients = await listener.client_list()
        assert len([c for c in clients if c.get("name") == name]) == 1
        got: list[int] = []
        async with asyncio.timeout(10):
            while len(got) < sent:
                message = await pubsub.get_message(timeout=1)
                if message is not None:
                    got.append(manager.json.loads(message["data"])["n"])
        assert got == list(range(sent))
    finally:
        await manager.redis.aclose()
        await pubsub.aclose()
        await listener.aclose()
