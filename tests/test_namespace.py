"""The /chat handlers in process: the guard, routing, admission and fan-out on a fake server."""

from __future__ import annotations

import asyncio

import pytest
import socketio
from prometheus_client import REGISTRY

from server.auth import TokenVerifier
from server.core.clientip import ClientAddress
from server.core.models import Room
from server.core.refusals import LocalRefusals, RefusalCounter
from server.core.state import InstanceState
from server.presence.memory import MemoryPresence
from server.services.changes import ChangeService
from server.services.content import ContentLimits
from server.services.inbox import InboxService
from server.services.messages import MessageService
from server.services.moderation import Moderation
from server.services.presence import PresenceService
from server.services.rooms import RoomService
from server.store.memory import MemoryStore
from server.transport.channels import room_channel, user_channel
from server.transport.connections import Admission, ConnectionRegistry
from server.transport.fanout import Fanout
from server.transport.indicators import TypingTimers
from server.transport.interest import RoomInterest
from server.transport.namespace import ChatNamespace
from tests.support.fake_sio import FakeServer
from tests.support.servers import TEST_SECRET, make_token


class Wired:
    """The parts of one instance as the composition root wires them, on a fake server."""

    def __init__(self, burst: int = 100) -> None:
        self.sio = FakeServer()
        self.store = MemoryStore()
        self.state = InstanceState("test-1", "0")
        self.registry = ConnectionRegistry()
        self.interest = RoomInterest(self.sio.manager, None, linger=0)  # type: ignore[arg-type]
        self.fanout = Fanout(self.sio, self.registry, self.interest)  # type: ignore[arg-type]
        self.presence = PresenceService(
            lambda on_t: MemoryPresence(60, on_t), self.store, self.fanout
        )
        moderation = Moderation(self.store, self.fanout)
        rooms = RoomService(self.store, moderation)
        limits = ContentLimits(max_length=100)
        self.messages = MessageService(self.store, rooms, self.fanout, limits)
        changes = ChangeService(self.store, rooms, self.messages, self.fanout, limits)
        verifier = TokenVerifier(algorithms=["HS256"], secret=TEST_SECRET)
        self.admission = Admission(
            self.sio,  # type: ignore[arg-type]
            self.registry,
            self.state,
            verifier,
            self.presence,
            self.store.upsert_user,
            moderation,
            refusals=LocalRefusals(RefusalCounter(100, 60.0)),
            client_address=ClientAddress(trust_peer=False, trusted=[]),
            max_connections_per_user=100,
            max_connections_per_ip=100,
            events_per_second=0.001,
            events_burst=burst,
            interest=self.interest,
            member_rooms=self.store.member_rooms,
        )
        self.ns = ChatNamespace(
            state=self.state,
            registry=self.registry,
            admission=self.admission,
            verifier=verifier,
            rooms=rooms,
            messages=self.messages,
            changes=changes,
            inbox=InboxService(self.store, limits),
            presence=self.presence,
            fanout=self.fanout,
            typing=TypingTimers(self.messages, 5.0),
            max_presence_subscriptions=10,
            max_joined_rooms=50,
            interest=self.interest,
        )
        self.ns._set_server(self.sio)

    async def connect(self, sid: str, user: str, token: str | None = None) -> None:
        environ = {"asgi.scope": {"client": ("127.0.0.1", 1)}}
        await self.ns.trigger_event("connect", sid, environ, {"token": token or make_token(user)})
        self.sio.manager.connected.add(sid)

    async def call(self, sid: str, event: str, data=None):
        return await self.ns.trigger_event(event, sid, data)


@pytest.fixture
async def wired() -> Wired:
    made = Wired()
    await made.store.start()
    return made


async def test_a_refused_token_never_registers_the_socket(wired):
    with pytest.raises(socketio.exceptions.ConnectionRefusedError) as refused:
        await wired.connect("s1", "alice", token="not-a-token")
    assert refused.value.error_args == {
        "message": "unauthorized",
        "data": {"code": "invalid_token"},
    }
    assert wired.registry.get("s1") is None
    assert wired.sio.manager.rooms[user_channel("alice")] == set()


async def test_send_needs_a_join_and_broadcasts_to_the_room_but_the_sender(wired):
    await wired.connect("s1", "alice")
    await wired.connect("s2", "bob")
    early = await wired.call("s1", "message:send", {"room": "r", "text": "hi", "client_id": "c1"})
    assert early["ok"] is False and early["error"]["code"] == "forbidden"
    for sid in ("s1", "s2"):
        assert (await wired.call(sid, "room:join", {"room": "r"}))["ok"] is True
    ack = await wired.call("s1", "message:send", {"room": "r", "text": "hi", "client_id": "c1"})
    assert ack["ok"] is True and ack["message"]["seq"] == 1
    [sent] = wired.sio.named("message:new")
    assert (sent.room, sent.skip_sid, sent.data["text"]) == (room_channel("r"), "s1", "hi")
    assert wired.state.in_flight == 0


