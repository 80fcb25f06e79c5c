"""Firestore store: the managed backend for several instances (docs/firestore.md).

Data model (all ids are strings)::

    system/health                       {kind, created_at}          read by ping()
    rooms/{room}                        {kind, name, owner, created_at, last_seq}
    rooms/{room}/members/{user}         {user, joined_at}
    rooms/{room}/messages/{message_id}  {room, seq, sender_id, sender_name, text,
                                         client_id, created_at, write_id}
    rooms/{room}/seqs/{seq}             {message_id}                uniqueness guard of seq
    rooms/{room}/read_markers/{user}    {seq, updated_at}
    users/{user}                        {name, last_seen}

``message_id`` is a hash of (room, sender, client_id): repeated sends map to the same
document, and ``create()`` refuses a second one, which makes sends idempotent; the ids are
random-looking, so writes spread over the key space. The order of a room is the integer
``seq`` field, never the document id.

Seq allocation has two paths. Without an explicit seq the store allocates it: one
transaction reads ``rooms/{room}.last_seq`` and writes ``last_seq + 1`` together with the
message, so every send to a room writes the room document (about one sustained write per
second per document in production). With an explicit seq (an external allocator such as
Redis INCR) the room document is not written at all: the message and its
``seqs/{seq}`` guard are created in one batch, and the guard's ``create()`` fails when the
seq is taken. ``last_seq()`` therefore reads the highest message, not the room document.

Every call has a deadline: each attempt is bounded by ``timeout`` and the whole call by
``2 * timeout``; UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED are retried with jittered
backoff inside that budget. What still fails raises :class:`StoreUnavailable` naming the
operation and the last error.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.cloud.firestore_v1 import AsyncClient, AsyncTransaction
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.services.firestore import async_client as gapic_module
from google.cloud.firestore_v1.services.firestore.async_client import FirestoreAsyncClient
from google.cloud.firestore_v1.services.firestore.transports.grpc_asyncio import (
    FirestoreGrpcAsyncIOTransport,
)

from server.core.errors import SeqTaken, StoreUnavailable
from server.core.locks import KeyedLock
from server.core.models import (
    AddResult,
    Message,
    MessageDraft,
    Room,
    UserRecord,
    message_id,
    utcnow,
)
from server.store.base import Store

T = TypeVar("T")

RETRYABLE = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.Aborted)
MAX_ATTEMPTS = 5
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 1.0
BATCH_LIMIT = 500  # writes per commit
GUARD_CONFLICTS_PER_ATTEMPT = 4

# gRPC's default reconnect backoff grows to 120 s: after a short outage the channel would
# keep failing fast for minutes. Cap it so a recovered backend is used within a second.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class _Transport(FirestoreGrpcAsyncIOTransport):
    @classmethod
    def create_channel(cls, *args: Any, **kwargs: Any) -> grpc.aio.Channel:
        kwargs["options"] = _CHANNEL_OPTIONS
        return super().create_channel(*args, **kwargs)


class _Client(AsyncClient):
    """AsyncClient whose channel reconnects quickly and can be closed."""

    @property
    def _firestore_api(self) -> FirestoreAsyncClient:
        return self._firestore_api_helper(_Transport, FirestoreAsyncClient, gapic_module)

    def _emulator_channel(self, transport: Any) -> grpc.aio.Channel:
        # Same as the library's emulator channel ("owner" token, insecure) plus our options.
        return grpc.aio.insecure_channel(
            self._emulator_host, options=[("Authorization", "Bearer owner"), *_CHANNEL_OPTIONS]
        )

    async def aclose(self) -> None:
        api = self._firestore_api_internal
        if api is not None:
            await api.transport.close()


class _Transaction(AsyncTransaction):
    """An AsyncTransaction whose begin/commit/rollback carry a deadline and no library retry.

    The library's defaults retry these RPCs for up to 60 s; the store retries itself within
    its own budget instead.
    """

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


class _SeqConflict(Exception):
    """The seq guard document already exists."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


