"""Publishes that arrive together go to Redis together: :class:`Batcher`.

Every message sent in the chat is one Redis PUBLISH (two with ``room:activity``). Awaited
one by one, each holds a pooled connection for a whole round trip, so under load the
publishes in flight at once grow into hundreds of connections (each new one costs a
handshake, and redis-py reads its own package metadata for every connection it makes),
and every message waits for a free one. Node's Redis clients pipeline instead: what is
sent in one turn of the event loop is written at once on one connection.

:class:`Batcher` does the same for any command the caller can run as a batch: calls made
while a batch is in flight wait for it, then go together in the next one, in call order.
So there is at most one batch in flight, on one connection, and the order of publishes
from this process is the order of the calls (a pool of connections could reorder them).

A failed batch fails each of its calls with the batch's error; the caller's retry policy
(``server/bus/delivery.py``) decides what happens next. A caller that stops waiting
(timeout, cancellation) does not stop the batch it is in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from server.core import metrics

Item = TypeVar("Item")

#: runs one batch: one result per item, in order; an item's exception stands for its failure
RunBatch = Callable[[list[Item]], Awaitable[list[Any]]]


class Batcher(Generic[Item]):
    """Groups calls into batches, one batch in flight at a time (see the module doc)."""

    def __init__(self, run_batch: RunBatch[Item], name: str, max_batch: int = 1000) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._pending: list[tuple[Item, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._sizes = metrics.BUS_BATCH.labels(name)

    async def call(self, item: Item) -> Any:
        """Run ``item`` in the next batch and return its result (or raise its error)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Any]]] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._sizes.observe(len(batch))
                try:
                    results = await self._run_batch([item for item, _ in batch])
                except Exception as exc:  # the whole batch failed: so did each call in it
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # its caller gave up waiting
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:  # cancelled (shutdown): nobody is left to run what waits
            self._task = None
            for _, future in [*batch, *self._pending]:
                if not future.done():
                    future.cancel()
