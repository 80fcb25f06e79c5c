"""A pub/sub channel per chat room: an instance hears a room only while it follows it.

Without this every instance reads every emit of the cluster through the one main channel,
members of the room or not. With it, the emits to a Socket.IO room whose name starts with
``prefix`` (the chat rooms, ``room:<id>``) go on that room's own channel, and an instance
listens to the main channel (everything else: per-user and presence emits, control events,
callbacks) plus the channels of the rooms it *follows*. Which rooms those are is the
transport's decision (``server/transport/interest.py``: the rooms its connections joined or
whose members are connected here). An instance with no member of a busy room then does no
work at all for that room's traffic: Redis does not send it.

Invariants:

* Every emit to one room goes on that room's channel (with ``publish=True``), so a room's
  events keep their order, as they did on the main channel.
* ``follow`` returns once Redis has confirmed the subscription to every room it names
  (at most ``confirm_timeout`` seconds, then it logs and returns): a join that reads the
  room's last seq after it misses nothing live. While the listener is not subscribed it
  returns at once: the listener's next subscription includes the room, and the catch-up
  after a lost subscription (``server/transport/catchup.py``) hands over what was missed.
* Every (re)subscription of the listener names the main channel and every followed room;
  what ``follow``/``unfollow`` change while it is being made is applied before it counts as
  live (:meth:`RoomChannels.settle`).
* A room's channel shares the main channel's Redis Cluster hash slot (the main channel's
  hash tag, or the main channel as the tag), so with sharded pub/sub every channel of an
  instance lives on one shard and one connection, like the main channel alone did.
* ``publish=False`` (``BUS_ROOM_CHANNELS=false``) keeps publishing room emits on the main
  channel while still following rooms: the setting for a rolling upgrade from a release
  without room channels, whose instances hear only the main channel (``docs/redis.md``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog

from server.core import metrics

log = structlog.get_logger(__name__)

#: sends one SUBSCRIBE (or UNSUBSCRIBE) of the channels given on the listener's connection
Send = Callable[[list[str]], Awaitable[Any]]
#: channels named in one SUBSCRIBE / UNSUBSCRIBE command at most
CHUNK = 1000


def hash_tag_of(channel: str) -> str | None:
    """The Redis Cluster hash tag of ``channel`` (what its slot is computed from), or None."""
    start = channel.find("{")
    end = channel.find("}", start + 1) if start >= 0 else -1
    return channel[start + 1 : end] if end > start + 1 else None


class RoomChannels:
    """The rooms one manager follows, their channel names, and subscription confirmations.

    :param channel: the manager's main channel.
    :param prefix: Socket.IO rooms whose names start with it get channels of their own;
        None: none do (a manager used for something else than chat rooms).
    :param publish: publish room emits on the rooms' channels (False: on the main channel).
    :param confirm_timeout: the longest ``follow`` waits for Redis to confirm.
    """

    def __init__(
        self,
        channel: str,
        prefix: str | None,
        *,
        publish: bool = True,
        confirm_timeout: float = 5.0,
    ) -> None:
        self.prefix = prefix
        self.publish = publish and prefix is not None
        self.confirm_timeout = confirm_timeout
        self._base = channel if hash_tag_of(channel) else f"{{{channel}}}"
        self._room_bytes = f"{self._base}:".encode()
        #: the channel names every subscription of the listener must include
        self.followed: set[str] = set()
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._leaving: Counter[str] = Counter()  # unsubscriptions sent, not yet confirmed

    def name(self, room: str) -> str:
        """The channel of Socket.IO room ``room``."""
        return f"{self._base}:{room}"

    def channel_for(self, message: dict) -> str | None:
        """The room channel an outgoing pub/sub message goes on, or None for the main one."""
        if not self.publish or message.get("method") != "emit":
            return None
        room = message.get("room")
        if isinstance(room, str) and room.startswith(self.prefix):  # type: ignore[arg-type]
            return self.name(room)
        return None

    def is_room_channel(self, channel: bytes) -> bool:
        return channel.startswith(self._room_bytes)

    async def follow(self, rooms: Iterable[str], subscribe: Send | None, wait: bool = True) -> None:
        """Follow ``rooms`` (Socket.IO room names); see the module's invariants.

        ``subscribe(channels)`` sends one SUBSCRIBE on the listener's connection; None: the
        listener is not subscribed now. ``wait=False`` returns once it is sent: what the
        listener's own task calls (a control event's handler) must not wait, as only that
        task reads the confirmation."""
        names = [self.name(room) for room in rooms]
        new = [name for name in dict.fromkeys(names) if name not in self.followed]
        self.followed.update(new)
        metrics.BUS_FOLLOWED_ROOMS.set(len(self.followed))
        if subscribe is None:
            return
        loop = asyncio.get_running_loop()
        for name in new:
            self._waiting[name] = loop.create_future()
        if new:
            try:
                for start in range(0, len(new), CHUNK):
                    await subscribe(new[start : start + CHUNK])
            except Exception as exc:  # the listener notices and subscribes again
                log.warning("bus.follow_failed", rooms=len(new), error=str(exc))
                return
        waits = [future for name in names if (future := self._waiting.get(name)) is not None]
        if waits and wait:
            _, pending = await asyncio.wait(waits, timeout=self.confirm_timeout)
            if pending:
                metrics.BUS_FOLLOW_TIMEOUTS.inc()
                log.warning(
                    "bus.follow_unconfirmed",
                    rooms=len(pending),
                    timeout=self.confirm_timeout,
                    impact="messages to these rooms may reach this instance's sockets only "
                    "from history until the subscription is confirmed",
                )

    async def unfollow(self, rooms: Iterable[str], unsubscribe: Send | None) -> None:
        """Stop following ``rooms``; ``unsubscribe(channels)`` as ``subscribe`` in ``follow``."""
        names = [name for name in map(self.name, rooms) if name in self.followed]
        self.followed.difference_update(names)
        metrics.BUS_FOLLOWED_ROOMS.set(len(self.followed))
        for name in names:
            self.confirmed(name)  # nobody waits for a room no longer followed
        if unsubscribe is not None and names:
            self._leaving.update(names)
            try:
                for start in range(0, len(names), CHUNK):
                    await unsubscribe(names[start : start + CHUNK])
            except Exception as exc:  # a new subscription will not include them
                log.warning("bus.unfollow_failed", rooms=len(names), error=str(exc))

    def confirmed(self, channel: bytes | str) -> None:
        """Redis confirmed a subscription to ``channel``: release whoever waits for it."""
        name = channel.decode() if isinstance(channel, bytes) else channel
        future = self._waiting.pop(name, None)
        if future is not None and not future.done():
            future.set_result(None)

    def unsubscribed(self, channel: bytes) -> bool:
        """Redis ended the subscription to ``channel``: True when ``unfollow`` asked for it
        (or it is no longer followed), False when the server ended a subscription still
        needed (a slot moved, a node was demoted)."""
        name = channel.decode()
        if self._leaving[name] > 0:
            self._leaving[name] -= 1
            if not self._leaving[name]:
                del self._leaving[name]
            return True
        return name not in self.followed

    async def settle(self, subscribed: set[str], subscribe: Send, unsubscribe: Send) -> None:
        """Bring a new subscription that names ``subscribed`` (room channels) up to date with
        what ``follow``/``unfollow`` changed meanwhile. Returns with no await after its last
        check, so a caller that marks the subscription live right after misses no change."""
        self._leaving.clear()  # those of an earlier subscription never come
        while True:
            missing = sorted(self.followed - subscribed)
            extra = sorted(subscribed - self.followed)
            if not missing and not extra:
                return
            for start in range(0, len(missing), CHUNK):
                await subscribe(missing[start : start + CHUNK])
            self._leaving.update(extra)
            for start in range(0, len(extra), CHUNK):
                await unsubscribe(extra[start : start + CHUNK])
            subscribed.update(missing)
            subscribed.difference_update(extra)
