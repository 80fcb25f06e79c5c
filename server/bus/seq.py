"""Per-room seq allocation with Redis INCR, for stores that cannot allocate cheaply.

The counter ``seq:<room>`` is seeded from the store's highest seq when it is missing
(first use, Redis restart, eviction), so a lost counter never hands out a seq again; and
when the store reports a taken seq (a failover lost the latest increments) the counter is
moved past the stored maximum. These are the only keys without a TTL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from server.bus.connection import RedisClient
from server.bus.keys import Keys
from server.core import metrics

INCR_IF_SEEDED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('INCR', KEYS[1])
"""

SEED_AND_INCR = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return redis.call('INCR', KEYS[1])
"""

ADVANCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


class RedisSeqAllocator:
    def __init__(
        self, redis: RedisClient, keys: Keys, stored_max: Callable[[str], Awaitable[int]]
    ) -> None:
        self.keys = keys
        self.stored_max = stored_max
        self._incr = redis.register_script(INCR_IF_SEEDED)
        self._seed = redis.register_script(SEED_AND_INCR)
        self._advance = redis.register_script(ADVANCE)

    async def next(self, room_id: str) -> int:
        key = self.keys.seq(room_id)
        with metrics.timed(metrics.REDIS_LATENCY, "seq_incr"):
            value = int(await self._incr(keys=[key]))
        if value >= 0:
            return value
        return int(await self._seed(keys=[key], args=[await self.stored_max(room_id)]))

    async def advance(self, room_id: str, at_least: int) -> None:
        await self._advance(keys=[self.keys.seq(room_id)], args=[at_least])
