"""HTTP routes beside Socket.IO (contract §7): health, development tokens, demo page, metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import jwt
import pytest
import socketio

from server import __version__
from tests.support.clients import NAMESPACE, ChatClient, metric_values, until
from tests.support.redis_servers import RedisServer
from tests.support.servers import TEST_SECRET, ServerProcess, key_prefix


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def production_like():
    """DEV_TOKENS=false; nobody else connects to it, so counts are exact."""
    proc = ServerProcess({"DEV_TOKENS": "false", "INSTANCE_ID": "http-test-1"}).start()
    yield proc
    proc.stop()


async def connections(http, url: str) -> int:
    return (await http.get(f"{url}/api/health")).json()["connections"]


async def wait_connections(http, url: str, expected: int, timeout: float = 5) -> None:
    async def reached() -> bool:
        return await connections(http, url) == expected

    await until(reached, f"{expected} connections", timeout=timeout, interval=0.05)


# --- health ---------------------------------------------------------------------------------


async def refused_attempt(url: str) -> None:
    """One connection attempt with a garbage token, which the server must refuse."""
    refused = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused.connect(
            url,
            namespaces=[NAMESPACE],
            auth={"token": "garbage"},
            transports=["websocket"],
            wait_timeout=5,
        )


def sample(text: str, name: str) -> float:
    """The value of one Prometheus sample (0 when the series does not exist yet)."""
    return metric_values(text).get(name, 0.0)


def assert_check_ok(check: dict) -> None:
    assert set(check) == {"ok", "latency_ms"} and check["ok"] is True, check
    assert isinstance(check["latency_ms"], int | float) and check["latency_ms"] >= 0


async def test_health_shape_without_redis(server, http):
    response = await http.get(f"{server.url}/api/health")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {
        "status",
        "instance_id",
        "instance",
        "version",
        "checks",
        "connections",
        "cluster",
    }
    assert body["instance"] == body["instance_id"]  # one process: the instance is its member
    assert body["status"] == "healthy"
    assert isinstance(body["instance_id"], str) and body["instance_id"]
    assert body["version"] == __version__
    assert_check_ok(body["checks"]["store"])  # SQLite, pinged for real
    assert body["checks"]["redis"] == {"ok": True, "mode": "disabled (single instance)"}
    # Without Redis the figures are this instance's own (docs/protocol.md says null).
    assert body["cluster"] is None or set(body["cluster"]) == {
        "instances",
        "instance_workers",
        "instance_connections",
        "connections",
        "online_users",
        "sampled_at",
    }
    assert isinstance(body["connections"], int) and body["connections"] >= 0


async def test_health_checks_redis_for_real_within_the_timeout(http):
    """With Redis, a hung Redis turns health 503 within HEALTH_CHECK_TIMEOUT; it recovers."""
    redis = RedisServer().start()
    node = ServerProcess(
        {"REDIS_URL": redis.url, "REDIS_KEY_PREFIX": key_prefix(), "HEALTH_CHECK_TIMEOUT": "0.5"}
    ).start()
    try:
        body = (await http.get(f"{node.url}/api/health")).json()
        assert body["status"] == "healthy"
        assert_check_ok(body["checks"]["store"])
        assert_check_ok(body["checks"]["redis"])
        redis.pause()  # accepts connections, answers nothing
        response = await http.get(f"{node.url}/api/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unhealthy"
        assert body["checks"]["redis"] == {
            "ok": False,
            "error": "redis did not answer within 0.5s",
        }
        assert_check_ok(body["checks"]["store"])
        redis.resume()
        deadline = time.monotonic() + 20
        while (response := await http.get(f"{node.url}/api/health")).status_code != 200:
            assert time.monotonic() < deadline, response.json()
            await asyncio.sleep(0.2)
        assert_check_ok(response.json()["checks"]["redis"])
    finally:
        redis.resume()
        node.stop()
        redis.stop()


async def test_health_instance_id_from_settings(production_like, http):
    body = (await http.get(f"{production_like.url}/api/health")).json()
    assert body["instance_id"] == "http-test-1"


async def test_health_counts_connections(production_like, http, uid):
    url = production_like.url
    await wait_connections(http, url, 0)
    alice, bob = ChatClient(uid("alice")), ChatClient(uid("bob"))
    await alice.connect(url)
    await bob.connect(url)
    try:
        assert await connections(http, url) == 2
        # A refused attempt is not a connection.
        await refused_attempt(url)
        assert await connections(http, url) == 2
        await alice.disconnect()
        await wait_connections(http, url, 1)
    finally:
        await alice.disconnect()
        await bob.disconnect()
    await wait_connections(http, url, 0)


async def test_metrics_of_one_instance(production_like, http, uid):
    url = production_like.url
    await wait_connections(http, url, 0)

    before = (await http.get(f"{url}/metrics")).text
    room = uid("room")
    alice, bob = ChatClient(uid("alice")), ChatClient(uid("bob"))
    await alice.connect(url)
    await bob.connect(url)
    try:
        await alice.call("room:join", {"room": room})
        await bob.call("room:join", {"room": room})
        await alice.call("message:send", {"room": room, "text": "counted", "client_id": "c"})
        await bob.wait_for("message:new")
        await refused_attempt(url)
        response = await http.get(f"{url}/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/plain"
        )
        after = response.text
        assert sample(after, "chat_connections") == 2
        assert (
            sample(after, "chat_messages_received_total")
            - sample(before, "chat_messages_received_total")
            == 1
        )
        assert (
            sample(after, "chat_messages_delivered_total")
            - sample(before, "chat_messages_delivered_total")
            == 1
        )
        failures = 'chat_auth_failures_total{code="invalid_token"}'
        assert sample(after, failures) - sample(before, failures) == 1
    finally:
        await alice.disconnect()
        await bob.disconnect()


# --- development tokens ---------------------------------------------------------------------
async def test_dev_token_issues_a_working_token(server, http, uid):
    user = uid("dev")
    response = await http.post(
        f"{server.url}/api/dev/token", json={"user": user, "name": "Dev Eloper"}
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token"}
    claims = jwt.decode(body["token"], TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == user and claims["name"] == "Dev Eloper"
    assert claims["exp"] - claims["iat"] == 12 * 3600  # the documented 12 h
    assert abs(claims["iat"] - time.time()) < 60
    client = ChatClient(user)
    await client.connect(server.url, token=body["token"])
    try:
        assert client.events["session"][0]["user"] == {"id": user, "name": "Dev Eloper"}
    finally:
        await client.disconnect()


async def test_dev_token_name_is_optional(server, http, uid):
    user = uid("dev")
    response = await http.post(f"{server.url}/api/dev/token", json={"user": user})
    assert response.status_code == 200
    claims = jwt.decode(response.json()["token"], TEST_SECRET, algorithms=["HS256"])
    assert claims["sub"] == user and "name" not in claims


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {}},
        {"json": {"name": "x"}},
        {"json": {"user": ""}},
        {"json": {"user": "bad user"}},
        {"json": {"user": "x" * 129}},
        {"json": {"user": 5}},
        {"json": {"user": "ok", "name": ""}},
        {"json": {"user": "ok", "name": "n" * 129}},
        {"json": ["user"]},
        {"content": b"not json", "headers": {"content-type": "application/json"}},
        {},
    ],
    ids=[
        "empty",
        "no-user",
        "empty-user",
        "space",
        "too-long",
        "number",
        "empty-name",
        "long-name",
        "list",
        "not-json",
        "no-body",
    ],
)
async def test_dev_token_bad_body(server, http, kwargs):
    response = await http.post(f"{server.url}/api/dev/token", **kwargs)
    assert response.status_code == 422


async def test_dev_token_disabled(production_like, http):
    response = await http.post(f"{production_like.url}/api/dev/token", json={"user": "someone"})
    assert response.status_code == 404
    assert "token" not in response.json()


# --- demo page ------------------------------------------------------------------------------
async def test_demo_page(server, http):
    response = await http.get(f"{server.url}/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()


async def test_unknown_route_is_404(server, http):
    assert (await http.get(f"{server.url}/api/nope")).status_code == 404


async def test_cross_origin_handshakes_follow_cors_origins(server):
    """CORS_ORIGINS empty (testing): same origin only; a foreign browser origin is refused."""
    import httpx

    async with httpx.AsyncClient() as http:
        url = f"{server.url}/socket.io/?EIO=4&transport=polling"
        foreign = await http.get(url, headers={"Origin": "https://evil.example"})
        same = await http.get(url, headers={"Origin": server.url})
        no_origin = await http.get(url)
    assert foreign.status_code == 400
    assert same.status_code == 200 and no_origin.status_code == 200
