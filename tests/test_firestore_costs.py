"""What each chat operation costs on Firestore, counted on the emulator (docs/firestore.md).

Every row of the table in docs/firestore.md ("Reads and writes per operation") is asserted
here through an instrumented client (``tests/support/firestore_counter.py``), so a change
that adds a read, a write or a round trip fails a test rather than a bill. The services
run in-process on a real ``FirestoreStore``; presence is the in-memory backend.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

import pytest

from server.core.models import Identity
from server.presence.base import Transition
from server.presence.memory import MemoryPresence
from server.services.content import ContentLimits
from server.services.messages import MessageService
from server.services.payloads import History, MarkRead, SendMessage
from server.services.presence import PresenceService
from server.services.rooms import RoomService
from server.store.firestore import FirestoreStore
from tests.support.firestore_counter import Cost, FirestoreCounter

pytestmark = pytest.mark.skipif(
    os.environ.get("CHAT_TEST_FIRESTORE", "1") == "0", reason="CHAT_TEST_FIRESTORE=0"
)


class NoFanout:
    async def to_room(
        self, room_id: str, event: str, data: dict, skip_sid=None, outside=None
    ) -> None:
        return None

    async def to_users(self, user_ids: list[str], event: str, data: dict) -> None:
        return None

    async def announce(self, transition) -> None:
        return None


class CountingAllocator:
    """Stands in for Redis INCR (not Firestore: it costs no Firestore operation)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    async def next(self, room_id: str) -> int:
        self.last[room_id] = self.last.get(room_id, 0) + 1
        return self.last[room_id]

    async def advance(self, room_id: str, at_least: int) -> None:
        self.last[room_id] = max(self.last.get(room_id, 0), at_least)


class Rig:
    def __init__(self, store: FirestoreStore, counter: FirestoreCounter, redis: bool) -> None:
        self.store = store
        self.counter = counter
        # members_ttl: sends in one test see the member list remembered by the first one
        self.rooms = RoomService(store, members_ttl=600)
        allocator = CountingAllocator() if redis else None
        self.messages = MessageService(store, self.rooms, NoFanout(), ContentLimits(), allocator)
        self.presence = PresenceService(lambda on_t: MemoryPresence(0.01, on_t), store, NoFanout())
        self.sends = 0

    async def cost(self, coro) -> Cost:
        before = self.counter.snapshot()
        await coro
        return self.counter.since(before)

    async def joined(self, uid) -> tuple[Identity, str]:
        """A new user who has joined a new public room (created by that first join)."""
        who = Identity(uid("alice"), "Alice", expires_at=2e9)
        room = uid("room")
        await self.rooms.open_for_join(who, room)
        return who, room

    async def send(self, who: Identity, room: str):
        self.sends += 1
        request = SendMessage(room=room, text=f"m{self.sends}", client_id=f"c{self.sends}")
        return await self.messages.send(who, "sid", request)


@pytest.fixture(params=["without_redis", "with_redis"])
async def rig(request, firestore_emulator):
    counter = FirestoreCounter()
    store = FirestoreStore(
        project="chat-costs", emulator_host=firestore_emulator, interceptors=counter.interceptors
    )
    await store.start()
    made = Rig(store, counter, redis=request.param == "with_redis")
    await made.presence.start()
    yield made
    await made.presence.close()
    await store.close()


def costs(reads: int, writes: int, round_trips: int, transactions: int = 0) -> Cost:
    return Cost(reads, writes, round_trips, transactions)


async def test_send(rig, uid):
    alice, room = await rig.joined(uid)  # the process now knows the room record
    first = await rig.cost(rig.send(alice, room))
    # + the member list (for room:activity), remembered for a while after the first send;
    # without Redis also the room's highest seq, read once per process
    if rig.messages.allocator is None:
        assert first == costs(reads=3, writes=2, round_trips=4), first
    else:
        assert first == costs(reads=2, writes=2, round_trips=3), first

    cost = await rig.cost(rig.send(alice, room))
    # without Redis: idempotency read + one commit of the guard and the message;
    # with Redis: find_message before INCR + the same commit
    assert cost == costs(reads=1, writes=2, round_trips=2), cost


async def test_concurrent_sends_share_commits_without_redis(rig, uid):
    """Many sends to one room at once: one commit carries many, no document twice."""
    alice, room = await rig.joined(uid)
    await rig.send(alice, room)
    before = rig.counter.snapshot()
    paths_before = dict(rig.counter.writes_by_path)
    sent = await asyncio.gather(*(rig.send(alice, room) for _ in range(40)))
    cost = rig.counter.since(before)
    assert sorted(m["seq"] for m in sent) == list(range(2, 42))
    assert cost.reads == 40 and cost.writes == 80 and cost.transactions == 0, cost
    written = {
        path: n - paths_before.get(path, 0)
        for path, n in rig.counter.writes_by_path.items()
        if n != paths_before.get(path, 0)
    }
    assert len(written) == 80 and set(written.values()) == {1}
    assert not any(path.endswith(f"/rooms/{room}") for path in written)
    if rig.messages.allocator is None:
        assert cost.round_trips <= 8, cost  # grouped: 2 per group, not 2 per send


