"""Socket.IO client managers: in-process, or across instances through Redis pub/sub.

Besides emits to clients, instances exchange *control events*: emits whose name starts
with ``$chat:``. They travel through the same manager (so the same Redis channel or
shards) and are consumed by :class:`ControlEvents` on every instance, never sent to a
client. ``$chat:evict`` makes a user's sockets leave a room wherever they are connected.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import socketio
import structlog

from server.core import metrics

log = structlog.get_logger(__name__)

CONTROL_PREFIX = "$chat:"
ControlHandler = Callable[[str, dict], Awaitable[None]]


class ControlEvents(socketio.AsyncManager):
    """Intercepts control events on their way to local clients (every instance sees each once)."""

    control_handler: ControlHandler | None = None

    async def emit(
        self, event, data, namespace, room=None, skip_sid=None, callback=None, to=None, **kwargs
    ):
        if isinstance(event, str) and event.startswith(CONTROL_PREFIX):
            if self.control_handler is not None and isinstance(data, dict):
                try:
                    await self.control_handler(event[len(CONTROL_PREFIX) :], data)
                except Exception:
                    log.exception("cluster.control_event_failed", control_event=event)
            return None
        delivered = await super().emit(
            event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, to=to, **kwargs
        )
        if event == "message:new":
            if delivered is None:  # the emit path tells how many sockets it reached, or not
                delivered = self._local_count(namespace, to or room, skip_sid)
            metrics.MESSAGES_DELIVERED.inc(delivered)
        return delivered

    def _local_count(self, namespace: str, room: str | None, skip_sid) -> int:
        skip = set(skip_sid) if isinstance(skip_sid, list | tuple | set) else {skip_sid}
        try:
            return sum(1 for sid, _ in self.get_participants(namespace, room) if sid not in skip)
        except Exception:  # an unknown room has no participants
            return 0


class LocalManager(ControlEvents):
    """One instance: rooms and control events stay in this process."""


class RedisManager(socketio.AsyncRedisManager, ControlEvents):
    """Many instances on one Redis (plain pub/sub: standalone, TLS, Sentinel)."""
