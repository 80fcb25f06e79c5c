"""SQLite store: the embedded default. WAL journal, work on aiosqlite's thread.

One connection writes (serialised by a lock so that a transaction's statements never
interleave with another coroutine's), one connection reads; WAL lets the reader run
beside the writer. Several processes on one host may share the file: seq allocation runs
inside ``BEGIN IMMEDIATE`` and ``UNIQUE(room, seq)`` backs it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import aiosqlite

from ..errors import SeqTaken, StoreUnavailable
from ..models import AddResult, Message, MessageDraft, Room, UserRecord, message_id, utcnow
from .base import Store

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
        id=row[0], room=row[1], seq=row[2], sender_id=row[3], sender_name=row[4],
        text=row[5], client_id=row[6], created_at=datetime.fromisoformat(row[7]),
    )


class SQLiteStore(Store):
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._open()
        await self._writer.executescript(SCHEMA)
        await self._writer.commit()
        self._reader = await self._open()

    async def _open(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(str(self.path), isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        await conn.execute("PRAGMA foreign_keys=ON")
        return conn

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    async def _bounded(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await asyncio.wait_for(work(), self.timeout)
        except TimeoutError as exc:
            raise StoreUnavailable(f"sqlite did not answer within {self.timeout}s") from exc
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite error: {exc}") from exc
        except ValueError as exc:  # aiosqlite raises ValueError on a closed connection
            raise StoreUnavailable(f"sqlite connection closed: {exc}") from exc

    async def _begin(self) -> None:
        """Start a write transaction (under ``_write_lock``), ending any one left behind."""
        if self._writer.in_transaction:
            await self._rollback()
        try:
            await self._writer.execute("BEGIN IMMEDIATE")
        except BaseException:
            await self._rollback()  # cancelled while BEGIN waits: it may still succeed later
            raise

    async def _rollback(self) -> None:
        """End the writer's transaction after whatever statement is still running.

        A caller cancelled by the timeout may have a ``BEGIN`` still waiting in aiosqlite's
        thread: checking ``in_transaction`` now would miss a BEGIN that succeeds later and
        leave the connection inside a transaction for good. The ROLLBACK queues behind it.
        """
        try:
            await self._writer.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass  # no transaction was active (BEGIN failed)

    async def _fetchall(self, sql: str, params: tuple = ()) -> list[tuple]:
        async def work() -> list[tuple]:
            async with self._reader.execute(sql, params) as cursor:
                return list(await cursor.fetchall())

        return await self._bounded(work)

    async def _fetchone(self, sql: str, params: tuple = ()) -> tuple | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def _write(self, statements: list[tuple[str, tuple]]) -> None:
        """Run statements in one transaction."""

        async def work() -> None:
            async with self._write_lock:
                await self._begin()
                try:
                    for sql, params in statements:
                        await self._writer.execute(sql, params)
                    await self._writer.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    raise

        await self._bounded(work)

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
        async def work() -> bool:
            async with self._write_lock:
                await self._begin()
                try:
                    cursor = await self._writer.execute(
                        "INSERT OR IGNORE INTO rooms (id, kind, name, owner, created_at) VALUES (?, ?, ?, ?, ?)",
                        (room.id, room.kind, room.name, room.owner, room.created_at.isoformat()),
                    )
                    created = cursor.rowcount == 1
                    if created:
                        await self._writer.executemany(
                            "INSERT OR IGNORE INTO members (room, user) VALUES (?, ?)",
                            [(room.id, uid) for uid in members],
                        )
                    await self._writer.execute("COMMIT")
                    return created
                except BaseException:
                    await self._rollback()
                    raise

        created = await self._bounded(work)
        if created:
            return room, True
        stored = await self.get_room(room.id)
        return (stored or room), False

    async def add_members(self, room_id: str, user_ids: list[str]) -> None:
        await self._write(
            [("INSERT OR IGNORE INTO members (room, user) VALUES (?, ?)", (room_id, u)) for u in user_ids]
        )

    async def remove_members(self, room_id: str, user_ids: list[str]) -> None:
        await self._write([("DELETE FROM members WHERE room = ? AND user = ?", (room_id, u)) for u in user_ids])

    async def is_member(self, room_id: str, user_id: str) -> bool:
        row = await self._fetchone("SELECT 1 FROM members WHERE room = ? AND user = ?", (room_id, user_id))
        return row is not None

    async def list_members(self, room_id: str) -> list[str]:
        rows = await self._fetchall("SELECT user FROM members WHERE room = ? ORDER BY user", (room_id,))
        return [row[0] for row in rows]

    async def add_message(self, draft: MessageDraft, seq: int | None = None) -> AddResult:
        mid = message_id(draft.room, draft.sender_id, draft.client_id)
        now = utcnow()

        async def work() -> tuple[Message, bool]:
            async with self._write_lock:
                await self._begin()
                try:
                    async with self._writer.execute(
                        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (mid,)
                    ) as cursor:
                        row = await cursor.fetchone()
                    if row is not None:
                        await self._writer.execute("COMMIT")
                        return _message(row), False
                    async with self._writer.execute(
                        "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE room = ?", (draft.room,)
                    ) as cursor:
                        last = (await cursor.fetchone())[0]
                    chosen = last + 1 if seq is None else seq
                    message = draft.stored(chosen, now)
                    try:
                        await self._writer.execute(
                            f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (mid, draft.room, chosen, draft.sender_id, draft.sender_name,
                             draft.text, draft.client_id, now.isoformat()),
                        )
                    except sqlite3.IntegrityError as exc:
                        raise SeqTaken(draft.room, last) from exc
                    await self._writer.execute("COMMIT")
                    return message, True
                except BaseException:
                    await self._rollback()
                    raise

        message, created = await self._bounded(work)
        return AddResult(message, created)

    async def find_message(self, room_id: str, sender_id: str, client_id: str) -> Message | None:
        row = await self._fetchone(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?",
            (message_id(room_id, sender_id, client_id),),
        )
        return _message(row) if row else None

    async def last_seq(self, room_id: str) -> int:
        row = await self._fetchone("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE room = ?", (room_id,))
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
        await self._write([(
            "INSERT INTO read_markers (room, user, seq) VALUES (?, ?, ?) "
            "ON CONFLICT (room, user) DO UPDATE SET seq = MAX(seq, excluded.seq)",
            (room_id, user_id, seq),
        )])
        return await self.get_read_marker(room_id, user_id)

    async def get_read_marker(self, room_id: str, user_id: str) -> int:
        row = await self._fetchone(
            "SELECT seq FROM read_markers WHERE room = ? AND user = ?", (room_id, user_id)
        )
        return row[0] if row else 0

    async def upsert_user(self, user_id: str, name: str) -> None:
        await self._write([(
            "INSERT INTO users (id, name) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            (user_id, name),
        )])

    async def set_last_seen(self, user_id: str, when: datetime) -> None:
        await self._write([(
            "INSERT INTO users (id, name, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
            (user_id, user_id, when.isoformat()),
        )])

    async def get_users(self, user_ids: list[str]) -> dict[str, UserRecord]:
        if not user_ids:
            return {}
        marks = ",".join("?" * len(user_ids))
        rows = await self._fetchall(f"SELECT id, name, last_seen FROM users WHERE id IN ({marks})", tuple(user_ids))
        return {
            r[0]: UserRecord(r[0], r[1], datetime.fromisoformat(r[2]) if r[2] else None) for r in rows
        }
