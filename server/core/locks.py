"""One ``asyncio.Lock`` per key: the code base's only keyed lock.

Invariants: work under the same key runs one at a time, in arrival order (asyncio.Lock
is FIFO); work under different keys never waits on each other; an entry exists only
while someone holds or waits for its key, so memory is O(keys in use).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class KeyedLock:
    """``async with locks.hold(key):`` serialises work per key."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, list] = {}  # key -> [lock, holders and waiters]

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, key: Hashable, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold ``key``; with ``deadline`` (loop time), raise TimeoutError past it while waiting."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with asyncio.timeout_at(deadline):
                await entry[0].acquire()
            try:
                yield
            finally:
                entry[0].release()
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._entries.pop(key, None)
