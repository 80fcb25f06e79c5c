"""SQLite store: the embedded default. WAL journal; the work runs on two threads of its own.

One connection writes and one reads, each on its own single thread (a *lane*), so the event
loop never blocks. Calls that arrive while a lane's thread is busy wait, and then go over
together in one hop: one thread wake-up and one loop wake-up for the lot instead of one each.
On the writer's lane everything that went over together runs in one ``BEGIN IMMEDIATE``
transaction (group commit), each call inside a savepoint of its own: a call that fails rolls
back to its savepoint alone, the others commit, and every call is answered only after the
``COMMIT`` (an acked message is on disk as much as before: WAL, ``synchronous=NORMAL``).
Seqs are allocated inside the transaction (max + 1, one call after the other), so they stay
dense and unique. WAL lets the reader run beside the writer. Several processes on one host
may share the file: ``UNIQUE(room, seq)`` backs the allocation, and a lock held elsewhere is
waited for up to the timeout; a batch whose ``BEGIN`` or ``COMMIT`` fails fails its own
calls, whose callers may retry (sends are idempotent by client id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from server.core import metrics
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

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL, endpoint TEXT NOT NULL, ordering TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0, lease_owner TEXT, lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT, UNIQUE (event_id, endpoint)
);
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox (state, endpoint, ordering, pos);
CREATE TABLE IF NOT EXISTS sanctions (
    kind TEXT NOT NULL, scope TEXT NOT NULL, user TEXT NOT NULL, until REAL,
    PRIMARY KEY (kind, scope, user)
);
CREATE TABLE IF NOT EXISTS rooms (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, owner TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    room TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (room, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL,
    sender_id TEXT NOT NULL, sender_name TEXT NOT NULL, text TEXT NOT NULL,
    client_id TEXT NOT NULL, created_at TEXT NOT NULL,
    UNIQUE (room, seq)
);
CREATE TABLE IF NOT EXISTS read_markers (
    room TEXT NOT NULL, user TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (room, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, last_seen TEXT
);
CREATE TABLE IF NOT EXISTS reactions (
    message_id TEXT NOT NULL, emoji TEXT NOT NULL, user TEXT NOT NULL,
    PRIMARY KEY (message_id, emoji, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mentions (
    room TEXT NOT NULL, user TEXT NOT NULL, seq INTEGER NOT NULL, message_id TEXT NOT NULL,
    PRIMARY KEY (room, user, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS room_changes (
    room TEXT PRIMARY KEY, change_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_user ON members (user, room);
"""

#: Columns added after the first release; ``start`` adds those an older file lacks.
ADDED_MESSAGE_COLUMNS = {
    "reply_to": "TEXT",
    "mentions": "TEXT NOT NULL DEFAULT '[]'",
    "edited_at": "TEXT",
    "revision": "INTEGER NOT NULL DEFAULT 0",
    "deleted_at": "TEXT",
    "change_seq": "INTEGER NOT NULL DEFAULT 0",
    "reactions": "TEXT NOT NULL DEFAULT '[]'",
}
CHANGES_INDEX = (
    "CREATE INDEX IF NOT EXISTS messages_changes ON messages (room, change_seq) "
    "WHERE change_seq > 0"
)

#: what a new message's insert writes (the other columns start at their defaults)
NEW_MESSAGE_COLUMNS = (
    "id, room, seq, sender_id, sender_name, text, client_id, created_at, reply_to, mentions"
)
MESSAGE_COLUMNS = f"{NEW_MESSAGE_COLUMNS}, edited_at, revision, deleted_at, change_seq, reactions"
LAST_SEQ = "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE room = ?"


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _message(row: tuple) -> Message:
    return Message(
        id=row[0],
        room=row[1],
        seq=row[2],
        sender_id=row[3],
        sender_name=row[4],
        text=row[5],
        client_id=row[6],
        created_at=datetime.fromisoformat(row[7]),
        reply_to=row[8],
        mentions=tuple(json.loads(row[9])),
        edited_at=_time(row[10]),
        revision=row[11],
        deleted_at=_time(row[12]),
        change_seq=row[13],
        reactions=tuple((emoji, count) for emoji, count in json.loads(row[14])),
    )


