"""The Firestore store when the backend fails, stalls, loses answers or races.

Each test runs its own emulator (not the session one) so that stopping it disturbs no
other test. The emulator keeps state in memory: after a restart it is empty.
"""

from __future__ import annotations

import asyncio
import os
import time
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc

from server.core.errors import ChatError, SeqTaken, StoreUnavailable
from server.core.models import MessageDraft
from server.store.firestore import FirestoreStore
from tests.support.firestore_emulator import FirestoreEmulator

pytestmark = pytest.mark.skipif(
    os.environ.get("CHAT_TEST_FIRESTORE", "1") == "0", reason="CHAT_TEST_FIRESTORE=0"
)

TIMEOUT = 1.0
ROOT = str(Path(__file__).resolve().parents[1])


def draft(room: str, client_id: str, sender: str = "alice") -> MessageDraft:
    return MessageDraft(
        room=room, sender_id=sender, sender_name=sender.title(), text="hi", client_id=client_id
    )


@pytest.fixture
def emulator():
    instance = FirestoreEmulator.launch()
    yield instance
    instance.close()


@pytest.fixture
async def fs(emulator):
    store = FirestoreStore(project="chat-outage", emulator_host=emulator.host, timeout=TIMEOUT)
    await store.start()
    yield store
    await store.close()


async def timed(coro) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await coro
    except BaseException as exc:  # returned to the test
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


async def test_stopped_backend_fails_within_bound_then_recovers(fs, emulator, uid):
    room = uid("r")
    assert (await fs.add_message(draft(room, "before"))).message.seq == 1

    await asyncio.to_thread(emulator.stop)
    for seq in (None, 2):
        elapsed, error = await timed(fs.add_message(draft(room, f"during-{seq}"), seq=seq))
        assert isinstance(error, StoreUnavailable), error
        assert elapsed < 3 * TIMEOUT, elapsed
        assert "add_message" in str(error) and room in str(error)
    elapsed, error = await timed(fs.ping())
    assert isinstance(error, StoreUnavailable) and elapsed < 3 * TIMEOUT

    await asyncio.to_thread(emulator.start)  # same port, empty state
    after = await fs.add_message(draft(room, "after"))  # same store object, no restart
    assert after.created and after.message.seq == 1
    await fs.ping()


async def test_stalled_backend_hits_the_deadline(fs, emulator, uid):
    room = uid("r")
    await fs.add_message(draft(room, "before"))
    emulator.pause()  # port open, no answers
    try:
        elapsed, error = await timed(fs.add_message(draft(room, "stalled")))
        assert isinstance(error, StoreUnavailable), error
        assert elapsed < 3 * TIMEOUT, elapsed
        elapsed, error = await timed(fs.messages_after(room, 0, 10))
        assert isinstance(error, StoreUnavailable) and elapsed < 3 * TIMEOUT
    finally:
        emulator.resume()
    later = await fs.add_message(draft(room, "later"))
    assert later.created and later.message.seq == 2


