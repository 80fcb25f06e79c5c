"""Connection caps per user and per client address, the refused-attempt limiter, client IPs.

Real uvicorn processes (and a real Redis for the cluster-wide counts). This machine has a
second address (192.0.2.2) besides loopback, so two client addresses are real peers.
"""

from __future__ import annotations

import httpx
import pytest
import socketio

from server.core.clientip import ClientAddress, limit_key
from server.core.refusals import RefusalCounter
from tests.support.clients import NAMESPACE, ChatClient, metrics_of, until
from tests.support.servers import ServerProcess, key_prefix, make_token, start_all

OTHER_ADDRESS = "192.0.2.2"


async def attempt(url: str, token: str | None, headers: dict | None = None) -> dict:
    """One connection attempt; ``{"ok": True, "client": c}`` or ``{"ok": False, message, code}``."""
    client = socketio.AsyncClient(reconnection=False)
    errors: list = []

    @client.on("connect_error", namespace=NAMESPACE)
    async def on_error(data=None):
        errors.append(data)

    try:
        await client.connect(
            url,
            namespaces=[NAMESPACE],
            auth={"token": token} if token else None,
            headers=headers or {},
            transports=["websocket"],
            wait_timeout=10,
        )
    except socketio.exceptions.ConnectionError:
        error = (errors[0] if errors else None) or {}
        data = error.get("data") or {}
        return {
            "ok": False,
            "message": error.get("message"),
            "code": data.get("code"),
            "data": data,
        }
    return {"ok": True, "client": client}


def refused_with(result: dict, code: str) -> None:
    assert result["ok"] is False, result
    assert result["code"] == code, result


# --- one instance -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def capped():
    """Low caps, listening on every address so that 127.0.0.1 and 192.0.2.2 are two clients."""
    proc = ServerProcess(
        {
            "STORE": "memory",
            "MAX_CONNECTIONS_PER_USER": "3",
            "MAX_CONNECTIONS_PER_IP": "5",
            "RATE_LIMIT_CONNECTS_PER_MINUTE": "100000",
        },
        host="0.0.0.0",
    ).start()
    yield proc
    proc.stop()


async def test_connections_capped_per_user(capped, uid):
    url = capped.url
    user = uid("u")
    admitted = [await attempt(url, make_token(user)) for _ in range(3)]
    assert all(result["ok"] for result in admitted)
    try:
        over = await attempt(url, make_token(user))
        refused_with(over, "user_connection_limit")
        assert over["data"] == {"code": "user_connection_limit"}
        other = await attempt(url, make_token(uid("v")))  # somebody else is not affected
        assert other["ok"]
        await other["client"].disconnect()
        await admitted.pop()["client"].disconnect()  # a slot frees up when one leaves

        async def admitted_again() -> bool:
            result = await attempt(url, make_token(user))
            if result["ok"]:
                admitted.append(result)
            return result["ok"]

        await until(admitted_again, "a free slot for the user", timeout=15)
        figures = await metrics_of(url)
        assert figures['chat_connections_refused_total{reason="user_connection_limit"}'] >= 1
    finally:
        for result in admitted:
            await result["client"].disconnect()


async def test_connections_capped_per_address(capped, uid):
    local_url = capped.url
    other_url = f"http://{OTHER_ADDRESS}:{capped.port}"

    async def local_count() -> bool:
        async with httpx.AsyncClient(timeout=10) as http:
            return (await http.get(f"{local_url}/api/health")).json()["connections"] == 0

    await until(local_count, "no connections left", timeout=15)
    admitted = [await attempt(local_url, make_token(uid("a"))) for _ in range(5)]
    try:
        assert all(result["ok"] for result in admitted)
        refused_with(await attempt(local_url, make_token(uid("b"))), "ip_connection_limit")
        elsewhere = await attempt(other_url, make_token(uid("c")))  # another client address
        assert elsewhere["ok"]
        admitted.append(elsewhere)
        figures = await metrics_of(local_url)
        assert figures['chat_connections_refused_total{reason="ip_connection_limit"}'] >= 1
    finally:
        for result in admitted:
            await result["client"].disconnect()