def _migrate(conn: sqlite3.Connection) -> None:
    """Create what is missing: tables, then the message columns of later releases."""
    conn.executescript(SCHEMA)
    # Processes sharing the file may start together: one at a time reads the columns and
    # adds the missing ones (two adding the same column would fail the second start).
    conn.execute("BEGIN IMMEDIATE")
    try:
        present = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        for column, decl in ADDED_MESSAGE_COLUMNS.items():
            if column not in present:
                conn.execute(f"ALTER TABLE messages ADD COLUMN {column} {decl}")
        conn.execute(CHANGES_INDEX)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _index_mentions(
    conn: sqlite3.Connection,
    room: str,
    seq: int,
    mid: str,
    mentions: tuple[str, ...],
    sender_id: str,
) -> None:
    """The rows that count a user's unread mentions (the sender's own are not counted)."""
    conn.executemany(
        "INSERT OR IGNORE INTO mentions (room, user, seq, message_id) VALUES (?, ?, ?, ?)",
        [(room, user, seq, mid) for user in mentions if user != sender_id],
    )


def _unindex_mentions(conn: sqlite3.Connection, message: Message) -> None:
    conn.executemany(
        "DELETE FROM mentions WHERE room = ? AND user = ? AND seq = ?",
        [(message.room, user, message.seq) for user in message.mentions],
    )


def _insert_outbox(conn: sqlite3.Connection, entries: list[OutboxEntry]) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO outbox (event_id, endpoint, ordering, body) VALUES (?, ?, ?, ?)",
        [(e.event_id, e.endpoint, e.ordering, e.body) for e in entries],
    )


def _translated(exc: BaseException) -> BaseException:
    """The exception a store caller sees for ``exc`` raised by sqlite3."""
    if isinstance(exc, sqlite3.OperationalError):
        return StoreUnavailable(f"sqlite error: {exc}")
    if isinstance(exc, sqlite3.ProgrammingError):  # e.g. the connection was closed
        return StoreUnavailable(f"sqlite connection unusable: {exc}")
    return exc


Outcome = tuple[bool, Any]  # (True, result) or (False, exception)


QUEUED, RUNNING, ABANDONED = "queued", "running", "abandoned"


class _Call:
    """One store call waiting for, or running on, a lane.

    ``state`` goes from ``QUEUED`` to ``RUNNING`` (its batch claimed it on the lane's
    thread) or to ``ABANDONED`` (its caller stopped waiting: timeout or cancellation), never
    both; both moves happen under the lane's lock.
    """

    __slots__ = ("work", "future", "deadline", "savepoint", "state")

    def __init__(
        self,
        work: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future,
        deadline: float,
        savepoint: bool = True,
    ) -> None:
        self.work = work
        self.future = future
        self.deadline = deadline  # loop time
        self.savepoint = savepoint  # writes: run inside a savepoint of its own
        self.state = QUEUED


Claim = Callable[[list[_Call]], list[int]]