class LoseFirstCommitAnswer:
    """The first batch commit applies its writes, then raises ``error`` instead of answering;
    later commits answer. ``lost`` counts the answers lost."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
        from google.cloud.firestore_v1.async_batch import AsyncWriteBatch

        original = AsyncWriteBatch.commit
        self.lost = 0

        async def commit_then_lose_answer(batch, *args, **kwargs):
            result = await original(batch, *args, **kwargs)
            if self.lost == 0:
                self.lost += 1
                raise error
            return result

        monkeypatch.setattr(AsyncWriteBatch, "commit", commit_then_lose_answer)


async def test_lost_commit_answer_is_retried_idempotently(fs, uid, monkeypatch):
    """A group commit that applied but whose answer was lost: the retry reports the message."""
    lose = LoseFirstCommitAnswer(monkeypatch, gexc.DeadlineExceeded("answer lost"))
    room = uid("r")
    first = await fs.add_message(draft(room, "c1"))
    assert lose.lost == 1
    assert first.created and first.message.seq == 1
    second = await fs.add_message(draft(room, "c2"))
    assert second.message.seq == 2
    repeat = await fs.add_message(draft(room, "c1"))
    assert not repeat.created and repeat.message == first.message


async def test_lost_batch_answer_on_explicit_seq_is_retried_idempotently(fs, uid, monkeypatch):
    lose = LoseFirstCommitAnswer(
        monkeypatch, gexc.ServiceUnavailable("connection reset after commit")
    )
    room = uid("r")
    added = await fs.add_message(draft(room, "c1"), seq=7)
    assert lose.lost == 1 and added.created and added.message.seq == 7
    assert await fs.last_seq(room) == 7


async def test_allocating_path_moves_above_explicit_seqs(fs, uid):
    room = uid("r")
    for seq in (1, 2, 3):
        await fs.add_message(draft(room, f"x{seq}"), seq=seq)
    assert (await fs.add_message(draft(room, "a"))).message.seq == 4
    await fs.add_message(draft(room, "x10"), seq=10)
    assert (await fs.add_message(draft(room, "b"))).message.seq == 11
    with pytest.raises(SeqTaken) as info:
        await fs.add_message(draft(room, "y"), seq=11)
    assert info.value.max_seq == 11


async def test_two_clients_racing_get_unique_seqs(emulator, uid):
    """Two stores (two processes' worth of clients) sending to one room at once."""
    stores = [
        FirestoreStore(project="chat-race", emulator_host=emulator.host, timeout=5.0)
        for _ in range(2)
    ]
    for store in stores:
        await store.start()
    try:
        room = uid("r")
        sends = [
            stores[i % 2].add_message(draft(room, f"c{i}", sender=f"u{i % 2}")) for i in range(40)
        ]
        results = await asyncio.gather(*sends)
        assert sorted(r.message.seq for r in results) == list(range(1, 41))

        # explicit seqs: the same seq from both clients, one wins
        outcomes = await asyncio.gather(
            stores[0].add_message(draft(room, "e0", sender="u0"), seq=100),
            stores[1].add_message(draft(room, "e1", sender="u1"), seq=100),
            return_exceptions=True,
        )
        assert sum(isinstance(o, SeqTaken) for o in outcomes) == 1
        assert sum(not isinstance(o, BaseException) and o.created for o in outcomes) == 1

        # the same client_id from both clients: one message, both answers agree
        same = await asyncio.gather(
            stores[0].add_message(draft(room, "dup", sender="u0"), seq=200),
            stores[1].add_message(draft(room, "dup", sender="u0"), seq=201),
        )
        assert same[0].message == same[1].message
        assert [r.created for r in same].count(True) == 1
    finally:
        for store in stores:
            await store.close()


async def test_invalid_argument_is_bad_request_and_never_retried(fs, uid, monkeypatch):
    """A request Firestore can never accept is the client's error, answered at once."""
    from google.cloud.firestore_v1.async_batch import AsyncWriteBatch

    calls = 0

    async def refuse(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        raise gexc.InvalidArgument("document id is not valid")

    monkeypatch.setattr(AsyncWriteBatch, "commit", refuse)
    with pytest.raises(ChatError) as info:
        await fs.add_message(draft(uid("r"), "c1"), seq=1)
    assert info.value.code == "bad_request" and calls == 1


@pytest.mark.parametrize(
    "error", [gexc.InternalServerError, gexc.ResourceExhausted, gexc.ServiceUnavailable]
)
async def test_transient_codes_are_retried(fs, uid, monkeypatch, error):
    from google.cloud.firestore_v1.async_batch import AsyncWriteBatch

    original = AsyncWriteBatch.commit
    failures = 0

    async def fail_twice(self, *args, **kwargs):
        nonlocal failures
        if failures < 2:
            failures += 1
            raise error("transient")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncWriteBatch, "commit", fail_twice)
    room = uid("r")
    added = await fs.add_message(draft(room, "c1"))
    assert failures == 2 and added.created and added.message.seq == 1
    assert await fs.last_seq(room) == 1


SENDER = """
import asyncio, sys
from server.core.models import MessageDraft
from server.store.firestore import FirestoreStore

async def main(host, room):
    store = FirestoreStore(project="chat-outage", emulator_host=host, timeout=5.0)
    await store.start()
    n = 0
    while True:
        batch = [
            store.add_message(MessageDraft(room, "killed", "K", "x", f"k{n}-{i}"))
            for i in range(5)
        ]
        await asyncio.gather(*batch)
        n += 1
        print(n, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_killed_process_leaves_the_room_writable(fs, emulator, uid):
    """SIGKILL a process in the middle of its sends; another sends to the room at once.

    The emulator takes no transaction locks, so this cannot show a lock expiring; what it
    shows is that the room stays writable and its seqs dense. That nothing could be locked
    is asserted by tests/test_firestore_costs.py (no send begins a transaction).
    """
    import sys

    room = uid("r")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SENDER, emulator.host, room, stdout=PIPE, cwd=ROOT
    )
    try:
        for _ in range(3):  # a few groups acked: the process is mid-stream
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, "the sending process exited"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs in it
        await proc.wait()
    started = time.monotonic()
    after = await fs.add_message(draft(room, "after-kill"))
    assert after.created and time.monotonic() - started < 3 * TIMEOUT
    stored = await fs.messages_after(room, 0, 10_000)
    assert [m.seq for m in stored] == list(range(1, len(stored) + 1))
    assert stored[-1].client_id == "after-kill"
