"""Which chat rooms this instance hears from the others: :class:`RoomInterest`.

The Redis managers carry each chat room's emits on a channel of its own
(``server/bus/room_channels.py``); this decides which of those channels the instance
follows. A connection here is *interested* in a room when

* it has joined the room (it gets ``message:new``, ``typing``, … of the room), or
* its user is a member of the room (it gets ``room:activity``, which rides in the room's
  ``message:new`` publish, while it has not joined).

The instance follows a room while at least one of its connections is interested, and for
``linger`` seconds after the last one stopped being (a user who reconnects, or rejoins,
costs no new subscription). An instance with no member of a room connected does no work
for that room's traffic.

Invariants:

* :meth:`join` returns once the room is followed (confirmed by Redis; see the bus module):
  a join reads the room's last seq after it and misses nothing live. A membership learnt
  from a control event is followed without waiting: the handler runs in the listener's
  task, the only reader of the confirmation.
* Interest is counted per connection and per reason: leaving a room a user is still a
  member of keeps it followed; a connection counts once per room whatever its reasons.
* Interest of a connection that is gone (:meth:`drop`, or never :meth:`open`) is ignored,
  so a handler that finishes after its socket disconnected leaves nothing behind.
* When the instance stops following a room it forgets the room's delivery ledger: what it
  did not hear meanwhile is not missing (``server/bus/ledger.py``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from server.bus.ledger import DeliveryLedger
from server.bus.manager import ControlEvents
from server.transport.channels import room_channel

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Reasons:
    joined: set[str] = field(default_factory=set)
    member: set[str] = field(default_factory=set)

    def holds(self, room_id: str) -> bool:
        return room_id in self.joined or room_id in self.member


class RoomInterest:
    """Counts, per chat room, the connections here that need to hear it; follows those rooms.

    :param manager: the Socket.IO client manager (``follow`` / ``unfollow``).
    :param ledger: the delivery ledger to forget unfollowed rooms in (None: one instance).
    :param linger: seconds a room stays followed after its last interested connection.
    """

    def __init__(
        self, manager: ControlEvents, ledger: DeliveryLedger | None, linger: float = 30.0
    ) -> None:
        self.manager = manager
        self.ledger = ledger
        self.linger = linger
        self._by_sid: dict[str, _Reasons] = {}
        self._count: Counter[str] = Counter()
        self._unfollows: set[asyncio.Task[None]] = set()

    def __contains__(self, room_id: str) -> bool:
        """Whether some connection here is interested in ``room_id`` now."""
        return self._count[room_id] > 0

    def open(self, sid: str) -> None:
        """A connection was admitted: its interest counts from now on."""
        self._by_sid.setdefault(sid, _Reasons())

    async def join(self, sid: str, room_id: str) -> None:
        """Connection ``sid`` joins ``room_id``: returns once the room is followed (at once
        for a connection that is gone: nothing is followed for it)."""
        if sid in self._by_sid:
            self._add(sid, [room_id], joined=True)
            await self.manager.follow([room_channel(room_id)])

    def leave(self, sid: str, room_id: str) -> None:
        """Connection ``sid`` left ``room_id`` (itself, or evicted)."""
        self._remove(sid, room_id, joined=True)

    async def members(self, sid: str, room_ids: Iterable[str], wait: bool = True) -> None:
        """The user of connection ``sid`` is a member of ``room_ids``: returns once followed
        (``wait=False``: once asked; a control event's handler must not wait)."""
        added = self._add(sid, room_ids, joined=False)
        if added:
            await self.manager.follow([room_channel(r) for r in added], wait)

    def not_member(self, sid: str, room_id: str) -> None:
        """The user of connection ``sid`` is no longer a member of ``room_id``."""
        self._remove(sid, room_id, joined=False)

    def drop(self, sid: str) -> None:
        """Connection ``sid`` is gone: none of its interest counts any more."""
        reasons = self._by_sid.pop(sid, None)
        if reasons is not None:
            for room_id in reasons.joined | reasons.member:
                self._decrement(room_id)

    def _add(self, sid: str, room_ids: Iterable[str], joined: bool) -> list[str]:
        """Record the reason; the rooms that had no interested connection here before."""
        reasons = self._by_sid.get(sid)
        if reasons is None:  # disconnected meanwhile
            return []
        became_followed = []
        for room_id in room_ids:
            if not reasons.holds(room_id):
                self._count[room_id] += 1
                if self._count[room_id] == 1:
                    became_followed.append(room_id)
            (reasons.joined if joined else reasons.member).add(room_id)
        return became_followed

    def _remove(self, sid: str, room_id: str, joined: bool) -> None:
        reasons = self._by_sid.get(sid)
        if reasons is None or not reasons.holds(room_id):
            return
        (reasons.joined if joined else reasons.member).discard(room_id)
        if not reasons.holds(room_id):
            self._decrement(room_id)

    def _decrement(self, room_id: str) -> None:
        self._count[room_id] -= 1
        if self._count[room_id] > 0:
            return
        del self._count[room_id]
        if self.linger <= 0:
            self._spawn_unfollow(room_id)
        else:
            asyncio.get_running_loop().call_later(self.linger, self._spawn_unfollow, room_id)

    def _spawn_unfollow(self, room_id: str) -> None:
        if room_id in self:  # interested again meanwhile
            return
        task = asyncio.get_running_loop().create_task(self._unfollow(room_id))
        self._unfollows.add(task)
        task.add_done_callback(self._unfollows.discard)

    async def _unfollow(self, room_id: str) -> None:
        if room_id in self:  # interested again since the task was made
            return
        if self.ledger is not None:
            self.ledger.forget(room_id)
        try:
            await self.manager.unfollow([room_channel(room_id)])
        except Exception as exc:  # the next subscription of the listener leaves it out
            log.warning("bus.unfollow_failed", room=room_id, error=str(exc))