def _utc(value: Any) -> datetime | None:
    """A plain aware UTC datetime from what Firestore returns (DatetimeWithNanoseconds)."""
    if value is None:
        return None
    value = value.astimezone(UTC)
    return datetime(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        tzinfo=UTC,
    )


def _message_from(snapshot: Any) -> Message:
    data = snapshot.to_dict()
    return Message(
        id=snapshot.id,
        room=data["room"],
        seq=int(data["seq"]),
        sender_id=data["sender_id"],
        sender_name=data["sender_name"],
        text=data["text"],
        client_id=data["client_id"],
        created_at=_utc(data["created_at"]),
    )


def _describe(exc: BaseException | None, attempt_timeout: float) -> str:
    if exc is None:
        return "no attempt could start before the deadline"
    if isinstance(exc, TimeoutError):
        return f"no answer within {attempt_timeout:.2f}s"
    if isinstance(exc, gexc.GoogleAPICallError):
        return f"{type(exc).__name__}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


class FirestoreStore(Store):
    allocates_seq_cheaply = False

    def __init__(
        self,
        project: str,
        emulator_host: str = "",
        database: str = "(default)",
        timeout: float = 5.0,
        *,
        credentials_file: str = "",
    ) -> None:
        self.emulator_host = emulator_host
        self.project = project or ("demo-chat" if emulator_host else "")
        self.database = database or "(default)"
        self.timeout = timeout
        #: upper bound of one call including retries and waiting for this process's turn
        self.budget = 2 * timeout
        self.credentials_file = credentials_file
        self._client: _Client | None = None
        self._locks = KeyedLock()
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    def _make_client(self) -> _Client:
        if self.emulator_host:
            # The client reads this variable when it is built: it then talks plain gRPC to
            # the emulator with anonymous credentials and the "owner" token.
            os.environ["FIRESTORE_EMULATOR_HOST"] = self.emulator_host
            return _Client(project=self.project, database=self.database)
        saved = os.environ.pop("FIRESTORE_EMULATOR_HOST", None)  # never let a stray one win
        try:
            credentials = None
            if self.credentials_file:
                import google.auth

                credentials, _ = google.auth.load_credentials_from_file(
                    self.credentials_file, scopes=list(AsyncClient.SCOPE)
                )
            # Without a file: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS
            # in the environment, or the metadata server on Google Cloud).
            return _Client(
                project=self.project or None, credentials=credentials, database=self.database
            )
        except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
            raise StoreUnavailable(f"firestore credentials could not be loaded: {exc}") from exc
        finally:
            if saved is not None:
                os.environ["FIRESTORE_EMULATOR_HOST"] = saved

    async def start(self) -> None:
        if self._client is None:
            self._client = self._make_client()
        health = self._client.collection("system").document("health")

        async def ensure(timeout: float) -> None:
            snapshot = await health.get(retry=None, timeout=timeout)
            if not snapshot.exists:
                try:
                    await health.create(
                        {"kind": "health", "created_at": utcnow()}, retry=None, timeout=timeout
                    )
                except gexc.AlreadyExists:
                    pass  # another instance created it first

        await self._call("start (system/health)", ensure)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self.timeout)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> _Client:
        if self._client is None:
            raise StoreUnavailable("firestore store is not started")
        return self._client

    def _room(self, room_id: str) -> Any:
        return self.client.collection("rooms").document(room_id)

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.budget

    async def _call(
        self, what: str, op: Callable[[float], Awaitable[T]], *, deadline: float | None = None
    ) -> T:
        """Run ``op(attempt_timeout)`` with retries on transient errors until ``deadline``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.budget if deadline is None else deadline
        delay = BACKOFF_FIRST
        last: BaseException | None = None
        attempt_timeout = self.timeout
        attempts = 0
        while attempts < MAX_ATTEMPTS:
            remaining = deadline - loop.time()
            if remaining <= 0.01:
                break
            attempts += 1
            attempt_timeout = min(self.timeout, remaining)
            try:
                async with asyncio.timeout(attempt_timeout):
                    return await op(attempt_timeout)
            except (TimeoutError, *RETRYABLE) as exc:
                last = exc
            except gexc.GoogleAPICallError as exc:  # permission, missing index, bad request...
                raise StoreUnavailable(
                    f"firestore {what} failed: {_describe(exc, attempt_timeout)}"
                ) from exc
            pause = min(delay / 2 + random.uniform(0, delay / 2), deadline - loop.time())
            if attempts < MAX_ATTEMPTS and pause > 0:
                await asyncio.sleep(pause)
            delay = min(delay * 2, BACKOFF_MAX)
        raise StoreUnavailable(
            f"firestore {what} failed after {attempts} attempt(s) in "
            f"{loop.time() - started:.2f}s: {_describe(last, attempt_timeout)}"
        ) from last

    async def _transaction(
        self, body: Callable[[AsyncTransaction], Awaitable[T]], timeout: float
    ) -> T:
        """Run ``body`` in one read-write transaction attempt (the caller retries)."""
        transaction = _Transaction(self.client, timeout)
        await transaction._begin()
        try:
            result = await body(transaction)
            await transaction._commit()
            return result
        except BaseException:
            if transaction.in_progress:
                # Release the transaction's locks without holding up the caller.
                self._spawn(self._quiet(transaction._rollback()))
            raise

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quiet(coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception:  # best effort: the transaction expires on the server anyway
            pass

    async def _locked_call(self, what: str, key: tuple, op: Callable[[float], Awaitable[T]]) -> T:
        """``_call`` after taking this process's lock for ``key``, all within one budget.

        Transactions on one document from one process would only contend with each other;
        queueing them here leaves the transaction's own concurrency control for other
        processes.
        """
        deadline = self._deadline()
        try:
            async with self._locks.hold(key, deadline):
                return await self._call(what, op, deadline=deadline)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"firestore {what} gave up after {self.budget:.2f}s waiting for earlier "
                "writes to the same document from this process"
            ) from exc

    # ------------------------------------------------------------------ health

    async def ping(self) -> None:
        """One read of system/health, bounded by ``timeout``, no retry."""
        health = self.client.collection("system").document("health")
        try:
            async with asyncio.timeout(self.timeout):
                await health.get(retry=None, timeout=self.timeout)
        except TimeoutError as exc:
            raise StoreUnavailable(f"firestore ping: no answer within {self.timeout:.2f}s") from exc
        except gexc.GoogleAPICallError as exc:
            raise StoreUnavailable(
                f"firestore ping failed: {_describe(exc, self.timeout)}"
            ) from exc

    # ------------------------------------------------------------------ rooms and members

    @staticmethod
    def _room_from(snapshot: Any) -> Room | None:
        if not snapshot.exists:
            return None
        data = snapshot.to_dict()
        if "kind" not in data:  # only the seq counter exists: messages but no room record
            return None
        return Room(
            id=snapshot.id,
            kind=data["kind"],
            name=data["name"],
            owner=data.get("owner"),
            created_at=_utc(data.get("created_at")) or utcnow(),
        )

    async def get_room(self, room_id: str) -> Room | None:
        ref = self._room(room_id)

        async def op(timeout: float) -> Room | None:
            return self._room_from(await ref.get(retry=None, timeout=timeout))

        return await self._call(f"get_room({room_id!r})", op)

    async def create_room(self, room: Room, members: list[str]) -> tuple[Room, bool]:
        ref = self._room(room.id)
        member_ids = sorted(set(members))[: BATCH_LIMIT - 1]
        now = utcnow()

        async def op(timeout: float) -> tuple[Room, bool]:
            async def body(transaction: AsyncTransaction) -> tuple[Room, bool]:
                existing = self._room_from(
                    await ref.get(transaction=transaction, retry=None, timeout=timeout)
                )
                if existing is not None:
                    return existing, False
                record = {
                    "kind": room.kind,
                    "name": room.name,
                    "owner": room.owner,
                    "created_at": room.created_at,
                }
                # merge: keeps last_seq when messages reached the room before its record
                transaction.set(ref, record, merge=True)
                for uid in member_ids:
                    transaction.set(
                        ref.collection("members").document(uid), {"user": uid, "joined_at": now}
                    )
                return room, True

            return await self._transaction(body, timeout)

        stored, created = await self._locked_call(
            f"create_room({room.id!r})", ("room", room.id), op
        )
        if created and len(members) > len(member_ids):
            await self.add_members(room.id, sorted(set(members))[len(member_ids) :])
        return stored, created

    async def _member_batches(self, what: str, room_id: str, user_ids: list[str], write) -> None:
        """Apply ``write(batch, member_ref, user_id)`` to every user, BATCH_LIMIT per commit."""
        members = self._room(room_id).collection("members")
        unique = sorted(set(user_ids))
        for start in range(0, len(unique), BATCH_LIMIT):
            chunk = unique[start : start + BATCH_LIMIT]

            async def op(timeout: float, chunk: list[str] = chunk) -> None:
                batch = self.client.batch()
                for uid in chunk:
                    write(batch, members.document(uid), uid)
                await batch.commit(retry=None, timeout=timeout)

            await self._call(f"{what}({room_id!r})", op)

    async def add_members(self, room_id: str, user_ids: list[str]) -> None:
        now = utcnow()
        await self._member_batches(
            "add_members",
            room_id,
            user_ids,
            lambda batch, ref, uid: batch.set(ref, {"user": uid, "joined_at": now}, merge=True),
        )

    async def remove_members(self, room_id: str, user_ids: list[str]) -> None:
        await self._member_batches(
            "remove_members", room_id, user_ids, lambda batch, ref, uid: batch.delete(ref)
        )

    async def is_member(self, room_id: str, user_id: str) -> bool:
        ref = self._room(room_id).collection("members").document(user_id)

        async def op(timeout: float) -> bool:
            return (await ref.get(retry=None, timeout=timeout)).exists

        return await self._call(f"is_member({room_id!r})", op)

    async def list_members(self, room_id: str) -> list[str]:
        members = self._room(room_id).collection("members")

        async def op(timeout: float) -> list[str]:
            return sorted(snap.id for snap in await members.get(retry=None, timeout=timeout))

        return await self._call(f"list_members({room_id!r})", op)

    # ------------------------------------------------------------------ messages

    def _message_record(self, draft: MessageDraft, seq: int, now: datetime, write_id: str) -> dict:
        return {
            "room": draft.room,
            "seq": seq,
            "sender_id": draft.sender_id,
            "sender_name": draft.sender_name,
            "text": draft.text,
            "client_id": draft.client_id,
            "created_at": now,
            "write_id": write_id,
        }

    async def add_message(self, draft: MessageDraft, seq: int | None = None) -> AddResult:
        mid = message_id(draft.room, draft.sender_id, draft.client_id)
        # Marks the document as written by this call: when an attempt committed but its
        # answer was lost, the retry finds the document and still reports created=True.
        write_id = uuid.uuid4().hex
        now = utcnow()
        if seq is None:
            return await self._add_allocating(draft, mid, write_id, now)
        return await self._add_with_seq(draft, mid, write_id, now, seq)

    async def _existing(self, ref: Any, write_id: str, timeout: float) -> AddResult | None:
        snapshot = await ref.get(retry=None, timeout=timeout)
        if not snapshot.exists:
            return None
        return AddResult(
            _message_from(snapshot), created=snapshot.to_dict().get("write_id") == write_id
        )

    async def _add_allocating(
        self, draft: MessageDraft, mid: str, write_id: str, now: datetime
    ) -> AddResult:
        """Allocate last_seq + 1 in a transaction on the room document."""
        room_ref = self._room(draft.room)
        message_ref = room_ref.collection("messages").document(mid)
        seqs = room_ref.collection("seqs")
        # Raised past a seq whose guard turned out to be taken (a concurrent explicit-seq
        # write): the next attempt allocates above it.
        floor = 0

        async def once(timeout: float) -> AddResult:
            chosen = 0

            async def body(transaction: AsyncTransaction) -> AddResult:
                nonlocal chosen
                found = await message_ref.get(transaction=transaction, retry=None, timeout=timeout)
                if found.exists:
                    return AddResult(
                        _message_from(found), created=found.to_dict().get("write_id") == write_id
                    )
                room = await room_ref.get(transaction=transaction, retry=None, timeout=timeout)
                last = (room.to_dict() or {}).get("last_seq", 0) if room.exists else 0
                # Seqs stored with an explicit seq do not move last_seq: also read the top
                # message so this path never allocates below them.
                top = await self._max_seq(draft.room, timeout, transaction)
                chosen = max(int(last), top, floor) + 1
                # Guard first. A Firestore commit is all-or-nothing; the emulator applies
                # writes in order until one fails, so a taken guard must fail first there too.
                transaction.create(seqs.document(str(chosen)), {"message_id": mid})
                transaction.create(message_ref, self._message_record(draft, chosen, now, write_id))
                transaction.set(room_ref, {"last_seq": chosen}, merge=True)
                return AddResult(draft.stored(chosen, now), created=True)

            try:
                return await self._transaction(body, timeout)
            except gexc.AlreadyExists:
                existing = await self._existing(message_ref, write_id, timeout)
                if existing is not None:
                    return existing
                raise _SeqConflict(chosen) from None

        async def op(timeout: float) -> AddResult:
            nonlocal floor
            for _ in range(GUARD_CONFLICTS_PER_ATTEMPT):
                try:
                    return await once(timeout)
                except _SeqConflict as conflict:
                    floor = max(conflict.seq, await self._max_seq(draft.room, timeout))
            raise gexc.Aborted(f"seq guards of room {draft.room!r} kept moving")

        return await self._locked_call(
            f"add_message(room={draft.room!r})", ("room", draft.room), op
        )

    async def _add_with_seq(
        self, draft: MessageDraft, mid: str, write_id: str, now: datetime, seq: int
    ) -> AddResult:
        """Store with a seq from an external allocator; the seq guard makes it unique."""
        room_ref = self._room(draft.room)
        message_ref = room_ref.collection("messages").document(mid)
        guard_ref = room_ref.collection("seqs").document(str(seq))
        message = draft.stored(seq, now)

        async def op(timeout: float) -> AddResult | int:
            existing = await self._existing(message_ref, write_id, timeout)
            if existing is not None:
                return existing
            batch = self.client.batch()
            # Guard first (see _add_allocating): a taken seq leaves nothing behind.
            batch.create(guard_ref, {"message_id": mid})
            batch.create(message_ref, self._message_record(draft, seq, now, write_id))
            try:
                await batch.commit(retry=None, timeout=timeout)
            except gexc.AlreadyExists:
                existing = await self._existing(message_ref, write_id, timeout)
                if existing is not None:
                    return existing
                return max(seq, await self._max_seq(draft.room, timeout))  # seq taken
            return AddResult(message, created=True)

        outcome = await self._call(f"add_message(room={draft.room!r}, seq={seq})", op)
        if isinstance(outcome, int):
            raise SeqTaken(draft.room, outcome)
        return outcome

    async def find_message(self, room_id: str, sender_id: str, client_id: str) -> Message | None:
        ref = (
            self._room(room_id)
            .collection("messages")
            .document(message_id(room_id, sender_id, client_id))
        )

        async def op(timeout: float) -> Message | None:
            snapshot = await ref.get(retry=None, timeout=timeout)
            return _message_from(snapshot) if snapshot.exists else None

        return await self._call(f"find_message({room_id!r})", op)

    async def _max_seq(self, room_id: str, timeout: float, transaction: Any = None) -> int:
        query = (
            self._room(room_id)
            .collection("messages")
            .order_by("seq", direction="DESCENDING")
            .limit(1)
        )
        rows = await query.get(transaction=transaction, retry=None, timeout=timeout)
        return int(rows[0].get("seq")) if rows else 0

    async def last_seq(self, room_id: str) -> int:
        return await self._call(
            f"last_seq({room_id!r})", lambda timeout: self._max_seq(room_id, timeout)
        )

    async def messages_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        if limit <= 0:
            return []
        query = (
            self._room(room_id)
            .collection("messages")
            .where(filter=FieldFilter("seq", ">", after))
            .order_by("seq")
            .limit(limit)
        )

        async def op(timeout: float) -> list[Message]:
            return [_message_from(s) for s in await query.get(retry=None, timeout=timeout)]

        return await self._call(f"messages_after({room_id!r}, {after})", op)

    async def messages_before(self, room_id: str, before: int | None, limit: int) -> list[Message]:
        if limit <= 0:
            return []
        query = self._room(room_id).collection("messages")
        if before is not None:
            query = query.where(filter=FieldFilter("seq", "<", before))
        query = query.order_by("seq", direction="DESCENDING").limit(limit)

        async def op(timeout: float) -> list[Message]:
            rows = await query.get(retry=None, timeout=timeout)
            return [_message_from(s) for s in reversed(rows)]

        return await self._call(f"messages_before({room_id!r}, {before})", op)

    # ------------------------------------------------------------------ read markers

    async def set_read_marker(self, room_id: str, user_id: str, seq: int) -> int:
        ref = self._room(room_id).collection("read_markers").document(user_id)

        async def op(timeout: float) -> int:
            async def body(transaction: AsyncTransaction) -> int:
                snapshot = await ref.get(transaction=transaction, retry=None, timeout=timeout)
                stored = int((snapshot.to_dict() or {}).get("seq", 0)) if snapshot.exists else 0
                if seq <= stored:
                    return stored
                transaction.set(ref, {"seq": seq, "updated_at": utcnow()})
                return seq

            return await self._transaction(body, timeout)

        return await self._locked_call(
            f"set_read_marker({room_id!r}, {user_id!r})", ("marker", room_id, user_id), op
        )

    async def get_read_marker(self, room_id: str, user_id: str) -> int:
        ref = self._room(room_id).collection("read_markers").document(user_id)

        async def op(timeout: float) -> int:
            snapshot = await ref.get(retry=None, timeout=timeout)
            return int((snapshot.to_dict() or {}).get("seq", 0)) if snapshot.exists else 0

        return await self._call(f"get_read_marker({room_id!r}, {user_id!r})", op)

    # ------------------------------------------------------------------ users

    async def upsert_user(self, user_id: str, name: str) -> None:
        ref = self.client.collection("users").document(user_id)

        async def op(timeout: float) -> None:
            await ref.set({"name": name}, merge=True, retry=None, timeout=timeout)

        await self._call(f"upsert_user({user_id!r})", op)

    async def set_last_seen(self, user_id: str, when: datetime) -> None:
        ref = self.client.collection("users").document(user_id)

        async def op(timeout: float) -> None:
            await ref.set({"last_seen": when}, merge=True, retry=None, timeout=timeout)

        await self._call(f"set_last_seen({user_id!r})", op)

    async def get_users(self, user_ids: list[str]) -> dict[str, UserRecord]:
        unique = list(dict.fromkeys(user_ids))
        if not unique:
            return {}
        users = self.client.collection("users")

        async def op(timeout: float) -> dict[str, UserRecord]:
            found: dict[str, UserRecord] = {}
            refs = [users.document(uid) for uid in unique]
            async for snapshot in self.client.get_all(refs, retry=None, timeout=timeout):
                if snapshot.exists:
                    data = snapshot.to_dict()
                    found[snapshot.id] = UserRecord(
                        snapshot.id, data.get("name", snapshot.id), _utc(data.get("last_seen"))
                    )
            return {uid: found[uid] for uid in unique if uid in found}

        return await self._call(f"get_users({len(unique)} ids)", op)
