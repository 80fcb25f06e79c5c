"""The base of every Socket.IO client manager of ours: control events, and one instance.

Besides emits to clients, instances exchange *control events*: emits whose name starts
with ``$chat:``. They travel through the same manager (so the same Redis channel or
shard) and are consumed by :class:`ControlEvents` on every instance, never sent to a
client. ``$chat:evict`` makes a user's sockets leave a room wherever they are connected.

The managers: :class:`LocalManager` (one instance, here), ``redis_manager.RedisManager``
(one Redis: standalone, TLS, Sentinel) and ``cluster_manager.RedisClusterManager``
(Redis Cluster). The Redis managers carry each chat room's emits on a channel of its own,
which an instance hears only while it follows the room (``room_channels.py``).
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
#: the control event that delivers to the listed users' sockets outside a room; an emit
#: may carry one along (``emit(..., outside={...})``) instead of a publish of its own
OUTSIDE = "outside"
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
        outside = kwargs.pop("outside", None)
        if outside is not None:  # reaching here, it is delivered in this process only
            # ControlEvents' own emit, not self.emit: a pub/sub manager's would publish again
            delivered = await ControlEvents.emit(
                self, event, data, namespace, room, skip_sid, callback, to, **kwargs
            )
            await self.control(OUTSIDE, outside)
            return delivered
        if isinstance(event, str) and event.startswith(CONTROL_PREFIX):
            if isinstance(data, dict):
                await self.control(event[len(CONTROL_PREFIX) :], data)
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

    async def follow(self, rooms: list[str], wait: bool = True) -> None:
        """Hear the emits of Socket.IO ``rooms`` from every instance from now on (one
        instance: always; the Redis managers: ``server/bus/room_channels.py``, whose
        ``wait=False`` a control event's handler must pass)."""

    async def unfollow(self, rooms: list[str]) -> None:
        """The opposite of :meth:`follow`."""

    async def control(self, name: str, data: Any) -> None:
        """Hand control event ``name`` to this instance's handler; a failure is logged."""
        if self.control_handler is None or not isinstance(data, dict):
            return
        try:
            await self.control_handler(name, data)
        except Exception:
            log.exception("bus.control_event_failed", control_event=CONTROL_PREFIX + name)

    def _local_count(self, namespace: str, room: str | None, skip_sid: Any) -> int:
        skip = set(skip_sid) if isinstance(skip_sid, list | tuple | set) else {skip_sid}
        try:
            return sum(1 for sid, _ in self.get_participants(namespace, room) if sid not in skip)
        except Exception:  # an unknown room has no participants
            return 0


class LocalManager(ControlEvents):
    """One instance: rooms and control events stay in this process."""


class CarriedOutside:
    """Mixed in before python-socketio's ``AsyncPubSubManager``: an emit's ``outside``
    control event travels in the emit's own pub/sub message, so a message and its
    ``room:activity`` cost every instance one message to read, not two.

    Upstream's pub/sub ``emit`` has no room for an extra field, so the emit without
    callback is built here as upstream builds it (python-socketio 5.18.1), with the field
    ``outside`` added; each instance hands it to its control handler after the local
    emit. An instance of an earlier release ignores the field (it delivers the message, not
    the activity, during a rolling upgrade); the separate ``$chat:outside`` control event
    that earlier releases send is still understood.
    """

    # from the classes this is mixed with (python-socketio's AsyncPubSubManager, and
    # ControlEvents, which must come after it: the managers list this class first)
    host_id: str
    _publish: Callable[[dict], Awaitable[Any]]

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str | None = None,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> Any:
        outside = kwargs.pop("outside", None)
        if outside is None or callback is not None or kwargs.get("ignore_queue"):
            delivered = await super().emit(  # type: ignore[misc]
                event,
                data,
                namespace,
                room=room,
                skip_sid=skip_sid,
                callback=callback,
                to=to,
                **kwargs,
            )
            if outside is not None:  # not carried: this instance only
                await self.control(OUTSIDE, outside)  # type: ignore[attr-defined]
            return delivered
        message = {
            "method": "emit",
            "event": event,
            "data": list(data) if isinstance(data, tuple) else [data],
            "binary": False,  # the chat protocol carries JSON only
            "namespace": namespace or "/",
            "room": to or room,
            "skip_sid": skip_sid,
            "callback": None,
            "host_id": self.host_id,
            OUTSIDE: outside,
        }
        await self._handle_emit(message)  # this instance, then the others, as upstream
        await self._publish(message)
        return None

    async def _handle_emit(self, message: dict) -> None:
        await super()._handle_emit(message)  # type: ignore[misc]
        outside = message.get(OUTSIDE)
        if outside is not None:
            await self.control(OUTSIDE, outside)  # type: ignore[attr-defined]
