"""SQLite store: concurrent calls share one hop and one transaction, and fail only alone.

The behaviour every store shares is in test_store_contract.py; these tests cover what the
SQLite store adds on top: group commit and what happens to the calls of a batch when one of
them, or the whole transaction, fails.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from server.core import metrics
from server.core.errors import SeqTaken, StoreUnavailable
from server.core.models import MessageDraft, Room
from server.store.sqlite import SQLiteStore


def draft(room: str, client_id: str, sender: str = "alice") -> MessageDraft:
    return MessageDraft(room, sender, sender.title(), f"text {client_id}", client_id)


def writer_batches() -> tuple[float, float]:
    """(batches, calls) the writer lanes of this process have sent to their threads so far."""
    figures = {
        sample.name: sample.value
        for sample in metrics.STORE_BATCH.collect()[0].samples
        if sample.labels.get("lane") == "writer"
    }
    return figures["chat_store_batch_calls_count"], figures["chat_store_batch_calls_sum"]


@pytest.fixture
async def store(tmp_path):
    instance = SQLiteStore(tmp_path / "chat.db", timeout=1.0)
    await instance.start()
    yield instance
    await instance.close()


def stored_seqs(path, room: str) -> list[int]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT seq FROM messages WHERE room = ? ORDER BY seq", (room,))
        return [row[0] for row in rows]


async def test_concurrent_sends_commit_together_with_dense_seqs(store, uid):
    room = uid("r")
    batches_before, calls_before = writer_batches()
    results = await asyncio.gather(*(store.add_message(draft(room, f"c{i}")) for i in range(50)))
    batches, calls = (
        now - before
        for now, before in zip(writer_batches(), (batches_before, calls_before), strict=True)
    )
    assert calls == 50
    assert batches < 50  # grouped: fewer transactions than sends
    assert sorted(r.message.seq for r in results) == list(range(1, 51))
    assert all(r.created for r in results)
    assert stored_seqs(store.path, room) == list(range(1, 51))


async def test_a_repeat_in_the_same_batch_returns_the_first(store, uid):
    room = uid("r")
    first, repeat, other = await asyncio.gather(
        store.add_message(draft(room, "same")),
        store.add_message(draft(room, "same")),
        store.add_message(draft(room, "other")),
    )
    assert first.created and not repeat.created and other.created
    assert repeat.message == first.message
    assert stored_seqs(store.path, room) == [1, 2]


async def test_a_failing_call_fails_alone_and_the_batch_commits(store, uid):
    room = uid("r")
    await store.add_message(draft(room, "taken"), seq=1)
    outcomes = await asyncio.gather(
        store.add_message(draft(room, "a")),
        store.add_message(draft(room, "conflict"), seq=1),
        store.add_message(draft(room, "b")),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], SeqTaken)
    assert [o.message.seq for o in (outcomes[0], outcomes[2])] == [2, 3]
    assert await store.find_message(room, "alice", "conflict") is None
    assert stored_seqs(store.path, room) == [1, 2, 3]


async def test_a_batch_that_cannot_begin_fails_its_calls_and_stores_none(store, uid):
    room = uid("r")
    await store.add_message(draft(room, "before"))
    locker = sqlite3.connect(store.path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        outcomes = await asyncio.gather(
            *(store.add_message(draft(room, f"c{i}")) for i in range(5)),
            return_exceptions=True,
        )
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert all(isinstance(o, StoreUnavailable) for o in outcomes)
    assert stored_seqs(store.path, room) == [1]
    retried = await asyncio.gather(*(store.add_message(draft(room, f"c{i}")) for i in range(5)))
    assert sorted(r.message.seq for r in retried) == [2, 3, 4, 5, 6]
    again = await store.add_message(draft(room, "c0"))  # still idempotent after the failure
    assert not again.created and again.message == retried[0].message


async def test_a_claimed_call_finishes_with_its_batch_and_a_queued_one_expires(tmp_path, uid):
    """Past its deadline a call still queued fails and is never written; one its batch had
    already begun is answered when the batch commits (no batch rolls back for a late caller)."""
    store = SQLiteStore(tmp_path / "slow.db", timeout=2.0)
    await store.start()
    room = uid("r")

    def slow_insert(conn: sqlite3.Connection) -> str:
        conn.execute(
            "INSERT INTO rooms (id, kind, name, owner, created_at) VALUES (?, ?, ?, ?, ?)",
            (room, "public", "Slow", None, "2026-01-02T03:04:05+00:00"),
        )
        time.sleep(2.8)  # past its deadline (2 s), well before the hard one (4 s)
        return "done"

    try:
        slow = asyncio.ensure_future(store._in_writer(slow_insert))
        await asyncio.sleep(0.1)  # the slow batch has begun
        queued = asyncio.ensure_future(store.add_message(draft(room, "queued")))
        assert await slow == "done"
        with pytest.raises(StoreUnavailable):
            await queued
        assert (await store.get_room(room)).name == "Slow"
        assert stored_seqs(store.path, room) == []
        later = await store.add_message(draft(room, "later"))
        assert later.message.seq == 1
    finally:
        await store.close()


async def test_a_caller_that_times_out_before_its_batch_begins_stores_nothing(store, uid):
    room = uid("r")
    locker = sqlite3.connect(store.path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        first = asyncio.ensure_future(store.add_message(draft(room, "first")))
        await asyncio.sleep(0.5)
        second = asyncio.ensure_future(store.add_message(draft(room, "second")))
        # Release the lock once both callers have given up (second's at 1.5 s, while its
        # batch still waits on BEGIN), not after a fixed delay that a loaded machine can miss.
        for task in (first, second):
            with pytest.raises(StoreUnavailable):
                await task
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    later = await store.add_message(draft(room, "later"))
    assert later.message.seq == 1
    assert stored_seqs(store.path, room) == [1]


def room_cache_gauge() -> float:
    return metrics.STORE_ROOM_CACHE.collect()[0].samples[0].value


async def test_rooms_kept_in_memory_stay_within_the_limit(tmp_path, uid):
    small = SQLiteStore(tmp_path / "rooms.db", timeout=1.0, room_cache=2)
    await small.start()
    try:
        rooms = [Room(uid("r"), "private", f"Room {i}", owner="alice") for i in range(3)]
        for room in rooms:
            await small.create_room(room, ["alice"])
        for _ in range(2):
            for room in rooms:
                got = await small.get_room(room.id)
                assert (got.id, got.kind, got.name, got.owner) == (
                    room.id,
                    room.kind,
                    room.name,
                    room.owner,
                )
        assert room_cache_gauge() == 2
        # a room another process created is read from the file when first asked for
        other = uid("r")
        with sqlite3.connect(small.path) as conn:
            conn.execute(
                "INSERT INTO rooms (id, kind, name, owner, created_at) VALUES (?, ?, ?, ?, ?)",
                (other, "public", "Other", None, "2026-01-02T03:04:05+00:00"),
            )
        assert (await small.get_room(other)).name == "Other"
        assert await small.get_room(uid("missing")) is None
        assert room_cache_gauge() == 2
    finally:
        await small.close()


async def test_no_room_is_kept_when_the_limit_is_zero(tmp_path, uid):
    none_kept = SQLiteStore(tmp_path / "rooms.db", timeout=1.0, room_cache=0)
    await none_kept.start()
    try:
        room = Room(uid("r"), "public", "Lobby")
        await none_kept.create_room(room, ["alice"])
        assert (await none_kept.get_room(room.id)).name == "Lobby"
        assert none_kept._rooms == {}
    finally:
        await none_kept.close()
