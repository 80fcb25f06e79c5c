"""Presence across instances: counts, grace deadlines and decisions in Redis, made by Lua.

* ``connect``: the user's connection count goes up and any grace deadline is dropped in
  one script; only the call that finds the user neither counted nor in grace announces
  ``online``.
* ``disconnect``: the count goes down; at zero the user gets a grace deadline.
* A sweeper on every instance expires due deadlines; the script that removes a deadline
  (ZREM) succeeds for exactly one caller, which announces ``offline``. So the instance that
  started a grace period need not be alive to finish it.
* Heartbeats: every instance registers itself each ``WS_HEARTBEAT_INTERVAL``; one that
  misses three is claimed by one live instance, which closes its connections (their grace
  then runs as usual).
* During a Redis outage calls fail; they are kept in order and replayed when Redis answers,
  and an instance that Redis lost track of re-registers its live connections.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import datetime
from typing import cast

import structlog

from server.bus.connection import RedisClient
from server.bus.keys import PRESENCE_BUCKETS, Keys
from server.bus.registry import InstanceRegistry
from server.core import metrics
from server.core.locks import KeyedLock
from server.core.models import iso, parse_iso, utcnow
from server.presence.base import Presence, PresenceState, Transition, TransitionHandler

log = structlog.get_logger(__name__)

CONNECT = """
local count = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local in_grace = redis.call('ZREM', KEYS[2], ARGV[1])
if count == 1 and in_grace == 0 then return 1 end
return 0
"""

DISCONNECT = """
local count = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if count <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  return 1
end
return 0
"""

EXPIRE_GRACE = """
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not deadline or tonumber(deadline) > tonumber(ARGV[2]) then return false end
redis.call('ZREM', KEYS[2], ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') > 0 then return false end
return redis.call('HGET', KEYS[3], ARGV[1]) or ''
"""


class RedisPresence(Presence):
    def __init__(
        self,
        grace: float,
        on_transition: TransitionHandler,
        redis: RedisClient,
        keys: Keys,
        registry: InstanceRegistry,
    ) -> None:
        super().__init__(grace, on_transition)
        self.redis = redis
        self.keys = keys
        self.registry = registry
        self.instance_id = registry.instance_id
        self.local: dict[str, str] = {}  # connection id -> user id, on this instance
        self._backlog: deque[tuple[str, str, str, datetime]] = deque()
        self._connect = redis.register_script(CONNECT)
        self._disconnect = redis.register_script(DISCONNECT)
        self._expire = redis.register_script(EXPIRE_GRACE)
        self._tasks: list[asyncio.Task] = []
        self._closing = asyncio.Event()
        self._locks = KeyedLock()  # a user's changes on this instance run in order
        self.redis_ok = True

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.registry.heartbeat(0, first=True)
        await self._refresh_ttls()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeats()), loop.create_task(self._sweeps())]

    async def close(self) -> None:
        """Stop the heartbeats and sweeps; returns once both loops have ended.

        The loops also end on ``_closing``: redis-py can swallow a cancellation that lands
        inside a command (https://github.com/redis/redis-py/issues/2028), and a loop that
        ate its cancellation would otherwise keep the caller waiting forever.
        """
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False (at once) when the presence is closing."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return True
        return False

    # --- connections ------------------------------------------------------------------------
    async def connect(self, user_id: str, conn_id: str) -> None:
        self.local[conn_id] = user_id
        await self._apply("connect", user_id, conn_id, utcnow())

    async def disconnect(self, user_id: str, conn_id: str) -> None:
        if self.local.pop(conn_id, None) is None:
            return
        await self._apply("disconnect", user_id, conn_id, utcnow())

    async def _apply(self, op: str, user_id: str, conn_id: str, when: datetime) -> None:
        """Run ``op`` now, or queue it behind earlier failed ones (order matters)."""
        if self._backlog:
            self._backlog.append((op, user_id, conn_id, when))
            return
        try:
            await self._run(op, user_id, conn_id, when)
        except Exception as exc:
            self._note_failure(exc)
            self._backlog.append((op, user_id, conn_id, when))

    async def _run(self, op: str, user_id: str, conn_id: str, when: datetime) -> None:
        """One user's changes run one at a time, so a disconnect never overtakes its connect."""
        async with self._locks.hold(user_id):
            with metrics.timed(metrics.REDIS_LATENCY, f"presence_{op}"):
                await self._run_unlocked(op, user_id, conn_id, when)

    async def _run_unlocked(self, op: str, user_id: str, conn_id: str, when: datetime) -> None:
        online, grace, seen = self.keys.presence_of(user_id)
        conns = self.keys.instance_conns(self.instance_id)
        if op == "connect":
            await self.redis.hset(conns, conn_id, user_id)
            if await self._connect(keys=[online, grace], args=[user_id]):
                await self.on_transition(Transition(user_id, "online", None))
        else:
            await self.redis.hdel(conns, conn_id)
            deadline = int((when.timestamp() + self.grace) * 1000)
            await self._disconnect(keys=[online, grace, seen], args=[user_id, deadline, iso(when)])

    def _note_failure(self, exc: Exception) -> None:
        if self.redis_ok:
            log.error(
                "presence.redis_unavailable",
                error=str(exc),
                hint="presence changes are queued and replayed when Redis answers",
            )
        self.redis_ok = False

    async def _flush_backlog(self) -> None:
        while self._backlog:
            op, user_id, conn_id, when = self._backlog[0]
            await self._run(op, user_id, conn_id, when)
            self._backlog.popleft()

    # --- background work --------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        while await self._pause(self.registry.interval):
            try:
                await self._flush_backlog()
                if await self.registry.heartbeat(len(self.local)):
                    await self._resync()
                await self._refresh_ttls()
                for dead in await self.registry.claim_dead():
                    await self._reap(dead)
                if not self.redis_ok:
                    log.info("presence.redis_recovered")
                self.redis_ok = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._note_failure(exc)

    async def _sweeps(self) -> None:
        period = min(0.5, max(0.05, self.grace / 4))
        while await self._pause(period):
            try:
                await self.expire_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._note_failure(exc)

    async def expire_due(self) -> None:
        """Finish every grace period that is due; each one is announced by one instance only."""
        now = int(time.time() * 1000)
        for bucket in range(PRESENCE_BUCKETS):
            online, grace, seen = self.keys.presence(bucket)
            # the client decodes replies (decode_responses=True); redis-py's types cannot know
            due = cast(
                list[str], await self.redis.zrangebyscore(grace, "-inf", now, start=0, num=200)
            )
            for user_id in due:
                last_seen = await self._expire(keys=[online, grace, seen], args=[user_id, now])
                if last_seen is None:
                    continue
                try:
                    await self.on_transition(Transition(user_id, "offline", parse_iso(last_seen)))
                except Exception:
                    log.exception("presence.offline_announce_failed", user=user_id)

    async def _reap(self, instance_id: str) -> None:
        """Close the connections of an instance that stopped heartbeating."""
        conns_key = self.keys.instance_conns(instance_id)
        # the client decodes replies (decode_responses=True); redis-py's types cannot know
        conns = cast(dict[str, str], await self.redis.hgetall(conns_key))
        now = utcnow()
        deadline = int((now.timestamp() + self.grace) * 1000)
        for user_id in conns.values():
            online, grace, seen = self.keys.presence_of(user_id)
            await self._disconnect(keys=[online, grace, seen], args=[user_id, deadline, iso(now)])
        await self.redis.delete(conns_key, self.keys.instance_info(instance_id))
        log.warning("presence.instance_reaped", dead_instance=instance_id, connections=len(conns))

    async def _resync(self) -> None:
        """Redis lost track of this instance: count its live connections again."""
        log.warning("presence.resync", connections=len(self.local))
        await self.redis.delete(self.keys.instance_conns(self.instance_id))
        for conn_id, user_id in list(self.local.items()):
            await self._run("connect", user_id, conn_id, utcnow())

    async def _refresh_ttls(self) -> None:
        keep = self.registry.keep_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.pexpire(self.keys.instance_conns(self.instance_id), keep)
            for bucket in range(PRESENCE_BUCKETS):
                for key in self.keys.presence(bucket):
                    pipe.pexpire(key, keep)
            await pipe.execute()

    # --- queries ----------------------------------------------------------------------------
    async def states(self, user_ids: list[str]) -> dict[str, PresenceState]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                online, grace, seen = self.keys.presence_of(user_id)
                pipe.hget(online, user_id)
                pipe.zscore(grace, user_id)
                pipe.hget(seen, user_id)
            replies = await pipe.execute()
        result = {}
        for index, user_id in enumerate(user_ids):
            count, deadline, seen = replies[3 * index : 3 * index + 3]
            is_online = int(count or 0) > 0 or deadline is not None
            result[user_id] = PresenceState(
                "online" if is_online else "offline", None if is_online else parse_iso(seen)
            )
        return result

    async def connection_count(self, user_id: str) -> int:
        """The cluster-wide count the CONNECT and DISCONNECT scripts keep."""
        online, _, _ = self.keys.presence_of(user_id)
        with metrics.timed(metrics.REDIS_LATENCY, "presence_count"):
            return int(await self.redis.hget(online, user_id) or 0)

    async def online_users(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in range(PRESENCE_BUCKETS):
                online, grace, _ = self.keys.presence(bucket)
                pipe.hlen(online)
                pipe.zcard(grace)
            return sum(await pipe.execute())