#: a new message at the room's next seq, which the statement returns
_INSERT_NEXT_SEQ = (
    f"INSERT INTO messages ({NEW_MESSAGE_COLUMNS}) "
    "SELECT ?, ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ?, ?, ?, ? FROM messages WHERE room = ? "
    "RETURNING seq"
)
#: a new message at a seq chosen by the caller (the Redis allocator)
_INSERT_AT_SEQ = (
    f"INSERT INTO messages ({NEW_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class _Lane:
    """One connection on one thread of its own, fed in batches.

    ``submit`` queues a call; when the thread is free, every queued call goes over in one
    hop and ``run_batch(conn, calls, claim)`` runs them there, returning one outcome per
    call. The futures are settled in one loop callback when the batch is done, then the
    next batch (what queued meanwhile) goes over. Invariant: at most one batch per lane at a
    time.

    Deadlines: one timer per lane (not one per call). A call still queued at its deadline
    (``timeout`` seconds after it was submitted) is abandoned and fails with
    :class:`StoreUnavailable`; it never runs. A call its batch has claimed (``claim``, after
    ``BEGIN`` on the writer) runs to the end of its batch and is answered then: it is never
    half abandoned, so a batch never has to roll back for a caller that gave up. Only a
    batch that has not ended ``timeout`` seconds after a claimed call's deadline (a disk
    that stopped answering) fails it unanswered; its write may still land, and a retry finds
    it (sends are idempotent by client id).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[sqlite3.Connection, list[_Call], Claim], list[Outcome]],
        timeout: float,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{name}")
        self._run_batch = run_batch
        self._lock = threading.Lock()  # guards _Call.state between the loop and the thread
        self._queued: list[_Call] = []
        self._unanswered: deque[_Call] = deque()  # in submission order
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch_sizes = metrics.STORE_BATCH.labels(name)

    async def open(self, opener: Callable[[], sqlite3.Connection]) -> None:
        self._loop = asyncio.get_running_loop()
        self.conn = await self._loop.run_in_executor(self._thread, opener)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:  # queued behind the batch in progress, if any
            await asyncio.get_running_loop().run_in_executor(self._thread, conn.close)
        self._thread.shutdown(wait=False)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def submit(self, work: Callable[[sqlite3.Connection], Any], savepoint: bool = True) -> _Call:
        loop = self._loop
        if self.conn is None or loop is None:
            raise StoreUnavailable("sqlite store is closed")
        call = _Call(work, loop.create_future(), loop.time() + self.timeout, savepoint)
        self._queued.append(call)
        self._unanswered.append(call)
        if self._timer is None:
            self._timer = loop.call_at(call.deadline, self._expire)
        if not self._busy:
            self._busy = True
            # calls made in this turn of the loop go over with this one
            loop.call_soon(self._dispatch)
        return call

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop of ``open``: the callbacks below run only after ``submit``, which needs it."""
        assert self._loop is not None, "sqlite lane used before open()"
        return self._loop

    def abandon(self, call: _Call) -> bool:
        """Give ``call`` up unless its batch claimed it already; True if it will not run."""
        with self._lock:
            if call.state == QUEUED:
                call.state = ABANDONED
            return call.state == ABANDONED

    def claim(self, calls: list[_Call]) -> list[int]:
        """On the thread: the indexes of ``calls`` still queued, now running."""
        claimed = []
        with self._lock:
            for index, call in enumerate(calls):
                if call.state == QUEUED:
                    call.state = RUNNING
                    claimed.append(index)
        return claimed

    def _dispatch(self) -> None:
        calls, self._queued = self._queued, []
        if not calls:
            self._busy = False
            return
        self._batch_sizes.observe(len(calls))
        conn = self.conn
        try:
            if conn is None:
                raise StoreUnavailable("sqlite store is closed")
            done = self._thread.submit(self._run_batch, conn, calls, self.claim)
        except Exception as exc:  # closed meanwhile: the executor refuses new work
            unavailable = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
            self._settle(calls, [(False, unavailable)] * len(calls))
            return
        done.add_done_callback(lambda finished: self._from_thread(calls, finished))

    def _from_thread(self, calls: list[_Call], finished: Future) -> None:
        exc = finished.exception()
        outcomes = [(False, _translated(exc))] * len(calls) if exc else finished.result()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._settle, calls, outcomes)

    def _settle(self, calls: list[_Call], outcomes: list[Outcome]) -> None:
        for call, (ok, value) in zip(calls, outcomes, strict=True):
            if call.future.done():  # its caller gave up
                continue
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)
        self._forget_answered()
        self._dispatch()

    def _forget_answered(self) -> None:
        unanswered = self._unanswered
        while unanswered and unanswered[0].future.done():
            unanswered.popleft()

    def _expire(self) -> None:
        """Abandon the queued calls past their deadline; wake again for the next deadline."""
        self._timer = None
        now = self.loop.time()
        wake = None
        for call in self._unanswered:  # oldest first: deadlines ascend
            if call.future.done():
                continue
            if call.deadline > now:
                wake = call.deadline if wake is None else min(wake, call.deadline)
                break
            if self.abandon(call):
                call.future.set_exception(
                    StoreUnavailable(f"sqlite did not answer within {self.timeout}s")
                )
            elif call.deadline + self.timeout <= now:  # claimed, and its batch hangs
                call.future.set_exception(
                    StoreUnavailable(f"sqlite did not finish within {2 * self.timeout}s")
                )
            else:
                hard = call.deadline + self.timeout
                wake = hard if wake is None else min(wake, hard)
        self._forget_answered()
        if wake is not None:
            self._timer = self.loop.call_at(wake, self._expire)


def _read_batch(conn: sqlite3.Connection, calls: list[_Call], claim: Claim) -> list[Outcome]:
    """Reads, one after the other; each answers for itself."""
    gone = StoreUnavailable("abandoned before it started")
    outcomes: list[Outcome] = [(False, gone)] * len(calls)
    for index in claim(calls):
        try:
            outcomes[index] = (True, calls[index].work(conn))
        except Exception as exc:
            outcomes[index] = (False, _translated(exc))
    return outcomes


