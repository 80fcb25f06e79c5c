"""The real JavaScript client (socket.io-client 4.8.4, run by node) against a real server."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import jwt
import pytest

from tests.support.clients import first_join_ack
from tests.support.requirements import require_tool
from tests.support.servers import make_token

ROOT = Path(__file__).resolve().parents[1]
JS = Path(__file__).resolve().parent / "js"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MESSAGE_FIELDS = {
    "id",
    "room",
    "seq",
    "sender",
    "text",
    "client_id",
    "created_at",
    "reply_to",
    "mentions",
    "edited_at",
    "revision",
    "deleted",
    "change_seq",
    "reactions",
}


@pytest.fixture(scope="session")
def node_client():
    """node with socket.io-client installed in the project (``npm ci`` when missing)."""
    node = require_tool("node", "nodejs")
    if not (ROOT / "node_modules" / "socket.io-client").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True, timeout=600)
    version = json.loads((ROOT / "node_modules" / "socket.io-client" / "package.json").read_text())[
        "version"
    ]
    assert version == "4.8.4"
    return node


async def run_js(node: str, script: str, payload: dict, timeout: float = 60) -> object:
    proc = await asyncio.create_subprocess_exec(
        node,
        str(JS / script),
        json.dumps(payload),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, stderr.decode()
    return json.loads(stdout)


def refusal(name: str, code: str) -> dict:
    return {
        "name": name,
        "connected": False,
        "message": "unauthorized",
        "data": {"code": code},
        "active": False,
    }


async def test_js_auth_refusals(server, node_client, uid):
    user = uid("u")
    cases = [
        {"name": "missing", "token": None, "via": "none"},
        {"name": "empty", "token": "", "via": "auth"},
        {"name": "expired", "token": make_token(user, ttl=-30), "via": "auth"},
        {
            "name": "bad-signature",
            "token": make_token(user, secret="not-the-secret-0123456789-0123456789"),
            "via": "auth",
        },
        {"name": "garbage", "token": "garbage", "via": "auth"},
        {"name": "bad-sub", "token": make_token("has space"), "via": "auth"},
        {
            "name": "expired-polling",
            "token": make_token(user, ttl=-30),
            "via": "auth",
            "transports": ["polling"],
        },
    ]
    results = await run_js(node_client, "auth.js", {"url": server.url, "cases": cases})
    assert results == [
        refusal("missing", "missing_token"),
        refusal("empty", "missing_token"),
        refusal("expired", "token_expired"),
        refusal("bad-signature", "invalid_token"),
        refusal("garbage", "invalid_token"),
        refusal("bad-sub", "invalid_token"),
        refusal("expired-polling", "token_expired"),
    ]


async def test_js_token_sources(server, node_client, uid):
    users = {via: uid(via) for via in ("auth", "query", "header", "header-polling")}
    cases = [
        {"name": "auth", "token": make_token(users["auth"], "Via Auth"), "via": "auth"},
        {"name": "query", "token": make_token(users["query"]), "via": "query"},
        {"name": "header", "token": make_token(users["header"]), "via": "header"},
        {
            "name": "header-polling",
            "token": make_token(users["header-polling"]),
            "via": "header",
            "transports": ["polling"],
        },
    ]
    results = await run_js(node_client, "auth.js", {"url": server.url, "cases": cases})
    for result in results:
        assert result["connected"] is True, result
        session = result["session"]
        assert set(session) == {"user", "sid", "instance_id", "server_time"}
        assert session["user"]["id"] == users[result["name"]]
        assert session["sid"] == result["id"]
        assert ISO_MS.match(session["server_time"])
    assert results[0]["session"]["user"] == {"id": users["auth"], "name": "Via Auth"}


async def test_js_disconnected_at_token_expiry(server, node_client, uid):
    user = uid("u")
    token = make_token(user, ttl=8)  # a cold node start on a loaded machine takes seconds
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    [result] = await run_js(
        node_client,
        "auth.js",
        {
            "url": server.url,
            "cases": [{"name": "short", "token": token, "via": "auth", "waitDisconnect": True}],
        },
    )
    assert result["connected"] is True and result["session"]["user"]["id"] == user
    # "io server disconnect": the JS client does not reconnect on its own with the old token.
    assert result["disconnectReason"] == "io server disconnect" and result["active"] is False
    assert result["expired"] == [{"reason": "token_expired"}]
    assert exp - 0.05 <= result["disconnectedAt"], (result, exp)  # never before exp
    assert result["disconnectedAt"] <= exp + 10, (result, exp)  # generous on a loaded machine


@pytest.mark.parametrize(
    "transports",
    [(["websocket"], ["websocket"]), (["polling", "websocket"], ["polling"])],
    ids=["websocket", "polling"],
)
async def test_js_chat_between_two_clients(server, node_client, uid, transports):
    room = uid("room")
    alice_id, bob_id = uid("alice"), uid("bob")
    out = await run_js(
        node_client,
        "chat.js",
        {
            "url": server.url,
            "room": room,
            "alice": {"token": make_token(alice_id, "Alice"), "transports": transports[0]},
            "bob": {"token": make_token(bob_id), "transports": transports[1]},
        },
    )
    assert out["sessions"]["alice"]["user"] == {"id": alice_id, "name": "Alice"}
    assert out["transports"]["bob"] == transports[1][0]

    assert (
        out["sendBeforeJoin"]["ok"] is False
        and out["sendBeforeJoin"]["error"]["code"] == "forbidden"
    )
    assert out["joinAlice"] == first_join_ack(room)
    assert out["joinBob"] == out["joinAlice"]

    message = out["send"]["message"]
    assert out["send"]["ok"] is True and set(out["send"]) == {"ok", "message"}
    assert set(message) == MESSAGE_FIELDS
    assert (message["room"], message["seq"], message["text"], message["client_id"]) == (
        room,
        1,
        "hello from js",
        "js-1",
    )
    assert message["sender"] == {"id": alice_id, "name": "Alice"}
    assert ISO_MS.match(message["created_at"])
    assert out["bobReceived"] == [message]
    assert out["repeat"] == out["send"]

    reply = out["reply"]["message"]
    assert reply["seq"] == 2 and reply["sender"] == {"id": bob_id, "name": bob_id}
    assert out["aliceReceived"] == [reply]

    assert out["typing"] == {"ok": True}
    assert out["aliceTyping"] == [{"room": room, "user": bob_id, "typing": True}]
    assert out["bobTypingAll"] == []
    assert out["read"]["ok"] is True
    assert out["bobRead"] == [{"room": room, "user": alice_id, "seq": 2}]

    for key, code in (
        ("tooLong", "too_large"),
        ("empty", "bad_request"),
        ("unknown", "bad_request"),
        ("notObject", "bad_request"),
        ("badLimit", "bad_request"),
    ):
        ack = out[key]
        assert set(ack) == {"ok", "error"} and ack["ok"] is False, (key, ack)
        assert ack["error"]["code"] == code and isinstance(ack["error"]["message"], str), key

    assert out["history"] == {"ok": True, "messages": [message, reply], "has_more": False}
    assert out["historyBefore"] == {"ok": True, "messages": [message], "has_more": False}
    assert sorted(out["members"]["members"], key=lambda m: m["id"]) == sorted(
        [{"id": alice_id, "status": "online"}, {"id": bob_id, "status": "online"}],
        key=lambda m: m["id"],
    )
    assert out["presence"] == {
        "ok": True,
        "presence": {alice_id: {"status": "online", "last_seen": None}},
    }
    assert out["leave"] == {"ok": True}
    # Bob left before the last message; Alice never hears her own messages back.
    assert out["bobAllMessages"] == [message]
    assert out["aliceAllMessages"] == [reply]


@pytest.mark.parametrize(
    "transports",
    [["websocket"], ["polling", "websocket"], ["polling"]],
    ids=["websocket", "upgrade", "polling"],
)
async def test_js_edits_deletes_reactions_replies_mentions(server, node_client, uid, transports):
    room = uid("room")
    alice_id, bob_id, carol_id = uid("alice"), uid("bob"), uid("carol")
    out = await run_js(
        node_client,
        "semantics.js",
        {
            "url": server.url,
            "room": room,
            "alice": {"token": make_token(alice_id, "Alice"), "transports": transports},
            "bob": {"token": make_token(bob_id, "Bob"), "transports": transports},
            "carol": {"token": make_token(carol_id), "transports": transports},
        },
    )
    first = out["send"]["message"]
    assert set(first) == MESSAGE_FIELDS
    assert (first["revision"], first["deleted"], first["reactions"], first["reply_to"]) == (
        0,
        False,
        [],
        None,
    )
    assert out["joinBob"]["change_seq"] == 0 and out["joinBob"]["changes"] == []
    reply = out["reply"]["message"]
    assert reply["reply_to"] == {
        "id": first["id"],
        "seq": 1,
        "sender": {"id": alice_id, "name": "Alice"},
        "text": "hello",
        "deleted": False,
    }
    assert reply["mentions"] == [alice_id, carol_id]
    assert out["aliceMention"] == [{"room": room, "message": reply}]
    assert out["carolMention"] == [{"room": room, "message": reply}]
    assert out["carolNew"] == [] and out["carolActivity"] == []  # not a member: no activity

    edited = out["edit"]["message"]
    assert (edited["text"], edited["revision"], edited["change_seq"]) == ("hello, edited", 1, 1)
    assert ISO_MS.match(edited["edited_at"]) and out["editAgain"] == out["edit"]
    assert out["bobUpdatedAll"] == [
        {
            "room": room,
            "id": first["id"],
            "seq": 1,
            "text": "hello, edited",
            "mentions": [],
            "edited_at": edited["edited_at"],
            "revision": 1,
            "change_seq": 1,
        }
    ]
    assert out["bobReact"]["message"]["reactions"] == [{"emoji": "👍", "count": 1, "me": True}]
    assert out["aliceReactions"][0]["reactions"] == [{"emoji": "👍", "count": 1}]
    assert out["aliceReact"]["message"]["reactions"] == [{"emoji": "👍", "count": 2, "me": True}]
    tomb = out["delete"]["message"]
    assert (tomb["deleted"], tomb["text"], tomb["mentions"], tomb["seq"]) == (True, "", [], 2)
    assert out["aliceDeleted"] == [
        {
            "room": room,
            "id": reply["id"],
            "seq": 2,
            "deleted_at": out["aliceDeleted"][0]["deleted_at"],
            "change_seq": 4,
        }
    ]
    for key, code in (
        ("editOthers", "forbidden"),
        ("editMissingRoom", "not_found"),
        ("longEmoji", "too_large"),
        ("badId", "bad_request"),
    ):
        assert out[key]["ok"] is False and out[key]["error"]["code"] == code, (key, out[key])

    history = out["history"]["messages"]
    assert [m["seq"] for m in history] == [1, 2]
    assert history[0]["text"] == "hello, edited"
    assert history[0]["reactions"] == [{"emoji": "👍", "count": 2, "me": True}]
    assert history[1]["deleted"] is True
    [listed] = [r for r in out["rooms"]["rooms"] if r["room"]["id"] == room]
    assert (listed["last_seq"], listed["unread"], listed["last_message"]["deleted"]) == (2, 1, True)
    assert [m["change_seq"] for m in out["changes"]["changes"]] == [3, 4]
    assert out["changes"]["change_seq"] == 4 and out["changes"]["has_more"] is False
    # bob has joined the room: message:new and his acks tell him, room:activity does not
    assert out["bobActivity"] == []
