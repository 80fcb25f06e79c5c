"""Ids, names, client ids and text refuse the characters that deceive or break (real server)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import socketio

from tests.support.clients import NAMESPACE, ChatClient, error_code, send
from tests.support.servers import make_token

DECEIVING = ["\u202e", "\u200b", "\u2066", "\ufeff", "\x00", "\x1b", "\u2028", "\r"]


@pytest.mark.parametrize("sub", ["alice\n", "alice\r\n", "ali\u200bce", "\u202ealice", "alice "])
async def test_sub_is_matched_whole(server, sub):
    client = socketio.AsyncClient(reconnection=False)
    errors: list = []
    client.on("connect_error", lambda data=None: errors.append(data), namespace=NAMESPACE)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(
            server.url,
            namespaces=[NAMESPACE],
            auth={"token": make_token(sub)},
            transports=["websocket"],
            wait_timeout=10,
        )
    assert errors and errors[0]["data"]["code"] == "invalid_token"


@pytest.mark.parametrize("char", DECEIVING)
async def test_names_and_client_ids_refuse_deceiving_characters(clients, uid, char):
    alice = await clients(uid("alice"))
    room = uid("room")
    ack = await alice.call("room:create", {"room": room, "name": f"Tea{char}m"})
    assert error_code(ack) == "bad_request"
    assert (await alice.call("room:join", {"room": room}))["ok"] is True  # nothing was made
    ack = await alice.call("message:send", {"room": room, "text": "hi", "client_id": f"c{char}1"})
    assert error_code(ack) == "bad_request"
    assert (await alice.call("room:join", {"room": room}))["last_seq"] == 0


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\r"])
async def test_text_refuses_control_characters(clients, uid, char):
    alice = await clients(uid("alice"))
    room = uid("room")
    await alice.call("room:join", {"room": room})
    assert error_code(await send(alice, room, f"bad{char}text", "c1")) == "bad_request"


async def test_text_keeps_newlines_tabs_and_emoji_sequences(clients, uid):
    alice = await clients(uid("alice"))
    room = uid("room")
    await alice.call("room:join", {"room": room})
    text = "line one\n\tline two \U0001f469\u200d\U0001f4bb \u05e9\u05dc\u05d5\u05dd"
    ack = await send(alice, room, text, client_id="multi-line")
    assert ack["ok"] is True and ack["message"]["text"] == text


async def test_a_deceiving_token_name_is_not_shown(server, uid):
    user = uid("mallory")
    client = ChatClient(user)
    await client.connect(server.url, token=make_token(user, name="\u202eecila"))
    try:
        assert client.events["session"][0]["user"] == {"id": user, "name": user}
    finally:
        await client.disconnect()


async def test_dev_token_names_are_checked(server):
    async with httpx.AsyncClient(timeout=10) as http:
        bad = await http.post(
            f"{server.url}/api/dev/token", json={"user": "ann", "name": "A\u202enn"}
        )
        assert bad.status_code == 422
        bad_user = await http.post(f"{server.url}/api/dev/token", json={"user": "ann\n"})
        assert bad_user.status_code == 422


async def test_frame_limit_counts_bytes(server, uid):
    """A frame under MAX_FRAME_BYTES characters but over it in bytes closes the connection."""
    alice = ChatClient(uid("alice"))
    await alice.connect(server.url)
    room = uid("room")
    await alice.call("room:join", {"room": room})
    text = "é" * 40_000  # 40 000 characters, 80 000 bytes: over 65 536 bytes only
    await alice.sio.emit(
        "message:send", {"room": room, "text": text, "client_id": "big"}, namespace=NAMESPACE
    )
    deadline = asyncio.get_running_loop().time() + 20
    while alice.sio.connected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    assert not alice.sio.connected
    await alice.disconnect()