def _write_batch(conn: sqlite3.Connection, calls: list[_Call], claim: Claim) -> list[Outcome]:
    """Every call in one transaction, each in a savepoint of its own (group commit).

    (A call whose only writing statement is its last runs without one: SQLite undoes a
    failed statement whole.) The calls are claimed once ``BEGIN`` has the write lock: those
    abandoned by then (their caller gave up, e.g. while ``BEGIN`` waited for another
    process) are skipped and nothing of theirs is written. A call that raises is rolled
    back to its savepoint and answers with its exception; the others commit together and
    answer after the ``COMMIT``. A ``BEGIN`` or ``COMMIT`` that fails fails every call of
    the batch, and a batch whose calls were all abandoned does not begin at all.
    """
    gone = StoreUnavailable("abandoned by its caller")
    outcomes: list[Outcome] = [(False, gone)] * len(calls)
    if all(call.state == ABANDONED for call in calls):
        return outcomes
    try:
        conn.execute("BEGIN IMMEDIATE")
    except Exception as exc:
        failure = _translated(exc)
        return [(False, failure)] * len(calls)
    live = claim(calls)
    try:
        for index in live:
            call = calls[index]
            if call.savepoint:
                conn.execute("SAVEPOINT call")
            try:
                outcomes[index] = (True, call.work(conn))
            except Exception as exc:
                if call.savepoint:
                    conn.execute("ROLLBACK TO call")
                outcomes[index] = (False, _translated(exc))
            if call.savepoint:
                conn.execute("RELEASE call")
        conn.execute("COMMIT")
    except Exception as exc:
        if conn.in_transaction:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
        failure = _translated(exc)
        for index in live:
            outcomes[index] = (False, failure)
    return outcomes


