"""Every change this project makes to google-cloud-firestore's behaviour, in one module.

The rest of the package uses only the library's public API plus the names exported here.
Each override is a subclass; no installed file is edited. What is overridden and why:

1. ``FirestoreGrpcAsyncIOTransport.create_channel`` (classmethod, in :class:`Transport`):
   adds :data:`CHANNEL_OPTIONS`. gRPC's default reconnect backoff grows to 120 s, so after a
   short outage the channel would keep failing fast for minutes; capped, a recovered backend
   is used within about a second. The generated transports take no extra channel options
   (https://github.com/googleapis/gapic-generator-python/issues/782).
2. ``AsyncClient._firestore_api`` (private property, in :class:`Client`): builds the GAPIC
   client with :class:`Transport` through the library's own ``_firestore_api_helper``; the
   client has no parameter for a transport class or channel options (same upstream issue).
3. ``AsyncClient._emulator_channel`` (private, in :class:`Client`): the library's emulator
   channel (insecure, ``Bearer owner``) plus :data:`CHANNEL_OPTIONS`.
4. ``Client(interceptors=...)`` (added): gRPC client interceptors on the channel, the
   hook through which ``tests/test_firestore_costs.py`` counts reads, writes and round
   trips; empty in production.
5. ``Client.aclose`` (added): ``AsyncClient`` has no way to close its gRPC channel; a store
   that is closed and rebuilt (tests, restarts inside one process) would leak it.
6. ``AsyncTransaction._begin``, ``_commit`` and ``_rollback`` (private, in
   :class:`Transaction`): the library issues these RPCs with its default retry policy (up to
   60 s) and no timeout, and offers no parameter for either
   (https://github.com/googleapis/python-firestore/issues/221). Ours pass ``retry=None`` and
   the store's attempt timeout: the store retries within its own deadline
   (``calls.py``). ``_begin`` keeps the library's ``retry_id`` argument, so a retried
   transaction begins with ``retry_transaction`` set to the first attempt's id and keeps
   its place in line (the library's own transaction retry does the same; see
   https://github.com/googleapis/python-firestore/issues/879 for its gaps).

Invariant: these classes change deadlines, retries and channel settings only, never what
is read or written. Production behaviour (credentials, TLS, endpoints) is the library's.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.cloud.firestore_v1 import AsyncClient, AsyncTransaction
from google.cloud.firestore_v1.services.firestore import async_client as gapic_module
from google.cloud.firestore_v1.services.firestore.async_client import FirestoreAsyncClient
from google.cloud.firestore_v1.services.firestore.transports.grpc_asyncio import (
    FirestoreGrpcAsyncIOTransport,
)

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class Transport(FirestoreGrpcAsyncIOTransport):
    """The library's asyncio transport with :data:`CHANNEL_OPTIONS` on its channel."""

    interceptors: tuple[grpc.aio.ClientInterceptor, ...] = ()

    @classmethod
    def create_channel(cls, *args: Any, **kwargs: Any) -> grpc.aio.Channel:
        kwargs["options"] = CHANNEL_OPTIONS
        if cls.interceptors:
            kwargs["interceptors"] = list(cls.interceptors)
        return super().create_channel(*args, **kwargs)


class Client(AsyncClient):
    """AsyncClient whose channel reconnects quickly, may carry interceptors, and closes."""

    def __init__(
        self, *args: Any, interceptors: tuple[grpc.aio.ClientInterceptor, ...] = (), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._interceptors = interceptors
        self._transport_class = (
            type("Transport", (Transport,), {"interceptors": interceptors})
            if interceptors
            else Transport
        )

    @property
    def _firestore_api(self) -> FirestoreAsyncClient:
        return self._firestore_api_helper(self._transport_class, FirestoreAsyncClient, gapic_module)

    def _emulator_channel(self, transport: Any) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            self._emulator_host,
            options=[("Authorization", "Bearer owner"), *CHANNEL_OPTIONS],
            interceptors=list(self._interceptors) or None,
        )

    async def aclose(self) -> None:
        api = self._firestore_api_internal
        if api is not None:
            await api.transport.close()


class Transaction(AsyncTransaction):
    """An AsyncTransaction whose begin/commit/rollback carry a deadline and no library retry."""

    def __init__(self, client: AsyncClient, rpc_timeout: float) -> None:
        super().__init__(client, max_attempts=1)
        self.rpc_timeout = rpc_timeout

    async def _begin(self, retry_id: bytes | None = None) -> None:
        response = await self._client._firestore_api.begin_transaction(
            request={
                "database": self._client._database_string,
                "options": self._options_protobuf(retry_id),
            },
            metadata=self._client._rpc_metadata,
            retry=None,
            timeout=self.rpc_timeout,
        )
        self._id = response.transaction

    async def _commit(self) -> list:
        response = await self._client._firestore_api.commit(
            request={
                "database": self._client._database_string,
                "writes": self._write_pbs,
                "transaction": self._id,
            },
            metadata=self._client._rpc_metadata,
            retry=None,
            timeout=self.rpc_timeout,
        )
        self._clean_up()
        self.write_results = list(response.write_results)
        self.commit_time = response.commit_time
        return self.write_results

    async def _rollback(self) -> None:
        try:
            await self._client._firestore_api.rollback(
                request={"database": self._client._database_string, "transaction": self._id},
                metadata=self._client._rpc_metadata,
                retry=None,
                timeout=self.rpc_timeout,
            )
        finally:
            self._clean_up()
