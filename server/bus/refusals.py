"""The refused-attempt limiter shared by every instance through Redis.

Each key counts refused attempts in fixed windows (``{P rl:<key>}:<window>``, one hash
tag per key so both windows answer one MGET on Redis Cluster too) that expire after two
windows; the two latest are weighted into a sliding count as the local counter does. The
local counter keeps counting beside Redis: it answers first (an address blocked here
costs no round trip) and alone while Redis does not answer, so an outage never turns the
limiter off.
"""

from __future__ import annotations

import time

import structlog

from server.bus.connection import RedisClient
from server.bus.keys import Keys
from server.core import metrics
from server.core.refusals import RefusalCounter, sliding

log = structlog.get_logger(__name__)


class RedisRefusals:
    def __init__(
        self, redis: RedisClient, keys: Keys, local: RefusalCounter, window: float
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.local = local
        self.window = window
        self._ttl_ms = int(window * 2000)
        self._failing = False

    def _position(self) -> tuple[int, float]:
        at = time.time() / self.window
        return int(at), at - int(at)

    async def blocked(self, key: str) -> bool:
        if self.local.blocked(key):
            return True
        index, into = self._position()
        try:
            with metrics.timed(metrics.REDIS_LATENCY, "refusals_get"):
                previous, current = await self.redis.mget(
                    self.keys.refused(key, index - 1), self.keys.refused(key, index)
                )
        except Exception as exc:
            self._failed(exc)
            return False
        self._failing = False
        return sliding(int(previous or 0), int(current or 0), into) >= self.local.limit

    async def record(self, key: str) -> None:
        self.local.record(key)
        index, _ = self._position()
        name = self.keys.refused(key, index)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(name)
                pipe.pexpire(name, self._ttl_ms)
                await pipe.execute()
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if not self._failing:
            log.warning(
                "refusals.redis_unavailable",
                error=str(exc),
                hint="refused attempts are counted per instance until Redis answers",
            )
        self._failing = True
