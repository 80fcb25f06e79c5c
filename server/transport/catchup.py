"""After the bus lost its subscription: hand this instance's sockets what they missed.

While an instance is not subscribed (its pub/sub connection was killed or cut, Redis
failed over, its credentials rotated), messages the other instances publish never reach it:
Redis pub/sub keeps nothing for an absent subscriber. Every message is stored before it is
published, so once the listener has subscribed again (and before it reads anything from the
new subscription) :meth:`CatchUp.run` reads, for every room with a socket here, the
messages stored after the last ones delivered and hands those that never arrived to the
room's local sockets, in seq order. The :class:`~server.bus.ledger.DeliveryLedger` tells
which ones those are, and drops the copy that may still arrive live.
"""

from __future__ import annotations

import asyncio

import socketio
import structlog

from server.bus.ledger import DeliveryLedger
from server.core import metrics
from server.services.messages import MessageService
from server.transport.channels import NAMESPACE, room_channel

log = structlog.get_logger(__name__)

ROOM_PREFIX = room_channel("")


class CatchUp:
    """Reads what a lost subscription missed and delivers it locally.

    :param page: messages read per store call.
    :param max_per_room: the most messages handed over per room; past it the rest stay
        for ``message:history`` (logged as ``bus.catch_up_truncated``).
    :param parallel: rooms read at once.
    """

    def __init__(
        self,
        sio: socketio.AsyncServer,
        ledger: DeliveryLedger,
        messages: MessageService,
        *,
        page: int = 200,
        max_per_room: int = 2000,
        parallel: int = 8,
    ) -> None:
        self.sio = sio
        self.ledger = ledger
        self.messages = messages
        self.page = page
        self.max_per_room = max_per_room
        self.parallel = parallel

    def local_rooms(self) -> list[str]:
        """Chat rooms with at least one socket of this instance."""
        channels = self.sio.manager.rooms.get(NAMESPACE, {})
        return [
            name[len(ROOM_PREFIX) :]
            for name, members in list(channels.items())
            if isinstance(name, str) and name.startswith(ROOM_PREFIX) and members
        ]

    async def run(self) -> None:
        rooms = self.local_rooms()
        gate = asyncio.Semaphore(self.parallel)

        async def one(room_id: str) -> int:
            async with gate:
                return await self.room(room_id)

        handed = await asyncio.gather(*(one(r) for r in rooms), return_exceptions=True)
        failed = [r for r, n in zip(rooms, handed, strict=True) if isinstance(n, BaseException)]
        total = sum(n for n in handed if isinstance(n, int))
        metrics.BUS_CAUGHT_UP.inc(total)
        log.info("bus.caught_up", rooms=len(rooms), messages=total, failed_rooms=len(failed))
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(rooms)} rooms could not be read")

    async def room(self, room_id: str) -> int:
        """Deliver ``room_id``'s missing messages here; how many."""
        after = self.ledger.catch_up_from(room_id)
        if after is None:
            return 0
        handed = 0
        while handed < self.max_per_room:
            wires = await self.messages.after(room_id, after, self.page)
            missing = set(self.ledger.missing(room_id, [w["seq"] for w in wires]))
            for wire in wires:
                if wire["seq"] in missing:
                    await self.sio.emit(
                        "message:new",
                        wire,
                        room=room_channel(room_id),
                        namespace=NAMESPACE,
                        ignore_queue=True,
                    )
                    handed += 1
            if len(wires) < self.page:
                break
            after = wires[-1]["seq"]
        else:
            log.warning("bus.catch_up_truncated", room=room_id, handed=handed, after=after)
        return handed
