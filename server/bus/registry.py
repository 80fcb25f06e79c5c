"""Instance registry: heartbeats, live members and their figures, dead-member claims.

A *member* is one process: the instance itself, or one worker of ``uvicorn --workers N``
(``<INSTANCE_ID>/p<pid>``, server/core/workers.py). Each member writes ``info:<member>``
(expires after 3 heartbeats) and its score in ``all`` every ``WS_HEARTBEAT_INTERVAL``. A
member whose score is older than three intervals is dead; exactly one live member claims
it (ZREM wins once) and reaps its connections through presence. So a SIGKILLed worker is
reaped like a lost machine, while its siblings carry on.

``owner:<INSTANCE_ID>`` holds the instance's owner token (host and supervisor pid): the
workers of one instance share it, and a process elsewhere that claims the same
``INSTANCE_ID`` is refused (:class:`DuplicateInstance`) while it is held.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

from server.bus.connection import RedisClient
from server.bus.keys import Keys

MISSED_HEARTBEATS = 3
# Scripts touch keys of the ``{P:instances}`` tag only, so they work on Redis Cluster.
REGISTER = """
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[7] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 and ARGV[4] == '1' then return 0 end
redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local added = redis.call('ZADD', KEYS[1], ARGV[1], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
if added == 1 and ARGV[4] == '0' then return 2 end
return 1
"""
DEREGISTER = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[3]) == ARGV[2] then redis.call('DEL', KEYS[3]) end
return 1
"""


class DuplicateInstance(Exception):
    """Another live instance already holds this INSTANCE_ID."""


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    id: str
    connections: int
    started_at: float
    heartbeat_at: float
    instance: str = ""


class InstanceRegistry:
    """``instance_id`` is this member's id; ``instance`` the ``INSTANCE_ID`` it belongs to
    (the same when the instance runs one process) and ``owner`` the token its workers share.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        instance_id: str,
        interval: float,
        instance: str | None = None,
        owner: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.instance_id = instance_id
        self.instance = instance or instance_id
        self.owner = owner or instance_id
        self.interval = interval
        self.started_at = time.time()
        self._register = redis.register_script(REGISTER)
        self._deregister = redis.register_script(DEREGISTER)

    @property
    def dead_after_ms(self) -> int:
        return int(self.interval * MISSED_HEARTBEATS * 1000)

    @property
    def keep_ms(self) -> int:
        """How long registry keys outlive the last heartbeat (long enough to be reaped)."""
        return max(3_600_000, self.dead_after_ms * 20)

    async def heartbeat(self, connections: int, first: bool = False) -> bool:
        """Write this instance's heartbeat; True when Redis had lost track of it.

        Lost track means Redis lost its data or another instance reaped this one (it
        missed heartbeats); the caller must then re-register its live connections.
        """
        now = time.time()
        info = json.dumps(
            {
                "id": self.instance_id,
                "instance": self.instance,
                "connections": connections,
                "started_at": self.started_at,
                "heartbeat_at": now,
            }
        )
        ok = await self._register(
            keys=[
                self.keys.instances,
                self.keys.instance_info(self.instance_id),
                self.keys.instance_owner(self.instance),
            ],
            args=[
                int(now * 1000),
                info,
                self.dead_after_ms,
                "1" if first else "0",
                self.instance_id,
                self.keep_ms,
                self.owner,
            ],
        )
        if not ok:
            raise DuplicateInstance(
                f"another live instance holds INSTANCE_ID={self.instance!r}; give each instance "
                f"its own id (or leave INSTANCE_ID empty), or wait {self.dead_after_ms / 1000:.0f}s "
                "for the old one to expire"
            )
        return ok == 2

    async def deregister(self) -> None:
        """Leave the registry; the owner key goes too unless a sibling worker holds it on."""
        await self._deregister(
            keys=[
                self.keys.instances,
                self.keys.instance_info(self.instance_id),
                self.keys.instance_owner(self.instance),
            ],
            args=[self.instance_id, self.owner],
        )

    async def live(self) -> list[InstanceInfo]:
        cutoff = int(time.time() * 1000) - self.dead_after_ms
        # the client decodes replies (decode_responses=True); redis-py's types cannot know
        ids = cast(list[str], await self.redis.zrangebyscore(self.keys.instances, cutoff, "+inf"))
        result = []
        for instance_id in ids:
            raw = await self.redis.get(self.keys.instance_info(instance_id))
            if raw:
                data = json.loads(raw)
                result.append(
                    InstanceInfo(
                        instance_id,
                        int(data["connections"]),
                        float(data["started_at"]),
                        float(data["heartbeat_at"]),
                        str(data.get("instance") or instance_id),
                    )
                )
        return result

    async def claim_dead(self) -> list[str]:
        """Ids of instances that stopped heartbeating; each is returned to exactly one caller."""
        cutoff = int(time.time() * 1000) - self.dead_after_ms
        # the client decodes replies (decode_responses=True); redis-py's types cannot know
        stale = cast(
            list[str],
            await self.redis.zrangebyscore(
                self.keys.instances, "-inf", f"({cutoff}", start=0, num=20
            ),
        )
        claimed = []
        for instance_id in stale:
            if instance_id != self.instance_id and await self.redis.zrem(
                self.keys.instances, instance_id
            ):
                claimed.append(instance_id)
        return claimed
