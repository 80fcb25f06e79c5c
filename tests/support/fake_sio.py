"""An in-process stand-in for python-socketio's AsyncServer, for handler tests.

It keeps rooms per namespace like the real manager and records every emit, so the
namespace handlers, admission and fan-out run unchanged without a network or a process.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass
class Emitted:
    event: str
    data: Any
    room: str | None
    to: str | None
    skip_sid: str | None
    ignore_queue: bool


class FakeManager:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.connected: set[str] = set()
        self.rooms: dict[str, set[str]] = defaultdict(set)
        #: the Socket.IO rooms followed now (``follow`` / ``unfollow``, as a Redis manager's)
        self.followed: set[str] = set()

    async def follow(self, rooms: list[str], wait: bool = True) -> None:
        self.followed.update(rooms)

    async def unfollow(self, rooms: list[str]) -> None:
        self.followed.difference_update(rooms)

    async def emit(self, event, data, namespace=None, room=None, skip_sid=None, **kwargs) -> None:
        """What ``AsyncServer.emit`` hands the manager; recorded like the server's own."""
        await self.server.emit(
            event, data, room=room, skip_sid=skip_sid, namespace=namespace, **kwargs
        )

    def is_connected(self, sid: str, namespace: str) -> bool:
        return sid in self.connected

    def get_participants(self, namespace: str, room: str):
        for sid in list(self.rooms.get(room, ())):
            yield sid, sid


class FakeServer:
    def __init__(self) -> None:
        self.manager = FakeManager(self)
        self.emitted: list[Emitted] = []
        self.disconnected: list[str] = []
        self.tasks: set[asyncio.Task] = set()

    async def enter_room(self, sid: str, room: str, namespace: str | None = None) -> None:
        self.manager.rooms[room].add(sid)

    async def leave_room(self, sid: str, room: str, namespace: str | None = None) -> None:
        self.manager.rooms[room].discard(sid)

    async def emit(
        self, event, data=None, to=None, room=None, skip_sid=None, namespace=None, **kwargs
    ) -> None:
        self.emitted.append(
            Emitted(event, data, room, to, skip_sid, bool(kwargs.get("ignore_queue")))
        )

    async def disconnect(self, sid: str, namespace: str | None = None) -> None:
        self.disconnected.append(sid)

    def start_background_task(self, target, *args, **kwargs) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(target(*args, **kwargs))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def named(self, event: str) -> list[Emitted]:
        return [e for e in self.emitted if e.event == event]
