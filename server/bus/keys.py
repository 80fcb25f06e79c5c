"""The Redis key schema, in one place. Every key starts with ``REDIS_KEY_PREFIX``.

Keys a Lua script touches together share a hash tag (``{...}``) so that they live in one
Redis Cluster slot. Presence is spread over ``PRESENCE_BUCKETS`` tags by user id.

==============================  =========  ===========================================
key                             type       holds
==============================  =========  ===========================================
{P:instances}:all               zset       member id → last heartbeat (ms)
{P:instances}:info:<id>         string     JSON of the member (instance, connections, started)
{P:instances}:conns:<id>        hash       connection id → user id, per instance
{P:instances}:owner:<INSTANCE>  string     owner token (host:supervisor pid) of an INSTANCE_ID
{Pp<b>}:online                  hash       user id → live connection count
{Pp<b>}:grace                   zset       user id → grace deadline (ms)
{Pp<b>}:seen                    hash       user id → last_seen (ISO 8601)
{Prl:<ip>}:<window>             string     refused connection attempts (TTL 2 windows)
seq:<room>                      string     the room's last allocated seq (TTL SEQ_KEY_TTL, refreshed on use)
==============================  =========  ===========================================

(``P`` is the prefix.) Every key has a TTL: live instances keep refreshing the presence and
instance keys, and each use of a room's ``seq:<room>`` refreshes its own; what eviction of
each kind does is in docs/redis.md.
"""

from __future__ import annotations

import zlib

PRESENCE_BUCKETS = 16


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        tag = f"{{{prefix}instances}}"
        self.instances = f"{tag}:all"
        self._info = f"{tag}:info:"
        self._conns = f"{tag}:conns:"
        self._owner = f"{tag}:owner:"

    def instance_info(self, instance_id: str) -> str:
        return self._info + instance_id

    def instance_owner(self, instance: str) -> str:
        return self._owner + instance

    def instance_conns(self, instance_id: str) -> str:
        return self._conns + instance_id

    @staticmethod
    def bucket(user_id: str) -> int:
        return zlib.crc32(user_id.encode()) % PRESENCE_BUCKETS

    def presence(self, bucket: int) -> tuple[str, str, str]:
        """(online, grace, seen) keys of one presence bucket."""
        tag = f"{{{self.prefix}p{bucket}}}"
        return f"{tag}:online", f"{tag}:grace", f"{tag}:seen"

    def presence_of(self, user_id: str) -> tuple[str, str, str]:
        return self.presence(self.bucket(user_id))

    def refused(self, limit_key: str, window: int) -> str:
        """Refused connection attempts of one address in one window (``server/bus/refusals.py``)."""
        return f"{{{self.prefix}rl:{limit_key}}}:{window}"

    def seq(self, room_id: str) -> str:
        return f"{self.prefix}seq:{room_id}"
