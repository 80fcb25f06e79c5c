"""Per-room seq allocation with Redis INCR, for stores that cannot allocate cheaply.

The counter ``seq:<room>`` is seeded from the store's highest seq when it is missing
(first use, Redis restart, eviction), so a lost counter never hands out a seq again; and
when the store reports a taken seq (a failover lost the latest increments) the counter is
moved past the stored maximum. Every use refreshes the key's TTL (``ttl`` seconds), so the
counters of rooms nobody writes to any more expire instead of piling up; an expired
counter is seeded again like a lost one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from server.bus.connection import RedisClient
from server.bus.keys import Keys
from server.core import metrics

INCR_IF_SEEDED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local value = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return value
"""

SEED_AND_INCR = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
local value = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return value
"""

ADVANCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class RedisSeqAllocator:
    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        stored_max: Callable[[str], Awaitable[int]],
        ttl: float = 30 * 86400,
    ) -> None:
        self.keys = keys
        self.ttl_ms = int(ttl * 1000)
        self.stored_max = stored_max
        self._incr = redis.register_script(INCR_IF_SEEDED)
        self._seed = redis.register_script(SEED_AND_INCR)
        self._advance = redis.register_script(ADVANCE)

    async def next(self, room_id: str) -> int:
        key = self.keys.seq(room_id)
        with metrics.timed(metrics.REDIS_LATENCY, "seq_incr"):
            value = int(await self._incr(keys=[key], args=[self.ttl_ms]))
        if value >= 0:
            return value
        stored = await self.stored_max(room_id)
        return int(await self._seed(keys=[key], args=[stored, self.ttl_ms]))

    async def advance(self, room_id: str, at_least: int) -> None:
        await self._advance(keys=[self.keys.seq(room_id)], args=[at_least, self.ttl_ms])
