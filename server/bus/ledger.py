"""Which messages this instance has handed to its sockets: :class:`DeliveryLedger`.

Redis pub/sub delivers at most once: while an instance's subscription is down (its
connection was killed or cut, Redis failed over, its credentials rotated), what the others
publish never reaches it. Every message is stored before it is published, so after the
listener subscribes again the instance reads what it missed from the store and hands it to
its sockets (``server/transport/catchup.py``). The ledger tells which messages those are,
and keeps a message from reaching a socket twice when it arrives both ways.

Per room it holds a *floor*, the seqs delivered above it and the highest of them. A message is missing when
its seq is above the floor and not among them. The floor starts at the room's last seq
when the first local socket joins (or just below the first message delivered), and rises
when the oldest of the ``per_room`` remembered seqs is forgotten. Rooms are forgotten
oldest-used first past ``max_rooms``. Recording costs one dict lookup per message, not
per recipient.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Room:
    floor: int
    high: int = 0  # the highest seq delivered
    seen: set[int] = field(default_factory=set)
    order: list[int] = field(default_factory=list)  # a min-heap of ``seen``


class DeliveryLedger:
    """Per room, the floor and the seqs above it that reached this instance's sockets."""

    def __init__(self, per_room: int = 1024, max_rooms: int = 100_000) -> None:
        self.per_room = per_room
        self.max_rooms = max_rooms
        self._rooms: OrderedDict[str, _Room] = OrderedDict()

    def first_delivery(self, room_id: str, seq: int) -> bool:
        """Record that message ``seq`` of ``room_id`` is being delivered here; False when it
        already was. A seq at or below the floor still counts as new: messages published
        by different instances may arrive out of seq order."""
        room = self._rooms.get(room_id)
        if room is None:
            room = self._add(room_id, seq - 1)
        else:
            self._rooms.move_to_end(room_id)
        if seq in room.seen:
            return False
        room.seen.add(seq)
        room.high = max(room.high, seq)
        heapq.heappush(room.order, seq)
        if len(room.seen) > self.per_room:
            oldest = heapq.heappop(room.order)
            room.seen.discard(oldest)
            room.floor = max(room.floor, oldest)
        return True

    def joined(self, room_id: str, last_seq: int) -> None:
        """A local socket joined ``room_id`` whose last stored seq was ``last_seq``: what is
        stored up to it was the join's to hand over (``missed``), what follows is ours."""
        room = self._rooms.get(room_id)
        if room is None:
            self._add(room_id, last_seq)
        else:
            self._rooms.move_to_end(room_id)

    def catch_up_from(self, room_id: str, reorder: int = 32) -> int | None:
        """The seq after which to look for missing messages of ``room_id`` (None: a room
        never seen here). Not the floor, whose ``per_room`` delivered messages would all be
        read again: ``reorder`` below the highest delivered seq, since messages published
        by different instances arrive up to a few seqs out of order."""
        room = self._rooms.get(room_id)
        if room is None:
            return None
        return max(room.floor, room.high - reorder)

    def missing(self, room_id: str, seqs: list[int]) -> list[int]:
        """Those of ``seqs`` that were not delivered here and lie above the floor."""
        room = self._rooms.get(room_id)
        if room is None:
            return []
        return [s for s in seqs if s > room.floor and s not in room.seen]

    def forget(self, room_id: str) -> None:
        """This instance stopped hearing ``room_id``: what it delivers there next starts a
        new floor (the messages it did not hear meanwhile are not missing)."""
        self._rooms.pop(room_id, None)

    def __len__(self) -> int:
        return len(self._rooms)

    def _add(self, room_id: str, floor: int) -> _Room:
        room = self._rooms[room_id] = _Room(floor)
        while len(self._rooms) > self.max_rooms:
            self._rooms.popitem(last=False)
        return room
