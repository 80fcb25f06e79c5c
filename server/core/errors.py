"""Error codes of the contract and the exception that carries one to an ack."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "banned",
    "muted",
    "blocked",
    "rate_limited",
    "too_large",
    "unavailable",
    "internal",
]


class ChatError(Exception):
    """A request failed in a way the client should hear about: becomes `{ok: false, error}`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_ack(self) -> dict:
        return {"ok": False, "error": {"code": self.code, "message": self.message}}


class StoreUnavailable(Exception):
    """The store did not answer (timeout, outage); the caller may retry safely."""


class SeqTaken(Exception):
    """A message with this room seq already exists; the allocator must move past `max_seq`."""

    def __init__(self, room: str, max_seq: int) -> None:
        super().__init__(f"seq already used in room {room!r} (stored max {max_seq})")
        self.room = room
        self.max_seq = max_seq
