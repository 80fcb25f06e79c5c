"""Names of the Socket.IO rooms this server uses, and the namespace that holds them."""

from __future__ import annotations

NAMESPACE = "/chat"


def room_channel(room_id: str) -> str:
    """Every socket joined to chat room ``room_id``."""
    return f"room:{room_id}"


def user_channel(user_id: str) -> str:
    """Every socket of ``user_id``: eviction's index, and per-user events (mentions,
    room activity, read sync) emitted to it reach the user's sockets on every instance."""
    return f"user:{user_id}"


def presence_channel(user_id: str) -> str:
    """Every socket following ``user_id``'s presence."""
    return f"presence:{user_id}"
