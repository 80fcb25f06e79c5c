"""Presence as clients see it: states with last_seen, and each transition announced once.

The exactly-once decisions live in the presence backend (``server/presence``); this
service adds what the product needs around them: ``last_seen`` kept in the store when a
user goes offline, the store's ``last_seen`` for users no backend remembers, and the
announcement to followers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from server.core.models import iso
from server.presence.base import Presence, Transition, TransitionHandler
from server.services.ports import PresenceAnnouncer
from server.store.base import Store

log = structlog.get_logger(__name__)


class PresenceService:
    """Connects and disconnects sockets, answers states, announces transitions.

    ``make_backend`` receives this service's transition handler, so the backend that
    decides transitions reports them here and nowhere else.
    """

    def __init__(
        self,
        make_backend: Callable[[TransitionHandler], Presence],
        store: Store,
        announcer: PresenceAnnouncer,
        on_change: Callable[[Transition], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.announcer = announcer
        #: told every transition once, cluster-wide (webhooks)
        self.on_change = on_change
        self.backend = make_backend(self.on_transition)

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        await self.backend.close()

    async def connect(self, user_id: str, conn_id: str) -> None:
        await self.backend.connect(user_id, conn_id)

    async def disconnect(self, user_id: str, conn_id: str) -> None:
        await self.backend.disconnect(user_id, conn_id)

    async def connection_count(self, user_id: str) -> int:
        return await self.backend.connection_count(user_id)

    async def online_users(self) -> int:
        return await self.backend.online_users()

    async def on_transition(self, transition: Transition) -> None:
        """Remember ``last_seen`` of a user gone offline (best effort), then tell followers."""
        if transition.status == "offline" and transition.last_seen is not None:
            try:
                await self.store.set_last_seen(transition.user_id, transition.last_seen)
            except Exception as exc:
                log.warning(
                    "presence.last_seen_not_stored", user=transition.user_id, error=str(exc)
                )
        await self.announcer.announce(transition)
        if self.on_change is not None:
            try:
                await self.on_change(transition)
            except Exception as exc:
                log.warning("presence.observer_failed", user=transition.user_id, error=str(exc))

    async def statuses(self, user_ids: list[str]) -> dict[str, str]:
        """``{id: "online"|"offline"}`` from the presence backend alone (no store read)."""
        states = await self.backend.states(user_ids)
        return {uid: state.status for uid, state in states.items()}

    async def states(self, user_ids: list[str]) -> dict[str, dict]:
        """``{id: {status, last_seen}}``; offline users without a live last_seen use the store's."""
        states = await self.backend.states(user_ids)
        unknown = [
            uid for uid, s in states.items() if s.status == "offline" and s.last_seen is None
        ]
        records = await self.store.get_users(unknown) if unknown else {}
        result = {}
        for uid, state in states.items():
            last_seen = state.last_seen or (records[uid].last_seen if uid in records else None)
            result[uid] = {"status": state.status, "last_seen": iso(last_seen)}
        return result
