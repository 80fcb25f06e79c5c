"""FirestoreStore: the Store contract on Cloud Firestore (docs/firestore.md).

Data model (all ids are strings)::

    system/health                       {kind, created_at}          read by ping()
    rooms/{room}                        {kind, name, owner, created_at}  written once
    rooms/{room}/members/{user}         {user, joined_at}
    rooms/{room}/messages/{message_id}  {room, seq, sender_id, sender_name, text,
                                         client_id, created_at, write_id, reply_to,
                                         mentions, edited_at?, revision?, deleted_at?,
                                         change_seq?, reactions?: {emoji: count}}
    rooms/{room}/seqs/{seq}             {message_id}                uniqueness guard of seq
    rooms/{room}/read_markers/{user}    {seq, updated_at}
    rooms/{room}/counters/changes       {change_seq}                the room's change seq
    rooms/{room}/reactions/{key}        {message_id, emoji, user}
    users/{user}                        {name, last_seen}
    users/{user}/rooms/{room}           {joined_at}                 mirror of members/{user}
    outbox/{hash(event, endpoint)}      {event_id, endpoint, ordering, queue, body, state,
                                         attempts, next_at, lease_owner, lease_until,
                                         last_error, recorded_at, stamp}   webhook outbox

``message_id`` is a hash of (room, sender, client_id): repeated sends map to the same
document, and ``create()`` refuses a second one, which makes sends idempotent; the ids are
random-looking, so writes spread over the key space. The order of a room is the integer
``seq`` field, never the document id. A seq is used at most once: its ``seqs/{seq}`` guard
is created (``create()``) in the same commit as the message.

No document is written on every send (Firestore sustains about one write per second per
document): a send creates its message and its guard and writes nothing else. Without an
explicit seq (no Redis: one process) the room's queued sends are written together by one
writer per room (:mod:`.groups`), with seqs continuing this process's cached highest seq.
No send runs a transaction, so a killed process leaves no lock behind.

Every method is one of a few shapes run by :class:`~.calls.Caller` (deadline, retries,
errors): a single-document read (:meth:`_read`), a query (:meth:`_query`), a batch
(:meth:`_commit`) or a transaction (:meth:`_transact`, one document key at a time per
process). Field names live in :mod:`.codec`; library overrides in :mod:`.overrides`.

Webhook outbox: an event's entries are written in the same commit or transaction as the
change they describe (a send's batch, an edit's transaction, a membership batch). Claims
and settlements are transactions, so one instance at a time holds an entry's lease.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.cloud.firestore_v1 import AsyncClient, AsyncTransaction, AsyncWriteBatch
from google.cloud.firestore_v1.base_query import FieldFilter

from server.core.errors import SeqTaken, StoreUnavailable
from server.core.models import (
    AddResult,
    ChangeResult,
    Message,
    MessageDraft,
    OutboxEntry,
    OutboxItem,
    Outgoing,
    Room,
    SanctionKey,
    Unread,
    UserRecord,
    message_id,
    utcnow,
)
from server.store.base import Store
from server.store.firestore import codec
from server.store.firestore.calls import Caller, describe
from server.store.firestore.groups import Pending, SendQueue
from server.store.firestore.memo import Memo
from server.store.firestore.overrides import Client, Transaction

T = TypeVar("T")

BATCH_LIMIT = 500  # writes per commit
UNREAD_PAGE = 200  # documents per page when counting unread messages and mentions

#: What an edit, deletion or reaction change decides inside its transaction: a refusal
#: (a ChangeResult), or the changed Message fields and the side writes to add.
Decision = ChangeResult | tuple[dict[str, Any], Callable[[AsyncTransaction], None] | None]
GUARD_CONFLICTS_PER_ATTEMPT = 4
#: entries per page when the outbox claim walks the queues
OUTBOX_PAGE = 100


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
        interceptors: tuple[grpc.aio.ClientInterceptor, ...] = (),
        cache_entries: int = 10_000,
    ) -> None:
        self.emulator_host = emulator_host
        self.project = project or ("demo-chat" if emulator_host else "")
        self.database = database or "(default)"
        self.timeout = timeout
        #: upper bound of one call including retries and waiting for this process's turn
        self.budget = 2 * timeout
        self.credentials_file = credentials_file
        self.interceptors = interceptors
        self.calls = Caller(timeout, self.budget)
        self._client: Client | None = None
        self._background: set[asyncio.Task] = set()
        #: room -> highest seq this process knows is used (the group commit continues it)
        self._last_seq: Memo[str, int] = Memo("seqs", cache_entries)
        #: rooms never change kind, name or owner and are never deleted: a found room is kept
        self._rooms: Memo[str, Room] = Memo("rooms", cache_entries)
        #: user -> the name this process last wrote, so a reconnect writes nothing
        self._names: Memo[str, str] = Memo("names", cache_entries)
        self._sends = SendQueue(self._write_group, self._spawn, max_group=BATCH_LIMIT // 2)
        self._stamp = 0  # the last outbox stamp this process gave

    # ------------------------------------------------------------------ lifecycle

    def _make_client(self) -> Client:
        if self.emulator_host:
            # The client reads this variable when it is built: it then talks plain gRPC to
            # the emulator with anonymous credentials and the "owner" token.
            os.environ["FIRESTORE_EMULATOR_HOST"] = self.emulator_host
            return Client(
                project=self.project, database=self.database, interceptors=self.interceptors
            )
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
            return Client(
                project=self.project or None,
                credentials=credentials,
                database=self.database,
                interceptors=self.interceptors,
            )
        except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
            raise StoreUnavailable(f"firestore credentials could not be loaded: {exc}") from exc
        finally:
            if saved is not None:
                os.environ["FIRESTORE_EMULATOR_HOST"] = saved

    async def start(self) -> None:
        if self._client is None:
            self._client = self._make_client()
        health = self._health()

        async def ensure(timeout: float) -> None:
            if not (await health.get(retry=None, timeout=timeout)).exists:
                try:
                    await health.create(
                        {"kind": "health", "created_at": utcnow()}, retry=None, timeout=timeout
                    )
                except gexc.AlreadyExists:
                    pass  # another instance created it first

        await self.calls("start (system/health)", ensure)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self.timeout)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ the shapes of a call

    @property
    def client(self) -> Client:
        if self._client is None:
            raise StoreUnavailable("firestore store is not started")
        return self._client

    def _health(self) -> Any:
        return self.client.collection("system").document("health")

    def _room(self, room_id: str) -> Any:
        return self.client.collection("rooms").document(room_id)

    def _in_room(self, room_id: str, collection: str, doc_id: str) -> Any:
        return self._room(room_id).collection(collection).document(doc_id)

    def _user(self, user_id: str) -> Any:
        return self.client.collection("users").document(user_id)

    def _membership(self, user_id: str, room_id: str) -> Any:
        """``users/{user}/rooms/{room}``: the mirror of a member document, for the room list."""
        return self._user(user_id).collection("rooms").document(room_id)

    async def _read(self, what: str, ref: Any, decode: Callable[[Any], T]) -> T:
        """One document read: ``decode(snapshot)`` (the snapshot says whether it exists)."""

        async def op(timeout: float) -> T:
            return decode(await ref.get(retry=None, timeout=timeout))

        return await self.calls(what, op)

    async def _query(self, what: str, query: Any, decode: Callable[[Any], T]) -> list[T]:
        async def op(timeout: float) -> list[T]:
            return [decode(s) for s in await query.get(retry=None, timeout=timeout)]

        return await self.calls(what, op)

    async def _commit(self, what: str, writes: Callable[[AsyncWriteBatch], None]) -> None:
        """One batch: ``writes(batch)`` adds the writes, applied all or nothing."""

        async def op(timeout: float) -> None:
            batch = self.client.batch()
            writes(batch)
            await batch.commit(retry=None, timeout=timeout)

        await self.calls(what, op)

    async def _commit_recording(
        self, what: str, entries: list[OutboxEntry], writes: Callable[[AsyncWriteBatch], None]
    ) -> None:
        """One batch: the outbox ``entries`` first (each a ``create()``: recorded once), then
        ``writes``. An entry that exists already was recorded by an earlier attempt of this
        call (its answer was lost) or before it: then ``writes`` are applied alone."""

        async def op(timeout: float) -> None:
            batch = self.client.batch()
            self._record_outbox(batch, entries)
            writes(batch)
            try:
                await batch.commit(retry=None, timeout=timeout)
            except gexc.AlreadyExists:
                if not entries:
                    raise
                batch = self.client.batch()
                writes(batch)
                await batch.commit(retry=None, timeout=timeout)

        await self.calls(what, op)

    async def _transact(
        self, what: str, key: Hashable, body: Callable[[AsyncTransaction, float], Awaitable[T]]
    ) -> T:
        """Run ``body(transaction, timeout)`` in a read-write transaction, retried."""
        first_id: list[bytes | None] = []
        return await self.calls.locked(
            what, key, lambda timeout: self._transaction(body, timeout, first_id)
        )

    async def _transaction(
        self,
        body: Callable[[AsyncTransaction, float], Awaitable[T]],
        timeout: float,
        first_id: list[bytes | None],
    ) -> T:
        """One transaction attempt. ``first_id`` carries the first attempt's id across
        attempts: later ones begin with ``retry_transaction`` set to it, as the library's
        own transaction retry does, so a retried transaction keeps its place in line."""
        transaction = Transaction(self.client, timeout)
        await transaction._begin(retry_id=first_id[0] if first_id else None)
        if not first_id:
            first_id.append(transaction._id)
        try:
            result = await body(transaction, timeout)
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

    # ------------------------------------------------------------------ health

    async def ping(self) -> None:
        """One read of system/health, bounded by ``timeout``, no retry."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._health().get(retry=None, timeout=self.timeout)
        except TimeoutError as exc:
            raise StoreUnavailable(f"firestore ping: no answer within {self.timeout:.2f}s") from exc
        except gexc.GoogleAPICallError as exc:
            raise StoreUnavailable(f"firestore ping failed: {describe(exc, self.timeout)}") from exc

    # ------------------------------------------------------------------ rooms and members

    async def get_room(self, room_id: str) -> Room | None:
        cached = self._rooms.get(room_id)
        if cached is not None:
            return cached
        room = await self._read(f"get_room({room_id!r})", self._room(room_id), codec.room_from)
        if room is not None:
            self._rooms.put(room_id, room)
        return room

    async def create_room(
        self, room: Room, members: list[str], outbox: list[OutboxEntry] | None = None
    ) -> tuple[Room, bool]:
        """One commit, no transaction: ``create()`` of the room document first, so an
        existing room fails the commit before any member or outbox entry is written."""
        ref = self._room(room.id)
        entries = outbox or []
        member_ids = sorted(set(members))[: (BATCH_LIMIT - 1 - len(entries)) // 2]
        now = utcnow()
        what = f"create_room({room.id!r})"

        def writes(batch: AsyncWriteBatch, create: bool) -> None:
            if create:
                batch.create(ref, codec.room_record(room))
            else:  # a document without a room record (written by an older version)
                batch.set(ref, codec.room_record(room), merge=True)
            self._record_outbox(batch, entries)
            for uid in member_ids:
                batch.set(ref.collection("members").document(uid), codec.member_record(uid, now))
                batch.set(self._membership(uid, room.id), codec.membership_record(now))

        async def op(timeout: float) -> Room | None:
            batch = self.client.batch()
            writes(batch, create=True)
            try:
                await batch.commit(retry=None, timeout=timeout)
            except gexc.AlreadyExists:
                return codec.room_from(await ref.get(retry=None, timeout=timeout))
            return room

        stored = await self.calls(what, op)
        if stored is None:
            await self._commit(what, lambda batch: writes(batch, create=False))
            stored = room
        # Our own commit whose answer was lost reads back with our created_at.
        created = stored.created_at == room.created_at and stored.owner == room.owner
        self._rooms.put(room.id, stored)
        if created and len(members) > len(member_ids):
            await self.add_members(room.id, sorted(set(members))[len(member_ids) :])
        return stored, created

    async def _member_batches(
        self,
        what: str,
        room_id: str,
        user_ids: list[str],
        write: Callable[..., Any],
        outbox: list[OutboxEntry] | None,
    ) -> None:
        """Apply ``write(batch, ref, user_id, mirror)`` to every user's member document
        (``mirror=False``) and to its mirror under ``users/`` (for the room list), at most
        BATCH_LIMIT writes per commit; the ``outbox`` entries go in the first commit."""
        unique = sorted(set(user_ids))
        entries = outbox or []
        per_commit = (BATCH_LIMIT - len(entries)) // 2
        starts = range(0, len(unique), per_commit) if unique else range(1 if entries else 0)
        for start in starts:
            chunk = unique[start : start + per_commit]

            def writes(batch: AsyncWriteBatch, chunk: list[str] = chunk) -> None:
                for uid in chunk:
                    write(batch, self._in_room(room_id, "members", uid), uid, False)
                    write(batch, self._membership(uid, room_id), uid, True)

            await self._commit_recording(
                f"{what}({room_id!r})", entries if start == 0 else [], writes
            )

    async def add_members(
        self, room_id: str, user_ids: list[str], outbox: list[OutboxEntry] | None = None
    ) -> None:
        now = utcnow()

        def write(batch: AsyncWriteBatch, ref: Any, uid: str, mirror: bool) -> None:
            record = codec.membership_record(now) if mirror else codec.member_record(uid, now)
            batch.set(ref, record, merge=True)

        await self._member_batches("add_members", room_id, user_ids, write, outbox)

    async def remove_members(
        self, room_id: str, user_ids: list[str], outbox: list[OutboxEntry] | None = None
    ) -> None:
        await self._member_batches(
            "remove_members",
            room_id,
            user_ids,
            lambda batch, ref, uid, mirror: batch.delete(ref),
            outbox,
        )

    async def is_member(self, room_id: str, user_id: str) -> bool:
        ref = self._in_room(room_id, "members", user_id)
        return await self._read(f"is_member({room_id!r})", ref, lambda s: bool(s.exists))

    async def list_members(
        self, room_id: str, after: str = "", limit: int | None = None
    ) -> list[str]:
        query = self._room(room_id).collection("members").order_by("user")
        if after:
            query = query.where(filter=FieldFilter("user", ">", after))
        if limit is not None:
            query = query.limit(limit)
        return await self._query(f"list_members({room_id!r})", query, lambda s: s.id)

    async def count_members(self, room_id: str) -> int:
        query = self._room(room_id).collection("members").count()

        async def op(timeout: float) -> int:
            result = await query.get(retry=None, timeout=timeout)
            return int(result[0][0].value)

        return await self.calls(f"count_members({room_id!r})", op)

    # ------------------------------------------------------------------ messages

    async def add_message(self, draft: MessageDraft, seq: int | None = None) -> AddResult:
        mid = message_id(draft.room, draft.sender_id, draft.client_id)
        # Marks the document as written by this call: when an attempt committed but its
        # answer was lost, the retry finds the document and still reports created=True.
        write_id = uuid.uuid4().hex
        now = utcnow()
        if seq is None:
            deadline = asyncio.get_running_loop().time() + self.budget
            return await self._sends.submit(
                draft.room, Pending(draft, mid, write_id, now, deadline)
            )
        return await self._add_with_seq(draft, mid, write_id, now, seq)

    def _message_ref(self, room_id: str, mid: str) -> Any:
        return self._in_room(room_id, "messages", mid)

    def _guard_ref(self, room_id: str, seq: int) -> Any:
        return self._in_room(room_id, "seqs", str(seq))

    @staticmethod
    def _found(snapshot: Any, write_id: str) -> AddResult | None:
        """The stored message as an AddResult (created by this call or not), None if absent."""
        if not snapshot.exists:
            return None
        return AddResult(
            codec.message_from(snapshot), created=codec.write_id_of(snapshot) == write_id
        )

    async def _snapshots(self, refs: list[Any], timeout: float) -> dict[str, Any]:
        """One BatchGetDocuments round trip: path -> snapshot (missing documents included)."""
        found: dict[str, Any] = {}
        async for snapshot in self.client.get_all(refs, retry=None, timeout=timeout):
            found[snapshot.reference.path] = snapshot
        return found

    def _known_last(self, room_id: str, seq: int) -> None:
        """Raise this process's idea of the room's highest used seq to ``seq``."""
        known = self._last_seq.get(room_id)
        if known is not None and seq > known:
            self._last_seq.put(room_id, seq)

    async def _write_group(self, room_id: str, group: list[Pending], deadline: float) -> None:
        """Store ``group`` (one room's queued sends) in one commit, with seqs from here on.

        No transaction and no room document: the seqs continue this process's cached
        highest seq (read once per room with a query), and each ``seqs/{seq}`` guard is a
        ``create()`` in the same all-or-nothing commit as its message.
        """

        async def op(timeout: float) -> dict[str, AddResult]:
            return await self._group_attempt(room_id, group, timeout)

        try:
            results = await self.calls(
                f"add_message(room={room_id!r}, {len(group)} sends)", op, deadline=deadline
            )
        except BaseException:
            self._last_seq.forget(room_id)  # after any failure, read the room's top again
            raise
        answered: set[str] = set()
        for pending in group:
            result = results[pending.mid]
            if pending.mid in answered:  # a repeat of a message id inside the group
                result = AddResult(result.message, created=False)
            answered.add(pending.mid)
            pending.resolve(result)

    async def _group_attempt(
        self, room_id: str, group: list[Pending], timeout: float
    ) -> dict[str, AddResult]:
        """One attempt for ``group``; returns message id -> result for the first send of
        each message id (a repeat inside the group is answered ``created=False``)."""
        first: dict[str, Pending] = {}
        for pending in group:
            first.setdefault(pending.mid, pending)
        results: dict[str, AddResult] = {}
        # Duplicates of stored messages, and this call's own writes whose answer was lost.
        snapshots = await self._snapshots(
            [self._message_ref(room_id, mid) for mid in first], timeout
        )
        for pending in first.values():
            found = self._found(
                snapshots[self._message_ref(room_id, pending.mid).path], pending.write_id
            )
            if found is not None:
                results[pending.mid] = found
        conflicts = 0
        while conflicts < GUARD_CONFLICTS_PER_ATTEMPT:
            todo = [p for p in first.values() if p.mid not in results]
            if not todo:
                return results
            last = self._last_seq.get(room_id)
            if last is None:
                last = await self._max_seq(room_id, timeout)
            # Unknown until the commit answers: a lost answer may still have applied it.
            self._last_seq.forget(room_id)
            batch = self.client.batch()
            todo = self._fit(todo)
            for offset, pending in enumerate(todo, start=1):
                # Guard first: the emulator applies a commit's writes in order until one
                # fails (production commits are all or nothing).
                batch.create(
                    self._guard_ref(room_id, last + offset), codec.guard_record(pending.mid)
                )
                batch.create(
                    self._message_ref(room_id, pending.mid),
                    codec.message_record(
                        pending.draft, last + offset, pending.now, pending.write_id
                    ),
                )
                self._record_sent(batch, pending.draft, last + offset, pending.now)
            try:
                await batch.commit(retry=None, timeout=timeout)
            except gexc.AlreadyExists:
                await self._after_conflict(room_id, todo, last, results, timeout)
                conflicts += 1
                continue
            self._last_seq.put(room_id, last + len(todo))
            for offset, pending in enumerate(todo, start=1):
                results[pending.mid] = AddResult(
                    pending.draft.stored(last + offset, pending.now), created=True
                )
        raise gexc.Aborted(f"seq guards of room {room_id!r} kept moving")

    @staticmethod
    def _fit(todo: list[Pending]) -> list[Pending]:
        """The first of ``todo`` whose writes (guard, message, outbox entries) fit in one
        commit; the rest go in the next one."""
        fitted: list[Pending] = []
        writes = 0
        for pending in todo:
            outgoing = pending.draft.outgoing
            writes += 2 + (len(outgoing.endpoints) if outgoing is not None else 0)
            if fitted and writes > BATCH_LIMIT:
                break
            fitted.append(pending)
        return fitted

    def _record_sent(self, batch: AsyncWriteBatch, draft: MessageDraft, seq: int, now: Any) -> None:
        """A new message's ``message.created`` entries, in its commit (after its create():
        the commit stores them only with a new message, so a plain set() cannot overwrite
        an entry of an earlier commit)."""
        if draft.outgoing is not None:
            self._record_outbox(batch, draft.outgoing.entries(draft.stored(seq, now)), create=False)

    async def _after_conflict(
        self,
        room_id: str,
        todo: list[Pending],
        last: int,
        results: dict[str, AddResult],
        timeout: float,
    ) -> None:
        """A create in the group found its document: a concurrent duplicate stored one of
        the messages, or another writer holds one of the seqs. Find out which, in one read
        round trip, and move this process's highest seq past every taken guard."""
        messages = [self._message_ref(room_id, p.mid) for p in todo]
        guards = [self._guard_ref(room_id, last + i) for i in range(1, len(todo) + 1)]
        snapshots = await self._snapshots(messages + guards, timeout)
        for pending, ref in zip(todo, messages, strict=True):
            found = self._found(snapshots[ref.path], pending.write_id)
            if found is not None:
                results[pending.mid] = found
        taken = [last + i for i, ref in enumerate(guards, start=1) if snapshots[ref.path].exists]
        top = await self._max_seq(room_id, timeout)
        self._last_seq.put(room_id, max([top, *taken]))

    async def _add_with_seq(
        self, draft: MessageDraft, mid: str, write_id: str, now: datetime, seq: int
    ) -> AddResult:
        """Store with a seq from an external allocator; the seq guard makes it unique.

        The caller has already looked for the message (``find_message``, before asking the
        allocator), so the happy path is one commit and no read.
        """
        message_ref = self._message_ref(draft.room, mid)
        guard_ref = self._guard_ref(draft.room, seq)

        async def op(timeout: float) -> AddResult | int:
            batch = self.client.batch()
            # Guard first (see _group_attempt): a taken seq leaves nothing behind.
            batch.create(guard_ref, codec.guard_record(mid))
            batch.create(message_ref, codec.message_record(draft, seq, now, write_id))
            self._record_sent(batch, draft, seq, now)
            try:
                await batch.commit(retry=None, timeout=timeout)
            except gexc.AlreadyExists:
                existing = self._found(await message_ref.get(retry=None, timeout=timeout), write_id)
                if existing is not None:
                    return existing
                return max(seq, await self._max_seq(draft.room, timeout))  # seq taken
            return AddResult(draft.stored(seq, now), created=True)

        outcome = await self.calls(f"add_message(room={draft.room!r}, seq={seq})", op)
        if isinstance(outcome, int):
            self._known_last(draft.room, outcome)
            raise SeqTaken(draft.room, outcome)
        self._known_last(draft.room, outcome.message.seq)
        return outcome

    async def find_message(self, room_id: str, sender_id: str, client_id: str) -> Message | None:
        ref = self._in_room(room_id, "messages", message_id(room_id, sender_id, client_id))
        return await self._read(
            f"find_message({room_id!r})",
            ref,
            lambda s: codec.message_from(s) if s.exists else None,
        )

    def _messages(self, room_id: str) -> Any:
        return self._room(room_id).collection("messages")

    async def _max_seq(self, room_id: str, timeout: float, transaction: Any = None) -> int:
        query = self._messages(room_id).order_by("seq", direction="DESCENDING").limit(1)
        rows = await query.get(transaction=transaction, retry=None, timeout=timeout)
        return codec.seq_of(rows[0]) if rows else 0

    async def last_seq(self, room_id: str) -> int:
        return await self.calls(
            f"last_seq({room_id!r})", lambda timeout: self._max_seq(room_id, timeout)
        )

    async def messages_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        if limit <= 0:
            return []
        query = (
            self._messages(room_id)
            .where(filter=FieldFilter("seq", ">", after))
            .order_by("seq")
            .limit(limit)
        )
        return await self._query(f"messages_after({room_id!r}, {after})", query, codec.message_from)

    async def messages_before(self, room_id: str, before: int | None, limit: int) -> list[Message]:
        if limit <= 0:
            return []
        query = self._messages(room_id)
        if before is not None:
            query = query.where(filter=FieldFilter("seq", "<", before))
        query = query.order_by("seq", direction="DESCENDING").limit(limit)
        rows = await self._query(
            f"messages_before({room_id!r}, {before})", query, codec.message_from
        )
        return rows[::-1]

    async def get_messages(self, room_id: str, ids: list[str]) -> dict[str, Message]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return {}
        refs = [self._in_room(room_id, "messages", mid) for mid in unique]

        async def op(timeout: float) -> dict[str, Message]:
            found: dict[str, Message] = {}
            async for snapshot in self.client.get_all(refs, retry=None, timeout=timeout):
                if snapshot.exists:
                    found[snapshot.id] = codec.message_from(snapshot)
            return found

        return await self.calls(f"get_messages({room_id!r}, {len(unique)} ids)", op)

    # ------------------------------------------------------------------ changes

    def _changes(self, room_id: str) -> Any:
        return self._in_room(room_id, "counters", "changes")

    def _reaction(self, room_id: str, message_id: str, user_id: str, emoji: str) -> Any:
        """One document per (message, emoji, user): its id says which, so no query finds it."""
        key = f"{message_id}\x00{emoji}\x00{user_id}".encode()
        return self._in_room(room_id, "reactions", hashlib.blake2b(key, digest_size=16).hexdigest())

    async def change_seq(self, room_id: str) -> int:
        return await self._read(
            f"change_seq({room_id!r})", self._changes(room_id), codec.change_seq_of
        )

    async def changes_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        query = (
            self._messages(room_id)
            .where(filter=FieldFilter("change_seq", ">", after))
            .order_by("change_seq")
            .limit(limit)
        )
        return await self._query(f"changes_after({room_id!r}, {after})", query, codec.message_from)

    async def _change(
        self,
        what: str,
        room_id: str,
        message_id: str,
        decide: Callable[[AsyncTransaction, float, Message], Awaitable[Decision]],
        outgoing: Outgoing | None = None,
    ) -> ChangeResult:
        """One transaction: read the message, let ``decide`` refuse or name the changes;
        then the room's change counter + 1, the message with it, the side writes, and
        ``outgoing``'s entries for the changed message.

        Every change of a room writes its ``counters/changes`` document, so the room's
        changes are dense and ordered (about one sustained change per second per room in
        production, like the room document of allocating sends)."""
        ref = self._in_room(room_id, "messages", message_id)
        counter = self._changes(room_id)

        async def body(transaction: AsyncTransaction, timeout: float) -> ChangeResult:
            snapshot = await ref.get(transaction=transaction, retry=None, timeout=timeout)
            if not snapshot.exists:
                return ChangeResult(None, changed=False)
            message = codec.message_from(snapshot)
            decided = await decide(transaction, timeout, message)
            if isinstance(decided, ChangeResult):
                return decided
            changes, side_writes = decided
            current = await counter.get(transaction=transaction, retry=None, timeout=timeout)
            change = codec.change_seq_of(current) + 1
            transaction.set(counter, {"change_seq": change})
            if side_writes is not None:
                side_writes(transaction)
            changes = {**changes, "change_seq": change}
            transaction.update(ref, codec.message_changes(changes))
            changed = replace(message, **changes)
            if outgoing is not None:
                # set(): the event's id names this change seq, which no other commit has
                self._record_outbox(transaction, outgoing.entries(changed), create=False)
            return ChangeResult(changed, changed=True)

        return await self._transact(what, ("changes", room_id), body)

    async def edit_message(
        self,
        room_id: str,
        message_id: str,
        text: str,
        mentions: tuple[str, ...],
        at: datetime,
        outgoing: Outgoing | None = None,
    ) -> ChangeResult:
        async def decide(
            transaction: AsyncTransaction, timeout: float, message: Message
        ) -> Decision:
            if message.deleted:
                return ChangeResult(message, False, "deleted")
            if message.text == text:
                return ChangeResult(message, changed=False)
            changes = {
                "text": text,
                "mentions": mentions,
                "edited_at": at,
                "revision": message.revision + 1,
            }
            return changes, None

        return await self._change(
            f"edit_message({room_id!r})", room_id, message_id, decide, outgoing
        )

    async def delete_message(
        self, room_id: str, message_id: str, at: datetime, outgoing: Outgoing | None = None
    ) -> ChangeResult:
        async def decide(
            transaction: AsyncTransaction, timeout: float, message: Message
        ) -> Decision:
            if message.deleted:
                return ChangeResult(message, changed=False)
            return {"text": "", "mentions": (), "reactions": (), "deleted_at": at}, None

        result = await self._change(
            f"delete_message({room_id!r})", room_id, message_id, decide, outgoing
        )
        if result.message is not None:  # also on a repeat: finishes an interrupted erase
            await self._erase_reactions(room_id, message_id)
        return result

    async def _erase_reactions(self, room_id: str, message_id: str) -> None:
        """Delete a tombstone's reaction documents (its counts were erased with it)."""
        query = (
            self._room(room_id)
            .collection("reactions")
            .where(filter=FieldFilter("message_id", "==", message_id))
            .limit(BATCH_LIMIT)
        )
        what = f"erase_reactions({room_id!r})"
        while True:
            refs = await self._query(what, query, lambda s: s.reference)

            def writes(batch: AsyncWriteBatch, refs: list[Any] = refs) -> None:
                for ref in refs:
                    batch.delete(ref)

            if refs:
                await self._commit(what, writes)
            if len(refs) < BATCH_LIMIT:
                return

    async def add_reaction(
        self, room_id: str, message_id: str, user_id: str, emoji: str, max_distinct: int
    ) -> ChangeResult:
        reaction = self._reaction(room_id, message_id, user_id, emoji)

        async def decide(
            transaction: AsyncTransaction, timeout: float, message: Message
        ) -> Decision:
            if message.deleted:
                return ChangeResult(message, False, "deleted")
            held = await reaction.get(transaction=transaction, retry=None, timeout=timeout)
            if held.exists:
                return ChangeResult(message, changed=False)
            counts = dict(message.reactions)
            if emoji not in counts and len(counts) >= max_distinct:
                return ChangeResult(message, False, "full")
            counts[emoji] = counts.get(emoji, 0) + 1
            record = codec.reaction_record(message_id, emoji, user_id)
            return {"reactions": tuple(sorted(counts.items()))}, lambda t: t.create(
                reaction, record
            )

        return await self._change(f"add_reaction({room_id!r})", room_id, message_id, decide)

    async def remove_reaction(
        self, room_id: str, message_id: str, user_id: str, emoji: str
    ) -> ChangeResult:
        reaction = self._reaction(room_id, message_id, user_id, emoji)

        async def decide(
            transaction: AsyncTransaction, timeout: float, message: Message
        ) -> Decision:
            held = await reaction.get(transaction=transaction, retry=None, timeout=timeout)
            if not held.exists:
                return ChangeResult(message, changed=False)
            counts = dict(message.reactions)
            counts[emoji] = counts.get(emoji, 1) - 1
            if counts[emoji] <= 0:
                del counts[emoji]
            return {"reactions": tuple(sorted(counts.items()))}, lambda t: t.delete(reaction)

        return await self._change(f"remove_reaction({room_id!r})", room_id, message_id, decide)

    async def my_reactions(
        self, room_id: str, user_id: str, message_ids: list[str]
    ) -> dict[str, frozenset[str]]:
        """Two batched reads, no query: the messages (their emojis), then the documents of
        this user's possible reactions, whose ids are known."""
        messages = await self.get_messages(room_id, message_ids)
        candidates = {
            self._reaction(room_id, mid, user_id, emoji).id: (mid, emoji)
            for mid, message in messages.items()
            for emoji, _ in message.reactions
        }
        if not candidates:
            return {}
        refs = [self._in_room(room_id, "reactions", key) for key in candidates]

        async def op(timeout: float) -> dict[str, frozenset[str]]:
            mine: dict[str, set[str]] = {}
            async for snapshot in self.client.get_all(refs, retry=None, timeout=timeout):
                if snapshot.exists:
                    mid, emoji = candidates[snapshot.id]
                    mine.setdefault(mid, set()).add(emoji)
            return {mid: frozenset(emojis) for mid, emojis in mine.items()}

        return await self.calls(f"my_reactions({room_id!r})", op)

    # ------------------------------------------------------------------ the room list

    async def member_rooms(self, user_id: str, limit: int | None = None) -> list[str]:
        """The ids of the user's ``users/{user}/rooms`` mirrors (document id order): one
        query, one read per room returned."""
        query: Any = self._user(user_id).collection("rooms")
        if limit is not None:
            query = query.limit(limit)  # a query without order_by returns id order
        return await self._query(f"member_rooms({user_id!r})", query, lambda s: s.id)

    async def user_rooms(self, user_id: str) -> list[tuple[Room, Message | None]]:
        """The user's ``users/{user}/rooms`` mirrors (written with every membership change),
        the rooms in one batched read, then each room's last message (one small query per
        room, concurrently)."""
        mirrors = self._user(user_id).collection("rooms")
        room_ids = await self._query(f"user_rooms({user_id!r})", mirrors, lambda s: s.id)
        if not room_ids:
            return []
        refs = [self._room(rid) for rid in room_ids]

        async def op(timeout: float) -> list[Room]:
            found = []
            async for snapshot in self.client.get_all(refs, retry=None, timeout=timeout):
                room = codec.room_from(snapshot)
                if room is not None:
                    found.append(room)
            return found

        rooms = await self.calls(f"user_rooms({user_id!r}) rooms", op)
        lasts = await asyncio.gather(*(self.messages_before(r.id, None, 1) for r in rooms))
        return [(room, last[0] if last else None) for room, last in zip(rooms, lasts, strict=True)]

    async def unread(
        self, room_id: str, user_id: str, cap: int, marker: int | None = None
    ) -> Unread:
        """Counts by paging through the documents after the marker (seq and sender only)
        until ``cap`` are counted. Unread mentions use the composite index (mentions
        array-contains, seq) of firestore.indexes.json."""
        if marker is None:
            marker = await self.get_read_marker(room_id, user_id)
        messages = self._messages(room_id)

        def later(after: int) -> Any:
            return messages.where(filter=FieldFilter("seq", ">", after))

        def mentioned(after: int) -> Any:
            return later(after).where(filter=FieldFilter("mentions", "array_contains", user_id))

        unread = await self._count_after(
            f"unread({room_id!r})",
            later,
            marker,
            lambda data: data.get("deleted_at") is None and data.get("sender_id") != user_id,
            cap,
        )
        mentions = await self._count_after(
            f"unread_mentions({room_id!r})",
            mentioned,
            marker,
            lambda data: data.get("sender_id") != user_id,
            cap,
        )
        return Unread(marker, unread, mentions)

    async def _count_after(
        self,
        what: str,
        query_after: Callable[[int], Any],
        after: int,
        keep: Callable[[dict[str, Any]], bool],
        cap: int,
    ) -> int:
        count = 0
        while count < cap:
            query = (
                query_after(after)
                .order_by("seq")
                .select(["seq", "sender_id", "deleted_at"])
                .limit(UNREAD_PAGE)
            )
            rows = await self._query(what, query, codec.fields)
            count += sum(1 for data in rows if keep(data))
            if len(rows) < UNREAD_PAGE:
                break
            after = int(rows[-1]["seq"])
        return min(count, cap)

    async def set_read_marker(self, room_id: str, user_id: str, seq: int) -> int:
        return (await self.advance_read_marker(room_id, user_id, seq))[1]

    async def advance_read_marker(self, room_id: str, user_id: str, seq: int) -> tuple[int, int]:
        """One transaction: read the marker, write it only when ``seq`` is higher."""
        ref = self._in_room(room_id, "read_markers", user_id)

        async def body(transaction: AsyncTransaction, timeout: float) -> tuple[int, int]:
            stored = codec.seq_of(
                await ref.get(transaction=transaction, retry=None, timeout=timeout)
            )
            if seq <= stored:
                return stored, stored
            transaction.set(ref, codec.marker_record(seq))
            return stored, seq

        return await self._transact(
            f"set_read_marker({room_id!r}, {user_id!r})", ("marker", room_id, user_id), body
        )

    async def get_read_marker(self, room_id: str, user_id: str) -> int:
        ref = self._in_room(room_id, "read_markers", user_id)
        return await self._read(f"get_read_marker({room_id!r}, {user_id!r})", ref, codec.seq_of)

    # ------------------------------------------------------------------ users

    async def upsert_user(self, user_id: str, name: str) -> None:
        """Writes only when this process has not written this name for this user already."""
        if self._names.get(user_id) == name:
            return
        ref = self._user(user_id)
        await self._commit(
            f"upsert_user({user_id!r})", lambda batch: batch.set(ref, {"name": name}, merge=True)
        )
        self._names.put(user_id, name)

    async def set_last_seen(self, user_id: str, when: datetime) -> None:
        ref = self._user(user_id)
        await self._commit(
            f"set_last_seen({user_id!r})",
            lambda batch: batch.set(ref, {"last_seen": when}, merge=True),
        )

    async def get_users(self, user_ids: list[str]) -> dict[str, UserRecord]:
        unique = list(dict.fromkeys(user_ids))
        if not unique:
            return {}
        refs = [self._user(uid) for uid in unique]

        async def op(timeout: float) -> dict[str, UserRecord]:
            found: dict[str, UserRecord] = {}
            async for snapshot in self.client.get_all(refs, retry=None, timeout=timeout):
                record = codec.user_from(snapshot)
                if record is not None:
                    found[record.id] = record
            return {uid: found[uid] for uid in unique if uid in found}

        return await self.calls(f"get_users({len(unique)} ids)", op)

    # ------------------------------------------------------------------ sanctions
    # One document per sanction in ``sanctions``, named by SanctionKey.document_id().

    def _sanction(self, key: SanctionKey) -> Any:
        return self.client.collection("sanctions").document(key.document_id())

    async def put_sanction(self, key: SanctionKey, until: float | None) -> None:
        ref = self._sanction(key)
        data = codec.sanction_record(key, until)
        await self._commit(f"put_sanction({key.kind})", lambda batch: batch.set(ref, data))

    async def delete_sanction(self, key: SanctionKey) -> None:
        ref = self._sanction(key)
        await self._commit(f"delete_sanction({key.kind})", lambda batch: batch.delete(ref))

    async def get_sanctions(self, keys: list[SanctionKey]) -> dict[SanctionKey, float | None]:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        by_id = {key.document_id(): key for key in unique}
        refs = [self._sanction(key) for key in unique]

        async def op(timeout: float) -> dict[SanctionKey, float | None]:
            found: dict[SanctionKey, float | None] = {}
            async for snapshot in self.client.get_all(refs, retry=None, timeout=timeout):
                if snapshot.exists:
                    found[by_id[snapshot.id]] = codec.sanction_until(snapshot)
            return found

        return await self.calls(f"get_sanctions({len(unique)})", op)

    # ------------------------------------------------------------------ webhook outbox
    # One document per (event, endpoint) in ``outbox``. A queue (endpoint, ordering) is
    # served in the order (recorded_at, stamp), one entry at a time: only its oldest
    # pending entry is ever leased (the same contract as the SQLite table).
    supports_outbox = True

    def _outbox(self) -> Any:
        return self.client.collection("outbox")

    def _outbox_ref(self, entry: OutboxEntry) -> Any:
        return self._outbox().document(codec.outbox_id(entry.event_id, entry.endpoint))

    def _next_stamp(self) -> int:
        """Increasing in this process, close to the time in microseconds (exact in the
        emulator's 53-bit numbers)."""
        self._stamp = max(self._stamp + 1, time.time_ns() // 1000)
        return self._stamp

    def _record_outbox(self, writer: Any, entries: list[OutboxEntry], create: bool = True) -> None:
        """Add ``entries`` to a batch or transaction: ``create()`` (the commit fails with
        AlreadyExists on a recorded one) or ``set()`` (where the commit itself makes the
        event new)."""
        for entry in entries:
            record = codec.outbox_record(entry, self._next_stamp())
            if create:
                writer.create(self._outbox_ref(entry), record)
            else:
                writer.set(self._outbox_ref(entry), record)

    async def outbox_add(self, entries: list[OutboxEntry]) -> None:
        if not entries:
            return

        async def op(timeout: float) -> None:
            batch = self.client.batch()
            self._record_outbox(batch, entries)
            try:
                await batch.commit(retry=None, timeout=timeout)
                return
            except gexc.AlreadyExists:
                pass
            for entry in entries:  # some were recorded already: the others one by one
                batch = self.client.batch()
                self._record_outbox(batch, [entry])
                try:
                    await batch.commit(retry=None, timeout=timeout)
                except gexc.AlreadyExists:
                    pass

        await self.calls(f"outbox_add({entries[0].event_id!r})", op)

    async def _outbox_heads(self, now: float) -> list[tuple[Any, Any]]:
        """(reference, place) of the head of every queue, when it is due and free at
        ``now``. Walks the pending entries ordered by (queue, recorded_at, stamp) a page at
        a time; each page starts past the last queue of the one before, so a long queue
        costs at most one page (composite index in firestore.indexes.json)."""
        heads: list[tuple[Any, Any]] = []
        after = ""
        while True:
            query = (
                self._outbox()
                .where(filter=FieldFilter("state", "==", "pending"))
                .where(filter=FieldFilter("queue", ">", after))
                .order_by("queue")
                .order_by("recorded_at")
                .order_by("stamp")
                .select(codec.OUTBOX_QUEUE_FIELDS)
                .limit(OUTBOX_PAGE)
            )
            rows = await self._query(
                "outbox_claim (queues)", query, lambda s: (s.reference, codec.fields(s))
            )
            seen: set[str] = set()
            for ref, data in rows:
                if data["queue"] in seen:
                    continue
                seen.add(data["queue"])  # the first of its queue in the page: its head
                if codec.outbox_due(data, now):
                    heads.append((ref, codec.outbox_place(data)))
            if len(rows) < OUTBOX_PAGE:
                return heads
            after = rows[-1][1]["queue"]

    async def outbox_claim(
        self, owner: str, now: float, lease: float, limit: int
    ) -> list[OutboxItem]:
        """The oldest ``limit`` due heads, leased in one transaction that reads them again:
        an entry another instance leased (or settled) meanwhile is left out. A head stays
        the head until it is delivered or dead (entries recorded later sort after it)."""
        heads = await self._outbox_heads(now)
        if not heads:
            return []
        heads.sort(key=lambda head: head[1])
        refs = [ref for ref, _ in heads[:limit]]

        async def body(transaction: AsyncTransaction, timeout: float) -> list[OutboxItem]:
            found: dict[str, Any] = {}
            async for snapshot in self.client.get_all(
                refs, transaction=transaction, retry=None, timeout=timeout
            ):
                found[snapshot.reference.path] = snapshot
            claimed = []
            for ref in refs:
                snapshot = found[ref.path]
                if snapshot.exists and codec.outbox_due(codec.fields(snapshot), now):
                    transaction.update(ref, codec.outbox_lease(owner, now + lease))
                    claimed.append(codec.outbox_item_from(snapshot))
            return claimed

        return await self._transact("outbox_claim", ("outbox",), body)

    async def outbox_finish(
        self,
        item: OutboxItem,
        owner: str,
        delivered: bool,
        next_at: float = 0.0,
        dead: bool = False,
        error: str = "",
    ) -> bool:
        ref = self._outbox_ref(item.entry)

        async def body(transaction: AsyncTransaction, timeout: float) -> bool:
            snapshot = await ref.get(transaction=transaction, retry=None, timeout=timeout)
            data = codec.fields(snapshot)
            if data.get("lease_owner") != owner:
                return False
            if delivered:
                transaction.delete(ref)
            else:
                attempts = int(data.get("attempts", 0)) + 1
                transaction.update(ref, codec.outbox_settled(attempts, next_at, dead, error))
            return True

        return await self._transact("outbox_finish", ("outbox", ref.id), body)

    async def outbox_counts(self) -> dict[str, int]:
        async def op(timeout: float) -> dict[str, int]:
            counts = {}
            for state in ("pending", "dead"):
                query = self._outbox().where(filter=FieldFilter("state", "==", state)).count()
                result = await query.get(retry=None, timeout=timeout)
                counts[state] = int(result[0][0].value)
            return counts

        return await self.calls("outbox_counts", op)
