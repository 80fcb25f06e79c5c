"""Bursts beyond the Redis pool's size wait for a connection instead of failing."""

from __future__ import annotations

import asyncio

from server.bus.connection import RedisConfig, create_redis
from server.bus.redis_manager import RedisManager


async def test_a_burst_of_state_commands_beyond_the_pool_all_succeed(redis_url):
    client = create_redis(RedisConfig(redis_url, redis_url, timeout=10, max_connections=4))
    try:
        # BLPOP holds a connection for its whole timeout: 40 of them need 10 rounds of 4.
        results = await asyncio.gather(
            *(client.blpop([f"test-pool-empty-{i}"], timeout=0.2) for i in range(40))
        )
        assert results == [None] * 40
    finally:
        await client.aclose()


async def test_a_burst_of_publishes_beyond_the_pool_is_not_dropped(redis_url):
    manager = RedisManager(
        redis_url,
        channel="test-pool-channel",
        redis_options={"socket_timeout": 10, "max_connections": 2},
    )
    manager._redis_connect()
    try:
        await asyncio.gather(*(manager._publish({"n": i}) for i in range(200)))
        assert manager.delivery.publish_failures == 0
    finally:
        await manager.redis.aclose()