@pytest.fixture(scope="module")
def limited():
    """Three refused attempts a minute per address; the direct peer may be a proxy."""
    proc = ServerProcess(
        {
            "STORE": "memory",
            "RATE_LIMIT_CONNECTS_PER_MINUTE": "3",
            "TRUSTED_PROXIES": "127.0.0.1",
        },
        host="0.0.0.0",
    ).start()
    yield proc
    proc.stop()


async def test_blocked_address_is_refused_before_its_token_is_verified(limited, uid):
    url = f"http://{OTHER_ADDRESS}:{limited.port}"  # not a trusted proxy: its own address counts
    before = await metrics_of(limited.url)
    for _ in range(3):
        refused_with(await attempt(url, "garbage"), "invalid_token")
    for token in ("garbage", make_token(uid("u"))):  # blocked: even a good token waits
        result = await attempt(url, token)
        refused_with(result, "rate_limited")
        assert result["message"] == "rate_limited"
    after = await metrics_of(limited.url)
    failures = 'chat_auth_failures_total{code="invalid_token"}'
    # Only the three attempts before the block were verified at all.
    assert after[failures] - before.get(failures, 0) == 3
    assert after['chat_connections_refused_total{reason="rate_limited"}'] >= 2
    # Another address is not affected.
    result = await attempt(limited.url, make_token(uid("v")))
    assert result["ok"]
    await result["client"].disconnect()


async def test_forwarded_address_is_the_right_most_untrusted(limited, uid):
    """The left-most X-Forwarded-For entry is the client's to choose: it never decides."""
    for index in range(3):
        forwarded = {"X-Forwarded-For": f"10.9.8.{index}, 198.51.100.7"}
        refused_with(await attempt(limited.url, "garbage", forwarded), "invalid_token")
    rotated = {"X-Forwarded-For": "10.9.8.99, 198.51.100.7"}
    refused_with(await attempt(limited.url, "garbage", rotated), "rate_limited")
    # The proxy (127.0.0.1) appended 198.51.100.8: another client.
    other = {"X-Forwarded-For": "198.51.100.7, 198.51.100.8"}
    refused_with(await attempt(limited.url, "garbage", other), "invalid_token")


async def test_ipv6_clients_counted_by_their_64(limited):
    for suffix in ("1", "2", "ffff:ffff"):
        forwarded = {"X-Forwarded-For": f"2001:db8:5:6::{suffix}"}
        refused_with(await attempt(limited.url, "garbage", forwarded), "invalid_token")
    same_64 = {"X-Forwarded-For": "2001:db8:5:6:1234::9"}
    refused_with(await attempt(limited.url, "garbage", same_64), "rate_limited")
    next_64 = {"X-Forwarded-For": "2001:db8:5:7::1"}
    refused_with(await attempt(limited.url, "garbage", next_64), "invalid_token")


async def test_forwarded_header_ignored_from_an_untrusted_peer(uid):
    proc = ServerProcess({"STORE": "memory", "RATE_LIMIT_CONNECTS_PER_MINUTE": "2"}).start()
    try:
        for index in range(2):
            forwarded = {"X-Forwarded-For": f"203.0.113.{index}"}
            refused_with(await attempt(proc.url, "garbage", forwarded), "invalid_token")
        spoof = {"X-Forwarded-For": "203.0.113.200"}
        refused_with(await attempt(proc.url, "garbage", spoof), "rate_limited")
    finally:
        proc.stop()


