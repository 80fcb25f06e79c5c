"""Presence for one instance: dictionaries and one timer per user in grace."""

from __future__ import annotations

import asyncio
from datetime import datetime

import structlog

from server.core.models import utcnow
from server.presence.base import Presence, PresenceState, Transition, TransitionHandler

log = structlog.get_logger(__name__)


class MemoryPresence(Presence):
    def __init__(self, grace: float, on_transition: TransitionHandler) -> None:
        super().__init__(grace, on_transition)
        self._connections: dict[str, set[str]] = {}
        self._online: set[str] = set()
        self._last_seen: dict[str, datetime] = {}
        self._grace_timers: dict[str, asyncio.Task] = {}

    async def close(self) -> None:
        for timer in self._grace_timers.values():
            timer.cancel()
        self._grace_timers.clear()

    async def connect(self, user_id: str, conn_id: str) -> None:
        self._connections.setdefault(user_id, set()).add(conn_id)
        timer = self._grace_timers.pop(user_id, None)
        if timer is not None:
            timer.cancel()  # back inside the grace period: no event at all
            return
        if user_id not in self._online:
            self._online.add(user_id)
            await self.on_transition(Transition(user_id, "online", None))

    async def disconnect(self, user_id: str, conn_id: str) -> None:
        conns = self._connections.get(user_id)
        if conns is None:
            return
        conns.discard(conn_id)
        if conns:
            return
        del self._connections[user_id]
        self._last_seen[user_id] = utcnow()
        if user_id in self._online and user_id not in self._grace_timers:
            self._grace_timers[user_id] = asyncio.create_task(self._expire(user_id))

    async def _expire(self, user_id: str) -> None:
        await asyncio.sleep(self.grace)
        if self._grace_timers.get(user_id) is not asyncio.current_task():
            return
        del self._grace_timers[user_id]
        if user_id in self._connections:
            return
        self._online.discard(user_id)
        try:
            await self.on_transition(Transition(user_id, "offline", self._last_seen.get(user_id)))
        except Exception:
            log.exception("presence.offline_announce_failed", user=user_id)

    async def states(self, user_ids: list[str]) -> dict[str, PresenceState]:
        return {
            uid: PresenceState(
                "online" if uid in self._online else "offline",
                None if uid in self._online else self._last_seen.get(uid),
            )
            for uid in user_ids
        }

    async def connection_count(self, user_id: str) -> int:
        return len(self._connections.get(user_id, ()))

    async def online_users(self) -> int:
        return len(self._online)
