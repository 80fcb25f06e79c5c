"""Settings away from their defaults, and unexpected failures provoked in the SQLite file.

One server runs with non-default TRUST_PROXY_HEADERS (and TRUSTED_PROXIES), JWT_LEEWAY, CORS_ORIGINS,
MAX_MESSAGE_LENGTH, MAX_FRAME_BYTES and RATE_LIMIT_CONNECTS_PER_MINUTE; the shared server
(defaults) is the control for each. A trigger that the test installs in the server's SQLite
file makes a store call fail in a way no code path expects, which must answer ``internal``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import jwt
import pytest

from tests.support.clients import NAMESPACE, QUIET, ChatClient, attempt, error_code, refused, send
from tests.support.servers import ServerProcess, make_token

ORIGIN = "https://app.example.test"
MAX_LENGTH = 10
FRAME = 4096
LEEWAY = 30


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    path = tmp_path_factory.mktemp("tuned") / "chat.db"
    proc = ServerProcess(
        {
            "SQLITE_PATH": str(path),
            "TRUST_PROXY_HEADERS": "true",
            "TRUSTED_PROXIES": "10.0.0.0/8",
            "RATE_LIMIT_CONNECTS_PER_MINUTE": "2",
            "JWT_LEEWAY": str(LEEWAY),
            "CORS_ORIGINS": ORIGIN,
            "MAX_MESSAGE_LENGTH": str(MAX_LENGTH),
            "MAX_FRAME_BYTES": str(FRAME),
        }
    ).start()
    proc.db = path
    yield proc
    proc.stop()


def forwarded(address: str) -> dict:
    """The header as a client's address passed through two proxies: a trusted inner one
    (10.0.0.1, in TRUSTED_PROXIES) and the direct peer (trusted by TRUST_PROXY_HEADERS)."""
    return {"X-Forwarded-For": f"{address}, 10.0.0.1"}


# --- TRUST_PROXY_HEADERS ----------------------------------------------------------------------
async def test_trusted_forwarded_for_is_the_client_address(tuned, uid):
    """Refused attempts count per X-Forwarded-For address when TRUST_PROXY_HEADERS=true."""
    noisy, quiet = "203.0.113.7", "203.0.113.8"
    for _ in range(2):
        result = await attempt(tuned.url, auth={"token": "garbage"}, headers=forwarded(noisy))
        assert result == refused("invalid_token")
    limited = await attempt(tuned.url, auth={"token": "garbage"}, headers=forwarded(noisy))
    assert limited["error"]["data"] == {"code": "rate_limited"}
    other = await attempt(tuned.url, auth={"token": "garbage"}, headers=forwarded(quiet))
    assert other == refused("invalid_token")  # another client behind the same proxy


# --- JWT_LEEWAY ---------------------------------------------------------------------------------
async def test_leeway_accepts_a_token_just_expired(tuned, server, uid):
    user = uid("u")
    token = make_token(user, ttl=-5)  # expired 5 s ago, inside the 30 s leeway
    accepted = await attempt(tuned.url, auth={"token": token})
    assert accepted["ok"] is True and accepted["session"]["user"]["id"] == user
    assert await attempt(server.url, auth={"token": token}) == refused("token_expired")
    too_old = make_token(user, ttl=-(LEEWAY + 30))
    assert await attempt(tuned.url, auth={"token": too_old}) == refused("token_expired")


# --- CORS_ORIGINS -------------------------------------------------------------------------------
async def test_cors_origins_lists_the_browser_origins_allowed(tuned):
    url = f"{tuned.url}/socket.io/?EIO=4&transport=polling"
    async with httpx.AsyncClient(timeout=10) as http:
        listed = await http.get(url, headers={"Origin": ORIGIN})
        foreign = await http.get(url, headers={"Origin": "https://evil.example"})
        same = await http.get(url, headers={"Origin": tuned.url})
    assert listed.status_code == 200
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert foreign.status_code == 400
    assert same.status_code == 400  # a list replaces the same-origin default


# --- MAX_MESSAGE_LENGTH and MAX_FRAME_BYTES ----------------------------------------------------
async def test_message_and_frame_limits_follow_the_settings(tuned, uid):
    room = uid("room")
    alice = await ChatClient(uid("alice")).connect(tuned.url)
    big = await ChatClient(uid("big")).connect(tuned.url)
    try:
        for client in (alice, big):
            assert (await client.call("room:join", {"room": room}))["ok"]
        assert (await send(alice, room, "x" * MAX_LENGTH, "exact"))["ok"] is True
        assert error_code(await send(alice, room, "x" * (MAX_LENGTH + 1), "over")) == "too_large"
        closed = asyncio.Event()
        big.sio.on("disconnect", lambda *args: closed.set(), namespace=NAMESPACE)
        await big.sio.emit(
            "message:send", {"room": room, "text": "y" * FRAME, "client_id": "big"}, NAMESPACE
        )
        await asyncio.wait_for(closed.wait(), 20)
        history = await alice.call("message:history", {"room": room})
        assert [m["client_id"] for m in history["messages"]] == ["exact"]
    finally:
        await alice.disconnect()
        await big.disconnect()


# --- unexpected failures: `internal` ------------------------------------------------------------
async def test_unexpected_store_failure_answers_internal(tuned, uid):
    """A read-marker write that fails in no expected way acks ``internal``; nothing moves."""
    room = uid("room")
    alice = await ChatClient(uid("alice")).connect(tuned.url)
    bob = await ChatClient(uid("bob")).connect(tuned.url)
    db = sqlite3.connect(tuned.db, isolation_level=None, timeout=10)
    try:
        for client in (alice, bob):
            assert (await client.call("room:join", {"room": room}))["ok"]
        assert (await send(alice, room, "one", "1"))["ok"]
        db.execute(
            "CREATE TRIGGER refuse_markers BEFORE INSERT ON read_markers "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
        failed = await bob.call("message:read", {"room": room, "seq": 1})
        assert error_code(failed) == "internal"
        assert "refused by the test" not in failed["error"]["message"]  # no details leak
        await asyncio.sleep(QUIET)
        assert alice.events["message:read"] == []
        assert bob.sio.connected
        db.execute("DROP TRIGGER refuse_markers")
        assert (await bob.call("message:read", {"room": room, "seq": 1}))["ok"] is True
        assert await alice.wait_for("message:read") == [{"room": room, "user": bob.user, "seq": 1}]
    finally:
        db.execute("DROP TRIGGER IF EXISTS refuse_markers")
        db.close()
        await alice.disconnect()
        await bob.disconnect()


# --- the token sources' order ---------------------------------------------------------------------
async def test_bearer_header_wins_over_query_token(server, uid):
    header_user, query_user = uid("header"), uid("query")
    result = await attempt(
        server.url,
        headers={"Authorization": f"Bearer {make_token(header_user)}"},
        query=f"?token={make_token(query_user)}",
    )
    assert result["ok"] is True and result["session"]["user"]["id"] == header_user


# --- auth:refresh ---------------------------------------------------------------------------------
async def test_refresh_answers_the_new_expiry(clients, uid):
    user = uid("alice")
    alice = await clients(user, token=make_token(user, ttl=600))
    token = make_token(user, ttl=1200)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    ack = await alice.call("auth:refresh", {"token": token})
    assert set(ack) == {"ok", "expires_at"} and ack["ok"] is True
    assert ack["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(exp))


async def test_refresh_with_an_earlier_expiry_is_refused(clients, uid):
    user = uid("alice")
    alice = await clients(user, token=make_token(user, ttl=3600))
    earlier = await alice.call("auth:refresh", {"token": make_token(user, ttl=600)})
    assert error_code(earlier) == "bad_request"
    assert alice.sio.connected
    later = await alice.call("auth:refresh", {"token": make_token(user, ttl=7200)})
    assert later["ok"] is True


# --- presence subscription cap ------------------------------------------------------------------
async def test_a_connection_follows_at_most_5000_users(clients, uid):
    observer = await clients(uid("observer"))
    run = uid("many")
    for batch in range(10):
        users = [f"{run}-{batch}-{i}" for i in range(500)]
        ack = await observer.call("presence:subscribe", {"users": users})
        assert ack["ok"] is True, (batch, ack)
    again = await observer.call("presence:subscribe", {"users": [f"{run}-0-0"]})
    assert again["ok"] is True  # already followed: not one more
    over = await observer.call("presence:subscribe", {"users": [uid("one-more")]})
    assert error_code(over) == "too_large"
    assert (await observer.call("presence:unsubscribe", {"users": [f"{run}-0-0"]}))["ok"]
    assert (await observer.call("presence:subscribe", {"users": [uid("fits-again")]}))["ok"]
