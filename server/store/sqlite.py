"""SQLite store: the embedded default. WAL journal; the work runs on two threads of its own.

One connection writes and one reads, each on its own single thread, so the event loop
never blocks and every transaction runs whole in one hop to its thread (no statement of
another caller can interleave). WAL lets the reader run beside the writer. Several
processes on one host may share the file: seq allocation runs inside ``BEGIN IMMEDIATE``
and ``UNIQUE(room, seq)`` backs it; a lock held elsewhere is waited for up to the timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from server.core.errors import SeqTaken, StoreUnavailable
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

SCHEMA = """
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
"""

MESSAGE_COLUMNS = "id, room, seq, sender_id, sender_name, text, client_id, created_at"


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
    )


class SQLiteStore(Store):
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=self.timeout
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        return conn

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._writer = await loop.run_in_executor(self._write_thread, self._open)
        await self._run(self._write_thread, self._writer, lambda conn: conn.executescript(SCHEMA))
        self._reader = await loop.run_in_executor(self._read_thread, self._open)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for pool, conn in ((self._read_thread, self._reader), (self._write_thread, self._writer)):
            if conn is not None:
                await loop.run_in_executor(pool, conn.close)
        self._reader = self._writer = None
        self._write_thread.shutdown(wait=False)
        self._read_thread.shutdown(wait=False)

    async def _run(
        self,
        pool: ThreadPoolExecutor,
        conn: sqlite3.Connection | None,
        work: Callable[[sqlite3.Connection], T],
        abandoned: threading.Event | None = None,
    ) -> T:
        """``work(conn)`` on the connection's thread, bounded by the timeout.

        A call that times out keeps running on its thread (later calls queue behind it);
        ``abandoned`` is set then, so that a transaction still waiting rolls back instead
        of committing what its caller already reported as failed.
        """
        if conn is None:
            raise StoreUnavailable("sqlite store is closed")
        future = asyncio.get_running_loop().run_in_executor(pool, work, conn)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError as exc:
            if abandoned is not None:
                abandoned.set()
            raise StoreUnavailable(f"sqlite did not answer within {self.timeout}s") from exc
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite error: {exc}") from exc
        except sqlite3.ProgrammingError as exc:  # e.g. the connection was closed
            raise StoreUnavailable(f"sqlite connection unusable: {exc}") from exc

    async def _in_writer(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` inside one ``BEGIN IMMEDIATE`` transaction, committed or rolled back whole."""
        abandoned = threading.Event()

        def transaction(conn: sqlite3.Connection) -> T:
            if abandoned.is_set():  # its caller gave up while it queued: do nothing
                raise StoreUnavailable("abandoned before it started")
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                if abandoned.is_set():  # the caller gave up while BEGIN waited for a lock
                    raise StoreUnavailable("abandoned by its caller")
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return await self._run(self._write_thread, self._writer, transaction, abandoned)

    async def _fetchall(self, sql: str, params: tuple = ()) -> list[tuple]:
        return await self._run(
            self._read_thread, self._reader, lambda conn: conn.execute(sql, params).fetchall()
        )

    async def _fetchone(self, sql: str, params: tuple = ()) -> tuple | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def _write(self, statements: list[tuple[str, tuple]]) -> None:
        """Run statements in one transaction."""

        def work(conn: sqlite3.Connection) -> None:
            for sql, params in statements:
                conn.execute(sql, params)

        await self._in_writer(work)

    async def ping(self) -> None:
        await self._fetchone("SELECT 1")

    async def get_room(self, room_id: str) -> Room | None:
        row = await self._fetchone(
            "SELECT id, kind, name, owner, created_at FROM rooms WHERE id = ?", (room_id,)
        )
        if row is None:
            return None
        return Room(row[0], row[1], row[2], row[3], datetime.fromisoformat(row[4]))

    async def create_room(self, room: Room, members: list[str]) -> tuple[Room, bool]:
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
            return True

        if await self._in_writer(work):
            return room, True
        stored = await self.get_room(room.id)
        return (stored or room), False

    async def add_members(self, room_id: str, user_ids: list[str]) -> None:
        await self._write(
            [
                ("INSERT OR IGNORE INTO members (room, user) VALUES (?, ?)", (room_id, u))
                for u in user_ids
            ]
        )

    async def remove_members(self, room_id: str, user_ids: list[str]) -> None:
        await self._write(
            [("DELETE FROM members WHERE room = ? AND user = ?", (room_id, u)) for u in user_ids]
        )

    async def is_member(self, room_id: str, user_id: str) -> bool:
        row = await self._fetchone(
            "SELECT 1 FROM members WHERE room = ? AND user = ?", (room_id, user_id)
        )
        return row is not None

    async def list_members(self, room_id: str) -> list[str]:
        rows = await self._fetchall(
            "SELECT user FROM members WHERE room = ? ORDER BY user", (room_id,)
        )
        return [row[0] for row in rows]

    async def add_message(self, draft: MessageDraft, seq: int | None = None) -> AddResult:
        mid = draft.message_id
        now = utcnow()

        def work(conn: sqlite3.Connection) -> tuple[Message, bool]:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (mid,)
            ).fetchone()
            if row is not None:
                return _message(row), False
            last = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE room = ?", (draft.room,)
            ).fetchone()[0]
            chosen = last + 1 if seq is None else seq
            try:
                conn.execute(
                    f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        mid,
                        draft.room,
                        chosen,
                        draft.sender_id,
                        draft.sender_name,
                        draft.text,
                        draft.client_id,
                        now.isoformat(),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise SeqTaken(draft.room, last) from exc
            return draft.stored(chosen, now), True

        message, created = await self._in_writer(work)
        return AddResult(message, created)

    async def find_message(self, room_id: str, sender_id: str, client_id: str) -> Message | None:
        row = await self._fetchone(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?",
            (message_id(room_id, sender_id, client_id),),
        )
        return _message(row) if row else None

    async def last_seq(self, room_id: str) -> int:
        row = await self._fetchone(
            "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE room = ?", (room_id,)
        )
        return row[0]

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
        row = await self._fetchone(
            "SELECT seq FROM read_markers WHERE room = ? AND user = ?", (room_id, user_id)
        )
        return row[0] if row else 0

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