async def test_limiter_memory_is_bounded():
    proc = ServerProcess(
        {
            "STORE": "memory",
            "RATE_LIMIT_CONNECTS_PER_MINUTE": "5",
            "REFUSAL_LIMITER_MAX_KEYS": "100",
            "TRUSTED_PROXIES": "127.0.0.0/8",
        }
    ).start()
    try:
        for index in range(150):
            forwarded = {"X-Forwarded-For": f"198.18.{index // 250}.{index % 250}"}
            refused_with(await attempt(proc.url, "garbage", forwarded), "invalid_token")
        figures = await metrics_of(proc.url)
        assert figures["chat_refusal_limiter_keys"] == 100
        assert figures["chat_refusal_limiter_evictions_total"] == 50
    finally:
        proc.stop()


# --- across instances ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(redis_url):
    prefix = key_prefix()
    env = {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "STORE": "memory",
        "WS_HEARTBEAT_INTERVAL": "1",
        "WS_GRACE_PERIOD": "1",
        "MAX_CONNECTIONS_PER_USER": "2",
        "RATE_LIMIT_CONNECTS_PER_MINUTE": "3",
    }
    servers = start_all([ServerProcess(dict(env)), ServerProcess(dict(env))], timeout=90)
    yield servers
    for server in servers:
        server.stop()


async def test_user_cap_counts_every_instance(pair, uid):
    first, second = pair
    user = uid("u")
    clients = [
        await ChatClient(user).connect(first.url),
        await ChatClient(user).connect(first.url),
    ]
    try:  # both are counted in Redis once their session event has arrived
        refused_with(await attempt(second.url, make_token(user)), "user_connection_limit")
        await clients.pop().disconnect()

        async def admitted_on_second() -> bool:
            result = await attempt(second.url, make_token(user))
            if result["ok"]:
                await result["client"].disconnect()
            return result["ok"]

        await until(admitted_on_second, "a free slot on the second instance", timeout=15)
    finally:
        for client in clients:
            await client.disconnect()


async def test_refused_attempts_count_across_instances(pair):
    first, second = pair
    # Every attempt comes from 127.0.0.1, alternately to each instance.
    refused_with(await attempt(first.url, "garbage"), "invalid_token")
    refused_with(await attempt(second.url, "garbage"), "invalid_token")
    refused_with(await attempt(first.url, "garbage"), "invalid_token")
    refused_with(await attempt(second.url, "garbage"), "rate_limited")


# --- the pieces on their own ---------------------------------------------------------------------
def test_client_address_rules():
    direct = ClientAddress(trust_peer=False, trusted=[])
    assert direct.of("203.0.113.5", "1.2.3.4") == "203.0.113.5"
    heroku = ClientAddress(trust_peer=True, trusted=[])
    assert heroku.of("10.1.2.3", "6.6.6.6, 203.0.113.5") == "203.0.113.5"
    alb = ClientAddress(trust_peer=False, trusted=["10.0.0.0/8"])
    assert alb.of("10.0.3.4", "6.6.6.6, 203.0.113.5, 10.0.1.1") == "203.0.113.5"
    assert alb.of("203.0.113.9", "6.6.6.6") == "203.0.113.9"  # not from the proxy
    assert alb.of("10.0.3.4", "garbage, 203.0.113.5") == "203.0.113.5"
    assert alb.of("10.0.3.4", "203.0.113.5, garbage") == "10.0.3.4"
    assert alb.of("::ffff:10.0.3.4", "[2001:db8::1]:443") == "2001:db8::1"
    assert limit_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert limit_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_refusal_counter_is_lru_bounded_and_slides():
    counter = RefusalCounter(limit=3, window=60.0, max_keys=3)
    for key in ("a", "b", "c"):
        counter.record(key, now=0.0)
    counter.record("a", now=1.0)  # "a" is now the most recent
    counter.record("d", now=1.0)  # evicts "b", the least recently used
    assert len(counter) == 3 and counter.count("b", now=1.0) == 0
    for _ in range(2):
        counter.record("a", now=2.0)
    assert counter.blocked("a", now=2.0)
    assert counter.blocked("a", now=70.0)  # 4 in the last window, weighted 5/6: 3.3
    assert not counter.blocked("a", now=100.0)  # weighted 1/3: 1.3
    assert counter.count("a", now=130.0) == 0  # two windows on
