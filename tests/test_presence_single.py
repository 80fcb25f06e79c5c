"""Presence on one instance (contract §6), with a 2.5 s grace period."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from tests.support.clients import QUIET, ChatClient, connect_and_close, parse_iso, until
from tests.support.servers import ServerProcess

GRACE = 2.5  # long enough that a reconnection "inside" it lands inside on a loaded machine
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(scope="module")
def presence_server():
    proc = ServerProcess({"WS_GRACE_PERIOD": str(GRACE)}).start()
    yield proc
    proc.stop()


@pytest.fixture
async def connect(presence_server):
    made: list[ChatClient] = []

    async def make(user: str, url: str | None = None) -> ChatClient:
        client = await ChatClient(user).connect(url or presence_server.url)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.disconnect()


async def subscribe(client: ChatClient, *users: str) -> dict:
    ack = await client.call("presence:subscribe", {"users": list(users)})
    assert set(ack) == {"ok", "presence"} and ack["ok"] is True, ack
    assert set(ack["presence"]) == set(users)
    return ack["presence"]


async def test_subscribe_returns_current_state(connect, uid):
    online, never = uid("online"), uid("never")
    observer = await connect(uid("observer"))
    await connect(online)
    state = await subscribe(observer, online, never, online)
    assert state == {
        online: {"status": "online", "last_seen": None},
        never: {"status": "offline", "last_seen": None},
    }


async def test_subscribe_to_500_users(connect, uid):
    observer = await connect(uid("observer"))
    users = [uid("many") for _ in range(500)]
    state = await subscribe(observer, *users)
    assert state == {user: {"status": "offline", "last_seen": None} for user in users}
    too_many = await observer.call("presence:subscribe", {"users": users + [uid("one-more")]})
    assert too_many["ok"] is False and too_many["error"]["code"] == "bad_request"


async def test_online_event_when_a_user_connects(connect, uid):
    user = uid("u")
    observer, bystander = await connect(uid("observer")), await connect(uid("bystander"))
    assert await subscribe(observer, user) == {user: {"status": "offline", "last_seen": None}}
    await subscribe(bystander, uid("someone-else"))
    await connect(user)
    assert await observer.wait_for("presence") == [
        {"user": user, "status": "online", "last_seen": None}
    ]
    await asyncio.sleep(QUIET)
    assert len(observer.events["presence"]) == 1 and bystander.events["presence"] == []
    assert await subscribe(observer, user) == {user: {"status": "online", "last_seen": None}}


async def test_two_tabs_offline_only_after_the_last_one_and_the_grace(connect, uid):
    user = uid("u")
    observer, second_observer = await connect(uid("observer")), await connect(uid("observer"))
    await subscribe(observer, user)
    await subscribe(second_observer, user)
    tab1 = await connect(user)
    tab2 = await connect(user)
    await observer.wait_for("presence")
    await tab1.disconnect()
    await asyncio.sleep(GRACE + 0.5)
    assert observer.events["presence"] == [{"user": user, "status": "online", "last_seen": None}]
    assert (await subscribe(observer, user))[user]["status"] == "online"

    closed_at = time.time()
    await tab2.disconnect()
    events = await observer.wait_for("presence", 2, timeout=GRACE + 4)
    arrived = time.time()
    offline = events[1]
    assert offline["user"] == user and offline["status"] == "offline"
    assert ISO_MS.match(offline["last_seen"])
    # last_seen is when the last connection closed, not the end of the grace period: the
    # server stamps it after the close was sent, and announces offline a whole grace period
    # later (both bounds hold however slow the machine is).
    last_seen = parse_iso(offline["last_seen"])
    assert last_seen >= closed_at - 0.01, (closed_at, offline)
    assert last_seen <= arrived - GRACE, (arrived, offline)
    assert await second_observer.wait_for("presence", 2) == events
    await asyncio.sleep(QUIET)
    assert len(observer.events["presence"]) == 2 and len(second_observer.events["presence"]) == 2
    assert await subscribe(observer, user) == {
        user: {"status": "offline", "last_seen": offline["last_seen"]}
    }


async def test_reconnect_inside_grace_produces_no_events(connect, uid):
    user = uid("u")
    observer = await connect(uid("observer"))
    await subscribe(observer, user)
    first = await connect(user)
    assert len(await observer.wait_for("presence")) == 1
    await first.disconnect()
    await asyncio.sleep(0.2)
    await connect(user)
    await asyncio.sleep(GRACE + 0.5)
    assert observer.events["presence"] == [{"user": user, "status": "online", "last_seen": None}]
    assert await subscribe(observer, user) == {user: {"status": "online", "last_seen": None}}


async def test_unsubscribe_stops_events(connect, uid):
    dropped, kept = uid("dropped"), uid("kept")
    observer = await connect(uid("observer"))
    await subscribe(observer, dropped, kept)
    assert await observer.call(
        "presence:unsubscribe", {"users": [dropped, uid("never-followed")]}
    ) == {"ok": True}
    await connect(dropped)
    await connect(kept)
    assert await observer.wait_for("presence") == [
        {"user": kept, "status": "online", "last_seen": None}
    ]
    await asyncio.sleep(QUIET)
    assert [e["user"] for e in observer.events["presence"]] == [kept]


async def test_later_subscriber_gets_last_seen(connect, uid):
    user = uid("u")
    observer = await connect(uid("observer"))
    await subscribe(observer, user)
    client = await connect(user)
    await observer.wait_for("presence")
    await client.disconnect()
    offline = (await observer.wait_for("presence", 2, timeout=GRACE + 4))[1]
    latecomer = await connect(uid("late"))
    assert await subscribe(latecomer, user) == {
        user: {"status": "offline", "last_seen": offline["last_seen"]}
    }
    # Coming back online is announced again, once.
    await connect(user)
    back = await observer.wait_for("presence", 3)
    assert back[2]["user"] == user and back[2]["status"] == "online"


async def test_subscriber_disconnecting_is_harmless(connect, uid):
    user = uid("u")
    observer, other = await connect(uid("observer")), await connect(uid("other"))
    await subscribe(observer, user)
    await subscribe(other, user)
    await observer.disconnect()
    await connect(user)
    assert len(await other.wait_for("presence")) == 1


async def test_last_seen_survives_a_restart(tmp_path, uid):
    """last_seen is stored with the user record: a new process still knows it."""
    env = {
        "STORE": "sqlite",
        "SQLITE_PATH": str(tmp_path / "chat.db"),
        "WS_GRACE_PERIOD": str(GRACE),
    }
    user = uid("u")
    first = ServerProcess(env).start()
    try:
        observer = await ChatClient(uid("observer")).connect(first.url)
        await subscribe(observer, user)
        client = await ChatClient(user).connect(first.url)
        await observer.wait_for("presence")
        await client.disconnect()
        offline = (await observer.wait_for("presence", 2, timeout=GRACE + 4))[1]
        assert offline["status"] == "offline"
        await observer.disconnect()
    finally:
        first.stop()
    second = ServerProcess(env).start()
    try:
        observer = await ChatClient(uid("observer")).connect(second.url)
        assert await subscribe(observer, user) == {
            user: {"status": "offline", "last_seen": offline["last_seen"]}
        }
        await observer.disconnect()
    finally:
        second.stop()


async def test_connections_closed_at_once_never_leave_a_user_online(connect, presence_server, uid):
    user_id = uid("flaky")
    watcher = await connect(uid("w"))
    for _ in range(3):
        await asyncio.gather(*(connect_and_close(presence_server.url, user_id) for _ in range(12)))

    async def offline() -> bool:
        return (await subscribe(watcher, user_id))[user_id]["status"] == "offline"

    await until(offline, "the user to go offline", timeout=GRACE + 20)
