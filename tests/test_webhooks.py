"""Webhooks with real processes and a real local HTTP receiver (docs/webhooks.md)."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import httpx
import pytest

from tests.conftest import STORE_BACKENDS
from tests.support.clients import ChatClient, metric_values, send
from tests.support.servers import ServerProcess, free_port, key_prefix, make_token, start_all
from tests.support.webhook_receiver import Receiver, signature_valid

SECRET = "whsec_test_0123456789abcdef"
FAST_RETRIES = {"WEBHOOK_BACKOFF_BASE": "0.2", "WEBHOOK_BACKOFF_MAX": "2"}


def sqlite_env(tmp_path) -> dict[str, str]:
    return {"STORE": "sqlite", "SQLITE_PATH": str(tmp_path / "chat.db")}


@pytest.fixture(params=[b for b in STORE_BACKENDS if b != "memory"])
def store_env(request, tmp_path) -> dict[str, str]:
    """The settings of a durable store for a server process: its outbox is in there."""
    if request.param == "sqlite":
        return sqlite_env(tmp_path)
    return {
        "STORE": "firestore",
        "FIRESTORE_EMULATOR_HOST": request.getfixturevalue("firestore_emulator"),
        "FIRESTORE_PROJECT": "chat-test",
    }


def hook_env(url: str, store: dict[str, str], **extra) -> dict[str, str]:
    return {
        **store,
        "WEBHOOK_URLS": url,
        "WEBHOOK_SECRETS": SECRET,
        "WS_GRACE_PERIOD": "0.5",
        **FAST_RETRIES,
        **{k: str(v) for k, v in extra.items()},
    }


def messages_in(received, room: str) -> list[int]:
    return [
        r.event["data"]["message"]["seq"]
        for r in received
        if r.event["type"] == "message.created" and r.event["data"]["message"]["room"] == room
    ]


@pytest.mark.timeout(400)
async def test_a_receiver_down_for_60_s_gets_every_event_afterwards_in_order_and_signed(
    tmp_path, uid
):
    receiver = Receiver(free_port())
    # 12 attempts 0.5, 1, 2, 4, 8, then 10 s apart span more than the 60 s of downtime.
    slow = {"WEBHOOK_BACKOFF_BASE": "0.5", "WEBHOOK_BACKOFF_MAX": "10"}
    server = ServerProcess(
        hook_env(receiver.url, sqlite_env(tmp_path), WEBHOOK_MAX_ATTEMPTS=12, **slow)
    ).start()
    try:
        rooms = [uid("r1"), uid("r2")]
        alice, bob = uid("alice"), uid("bob")
        a = await ChatClient(alice).connect(server.url)
        b = await ChatClient(bob).connect(server.url)
        for room in rooms:
            for client in (a, b):
                assert (await client.call("room:join", {"room": room}))["ok"] is True
        await b.disconnect()  # bob goes offline (after the grace period): user.offline
        await asyncio.sleep(1.5)
        for i in range(6):
            assert (await send(a, rooms[i % 2], f"m{i}"))["ok"] is True
        await asyncio.sleep(60)  # the receiver is down: nothing listens on its port
        await receiver.start()

        def complete(received) -> bool:
            offline = [r for r in received if r.event["type"] == "user.offline"]
            return bool(offline) and all(len(messages_in(received, room)) == 3 for room in rooms)

        await receiver.wait_until(complete, timeout=60)
        received = receiver.received
        assert all(signature_valid(SECRET, r) for r in received)
        ids = Counter(r.event["id"] for r in received)
        assert max(ids.values()) == 1, ids  # one instance, no crash: each event once
        for room in rooms:
            assert messages_in(received, room) == [1, 2, 3]  # in order per room
            in_room = [
                r.event
                for r in received
                if r.event["data"].get("room", "") == room
                or r.event["data"].get("message", {}).get("room") == room
            ]
            joins = [e for e in in_room if e["type"] == "room.member_added"]
            assert sorted(u for e in joins for u in e["data"]["users"]) == sorted([alice, bob])
            first_message = next(i for i, e in enumerate(in_room) if e["type"] == "message.created")
            assert all(in_room.index(e) < first_message for e in joins)  # joins came first
            created = next(e for e in in_room if e["type"] == "message.created")
            assert created["data"]["offline_members"] == [bob]  # bob was offline at the send
        offline = [r.event for r in received if r.event["type"] == "user.offline"]
        assert [e["data"]["user"] for e in offline] == [bob]
        assert offline[0]["data"]["last_seen"]
        await a.disconnect()
    finally:
        await receiver.stop()
        server.stop()


@pytest.mark.timeout(400)
async def test_two_instances_deliver_each_event_once_and_a_kill_mid_delivery_loses_nothing(
    redis_url, tmp_path, uid
):
    receiver = await Receiver(free_port()).start()
    prefix = key_prefix()
    env = hook_env(
        receiver.url,
        sqlite_env(tmp_path),
        REDIS_URL=redis_url,
        REDIS_KEY_PREFIX=prefix,
        WEBHOOK_TIMEOUT="2",
    )
    servers = start_all([ServerProcess({**env, "INSTANCE_ID": f"hook-{i}"}) for i in range(2)])
    try:
        room = uid("room")
        sender = await ChatClient(uid("carol")).connect(servers[1].url)
        assert (await sender.call("room:join", {"room": room}))["ok"] is True
        for i in range(5):
            assert (await send(sender, room, f"first {i}"))["ok"] is True
        await receiver.wait_until(lambda got: len(messages_in(got, room)) == 5, timeout=30)
        await asyncio.sleep(1.0)  # a second delivery would arrive by now
        ids = Counter(r.event["id"] for r in receiver.received)
        assert max(ids.values()) == 1, ids  # two instances, each event through one of them
        assert messages_in(receiver.received, room) == [1, 2, 3, 4, 5]

        # Now the receiver holds each request for 3 s: the instance delivering seq 6 dies
        # with the request in flight; the other one delivers it again after the lease.
        receiver.delay = 3.0
        for i in range(3):
            assert (await send(sender, room, f"second {i}"))["ok"] is True
        await receiver.wait_until(lambda got: len(messages_in(got, room)) == 6, timeout=30)
        in_flight = receiver.received[-1]
        victim = next(
            s for s in servers if s.env["INSTANCE_ID"] == in_flight.headers["Chat-Delivered-By"]
        )
        survivor = next(s for s in servers if s is not victim)
        victim.stop(signal.SIGKILL)
        receiver.delay = 0.0
        await sender.disconnect()
        await receiver.wait_until(
            lambda got: sorted(set(messages_in(got, room))) == [1, 2, 3, 4, 5, 6, 7, 8], timeout=60
        )
        seqs = messages_in(receiver.received, room)
        twice = [seq for seq, n in Counter(seqs).items() if n > 1]
        assert twice in ([], [6]), seqs  # at least once: only the event in flight may repeat
        assert [s for i, s in enumerate(seqs) if s not in seqs[:i]] == [1, 2, 3, 4, 5, 6, 7, 8]
        last = receiver.received[-1]
        assert last.headers["Chat-Delivered-By"] == survivor.env["INSTANCE_ID"]
    finally:
        await receiver.stop()
        for server in servers:
            server.stop()


@pytest.mark.timeout(300)
async def test_an_event_refused_too_often_is_dead_and_counted_and_its_room_moves_on(tmp_path, uid):
    receiver = await Receiver(free_port(), status=500).start()
    server = ServerProcess(
        hook_env(receiver.url, sqlite_env(tmp_path), WEBHOOK_MAX_ATTEMPTS="2")
    ).start()
    try:
        room = uid("room")
        client = await ChatClient(uid("dave")).connect(server.url)
        assert (await client.call("room:join", {"room": room}))["ok"] is True
        assert (await send(client, room, "doomed"))["ok"] is True
        admin = make_token(uid("admin"), role="admin")
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                stats = (
                    await http.get("/api/stats", headers={"Authorization": f"Bearer {admin}"})
                ).json()
                # user.online, room.member_added and message.created, each tried twice
                if stats["webhooks"]["dead"] >= 3 and stats["webhooks"]["pending"] == 0:
                    break
                assert asyncio.get_running_loop().time() < deadline, stats
                await asyncio.sleep(0.2)
            values = metric_values((await http.get("/metrics")).text)
            assert values['chat_webhook_deliveries_total{result="dead"}'] == 3
            assert values['chat_webhook_deliveries_total{result="retry"}'] == 3
            receiver.status = 200
            assert (await send(client, room, "after"))["ok"] is True
            await receiver.wait_until(lambda got: messages_in(got, room) == [2], timeout=30)
        await client.disconnect()
    finally:
        await receiver.stop()
        server.stop()


async def test_edits_and_deletions_follow_their_message_in_order_signed(store_env, uid):
    """On each durable store: the events come from its outbox, written with each change."""
    receiver = await Receiver(free_port()).start()
    server = ServerProcess(hook_env(receiver.url, store_env)).start()
    try:
        room = uid("room")
        client = await ChatClient(uid("erin")).connect(server.url)
        assert (await client.call("room:join", {"room": room}))["ok"] is True
        sent = (await send(client, room, "first draft"))["message"]
        edit = await client.call("message:edit", {"room": room, "id": sent["id"], "text": "final"})
        assert edit["ok"] is True
        again = await client.call("message:edit", {"room": room, "id": sent["id"], "text": "final"})
        assert again["ok"] is True  # changes nothing: no second event
        assert (await client.call("message:delete", {"room": room, "id": sent["id"]}))["ok"]

        def in_room(received):
            return [
                r.event
                for r in received
                if r.event["type"].startswith("message.")
                and r.event["data"]["message"]["room"] == room
            ]

        await receiver.wait_until(lambda got: len(in_room(got)) >= 3, timeout=30)
        await asyncio.sleep(1.0)
        events = in_room(receiver.received)
        assert [e["type"] for e in events] == [
            "message.created",
            "message.updated",
            "message.deleted",
        ]
        assert events[1]["data"]["message"]["text"] == "final"
        assert events[1]["data"]["message"]["revision"] == 1
        assert events[2]["data"]["message"]["deleted_at"]
        assert len({e["id"] for e in events}) == 3
        assert events[0]["data"]["message"]["text"] == "first draft"
        assert all(signature_valid(SECRET, r) for r in receiver.received)
        await client.disconnect()
    finally:
        await receiver.stop()
        server.stop()


def test_bad_webhook_configuration_is_refused_at_start():
    from server.config import ConfigError, load_settings

    base = {"STORE": "sqlite"}
    for overrides in (
        {"WEBHOOK_URLS": ["http://127.0.0.1:9/h"], "WEBHOOK_SECRETS": []},
        {"WEBHOOK_URLS": ["ftp://x/h"], "WEBHOOK_SECRETS": [SECRET]},
        {"WEBHOOK_URLS": ["http://127.0.0.1:9/h"], "WEBHOOK_SECRETS": ["short"]},
    ):
        with pytest.raises(ConfigError) as refused:
            load_settings(**{**base, **overrides})
        assert "WEBHOOK" in str(refused.value)
    ok = load_settings(**base, WEBHOOK_URLS=["https://a/h"], WEBHOOK_SECRETS=[SECRET])
    assert ok.WEBHOOK_URLS == ["https://a/h"]
    # Every store keeps an outbox, Firestore included.
    on_firestore = load_settings(
        STORE="firestore",
        FIRESTORE_PROJECT="p",
        WEBHOOK_URLS=["https://a/h"],
        WEBHOOK_SECRETS=[SECRET],
    )
    assert on_firestore.WEBHOOK_URLS == ["https://a/h"]
