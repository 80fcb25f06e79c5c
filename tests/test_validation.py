"""Bad input (contract §3): every malformed request gets ``bad_request`` and harms nothing."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import socketio

from tests.support.clients import NAMESPACE, QUIET, ChatClient, error_code, until
from tests.support.servers import ServerProcess, make_token

NOT_OBJECTS = [None, "text", 42, 1.5, True, ["room"], [{"room": "r"}]]
R = "valid-room"  # stands for a room the client has joined (replaced per test)


BAD_FIELDS: dict[str, list] = {
    "auth:refresh": [{}, {"token": 5}, {"token": ""}, {"token": None}, {"token": ["t"]}],
    "room:join": [
        {},
        {"room": 5},
        {"room": ""},
        {"room": "x" * 129},
        {"room": "a b"},
        {"room": "a/b"},
        {"room": "é"},
        {"room": "."},
        {"room": ".."},
        {"room": "__x__"},
        {"room": None},
        {"room": R, "since": -1},
        {"room": R, "since": "3"},
        {"room": R, "since": 1.5},
        {"room": R, "since": True},
        {"room": R, "since": 2**60},
    ],
    "room:leave": [{}, {"room": 1}, {"room": "a b"}, {"room": ["x"]}],
    "room:create": [
        {},
        {"room": 5},
        {"room": "a b"},
        {"room": "NEW", "private": "yes"},
        {"room": "NEW", "members": "bob"},
        {"room": "NEW", "members": [5]},
        {"room": "NEW", "members": ["bad user"]},
        {"room": "NEW", "members": ["ok", "__x__"]},
        {"room": "__NEW__"},
        {"room": "NEW", "name": 5},
        {"room": "NEW", "name": ""},
        {"room": "NEW", "name": "x" * 129},
        {"room": "NEW", "members": [f"u{i}" for i in range(1001)]},
    ],
    "room:members": [{}, {"room": None}, {"room": "a b"}],
    "room:members:add": [
        {},
        {"room": R},
        {"room": R, "users": []},
        {"room": R, "users": "bob"},
        {"room": R, "users": [1]},
        {"room": R, "users": ["bad user"]},
        {"users": ["bob"]},
    ],
    "room:members:remove": [
        {},
        {"room": R},
        {"room": R, "users": []},
        {"room": R, "users": "bob"},
        {"room": R, "users": [None]},
    ],
    "message:send": [
        {},
        {"room": R},
        {"room": R, "text": "x"},
        {"room": R, "client_id": "c"},
        {"text": "x", "client_id": "c"},
        {"room": R, "text": 5, "client_id": "c"},
        {"room": R, "text": None, "client_id": "c"},
        {"room": R, "text": ["x"], "client_id": "c"},
        {"room": R, "text": {"a": 1}, "client_id": "c"},
        {"room": R, "text": "x", "client_id": ""},
        {"room": R, "text": "x", "client_id": "c" * 65},
        {"room": R, "text": "x", "client_id": 5},
        {"room": "a b", "text": "x", "client_id": "c"},
    ],
    "message:history": [
        {},
        {"room": R, "limit": "10"},
        {"room": R, "limit": 1.5},
        {"room": R, "limit": True},
        {"room": R, "after": -1},
        {"room": R, "before": "5"},
        {"room": R, "before": -3},
        {"room": R, "after": None, "before": {}},
        {"room": 7},
    ],
    "message:read": [
        {},
        {"room": R},
        {"room": R, "seq": "1"},
        {"room": R, "seq": -1},
        {"room": R, "seq": 1.5},
        {"room": R, "seq": None},
        {"room": R, "seq": False},
        {"seq": 1},
    ],
    "typing": [
        {},
        {"room": R},
        {"room": R, "typing": "yes"},
        {"room": R, "typing": 1},
        {"room": R, "typing": None},
        {"typing": True},
    ],
    "presence:subscribe": [
        {},
        {"users": []},
        {"users": "bob"},
        {"users": [5]},
        {"users": ["bad user"]},
        {"users": [f"u{i}" for i in range(501)]},
        {"users": None},
    ],
    "presence:unsubscribe": [{}, {"users": "bob"}, {"users": [5]}, {"users": None}],
}
EVENTS = list(BAD_FIELDS)


def substitute(payload, room: str, new_room: str):
    if not isinstance(payload, dict):
        return payload
    swap = {R: room, "NEW": new_room}
    return {k: swap.get(v, v) if isinstance(v, str) else v for k, v in payload.items()}


async def still_works(client: ChatClient, room: str) -> None:
    """The connection survived: a normal request still succeeds."""
    ack = await client.call("room:join", {"room": room})
    assert ack["ok"] is True and ack["room"]["id"] == room, ack


@pytest.mark.parametrize("event", EVENTS)
async def test_non_object_payload(clients, uid, event):
    room = uid("room")
    alice = await clients(uid("alice"))
    for payload in NOT_OBJECTS:
        ack = await alice.call(event, payload)
        assert error_code(ack) == "bad_request", (event, payload)
    await still_works(alice, room)


@pytest.mark.parametrize("event", EVENTS)
async def test_missing_fields_and_wrong_types(clients, uid, event):
    room, new_room = uid("room"), uid("new")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    await alice.call("room:create", {"room": room, "private": True, "members": [bob.user]})
    for client in (alice, bob):
        assert (await client.call("room:join", {"room": room}))["ok"] is True
    for payload in BAD_FIELDS[event]:
        ack = await alice.call(event, substitute(payload, room, new_room))
        assert error_code(ack) == "bad_request", (event, payload)
    # Nothing happened: no message stored or broadcast, no room created, members unchanged.
    await asyncio.sleep(QUIET)
    assert bob.events["message:new"] == [] and bob.events["typing"] == []
    assert bob.events["message:read"] == [] and bob.events["room:removed"] == []
    assert (await alice.call("message:history", {"room": room}))["messages"] == []
    assert error_code(await alice.call("message:history", {"room": new_room})) == "not_found"
    members = await alice.call("room:members", {"room": room})
    assert sorted(m["id"] for m in members["members"]) == sorted([alice.user, bob.user])
    await still_works(alice, uid("room"))
    assert (await alice.call("message:send", {"room": room, "text": "fine", "client_id": "c"}))[
        "message"
    ]["seq"] == 1


async def test_extra_fields_are_ignored(clients, uid):
    room = uid("room")
    alice = await clients(uid("alice"))
    ack = await alice.call("room:join", {"room": room, "extra": {"nested": [1, 2]}, "since": None})
    assert ack["ok"] is True and ack["room"]["id"] == room
    sent = await alice.call(
        "message:send", {"room": room, "text": "x", "client_id": "c", "seq": 99, "sender": "eve"}
    )
    assert sent["message"]["seq"] == 1 and sent["message"]["sender"]["id"] == alice.user


async def test_extra_arguments_do_not_break_the_connection(clients, uid):
    room = uid("room")
    alice = await clients(uid("alice"))
    ack = await alice.call("room:join", ({"room": room}, "second", 3))
    assert ack["ok"] is True and ack["room"]["id"] == room
    await still_works(alice, uid("room"))


async def test_unknown_event_with_ack(clients, uid):
    alice = await clients(uid("alice"))
    for event in ("no:such:event", "message:delete", "Room:Join", "room:join ", ""):
        assert error_code(await alice.call(event, {"room": uid("room")})) == "bad_request", event
    assert error_code(await alice.call("no:such:event")) == "bad_request"
    await still_works(alice, uid("room"))


async def test_unknown_event_without_ack_is_ignored(clients, uid):
    alice = await clients(uid("alice"))
    await alice.sio.emit("no:such:event", {"x": 1}, namespace=NAMESPACE)
    await alice.sio.emit("another", "text", namespace=NAMESPACE)
    await asyncio.sleep(QUIET)
    assert set(alice.events) == {"session"} and alice.sio.connected
    await still_works(alice, uid("room"))


@pytest.mark.parametrize("event", ["connect", "disconnect"])
async def test_reserved_event_names_from_a_client(clients, uid, event):
    """A client emitting ``connect``/``disconnect`` as events must not re-run the lifecycle."""
    room = uid("room")
    alice, watcher = await clients(uid("alice")), await clients(uid("watcher"))
    await watcher.call("presence:subscribe", {"users": [alice.user]})
    await alice.call("room:join", {"room": room})
    await watcher.call("room:join", {"room": room})
    payload = {"token": make_token(uid("mallory")), "HTTP_AUTHORIZATION": "Bearer x"}
    ack = await alice.call(event, payload)
    assert error_code(ack) == "bad_request"
    await alice.sio.emit(event, payload, namespace=NAMESPACE)  # and without an ack
    await asyncio.sleep(QUIET)
    assert alice.sio.connected
    sent = await alice.call("message:send", {"room": room, "text": "still me", "client_id": "c"})
    assert sent["ok"] is True and sent["message"]["sender"]["id"] == alice.user
    assert (await watcher.wait_for("message:new"))[0]["text"] == "still me"
    state = await watcher.call("presence:subscribe", {"users": [alice.user]})
    assert state["presence"][alice.user]["status"] == "online"
    assert watcher.events["presence"] == []


class RawSocket:
    """A websocket speaking Engine.IO/Socket.IO by hand, to send frames no client library would."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"

    async def __aenter__(self) -> RawSocket:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url)
        assert (await self.receive()).startswith("0{")
        await self.ws.send_str("40/chat," + json.dumps({"token": make_token("raw-user")}))
        assert (await self.receive()).startswith("40/chat,{")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.session.close()

    async def receive(self, timeout: float = 5) -> str | None:
        """The next text frame, skipping pings and server events; None once closed."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            message = await asyncio.wait_for(self.ws.receive(), max(0.01, remaining))
            if message.type != aiohttp.WSMsgType.TEXT:
                return None
            if message.data == "2":
                await self.ws.send_str("3")
                continue
            if message.data.startswith("42/chat,"):  # session and other pushed events
                continue
            return message.data

    async def ack(self, frame_id: int, timeout: float = 5) -> list | None:
        """Wait for the ack of ``frame_id`` (other frames are skipped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        prefix = f"43/chat,{frame_id}"
        while True:
            data = await self.receive(max(0.01, deadline - asyncio.get_running_loop().time()))
            if data is None:
                return None
            if data.startswith(prefix + "["):
                return json.loads(data[len(prefix) :])

    async def works(self, frame_id: int = 900) -> bool:
        await self.ws.send_str(f'42/chat,{frame_id}["room:join",{{"room":"raw-room"}}]')
        answer = await self.ack(frame_id)
        return answer is not None and answer[0]["ok"] is True


MALFORMED_FRAMES = {
    "deep-nesting": '42/chat,1["room:join",{"room":' + "[" * 3000 + "]" * 3000 + "}]",
    "broken-json": '42/chat,2["room:join",{',
    "not-an-array": '42/chat,3{"room":"r"}',
    "empty-array": "42/chat,4[]",
    "unconnected-namespace": '42/elsewhere,5["room:join",{"room":"r"}]',
    "huge-ack-id": '42/chat,99999999999999999999999["room:join",{"room":"r"}]',
    "ack-for-nothing": '43/chat,77[{"ok":true}]',
    "connect-again": '40/chat,{"token":"garbage"}',
}


@pytest.mark.parametrize("frame", list(MALFORMED_FRAMES.values()), ids=list(MALFORMED_FRAMES))
async def test_malformed_socketio_frames_keep_the_connection(server, frame):
    async with RawSocket(server.url) as raw:
        await raw.ws.send_str(frame)
        assert await raw.works()


async def test_non_string_event_name_gets_bad_request(server):
    async with RawSocket(server.url) as raw:
        await raw.ws.send_str('42/chat,8[5,{"room":"r"}]')
        answer = await raw.ack(8)
        assert answer is not None and error_code(answer[0]) == "bad_request"
        assert await raw.works()


@pytest.mark.parametrize("frame", ["zzz", ""], ids=["not-a-packet", "empty"])
async def test_engineio_garbage_closes_only_that_connection(server, clients, uid, frame):
    bob = await clients(uid("bob"))
    async with RawSocket(server.url) as raw:
        await raw.ws.send_str(frame)
        # The server closes the websocket that broke the Engine.IO protocol: the next frame
        # read is the close, never an answer.
        try:
            assert await raw.receive(timeout=10) is None
        except TimeoutError:
            pytest.fail(f"the connection stayed open after the frame {frame!r}")
        assert raw.ws.closed
    await still_works(bob, uid("room"))
    async with RawSocket(server.url) as again:
        assert await again.works()


@pytest.mark.parametrize("frame", ["9", "4"], ids=["unknown-type", "empty-message"])
async def test_engineio_packets_without_meaning_are_ignored(server, clients, uid, frame):
    """An unknown packet type, or a message packet without a Socket.IO packet, is dropped."""
    bob = await clients(uid("bob"))
    async with RawSocket(server.url) as raw:
        await raw.ws.send_str(frame)
        assert await raw.works()
        assert not raw.ws.closed
    await still_works(bob, uid("room"))


# --- frame size -----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_oversized_frame_closes_only_that_connection(server, clients, uid, transport):
    room = uid("room")
    big = ChatClient(uid("big"))
    await big.connect(server.url, transports=(transport,))
    bob = await clients(uid("bob"))
    await big.call("room:join", {"room": room})
    await bob.call("room:join", {"room": room})
    closed = asyncio.Event()
    big.sio.on("disconnect", lambda *args: closed.set(), namespace=NAMESPACE)
    text = "y" * 70_000  # MAX_FRAME_BYTES is 65536
    await big.sio.emit(
        "message:send", {"room": room, "text": text, "client_id": "big"}, namespace=NAMESPACE
    )
    await asyncio.wait_for(closed.wait(), 10)
    assert not big.sio.connected
    if transport == "polling":
        await big.sio.eio.disconnect(abort=True)
    # Nothing was stored or delivered, and everyone else is served as before.
    await asyncio.sleep(QUIET)
    assert bob.events["message:new"] == []
    history = await bob.call("message:history", {"room": room})
    assert history["messages"] == []
    assert (await bob.call("message:send", {"room": room, "text": "ok", "client_id": "ok"}))[
        "message"
    ]["seq"] == 1
    carol = await clients(uid("carol"))
    await still_works(carol, room)


async def test_frame_just_under_the_limit_is_fine(clients, uid):
    room = uid("room")
    alice = await clients(uid("alice"))
    await alice.call("room:join", {"room": room})
    ack = await alice.call("message:send", {"room": room, "text": "z" * 60_000, "client_id": "c"})
    assert error_code(ack) == "too_large"  # under the frame limit, over MAX_MESSAGE_LENGTH
    assert alice.sio.connected
    await still_works(alice, room)


# --- event rate limit (dedicated server) ---------------------------------------------------
@pytest.fixture(scope="module")
def slow_server():
    proc = ServerProcess(
        {"RATE_LIMIT_EVENTS_PER_SECOND": "1", "RATE_LIMIT_EVENTS_BURST": "3"}
    ).start()
    yield proc
    proc.stop()


async def test_event_rate_limit(slow_server, uid):
    room = uid("room")
    alice, bob = ChatClient(uid("alice")), ChatClient(uid("bob"))
    await alice.connect(slow_server.url)
    await bob.connect(slow_server.url)
    try:
        assert (await alice.call("room:join", {"room": room}))["ok"] is True
        assert (await alice.call("message:send", {"room": room, "text": "1", "client_id": "1"}))[
            "ok"
        ] is True
        assert (await alice.call("message:send", {"room": room, "text": "2", "client_id": "2"}))[
            "ok"
        ] is True
        limited = await alice.call("message:send", {"room": room, "text": "3", "client_id": "3"})
        assert error_code(limited) == "rate_limited"
        # The limit is per connection: another client is not affected.
        assert (await bob.call("room:join", {"room": room}))["last_seq"] == 2
        assert alice.sio.connected

        async def one_token_back():  # one token per second comes back
            ack = await alice.call("message:send", {"room": room, "text": "3", "client_id": "3"})
            if not ack["ok"]:
                assert error_code(ack) == "rate_limited"
                return None
            return ack

        retry = await until(one_token_back, "a token to come back", interval=0.25)
        assert retry["message"]["seq"] == 3
        assert (
            error_code(
                await alice.call("message:send", {"room": room, "text": "4", "client_id": "4"})
            )
            == "rate_limited"
        )
    finally:
        await alice.disconnect()
        await bob.disconnect()


async def test_unknown_events_count_against_the_rate_limit(slow_server, uid):
    alice = ChatClient(uid("alice"))
    await alice.connect(slow_server.url)
    try:
        for _ in range(3):
            assert error_code(await alice.call("no:such:event", {})) == "bad_request"
        assert error_code(await alice.call("no:such:event", {})) == "rate_limited"
        assert error_code(await alice.call("room:join", {"room": uid("room")})) == "rate_limited"
        assert alice.sio.connected
    finally:
        await alice.disconnect()


async def test_raw_socketio_client_errors_do_not_leak(server, uid):
    """A client connecting without the namespace's auth object still gets a clean refusal."""
    sio = socketio.AsyncClient(reconnection=False)
    errors = []
    sio.on("connect_error", lambda data=None: errors.append(data), namespace=NAMESPACE)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(
            server.url,
            namespaces=[NAMESPACE],
            auth="just-a-string",
            transports=["websocket"],
            wait_timeout=5,
        )
    assert errors == [{"message": "unauthorized", "data": {"code": "missing_token"}}]
