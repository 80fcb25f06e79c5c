"""Typing indicators end on the server: after a timeout, and on leave, disconnect or eviction.

A client that says ``typing: true`` and then vanishes (closed tab, lost network, removed
from the room) would otherwise leave everyone else seeing it type forever. Each
``(connection, room)`` that is typing holds one timer; the timer, ``room:leave``, the
disconnect and an eviction each end it with one ``typing: false`` to the room. A client's
own ``typing: false`` cancels the timer.
"""

from __future__ import annotations

import asyncio

import structlog

from server.core import metrics
from server.services.messages import MessageService
from server.transport.connections import Connection

log = structlog.get_logger(__name__)


class TypingTimers:
    def __init__(self, messages: MessageService, timeout: float) -> None:
        self.messages = messages
        self.timeout = timeout

    def started(self, conn: Connection, room_id: str) -> None:
        """``conn`` types in ``room_id``: (re)arm its timer."""
        self.cancel(conn, room_id)
        loop = asyncio.get_running_loop()
        conn.typing[room_id] = loop.call_later(
            self.timeout, lambda: loop.create_task(self.stop(conn, room_id, "timeout"))
        )

    def cancel(self, conn: Connection, room_id: str) -> bool:
        """Forget the timer (the client ended typing itself); True if there was one."""
        handle = conn.typing.pop(room_id, None)
        if handle is None:
            return False
        handle.cancel()
        return True

    async def stop(self, conn: Connection, room_id: str, why: str) -> None:
        """End ``conn``'s typing in ``room_id`` with ``typing: false``, if it was typing."""
        if not self.cancel(conn, room_id):
            return
        metrics.TYPING_EXPIRED.labels(why).inc()
        try:
            await self.messages.typing(conn.identity, conn.sid, room_id, False)
        except Exception as exc:
            log.warning("typing.stop_failed", room=room_id, error=str(exc))

    async def stop_all(self, conn: Connection, why: str) -> None:
        for room_id in list(conn.typing):
            await self.stop(conn, room_id, why)