async def test_the_guard_answers_bad_input_unknown_events_and_failures(wired, monkeypatch):
    await wired.connect("s1", "alice")
    not_object = await wired.call("s1", "room:join", ["r"])
    assert not_object["error"]["code"] == "bad_request"
    unknown = await wired.call("s1", "room:explode", {})
    assert unknown["error"] == {"code": "bad_request", "message": "unknown event 'room:explode'"}
    spoofed = await wired.call("s1", "connect", {})  # a connected socket sending "connect"
    assert spoofed["error"]["code"] == "bad_request"

    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(wired.messages, "history", broken)
    failed = await wired.call("s1", "message:history", {"room": "r"})
    assert failed["error"]["code"] == "internal" and "boom" not in failed["error"]["message"]
    assert wired.state.in_flight == 0


async def test_events_past_the_burst_are_rate_limited_known_or_not():
    wired = Wired(burst=2)
    await wired.store.start()
    await wired.connect("s1", "alice")
    assert (await wired.call("s1", "room:join", {"room": "r"}))["ok"] is True
    assert (await wired.call("s1", "nope", {}))["error"]["code"] == "bad_request"
    assert (await wired.call("s1", "room:join", {"room": "r"}))["error"]["code"] == "rate_limited"


async def test_removing_members_sends_one_control_event_and_evicts_only_them(wired):
    for sid, user in (("s1", "alice"), ("s2", "bob"), ("s3", "bob"), ("s4", "eve")):
        await wired.connect(sid, user)
    created = await wired.call(
        "s1", "room:create", {"room": "team", "private": True, "members": ["bob", "eve"]}
    )
    assert created["ok"] is True
    for sid in ("s1", "s2", "s3", "s4"):
        assert (await wired.call(sid, "room:join", {"room": "team"}))["ok"] is True
    ack = await wired.call("s1", "room:members:remove", {"room": "team", "users": ["bob", "zed"]})
    assert ack == {"ok": True, "room": "team", "removed": ["bob"]}
    [control] = wired.sio.named("$chat:evict")
    assert control.data == {"room": "team", "users": ["bob"]}
    await wired.fanout.on_control("evict", control.data)  # what every instance's manager does
    assert wired.sio.manager.rooms[room_channel("team")] == {"s1", "s4"}
    assert sorted(e.to for e in wired.sio.named("room:removed")) == ["s2", "s3"]


async def test_disconnect_forgets_the_socket_and_its_presence(wired):
    await wired.connect("s1", "alice")
    await asyncio.sleep(0)  # after-connect registers presence in the background
    for _ in range(100):
        if (await wired.presence.states(["alice"]))["alice"]["status"] == "online":
            break
        await asyncio.sleep(0.01)
    assert (await wired.presence.states(["alice"]))["alice"]["status"] == "online"
    wired.sio.manager.connected.discard("s1")
    await wired.ns.trigger_event("disconnect", "s1", "client disconnect")
    assert wired.registry.get("s1") is None


async def test_a_connect_that_fails_unexpectedly_is_refused_with_internal(wired):
    class Broken:
        async def verify(self, token):
            raise RuntimeError("boom")

    wired.admission.verifier = Broken()
    with pytest.raises(socketio.exceptions.ConnectionRefusedError) as refused:
        await wired.connect("s1", "alice")
    assert refused.value.error_args == {"message": "internal", "data": {"code": "internal"}}
    assert wired.registry.get("s1") is None  # nothing half-connected left behind


async def test_a_connection_follows_its_users_rooms_up_to_the_cap(wired):
    for room in ("r1", "r2", "r3"):
        await wired.store.create_room(Room(room, "public", room), ["alice", "bob"])
    wired.admission.max_followed_member_rooms = 2
    capped = ("chat_limit_refusals_total", {"limit": "followed_member_rooms"})
    before = REGISTRY.get_sample_value(*capped) or 0
    await wired.connect("s1", "alice")
    await asyncio.gather(*wired.sio.tasks)  # after-connect: follows before the session event
    assert wired.sio.manager.followed == {"room:r1", "room:r2"}  # the first two by id
    assert [e.event for e in wired.sio.emitted][-1] == "session"
    assert REGISTRY.get_sample_value(*capped) == before + 1
    assert (await wired.call("s1", "room:join", {"room": "r3"}))["ok"]
    assert "room:r3" in wired.sio.manager.followed  # a join follows past the cap
    wired.sio.manager.connected.discard("s1")
    await wired.ns.trigger_event("disconnect", "s1", "client disconnect")
    await asyncio.sleep(0.05)  # linger 0: the unfollows run as tasks
    assert wired.sio.manager.followed == set()
