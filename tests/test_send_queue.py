"""The Firestore store's per-room group commit queue, in process with a fake writer."""

from __future__ import annotations

import asyncio

import pytest

from server.core.errors import StoreUnavailable
from server.core.models import AddResult, MessageDraft, utcnow
from server.store.firestore.groups import Pending, SendQueue


class FakeWriter:
    """Records each group; can be told to fail or to wait until released."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.fail_next = False
        self.gate: asyncio.Event | None = None
        self.seq = 0

    async def __call__(self, room: str, group: list[Pending], deadline: float) -> None:
        self.groups.append([p.draft.client_id for p in group])
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise StoreUnavailable("commit failed")
        for pending in group:
            self.seq += 1
            pending.resolve(AddResult(pending.draft.stored(self.seq, pending.now), created=True))


def make_queue(writer: FakeWriter) -> tuple[SendQueue, set[asyncio.Task]]:
    tasks: set[asyncio.Task] = set()

    def spawn(coro) -> None:
        tasks.add(asyncio.ensure_future(coro))

    return SendQueue(writer, spawn, max_group=250), tasks


async def busy_room(client_id: str) -> tuple[FakeWriter, SendQueue, asyncio.Future]:
    """A queue whose writer is stuck (until ``writer.gate`` is set) on a first send."""
    writer = FakeWriter()
    writer.gate = asyncio.Event()
    queue, _ = make_queue(writer)
    first = asyncio.ensure_future(queue.submit("r", pending(client_id)))
    await asyncio.sleep(0.01)
    return writer, queue, first


def pending(client_id: str, deadline_in: float = 5.0) -> Pending:
    draft = MessageDraft("r", "u", "U", "x", client_id)
    loop = asyncio.get_running_loop()
    return Pending(draft, client_id, "w", utcnow(), loop.time() + deadline_in)


async def test_sends_that_arrive_together_share_one_group_in_order():
    writer = FakeWriter()
    queue, _ = make_queue(writer)
    results = await asyncio.gather(*(queue.submit("r", pending(f"c{i}")) for i in range(10)))
    assert writer.groups == [[f"c{i}" for i in range(10)]]
    assert [r.message.seq for r in results] == list(range(1, 11))
    assert len(queue) == 0  # no writer left behind


async def test_sends_during_a_commit_form_the_next_group():
    writer, queue, first = await busy_room("a")
    later = [asyncio.ensure_future(queue.submit("r", pending(f"b{i}"))) for i in range(3)]
    await asyncio.sleep(0.01)
    writer.gate.set()
    await asyncio.gather(first, *later)
    assert writer.groups == [["a"], ["b0", "b1", "b2"]]


async def test_a_failed_group_fails_each_of_its_sends_and_the_next_group_goes_on():
    writer = FakeWriter()
    writer.fail_next = True
    queue, _ = make_queue(writer)
    outcomes = await asyncio.gather(
        *(queue.submit("r", pending(f"c{i}")) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, StoreUnavailable) for o in outcomes)
    ok = await queue.submit("r", pending("d"))
    assert ok.created and ok.message.seq == 1  # no seq was used by the failed group


async def test_a_send_never_waits_past_its_deadline_and_is_then_not_written():
    writer, queue, first = await busy_room("slow")
    late = asyncio.ensure_future(queue.submit("r", pending("late", deadline_in=0.05)))
    await asyncio.sleep(0.1)
    writer.gate.set()
    await first
    with pytest.raises(StoreUnavailable):
        await late
    assert writer.groups == [["slow"]]


async def test_a_caller_gone_before_its_group_is_taken_is_not_written():
    writer, queue, first = await busy_room("a")
    gone = asyncio.ensure_future(queue.submit("r", pending("gone")))
    kept = asyncio.ensure_future(queue.submit("r", pending("kept")))
    await asyncio.sleep(0.01)
    gone.cancel()
    writer.gate.set()
    await asyncio.gather(first, kept)
    assert writer.groups == [["a"], ["kept"]]


async def test_rooms_have_their_own_writers():
    writer = FakeWriter()
    writer.gate = asyncio.Event()
    queue, _ = make_queue(writer)
    sends = [asyncio.ensure_future(queue.submit(room, pending(room))) for room in ("r1", "r2")]
    await asyncio.sleep(0.01)
    assert len(queue) == 2 and sorted(writer.groups) == [["r1"], ["r2"]]
    writer.gate.set()
    await asyncio.gather(*sends)
