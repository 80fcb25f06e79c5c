"""The refused-attempt limiter: too many refused connection attempts block an address.

It is consulted before any expensive work (token verification, a JWKS fetch), so an
address over its limit costs one lookup per attempt. Counts are kept per key (see
``server.core.clientip.limit_key``) in two fixed windows weighted into a sliding one:
O(1) memory and time per key, whatever the rate. The local counter holds at most
``max_keys`` keys and forgets the least recently used first, so a flood of fresh
addresses costs bounded memory and never a scan. ``server/bus/refusals.py`` shares the
counts across instances through Redis.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

from server.core import metrics


class Refusals(Protocol):
    """What admission asks before and tells after a refused attempt."""

    async def blocked(self, key: str) -> bool: ...

    async def record(self, key: str) -> None: ...


def sliding(previous: int, current: int, into_window: float) -> float:
    """The count of the last window from two fixed windows (``into_window`` in [0, 1))."""
    return previous * (1.0 - into_window) + current


class RefusalCounter:
    """Refused attempts per key over a sliding ``window``, for at most ``max_keys`` keys (LRU)."""

    def __init__(
        self, limit: int, window: float = 60.0, max_keys: int = 100_000, track: bool = True
    ) -> None:
        self.limit = limit
        self.track = track  # report size and evictions as the refused-attempt limiter's
        self.window = window
        self.max_keys = max_keys
        # key -> [window index, count in that window, count in the window before]
        self._counts: OrderedDict[str, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def _position(self, now: float | None) -> tuple[int, float]:
        at = (time.monotonic() if now is None else now) / self.window
        return int(at), at - int(at)

    def _entry(self, key: str, index: int) -> list[int] | None:
        entry = self._counts.get(key)
        if entry is None:
            return None
        if entry[0] != index:  # roll the windows forward
            entry[2] = entry[1] if entry[0] == index - 1 else 0
            entry[1] = 0
            entry[0] = index
        return entry

    def count(self, key: str, now: float | None = None) -> float:
        index, into = self._position(now)
        entry = self._entry(key, index)
        return 0.0 if entry is None else sliding(entry[2], entry[1], into)

    def blocked(self, key: str, now: float | None = None) -> bool:
        return self.count(key, now) >= self.limit

    def record(self, key: str, now: float | None = None, amount: int = 1) -> None:
        index, _ = self._position(now)
        entry = self._entry(key, index)
        if entry is None:
            entry = self._counts[key] = [index, 0, 0]
            while len(self._counts) > self.max_keys:
                self._counts.popitem(last=False)
                if self.track:
                    metrics.LIMITER_EVICTIONS.inc()
        self._counts.move_to_end(key)
        entry[1] += amount
        if self.track:
            metrics.LIMITER_KEYS.set(len(self._counts))


class Quota:
    """At most ``limit`` units per key (a user) in any sliding ``window`` seconds."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.counter = RefusalCounter(limit, window, max_keys, track=False)

    def take(self, key: str, amount: int = 1) -> bool:
        """Spend ``amount`` units of ``key``; False (nothing spent) when that would exceed."""
        if self.counter.count(key) + amount > self.counter.limit:
            return False
        self.counter.record(key, amount=amount)
        return True


class LocalRefusals:
    """:class:`Refusals` of one instance."""

    def __init__(self, counter: RefusalCounter) -> None:
        self.counter = counter

    async def blocked(self, key: str) -> bool:
        return self.counter.blocked(key)

    async def record(self, key: str) -> None:
        self.counter.record(key)
