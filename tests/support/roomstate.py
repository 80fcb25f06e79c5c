"""A client's view of one room, kept by the rules docs/protocol.md gives clients.

- a message (``message:new``, ``missed``, ``changes``, history) replaces the held one
  when its ``change_seq`` is not lower;
- ``message:updated`` / ``message:deleted`` / ``message:reactions`` apply only when their
  ``change_seq`` is above the held message's;
- ``me`` of a reaction changes only through events whose ``user`` is the viewer;
- the room cursor (``changes_since`` for the next join) is the ack's ``change_seq``,
  raised by each live change exactly one above it.
"""

from __future__ import annotations

from typing import Any


class RoomState:
    def __init__(self, viewer: str) -> None:
        self.viewer = viewer
        self.messages: dict[str, dict] = {}
        self.last_seq = 0
        self.cursor = 0
        self.gaps = 0  # live changes that arrived more than one above the cursor

    def message(self, m: dict) -> None:
        held = self.messages.get(m["id"])
        if held is None or m["change_seq"] >= held["change_seq"]:
            self.messages[m["id"]] = dict(m)
        self.last_seq = max(self.last_seq, m["seq"])

    def joined(self, ack: dict) -> None:
        for m in ack["missed"] + ack["changes"]:
            self.message(m)
        self.cursor = max(self.cursor, ack["change_seq"])

    def _live(self, event: dict) -> dict | None:
        if event["change_seq"] == self.cursor + 1:
            self.cursor += 1
        elif event["change_seq"] > self.cursor + 1:
            self.gaps += 1
        held = self.messages.get(event["id"])
        if held is None or event["change_seq"] <= held["change_seq"]:
            return None
        held["change_seq"] = event["change_seq"]
        return held

    def updated(self, event: dict) -> None:
        held = self._live(event)
        if held is not None:
            for key in ("text", "mentions", "edited_at", "revision"):
                held[key] = event[key]

    def deleted(self, event: dict) -> None:
        held = self._live(event)
        if held is not None:
            held.update(text="", mentions=[], reactions=[], deleted=True)

    def reactions(self, event: dict) -> None:
        held = self._live(event)
        if held is None:
            return
        before = {r["emoji"]: r["me"] for r in held["reactions"]}
        mine = event["user"] == self.viewer
        held["reactions"] = [
            {
                "emoji": r["emoji"],
                "count": r["count"],
                "me": event["reacted"]
                if mine and r["emoji"] == event["emoji"]
                else before.get(r["emoji"], False),
            }
            for r in event["reactions"]
        ]

    def apply(self, event: str, data: Any) -> None:
        handler = {
            "message:new": self.message,
            "message:updated": self.updated,
            "message:deleted": self.deleted,
            "message:reactions": self.reactions,
        }.get(event)
        if handler is not None:
            handler(data)

    def snapshot(self) -> list[tuple]:
        """What a user sees, by seq (the fields changes touch)."""
        return [
            (
                m["seq"],
                m["text"],
                m["deleted"],
                m["revision"],
                tuple(m["mentions"]),
                tuple((r["emoji"], r["count"], r["me"]) for r in m["reactions"]),
            )
            for m in sorted(self.messages.values(), key=lambda m: m["seq"])
        ]
