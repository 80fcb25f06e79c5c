"""A bounded in-process memory of facts that never change once true (oldest dropped first)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from server.core import metrics

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    """Least-recently-used mapping with at most ``limit`` entries (0: remembers nothing).

    Its size is the ``chat_firestore_cache_entries{memo=name}`` gauge.
    """

    def __init__(self, name: str, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()
        self._gauge = metrics.FIRESTORE_CACHE.labels(name)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        self._gauge.set(len(self._items))

    def forget(self, key: K) -> None:
        self._items.pop(key, None)
        self._gauge.set(len(self._items))
