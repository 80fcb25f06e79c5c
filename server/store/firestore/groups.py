"""Group commit of one room's sends inside one process.

Without Redis there is exactly one server process, so it can allocate a room's seqs itself
and write many sends in one commit. :class:`SendQueue` keeps one queue per room; the first
send to an idle room starts a writer task that takes up to ``max_group`` queued sends at a
time and hands them to ``write(room, group, deadline)``, which stores them all or fails
them all. Sends that arrive while a commit is in flight form the next group, so under load
a room costs one commit per round trip, not one per send, and no document is written more
than once.

Invariants: one writer per room at a time (seqs are allocated in arrival order with no
race inside the process); a send is resolved only by its group's outcome (acked after the
durable write); a send never waits past its own deadline: it fails with
``StoreUnavailable`` instead; a send whose caller went away (cancelled) before its group
was taken is not written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from server.core.errors import StoreUnavailable
from server.core.models import AddResult, MessageDraft


@dataclass
class Pending:
    draft: MessageDraft
    mid: str
    write_id: str
    now: datetime
    deadline: float  # loop time
    future: asyncio.Future[AddResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def resolve(self, result: AddResult) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


Writer = Callable[[str, list[Pending], float], Awaitable[None]]


class SendQueue:
    def __init__(
        self, write: Writer, spawn: Callable[[Awaitable[None]], None], max_group: int
    ) -> None:
        self._write = write
        self._spawn = spawn
        self.max_group = max_group
        self._queues: dict[str, list[Pending]] = {}

    def __len__(self) -> int:
        """Rooms with a writer running."""
        return len(self._queues)

    async def submit(self, room: str, pending: Pending) -> AddResult:
        queue = self._queues.get(room)
        if queue is None:
            queue = self._queues[room] = []
            self._spawn(self._drain(room, queue))
        queue.append(pending)
        return await pending.future

    async def _drain(self, room: str, queue: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while queue:
                await asyncio.sleep(0)  # let sends that arrive in this loop turn join
                taken = queue[: self.max_group]
                del queue[: self.max_group]
                now = loop.time()
                group = []
                for pending in taken:
                    if pending.future.done():
                        continue  # the caller went away
                    if pending.deadline <= now:
                        pending.fail(
                            StoreUnavailable(
                                f"firestore add_message(room={room!r}) gave up waiting for "
                                "earlier sends to the same room"
                            )
                        )
                        continue
                    group.append(pending)
                if not group:
                    continue
                try:
                    await self._write(room, group, min(p.deadline for p in group))
                except BaseException as exc:
                    for pending in group:
                        pending.fail(exc if isinstance(exc, Exception) else StoreUnavailable())
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._queues.pop(room, None)
            for pending in queue:  # only when cancelled: the store is closing
                pending.fail(StoreUnavailable("firestore store closed before the write"))
