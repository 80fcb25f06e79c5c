"""What the services need from the outside world, as small protocols.

The transport implements ``Fanout`` and ``PresenceAnnouncer`` (Socket.IO rooms across
instances); the inter-instance bus implements ``SeqAllocator`` (Redis INCR). Services
import these protocols, never the implementations.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from server.presence.base import Transition


class Notice(NamedTuple):
    """``event`` with ``data`` for the connections of ``users`` that have not joined a room."""

    users: list[str]
    event: str
    data: dict


class Fanout(Protocol):
    """Delivers an event to every socket joined to a room, on every instance."""

    async def to_room(
        self,
        room_id: str,
        event: str,
        data: dict,
        skip_sid: str | None = None,
        outside: Notice | None = None,
    ) -> None:
        """``event`` to the room's joined sockets but ``skip_sid``; with ``outside``, also
        its notice to the listed users' connections that have not joined the room, in the
        same delivery to each instance."""

    async def to_users(self, user_ids: list[str], event: str, data: dict) -> None:
        """Every connection of each of ``user_ids``, on every instance, joined or not."""


class PresenceAnnouncer(Protocol):
    """Tells every socket that follows a user about that user's transition."""

    async def announce(self, transition: Transition) -> None: ...


class SeqAllocator(Protocol):
    """Hands out a room's next seq outside the store (e.g. Redis INCR)."""

    async def next(self, room_id: str) -> int: ...

    async def advance(self, room_id: str, at_least: int) -> None:
        """Make sure the next value handed out is above ``at_least``."""


class ControlPublisher(Protocol):
    """Sends a control event to every instance (this one included), never to a client."""

    async def control(self, name: str, data: dict) -> None: ...


class Sessions(Protocol):
    """Acts on users' live sockets on every instance."""

    async def evict(self, room_id: str, user_ids: list[str]) -> None: ...

    async def disconnect_user(
        self, user_id: str, reason: str, issued_before: float | None = None
    ) -> None: ...