class SQLiteStore(Store):
    """``room_cache``: how many rooms ``get_room`` keeps in memory, oldest dropped first.

    A room never changes once created (``create_room`` inserts or ignores; nothing updates
    or deletes a room), so a kept room is never stale; one created by another process is
    read from the file the first time it is asked for. This saves the read that every send
    would otherwise make to check its room.
    """

    def __init__(self, path: Path, timeout: float = 5.0, room_cache: int = 10_000) -> None:
        self.path = path
        self.timeout = timeout
        self.room_cache = room_cache
        self._rooms: dict[str, Room] = {}
        self._writer = _Lane("writer", _write_batch, timeout)
        self._reader = _Lane("reader", _read_batch, timeout)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=self.timeout
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        return conn

    def _open_with_schema(self) -> sqlite3.Connection:
        conn = self._open()
        _migrate(conn)
        return conn

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await self._writer.open(self._open_with_schema)
        await self._reader.open(self._open)

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def _call(
        self, lane: _Lane, work: Callable[[sqlite3.Connection], T], savepoint: bool = True
    ) -> T:
        """``work(conn)`` on the lane's thread, bounded by the timeout.

        A caller that stops waiting (timeout, cancellation) abandons its call: if its batch
        has not claimed it yet it never runs and nothing of it is written; once claimed it
        finishes with its batch (see :class:`_Lane`). ``savepoint=False``
        only for a write whose one statement that writes is also its last one (a failure
        then leaves nothing of it behind without a savepoint).
        """
        call = lane.submit(work, savepoint)
        try:
            return await call.future
        except asyncio.CancelledError:
            lane.abandon(call)
            raise

    async def _in_writer(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` inside a write transaction, committed or rolled back whole."""
        return await self._call(self._writer, work)

    async def _fetchall(self, sql: str, params: tuple = ()) -> list[tuple]:
        return await self._call(self._reader, lambda conn: conn.execute(sql, params).fetchall())

    async def _fetchone(self, sql: str, params: tuple = ()) -> tuple | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def _fetchvalue(self, sql: str, params: tuple, default: Any) -> Any:
        """The first column of the first row, or ``default`` when there is no row."""
        row = await self._fetchone(sql, params)
        return row[0] if row else default

    async def _write(self, statements: list[tuple[str, tuple]]) -> None:
        """Run statements in one transaction."""

        def work(conn: sqlite3.Connection) -> None:
            for sql, params in statements:
                conn.execute(sql, params)

        await self._in_writer(work)

    async def ping(self) -> None:
        await self._fetchone("SELECT 1")

    async def get_room(self, room_id: str) -> Room | None:
        room = self._rooms.get(room_id)
        if room is not None:
            return room
        row = await self._fetchone(
            "SELECT id, kind, name, owner, created_at FROM rooms WHERE id = ?", (room_id,)
        )
        if row is None:
            return None
        room = Room(row[0], row[1], row[2], row[3], datetime.fromisoformat(row[4]))
        self._keep(room)
        return room

    def _keep(self, room: Room) -> None:
        if self.room_cache <= 0:
            return
        rooms = self._rooms
        rooms[room.id] = room
        while len(rooms) > self.room_cache:
            del rooms[next(iter(rooms))]
        metrics.STORE_ROOM_CACHE.set(len(rooms))

    async def create_room(
        self, room: Room, members: list[str], outbox: list[OutboxEntry] | None = None
    ) -> tuple[Room, bool]:
        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO rooms (id, kind, name, owner, created_at) VALUES (?, ?, ?, ?, ?)",
                (room.id, room.kind, room.name, room.owner, room.created_at.isoformat()),
            )
            if cursor.rowcount != 1:
                return False
            conn.executemany(
                "INSERT OR IGNORE INTO members (room, user) VALUES (?, ?)",
                [(room.id, uid) for uid in members],
            )
            _insert_outbox(conn, outbox or [])
            return True

        if await self._in_writer(work):
            return room, True
        stored = await self.get_room(room.id)
        return (stored or room), False

    async def add_members(
        self, room_id: str, user_ids: list[str], outbox: list[OutboxEntry] | None = None
    ) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO members (room, user) VALUES (?, ?)",
                [(room_id, u) for u in user_ids],
            )
            _insert_outbox(conn, outbox or [])

        await self._in_writer(work)

    async def remove_members(
        self, room_id: str, user_ids: list[str], outbox: list[OutboxEntry] | None = None
    ) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "DELETE FROM members WHERE room = ? AND user = ?", [(room_id, u) for u in user_ids]
            )
            _insert_outbox(conn, outbox or [])

        await self._in_writer(work)

    async def is_member(self, room_id: str, user_id: str) -> bool:
        row = await self._fetchone(
            "SELECT 1 FROM members WHERE room = ? AND user = ?", (room_id, user_id)
        )
        return row is not None

    async def list_members(
        self, room_id: str, after: str = "", limit: int | None = None
    ) -> list[str]:
        rows = await self._fetchall(
            "SELECT user FROM members WHERE room = ? AND user > ? ORDER BY user LIMIT ?",
            (room_id, after, -1 if limit is None else limit),
        )
        return [row[0] for row in rows]

    async def count_members(self, room_id: str) -> int:
        count = await self._fetchvalue("SELECT COUNT(*) FROM members WHERE room = ?", (room_id,), 0)
        return int(count)

    async def add_message(self, draft: MessageDraft, seq: int | None = None) -> AddResult:
        mid = draft.message_id
        now = utcnow()

        def last_seq(conn: sqlite3.Connection) -> int:
            return conn.execute(LAST_SEQ, (draft.room,)).fetchone()[0]

        values = (
            mid,
            draft.room,
            draft.sender_id,
            draft.sender_name,
            draft.text,
            draft.client_id,
            now.isoformat(),
            draft.reply_to,
            json.dumps(draft.mentions) if draft.mentions else "[]",
        )

        def work(conn: sqlite3.Connection) -> tuple[Message, bool]:
            # One statement in the common case, the next seq worked out inside it: each
            # statement hands the GIL back and forth with the event loop, which waits its
            # turn when the loop is busy. A repeat is found by the primary key refusing the
            # insert (rolled back whole: one statement).
            try:
                if seq is None:
                    chosen = conn.execute(_INSERT_NEXT_SEQ, (*values, draft.room)).fetchall()[0][0]
                else:
                    chosen = seq
                    conn.execute(_INSERT_AT_SEQ, (*values[:2], seq, *values[2:]))
            except sqlite3.IntegrityError as exc:
                row = conn.execute(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (mid,)
                ).fetchone()
                if row is not None:  # the same client_id again: the stored message
                    return _message(row), False
                raise SeqTaken(draft.room, last_seq(conn)) from exc
            if draft.mentions:
                _index_mentions(conn, draft.room, chosen, mid, draft.mentions, draft.sender_id)
            message = draft.stored(chosen, now)
            if draft.outgoing is not None:  # in the same transaction as the message
                _insert_outbox(conn, draft.outgoing.entries(message))
            return message, True

        # Without outbox rows the insert is the call's one write and its last statement.
        savepoint = draft.outgoing is not None
        message, created = await self._call(self._writer, work, savepoint=savepoint)
        return AddResult(message, created)

    async def find_message(self, room_id: str, sender_id: str, client_id: str) -> Message | None:
        row = await self._fetchone(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?",
            (message_id(room_id, sender_id, client_id),),
        )
        return _message(row) if row else None

    async def last_seq(self, room_id: str) -> int:
        return await self._fetchvalue(LAST_SEQ, (room_id,), 0)

    async def messages_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        rows = await self._fetchall(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ? AND seq > ? ORDER BY seq LIMIT ?",
            (room_id, after, limit),
        )
        return [_message(r) for r in rows]

    async def messages_before(self, room_id: str, before: int | None, limit: int) -> list[Message]:
        bound = before if before is not None else 2**62
        rows = await self._fetchall(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (room_id, bound, limit),
        )
        return [_message(r) for r in reversed(rows)]

    async def get_messages(self, room_id: str, ids: list[str]) -> dict[str, Message]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = await self._fetchall(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ? AND id IN ({marks})",
            (room_id, *ids),
        )
        return {row[0]: _message(row) for row in rows}

    async def change_seq(self, room_id: str) -> int:
        row = await self._fetchone("SELECT change_seq FROM room_changes WHERE room = ?", (room_id,))
        return row[0] if row else 0

    async def changes_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        rows = await self._fetchall(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ? AND change_seq > ? "
            "ORDER BY change_seq LIMIT ?",
            (room_id, after, limit),
        )
        return [_message(r) for r in rows]

    async def _change(
        self,
        room_id: str,
        mid: str,
        decide: Callable[[sqlite3.Connection, Message], ChangeResult | dict],
        outgoing: Outgoing | None = None,
    ) -> ChangeResult:
        """One transaction: read the message, let ``decide`` refuse (a ChangeResult) or
        write its side records and name the columns to set (a dict); then stamp the
        message with the room's next change seq and its reaction counts, and record
        ``outgoing``'s entries for the changed message."""

        def work(conn: sqlite3.Connection) -> ChangeResult:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ? AND id = ?", (room_id, mid)
            ).fetchone()
            if row is None:
                return ChangeResult(None, changed=False)
            decided = decide(conn, _message(row))
            if isinstance(decided, ChangeResult):
                return decided
            (change,) = conn.execute(
                "INSERT INTO room_changes (room, change_seq) VALUES (?, 1) ON CONFLICT (room) "
                "DO UPDATE SET change_seq = change_seq + 1 RETURNING change_seq",
                (room_id,),
            ).fetchone()
            counts = conn.execute(
                "SELECT emoji, COUNT(*) FROM reactions WHERE message_id = ? "
                "GROUP BY emoji ORDER BY emoji",
                (mid,),
            ).fetchall()
            columns = {**decided, "change_seq": change, "reactions": json.dumps(counts)}
            assignments = ", ".join(f"{name} = ?" for name in columns)
            conn.execute(
                f"UPDATE messages SET {assignments} WHERE id = ?", (*columns.values(), mid)
            )
            updated = _message(
                conn.execute(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (mid,)
                ).fetchone()
            )
            if outgoing is not None:
                _insert_outbox(conn, outgoing.entries(updated))
            return ChangeResult(updated, changed=True)

        return await self._in_writer(work)

    async def edit_message(
        self,
        room_id: str,
        message_id: str,
        text: str,
        mentions: tuple[str, ...],
        at: datetime,
        outgoing: Outgoing | None = None,
    ) -> ChangeResult:
        def decide(conn: sqlite3.Connection, message: Message) -> ChangeResult | dict:
            if message.deleted:
                return ChangeResult(message, False, "deleted")
            if message.text == text:
                return ChangeResult(message, changed=False)
            _unindex_mentions(conn, message)
            _index_mentions(conn, room_id, message.seq, message.id, mentions, message.sender_id)
            return {
                "text": text,
                "mentions": json.dumps(mentions),
                "edited_at": at.isoformat(),
                "revision": message.revision + 1,
            }

        return await self._change(room_id, message_id, decide, outgoing)

    async def delete_message(
        self, room_id: str, message_id: str, at: datetime, outgoing: Outgoing | None = None
    ) -> ChangeResult:
        def decide(conn: sqlite3.Connection, message: Message) -> ChangeResult | dict:
            if message.deleted:
                return ChangeResult(message, changed=False)
            _unindex_mentions(conn, message)
            conn.execute("DELETE FROM reactions WHERE message_id = ?", (message.id,))
            return {"text": "", "mentions": "[]", "deleted_at": at.isoformat()}

        return await self._change(room_id, message_id, decide, outgoing)

    async def add_reaction(
        self, room_id: str, message_id: str, user_id: str, emoji: str, max_distinct: int
    ) -> ChangeResult:
        def decide(conn: sqlite3.Connection, message: Message) -> ChangeResult | dict:
            if message.deleted:
                return ChangeResult(message, False, "deleted")
            emojis = dict(message.reactions)
            if emoji not in emojis and len(emojis) >= max_distinct:
                return ChangeResult(message, False, "full")
            added = conn.execute(
                "INSERT OR IGNORE INTO reactions (message_id, emoji, user) VALUES (?, ?, ?)",
                (message.id, emoji, user_id),
            )
            return {} if added.rowcount == 1 else ChangeResult(message, changed=False)

        return await self._change(room_id, message_id, decide)

    async def remove_reaction(
        self, room_id: str, message_id: str, user_id: str, emoji: str
    ) -> ChangeResult:
        def decide(conn: sqlite3.Connection, message: Message) -> ChangeResult | dict:
            removed = conn.execute(
                "DELETE FROM reactions WHERE message_id = ? AND emoji = ? AND user = ?",
                (message.id, emoji, user_id),
            )
            return {} if removed.rowcount == 1 else ChangeResult(message, changed=False)

        return await self._change(room_id, message_id, decide)

    async def my_reactions(
        self, room_id: str, user_id: str, message_ids: list[str]
    ) -> dict[str, frozenset[str]]:
        if not message_ids:
            return {}
        marks = ",".join("?" * len(message_ids))
        rows = await self._fetchall(
            "SELECT r.message_id, r.emoji FROM reactions r JOIN messages m ON m.id = r.message_id "
            f"WHERE m.room = ? AND r.user = ? AND r.message_id IN ({marks})",
            (room_id, user_id, *message_ids),
        )
        mine: dict[str, set[str]] = {}
        for mid, emoji in rows:
            mine.setdefault(mid, set()).add(emoji)
        return {mid: frozenset(emojis) for mid, emojis in mine.items()}

    async def member_rooms(self, user_id: str, limit: int | None = None) -> list[str]:
        rows = await self._fetchall(
            "SELECT room FROM members WHERE user = ? ORDER BY room LIMIT ?",
            (user_id, -1 if limit is None else limit),
        )
        return [row[0] for row in rows]

    async def user_rooms(self, user_id: str) -> list[tuple[Room, Message | None]]:
        columns = ", ".join(f"m.{c.strip()}" for c in MESSAGE_COLUMNS.split(","))
        rows = await self._fetchall(
            f"SELECT r.id, r.kind, r.name, r.owner, r.created_at, {columns} "
            "FROM members mb JOIN rooms r ON r.id = mb.room "
            "LEFT JOIN messages m ON m.room = r.id "
            "AND m.seq = (SELECT MAX(seq) FROM messages WHERE room = r.id) "
            "WHERE mb.user = ?",
            (user_id,),
        )
        return [
            (
                Room(row[0], row[1], row[2], row[3], datetime.fromisoformat(row[4])),
                _message(row[5:]) if row[5] is not None else None,
            )
            for row in rows
        ]

    async def unread(
        self, room_id: str, user_id: str, cap: int, marker: int | None = None
    ) -> Unread:
        def work(conn: sqlite3.Connection) -> Unread:
            marker_seq = marker
            if marker_seq is None:
                found = conn.execute(
                    "SELECT seq FROM read_markers WHERE room = ? AND user = ?", (room_id, user_id)
                ).fetchone()
                marker_seq = found[0] if found else 0
            unread = conn.execute(
                "SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE room = ? AND seq > ? "
                "AND deleted_at IS NULL AND sender_id != ? LIMIT ?)",
                (room_id, marker_seq, user_id, cap),
            ).fetchone()[0]
            mentions = conn.execute(
                "SELECT COUNT(*) FROM (SELECT 1 FROM mentions WHERE room = ? AND user = ? "
                "AND seq > ? LIMIT ?)",
                (room_id, user_id, marker_seq, cap),
            ).fetchone()[0]
            return Unread(marker_seq, unread, mentions)

        return await self._call(self._reader, work)

    async def set_read_marker(self, room_id: str, user_id: str, seq: int) -> int:
        await self._write(
            [
                (
                    "INSERT INTO read_markers (room, user, seq) VALUES (?, ?, ?) "
                    "ON CONFLICT (room, user) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                    (room_id, user_id, seq),
                )
            ]
        )
        return await self.get_read_marker(room_id, user_id)

    async def get_read_marker(self, room_id: str, user_id: str) -> int:
        return await self._fetchvalue(
            "SELECT seq FROM read_markers WHERE room = ? AND user = ?", (room_id, user_id), 0
        )

    async def upsert_user(self, user_id: str, name: str) -> None:
        await self._write(
            [
                (
                    "INSERT INTO users (id, name) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                    (user_id, name),
                )
            ]
        )

    async def set_last_seen(self, user_id: str, when: datetime) -> None:
        await self._write(
            [
                (
                    "INSERT INTO users (id, name, last_seen) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
                    (user_id, user_id, when.isoformat()),
                )
            ]
        )

    async def get_users(self, user_ids: list[str]) -> dict[str, UserRecord]:
        if not user_ids:
            return {}
        marks = ",".join("?" * len(user_ids))
        rows = await self._fetchall(
            f"SELECT id, name, last_seen FROM users WHERE id IN ({marks})", tuple(user_ids)
        )
        return {
            r[0]: UserRecord(r[0], r[1], datetime.fromisoformat(r[2]) if r[2] else None)
            for r in rows
        }

    async def put_sanction(self, key: SanctionKey, until: float | None) -> None:
        await self._write(
            [
                (
                    "INSERT INTO sanctions (kind, scope, user, until) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (kind, scope, user) DO UPDATE SET until = excluded.until",
                    (key.kind, key.scope, key.user_id, until),
                )
            ]
        )

    async def delete_sanction(self, key: SanctionKey) -> None:
        await self._write(
            [
                (
                    "DELETE FROM sanctions WHERE kind = ? AND scope = ? AND user = ?",
                    (key.kind, key.scope, key.user_id),
                )
            ]
        )

    async def get_sanctions(self, keys: list[SanctionKey]) -> dict[SanctionKey, float | None]:
        found: dict[SanctionKey, float | None] = {}
        for key in dict.fromkeys(keys):
            row = await self._fetchone(
                "SELECT until FROM sanctions WHERE kind = ? AND scope = ? AND user = ?",
                (key.kind, key.scope, key.user_id),
            )
            if row is not None:
                found[key] = row[0]
        return found

    # ------------------------------------------------------------------ webhook outbox
    supports_outbox = True

    async def outbox_add(self, entries: list[OutboxEntry]) -> None:
        if entries:
            await self._call(self._writer, lambda conn: _insert_outbox(conn, entries))

    async def outbox_claim(
        self, owner: str, now: float, lease: float, limit: int
    ) -> list[OutboxItem]:
        def work(conn: sqlite3.Connection) -> list[OutboxItem]:
            # The head of each (endpoint, ordering) queue, if due and free; in one IMMEDIATE
            # transaction, so two processes sharing the file never claim the same entry.
            rows = conn.execute(
                "SELECT o.pos, o.event_id, o.endpoint, o.ordering, o.body, o.attempts "
                "FROM outbox o WHERE o.state = 'pending' AND o.next_at <= ? "
                "AND o.lease_until <= ? AND o.pos = (SELECT MIN(p.pos) FROM outbox p "
                "WHERE p.state = 'pending' AND p.endpoint = o.endpoint "
                "AND p.ordering = o.ordering) ORDER BY o.pos LIMIT ?",
                (now, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE pos = ?",
                [(owner, now + lease, row[0]) for row in rows],
            )
            return [
                OutboxItem(row[0], OutboxEntry(row[1], row[2], row[3], row[4]), row[5])
                for row in rows
            ]

        return await self._call(self._writer, work)

    async def outbox_finish(
        self,
        item: OutboxItem,
        owner: str,
        delivered: bool,
        next_at: float = 0.0,
        dead: bool = False,
        error: str = "",
    ) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            if delivered:
                cursor = conn.execute(
                    "DELETE FROM outbox WHERE pos = ? AND lease_owner = ?", (item.pos, owner)
                )
            else:
                cursor = conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_at = ?, state = ?, "
                    "last_error = ?, lease_owner = NULL, lease_until = 0 "
                    "WHERE pos = ? AND lease_owner = ?",
                    (next_at, "dead" if dead else "pending", error[:500], item.pos, owner),
                )
            return cursor.rowcount == 1

        return await self._call(self._writer, work)

    async def outbox_counts(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        counts = {"pending": 0, "dead": 0}
        counts.update({state: count for state, count in rows})
        return counts
