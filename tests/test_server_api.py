"""The server API (/api/server) with real processes: keys, routes, moderation, across instances."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest
import socketio

from server.auth import new_api_key
from tests.support.clients import ChatClient, error_code, metric_values
from tests.support.servers import ROOT, ServerProcess, key_prefix, make_token, start_all

WRITE_KEY, WRITE_ENTRY = new_api_key("backend")
READ_KEY, READ_ENTRY = new_api_key("reports", writable=False)
OLD_KEY, OLD_ENTRY = new_api_key("backend-old")  # rotation: two writable keys at once


def api_env(**extra) -> dict[str, str]:
    return {
        "SERVER_API_KEYS": ",".join([WRITE_ENTRY, READ_ENTRY, OLD_ENTRY]),
        **{k: str(v) for k, v in extra.items()},
    }


@pytest.fixture(scope="module")
def pair(redis_url, tmp_path_factory):
    """Two instances on one Redis and one SQLite file, with server API keys."""
    prefix = key_prefix()
    tmp = tmp_path_factory.mktemp("api")
    env = api_env(
        REDIS_URL=redis_url,
        REDIS_KEY_PREFIX=prefix,
        STORE="sqlite",
        SQLITE_PATH=tmp / "shared.db",
        WS_HEARTBEAT_INTERVAL=1,
    )
    servers = start_all([ServerProcess({**env, "INSTANCE_ID": f"api-{i}"}) for i in range(2)])
    yield servers
    for server in servers:
        server.stop()


def auth(key: str = WRITE_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def api(server, method: str, path: str, key: str | None = WRITE_KEY, **kwargs):
    headers = {**(auth(key) if key else {}), **kwargs.pop("headers", {})}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        return await http.request(method, f"/api/server{path}", headers=headers, **kwargs)


ROUTES = [
    ("POST", "/rooms/r1/messages", {"text": "hi", "client_id": "c"}),
    ("GET", "/rooms/r1/messages", None),
    ("POST", "/rooms", {"room": "r1"}),
    ("POST", "/rooms/r1/members", {"users": ["a"]}),
    ("POST", "/rooms/r1/members/remove", {"users": ["a"]}),
    ("POST", "/presence", {"users": ["a"]}),
    ("POST", "/users/a/disconnect", {}),
    ("POST", "/users/a/revoke-tokens", {}),
    ("POST", "/rooms/r1/bans", {"user": "a"}),
    ("POST", "/rooms/r1/bans/remove", {"user": "a"}),
    ("POST", "/rooms/r1/mutes", {"user": "a", "seconds": 5}),
    ("POST", "/rooms/r1/mutes/remove", {"user": "a"}),
    ("POST", "/users/a/blocks", {"user": "b"}),
    ("POST", "/users/a/blocks/remove", {"user": "b"}),
]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_every_route_refuses_a_missing_or_wrong_key_and_changes_nothing(
    pair, method, path, body
):
    for key in (None, "sk_wrong", WRITE_KEY[:-1]):
        response = await api(pair[0], method, path, key=key, json=body)
        assert response.status_code == 401, response.text
        assert response.json() == {
            "ok": False,
            "error": {"code": "unauthorized", "message": "a valid server API key is required"},
        }
    history = await api(pair[0], "GET", "/rooms/r1/messages")
    assert history.json()["error"]["code"] == "not_found"  # nothing was created


BAD_BODIES = [
    ("POST", "/rooms/r1/messages", {"text": 5, "client_id": "c"}),
    ("POST", "/rooms/r1/messages", {"text": "no id"}),
    ("POST", "/rooms/r1/messages", {"text": "x", "client_id": "c", "sender": {"id": "a b"}}),
    ("POST", "/rooms/bad room/messages", {"text": "x", "client_id": "c"}),
    ("POST", "/rooms", {"room": "../x"}),
    ("POST", "/rooms", {"room": "r", "members": ["ok", "not ok"]}),
    ("POST", "/rooms/r1/members", {"users": []}),
    ("POST", "/presence", {"users": "a"}),
    ("POST", "/users/a/revoke-tokens", {"issued_before": "yesterday"}),
    ("POST", "/rooms/r1/mutes", {"user": "a"}),
    ("POST", "/rooms/r1/mutes", {"user": "a", "seconds": -1}),
    ("POST", "/users/a/blocks", {"user": "a"}),
    ("POST", "/rooms/r1/bans", {"user": "a", "extra": True}),
    # ids Firestore refuses as document ids are refused for every store
    ("POST", "/rooms", {"room": "__x__"}),
    ("POST", "/rooms", {"room": "r", "members": [".."]}),
    ("POST", "/rooms/__x__/messages", {"text": "x", "client_id": "c"}),
    ("POST", "/rooms/r1/messages", {"text": "x", "client_id": "c", "sender": {"id": "."}}),
    ("POST", "/users/__x__/revoke-tokens", {"issued_before": 1}),
]


@pytest.mark.parametrize("method,path,body", BAD_BODIES)
async def test_bad_bodies_get_a_400_in_the_acks_vocabulary(pair, method, path, body):
    response = await api(pair[0], method, path, json=body)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["code"] in ("bad_request", "not_found") and error["message"]
    if path.startswith("/rooms/r1/") or path == "/rooms":
        assert response.status_code == 400 or error["code"] == "not_found"


async def test_not_json_at_all_is_a_bad_request(pair):
    response = await api(
        pair[0],
        "POST",
        "/rooms",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


async def test_a_read_only_key_reads_but_never_writes(pair, uid):
    room = uid("ro")
    assert (await api(pair[0], "POST", "/rooms", json={"room": room})).status_code == 200
    read = await api(pair[0], "GET", f"/rooms/{room}/messages", key=READ_KEY)
    assert read.status_code == 200 and read.json() == {
        "ok": True,
        "messages": [],
        "has_more": False,
    }
    presence = await api(pair[0], "POST", "/presence", key=READ_KEY, json={"users": ["x"]})
    assert presence.status_code == 200
    write = await api(
        pair[0],
        "POST",
        f"/rooms/{room}/messages",
        key=READ_KEY,
        json={"text": "x", "client_id": "1"},
    )
    assert write.status_code == 403 and write.json()["error"]["code"] == "forbidden"
    assert (await api(pair[0], "GET", f"/rooms/{room}/messages")).json()["messages"] == []


async def test_posted_messages_are_idempotent_stored_and_broadcast_on_every_instance(pair, uid):
    room, bob = uid("news"), uid("bob")
    await api(pair[0], "POST", "/rooms", json={"room": room, "private": True, "members": [bob]})
    listener = await ChatClient(bob).connect(pair[1].url)
    try:
        assert (await listener.call("room:join", {"room": room}))["ok"] is True
        first = await api(
            pair[0],
            "POST",
            f"/rooms/{room}/messages",
            json={"text": "your order shipped"},
            headers={"Idempotency-Key": "order-1"},
        )
        body = first.json()
        assert first.status_code == 200 and body["created"] is True
        message = body["message"]
        assert message["sender"] == {"id": "$system", "name": "System"} and message["seq"] == 1
        again = await api(
            pair[1],
            "POST",
            f"/rooms/{room}/messages",
            key=OLD_KEY,
            json={"text": "your order shipped", "client_id": "order-1"},
        )
        assert again.json() == {"ok": True, "message": message, "created": False}
        [live] = await listener.wait_for("message:new")
        assert live == message
        as_user = await api(
            pair[0],
            "POST",
            f"/rooms/{room}/messages",
            json={"text": "hi", "client_id": "u1", "sender": {"id": bob, "name": "Bob"}},
        )
        assert as_user.json()["message"]["sender"] == {"id": bob, "name": "Bob"}
        # The API has no socket to skip: every socket of the room gets it, the sender's too.
        second = (await listener.wait_for("message:new", count=2))[1]
        assert second == as_user.json()["message"]
        history = (await api(pair[1], "GET", f"/rooms/{room}/messages?after=0")).json()
        assert [m["seq"] for m in history["messages"]] == [1, 2]
    finally:
        await listener.disconnect()


async def test_a_message_posted_on_one_instance_reaches_a_js_client_on_the_other(pair, uid):
    node = shutil.which("node")
    assert node, "node is required"
    room, carol = uid("js"), uid("carol")
    await api(pair[0], "POST", "/rooms", json={"room": room})
    payload = {
        "url": pair[1].url,
        "token": make_token(carol),
        "room": room,
        "event": "message:new",
        "count": 1,
        "ms": 20000,
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        str(ROOT / "tests" / "js" / "listen.js"),
        json.dumps(payload),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert ready == b"ready\n", (await proc.stderr.read()).decode() if proc.stderr else ""
        posted = await api(
            pair[0],
            "POST",
            f"/rooms/{room}/messages",
            json={"text": "deploy done", "client_id": "d1"},
        )
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(line) == [posted.json()["message"]]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_members_added_and_removed_through_the_api_lose_live_access_at_once(pair, uid):
    room, owner, dave = uid("team"), uid("owner"), uid("dave")
    made = await api(
        pair[0], "POST", "/rooms", json={"room": room, "private": True, "owner": owner}
    )
    assert made.json()["room"] == {"id": room, "kind": "private", "name": room}
    added = await api(pair[0], "POST", f"/rooms/{room}/members", json={"users": [dave, dave]})
    assert added.json() == {"ok": True, "room": room, "added": [dave]}
    client = await ChatClient(dave).connect(pair[1].url)
    try:
        assert (await client.call("room:join", {"room": room}))["ok"] is True
        removed = await api(
            pair[0], "POST", f"/rooms/{room}/members/remove", json={"users": [dave, "ghost"]}
        )
        assert removed.json() == {"ok": True, "room": room, "removed": [dave]}
        assert await client.wait_for("room:removed") == [{"room": room}]
        send = await client.call("message:send", {"room": room, "text": "x", "client_id": "1"})
        assert error_code(send) == "forbidden"
        owner_out = await api(
            pair[0], "POST", f"/rooms/{room}/members/remove", json={"users": [owner]}
        )
        assert owner_out.status_code == 400
    finally:
        await client.disconnect()


async def test_presence_of_a_list_of_users(pair, uid):
    online, offline = uid("on"), uid("off")
    client = await ChatClient(online).connect(pair[1].url)
    try:
        deadline = time.monotonic() + 15
        while True:
            states = (
                await api(pair[0], "POST", "/presence", json={"users": [online, offline]})
            ).json()
            if states["presence"][online]["status"] == "online":
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)
        assert states["presence"][offline] == {"status": "offline", "last_seen": None}
    finally:
        await client.disconnect()


async def test_disconnect_closes_every_connection_of_a_user_on_every_instance(pair, uid):
    erin, frank = uid("erin"), uid("frank")
    clients = [await ChatClient(erin).connect(server.url) for server in pair]
    bystander = await ChatClient(frank).connect(pair[1].url)
    try:
        response = await api(
            pair[0], "POST", f"/users/{erin}/disconnect", json={"reason": "account closed"}
        )
        assert response.json() == {"ok": True, "user": erin}
        for client in clients:
            assert await client.wait_for("session:closed") == [{"reason": "account closed"}]
            deadline = time.monotonic() + 10
            while client.sio.connected:
                assert time.monotonic() < deadline, "still connected"
                await asyncio.sleep(0.05)
        assert bystander.sio.connected
        assert (await bystander.call("room:join", {"room": uid("r")}))["ok"] is True
    finally:
        for client in [*clients, bystander]:
            await client.disconnect()


async def revoked_refusals(server) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.url}/metrics")).text
    return metric_values(text).get('chat_auth_failures_total{code="token_revoked"}', 0.0)


async def test_revoked_tokens_are_refused_everywhere_and_live_ones_closed(pair, uid):
    grace = uid("grace")
    old = make_token(grace)
    live = await ChatClient(grace).connect(pair[1].url, token=old)
    try:
        await asyncio.sleep(1.1)  # tokens carry whole seconds: the cut-off must be later than iat
        response = await api(pair[0], "POST", f"/users/{grace}/revoke-tokens", json={})
        assert response.status_code == 200 and response.json()["issued_before"]
        assert await live.wait_for("session:closed") == [{"reason": "token revoked"}]
        for server in pair:
            before = await revoked_refusals(server)
            with pytest.raises(socketio.exceptions.ConnectionError):
                await ChatClient(grace).connect(server.url, token=old)
            assert await revoked_refusals(server) == before + 1
        await asyncio.sleep(1.1)
        fresh = await ChatClient(grace).connect(pair[1].url, token=make_token(grace))
        refresh = await fresh.call("auth:refresh", {"token": old})
        assert error_code(refresh) == "forbidden" and "token_revoked" in refresh["error"]["message"]
        await fresh.disconnect()
    finally:
        await live.disconnect()


async def test_bans_mutes_and_blocks_refuse_with_their_own_codes_on_every_instance(pair, uid):
    room, gina, hank = uid("mod"), uid("gina"), uid("hank")
    await api(pair[0], "POST", "/rooms", json={"room": room})
    g = await ChatClient(gina).connect(pair[1].url)
    h = await ChatClient(hank).connect(pair[0].url)
    try:
        for client in (g, h):
            assert (await client.call("room:join", {"room": room}))["ok"] is True
        muted = await api(
            pair[0], "POST", f"/rooms/{room}/mutes", json={"user": gina, "seconds": 60}
        )
        assert muted.status_code == 200 and muted.json()["until"]
        refused = await g.call("message:send", {"room": room, "text": "x", "client_id": "m1"})
        assert error_code(refused) == "muted"
        assert (await h.call("message:send", {"room": room, "text": "ok", "client_id": "h1"}))["ok"]
        await api(pair[1], "POST", f"/rooms/{room}/mutes/remove", json={"user": gina})
        assert (await g.call("message:send", {"room": room, "text": "back", "client_id": "m2"}))[
            "ok"
        ]

        banned = await api(pair[0], "POST", f"/rooms/{room}/bans", json={"user": gina})
        assert banned.json()["until"] is None
        assert await g.wait_for("room:removed") == [{"room": room}]
        assert error_code(await g.call("room:join", {"room": room})) == "banned"
        posted = await api(
            pair[0],
            "POST",
            f"/rooms/{room}/messages",
            json={"text": "x", "client_id": "b1", "sender": {"id": gina}},
        )
        assert posted.status_code == 403 and posted.json()["error"]["code"] == "banned"
        await api(pair[0], "POST", f"/rooms/{room}/bans/remove", json={"user": gina})
        assert (await g.call("room:join", {"room": room}))["ok"] is True

        dm = "dm:" + ":".join(sorted([gina, hank]))
        for client in (g, h):
            assert (await client.call("room:join", {"room": dm}))["ok"] is True
        blocked = await api(pair[0], "POST", f"/users/{hank}/blocks", json={"user": gina})
        assert blocked.json() == {"ok": True, "user": hank, "blocked": gina}
        for client, cid in ((g, "d1"), (h, "d2")):
            send = await client.call("message:send", {"room": dm, "text": "x", "client_id": cid})
            assert error_code(send) == "blocked"
        assert error_code(await h.call("room:join", {"room": dm})) == "blocked"
        await api(pair[1], "POST", f"/users/{hank}/blocks/remove", json={"user": gina})
        assert (await h.call("room:join", {"room": dm}))["ok"] is True
    finally:
        await g.disconnect()
        await h.disconnect()


async def test_each_key_has_its_own_rate_limit(tmp_path, uid):
    server = ServerProcess(api_env(SERVER_API_RATE_PER_SECOND=0.01, SERVER_API_BURST=3)).start()
    try:
        codes = [
            (await api(server, "POST", "/presence", json={"users": ["a"]})).status_code
            for _ in range(5)
        ]
        assert codes == [200, 200, 200, 429, 429]
        other = await api(server, "POST", "/presence", key=READ_KEY, json={"users": ["a"]})
        assert other.status_code == 200
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{server.url}/metrics")).text
        assert 'chat_server_api_requests_total{code="rate_limited",key="backend"} 2.0' in metrics
    finally:
        server.stop()


def test_api_routes_are_in_the_openapi_schema(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    paths = {p for p in schema["paths"] if p.startswith("/api/server")}
    assert paths == {
        "/api/server" + path.replace("r1", "{room}").replace("/users/a/", "/users/{user}/")
        for _, path, _ in ROUTES
    }
