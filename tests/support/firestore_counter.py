"""Counts what a Firestore client costs: document reads, writes and round trips.

A pair of gRPC client interceptors (``FirestoreStore(interceptors=counter.interceptors)``;
grpc.aio files an interceptor under its first matching kind only, hence two). It sees
every RPC the library sends and counts the way Firestore bills:

- ``BatchGetDocuments``: one read per requested document (found or not);
- ``RunQuery``: one read per returned document, at least one per query;
- ``Commit``: one write per write in the request (a delete counts as a write here);
- every RPC is one round trip; ``BeginTransaction``/``Rollback`` are counted by name.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Cost:
    reads: int
    writes: int
    round_trips: int
    transactions: int  # BeginTransaction calls

    def __str__(self) -> str:
        return (
            f"{self.reads} reads, {self.writes} writes, {self.round_trips} round trips, "
            f"{self.transactions} transactions"
        )


def _method(details: Any) -> str:
    method = details.method
    name = method.decode() if isinstance(method, bytes) else str(method)
    return name.rsplit("/", 1)[-1]


class _Unary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, counter: FirestoreCounter) -> None:
        self.counter = counter

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self.counter.unary(continuation, client_call_details, request)


class _Stream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, counter: FirestoreCounter) -> None:
        self.counter = counter

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self.counter.stream(continuation, client_call_details, request)


class FirestoreCounter:
    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0
        self.calls: Counter[str] = Counter()
        #: writes per document path (Commit requests), for hot-document checks
        self.writes_by_path: Counter[str] = Counter()
        #: writes per (document path, whole second of the monotonic clock)
        self.writes_by_path_second: Counter[tuple[str, int]] = Counter()
        self.interceptors = (_Unary(self), _Stream(self))

    def snapshot(self) -> Cost:
        return Cost(
            self.reads, self.writes, sum(self.calls.values()), self.calls["BeginTransaction"]
        )

    def since(self, before: Cost) -> Cost:
        now = self.snapshot()
        return Cost(
            now.reads - before.reads,
            now.writes - before.writes,
            now.round_trips - before.round_trips,
            now.transactions - before.transactions,
        )

    async def unary(self, continuation, client_call_details, request):
        method = _method(client_call_details)
        self.calls[method] += 1
        if method == "Commit":
            self.writes += len(request.writes)
            for write in request.writes:
                path = write.update.name or write.delete
                self.writes_by_path[path] += 1
                self.writes_by_path_second[path, int(time.monotonic())] += 1
        return await continuation(client_call_details, request)

    async def stream(self, continuation, client_call_details, request):
        method = _method(client_call_details)
        self.calls[method] += 1
        if method == "BatchGetDocuments":
            self.reads += len(request.documents)
            return await continuation(client_call_details, request)
        call = await continuation(client_call_details, request)
        if method != "RunQuery":
            return call
        return self._count_documents(call)

    async def _count_documents(self, call: Any) -> AsyncIterator[Any]:
        documents = 0
        try:
            async for response in call:
                if response.document.name:
                    documents += 1
                yield response
        finally:
            self.reads += max(1, documents)
