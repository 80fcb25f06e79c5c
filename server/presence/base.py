"""The presence interface: who is online, announced exactly once per transition.

A user is online while at least one connection of theirs exists. When the last one closes
the user stays online for ``grace`` seconds; a connection that returns inside the grace
period cancels it silently. Implementations: ``memory.py`` (one instance) and
``redis.py`` (every instance sharing one Redis, decisions made atomically there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Status = Literal["online", "offline"]


@dataclass(frozen=True, slots=True)
class PresenceState:
    status: Status
    last_seen: datetime | None


@dataclass(frozen=True, slots=True)
class Transition:
    """A user went online or offline.

    ``last_seen`` is when the user's last connection closed, on ``offline``; it is None on
    ``online`` (the protocol's ``last_seen`` is null while a user is online).
    """

    user_id: str
    status: Status
    last_seen: datetime | None


TransitionHandler = Callable[[Transition], Awaitable[None]]


class Presence(ABC):
    """Connection bookkeeping that emits :class:`Transition` through ``on_transition``."""

    def __init__(self, grace: float, on_transition: TransitionHandler) -> None:
        self.grace = grace
        self.on_transition = on_transition

    async def start(self) -> None:
        """Start background work (grace timers, sweeps)."""

    async def close(self) -> None:
        """Stop background work; connections are left to the grace logic of the other instances."""

    @abstractmethod
    async def connect(self, user_id: str, conn_id: str) -> None:
        """Record a live connection; announces ``online`` if the user was offline."""

    @abstractmethod
    async def disconnect(self, user_id: str, conn_id: str) -> None:
        """Forget a connection; the user's last one starts the grace period."""

    @abstractmethod
    async def states(self, user_ids: list[str]) -> dict[str, PresenceState]:
        """Current state of each user (offline users keep the last_seen known here)."""

    @abstractmethod
    async def connection_count(self, user_id: str) -> int:
        """The user's live connections (on every instance the backend sees)."""

    @abstractmethod
    async def online_users(self) -> int:
        """How many users are online (grace periods included)."""
