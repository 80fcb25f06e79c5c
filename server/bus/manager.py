"""The base of every Socket.IO client manager of ours: control events, and one instance.

Besides emits to clients, instances exchange *control events*: emits whose name starts
with ``$chat:``. They travel through the same manager (so the same Redis channel or
shard) and are consumed by :class:`ControlEvents` on every instance, never sent to a
client. ``$chat:evict`` makes a user's sockets leave a room wherever they are connected.

The managers: :class:`LocalManager` (one instance, here), ``redis_manager.RedisManager``
(one Redis: standalone, TLS, Sentinel) and ``cluster_manager.RedisClusterManager``
(Redis Cluster).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import socketio
import structlog

from server.bus.ledger import DeliveryLedger
from server.core import metrics

log = structlog.get_logger(__name__)

CONTROL_PREFIX = "$chat:"
ControlHandler = Callable[[str, dict], Awaitable[None]]


class ControlEvents(socketio.AsyncManager):
    """Takes control events on their way to this instance's clients.

    Each instance handles each control event once (a failing handler is logged, never
    raised), and no client ever receives one. ``message:new`` deliveries to local
    sockets are counted in ``chat_messages_delivered_total``; with a ``ledger``, each
    message reaches them once, however it arrives (live, or caught up after a lost
    subscription: ``server/bus/ledger.py``).
    """

    control_handler: ControlHandler | None = None
    ledger: DeliveryLedger | None = None

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> Any:
        if isinstance(event, str) and event.startswith(CONTROL_PREFIX):
            if self.control_handler is not None and isinstance(data, dict):
                try:
                    await self.control_handler(event[len(CONTROL_PREFIX) :], data)
                except Exception:
                    log.exception("bus.control_event_failed", control_event=event)
            return None
        if event == "message:new" and self.ledger is not None and isinstance(data, dict):
            room_id, seq = data.get("room"), data.get("seq")
            if (
                isinstance(room_id, str)
                and isinstance(seq, int)
                and not self.ledger.first_delivery(room_id, seq)
            ):
                metrics.DUPLICATES_SKIPPED.inc()
                return 0
        delivered = await super().emit(
            event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, to=to, **kwargs
        )
        if event == "message:new":
            if delivered is None:  # the emit path tells how many sockets it reached, or not
                delivered = self._local_count(namespace, to or room, skip_sid)
            metrics.MESSAGES_DELIVERED.inc(delivered)
        return delivered

    def _local_count(self, namespace: str, room: str | None, skip_sid: Any) -> int:
        skip = set(skip_sid) if isinstance(skip_sid, list | tuple | set) else {skip_sid}
        try:
            return sum(1 for sid, _ in self.get_participants(namespace, room) if sid not in skip)
        except Exception:  # an unknown room has no participants
            return 0


class LocalManager(ControlEvents):
    """One instance: rooms and control events stay in this process."""