async def test_history_page(rig, uid):
    alice, room = await rig.joined(uid)
    for _ in range(60):
        await rig.send(alice, room)
    cost = await rig.cost(rig.messages.history(alice, History(room=room, limit=50)))
    assert cost == costs(reads=51, writes=0, round_trips=1), cost  # limit + 1 tells has_more


async def test_join_with_catch_up(rig, uid):
    alice, room = await rig.joined(uid)
    for _ in range(10):
        await rig.send(alice, room)

    async def rejoin():
        await rig.rooms.open_for_join(alice, room)
        last, missed, _ = await rig.messages.missed(room, since=5)
        assert last == 10 and [m.seq for m in missed] == [6, 7, 8, 9, 10]

    # is_member + last_seq + the 5 missed messages
    cost = await rig.cost(rejoin())
    assert cost == costs(reads=7, writes=0, round_trips=3), cost


async def test_first_join_creates_a_public_room_once(rig, uid):
    alice = Identity(uid("alice"), "Alice", expires_at=2e9)
    cost = await rig.cost(rig.rooms.open_for_join(alice, uid("room")))
    # get_room, then one commit: the room, its creator as member and the mirror under users/
    assert cost == costs(reads=1, writes=3, round_trips=2), cost


async def test_read_marker(rig, uid):
    alice, room = await rig.joined(uid)
    for _ in range(3):
        await rig.send(alice, room)
    cost = await rig.cost(rig.messages.mark_read(alice, MarkRead(room=room, seq=3)))
    # membership, last_seq, then one transaction: begin, read the marker, commit; then the
    # counts for room:read: two queries after the new marker (nothing unread: one read each)
    assert cost == costs(reads=5, writes=1, round_trips=7, transactions=1), cost


async def test_connect_and_going_offline(rig, uid):
    user = uid("u")
    first = await rig.cost(rig.store.upsert_user(user, "Alice"))
    assert first == costs(reads=0, writes=1, round_trips=1), first
    again = await rig.cost(rig.store.upsert_user(user, "Alice"))  # reconnect, same name
    assert again == costs(reads=0, writes=0, round_trips=0), again
    renamed = await rig.cost(rig.store.upsert_user(user, "Alice B"))
    assert renamed == costs(reads=0, writes=1, round_trips=1), renamed

    gone = Transition(user, "offline", datetime(2026, 1, 1, tzinfo=UTC))
    offline = await rig.cost(rig.presence.on_transition(gone))
    assert offline == costs(reads=0, writes=1, round_trips=1), offline


async def test_room_members(rig, uid):
    alice, room = await rig.joined(uid)
    others = [uid("m") for _ in range(9)]
    await rig.store.add_members(room, others)

    async def page(after: str, limit: int, expected: int):
        ids, _ = await rig.rooms.members_for(alice, room, after=after, limit=limit)
        statuses = await rig.presence.statuses(ids)
        assert len(statuses) == expected
        return ids

    # membership + the page and one more (tells whether another page follows);
    # statuses come from presence, not from user records
    first = await rig.cost(page("", 4, 4))
    assert first == costs(reads=1 + 5, writes=0, round_trips=2), first
    everyone = await rig.cost(page("", 500, 10))
    assert everyone == costs(reads=1 + 10, writes=0, round_trips=2), everyone


async def test_health_probe(rig):
    cost = await rig.cost(rig.store.ping())
    assert cost == costs(reads=1, writes=0, round_trips=1), cost


async def test_cache_limit_bounds_what_the_store_remembers(firestore_emulator, uid):
    """FIRESTORE_CACHE: at most that many rooms (and seqs, names); 0 remembers nothing."""
    from server.core import metrics
    from server.core.models import Room

    def gauge(memo: str) -> float:
        samples = metrics.FIRESTORE_CACHE.collect()[0].samples
        return next(s.value for s in samples if s.labels == {"memo": memo})

    for limit in (1, 0):
        counter = FirestoreCounter()
        store = FirestoreStore(
            project="chat-costs",
            emulator_host=firestore_emulator,
            interceptors=counter.interceptors,
            cache_entries=limit,
        )
        await store.start()
        try:
            rooms = [uid("room") for _ in range(2)]
            for room in rooms:
                await store.create_room(Room(room, "public", room), ["a"])
            assert gauge("rooms") == limit
            before = counter.snapshot()
            await store.get_room(rooms[1])  # the newest: remembered unless the limit is 0
            assert counter.since(before).reads == (1 if limit == 0 else 0)
            before = counter.snapshot()
            await store.get_room(rooms[0])  # dropped (limit 1) or never kept (0)
            assert counter.since(before).reads == 1
            for name in ("n1", "n2"):
                await store.upsert_user(uid("u"), name)
            assert gauge("names") == limit
        finally:
            await store.close()
