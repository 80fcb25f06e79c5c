"""A Redis outage: local clients keep being served, health says so, delivery resumes after."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.clients import ChatClient, until
from tests.support.redis_servers import RedisServer
from tests.support.servers import ServerProcess, cluster_env, key_prefix


@pytest.fixture
def outage_pair(tmp_path):
    redis_server = RedisServer().start()
    prefix = key_prefix()
    servers = [
        ServerProcess(cluster_env(redis_server.url, prefix, tmp_path, INSTANCE_ID=f"o{i}")).start()
        for i in range(2)
    ]
    yield redis_server, servers
    for server in servers:
        server.stop()
    redis_server.stop()


async def health(url: str) -> tuple[int, dict]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{url}/api/health")
        return response.status_code, response.json()


async def wait_health(url: str, want: int, timeout: float = 20) -> dict:
    """The health document once ``url`` answers with status ``want``."""

    async def answered() -> dict | None:
        code, body = await health(url)
        return body if code == want else None

    return await until(answered, f"{url} to answer {want}", timeout=timeout, interval=0.2)


async def test_redis_restart_mid_conversation(outage_pair, uid):
    redis_server, (node_a, node_b) = outage_pair
    room = uid("room")
    a = await ChatClient(uid("a")).connect(node_a.url)
    a_peer = await ChatClient(uid("a2")).connect(node_a.url)
    b = await ChatClient(uid("b")).connect(node_b.url)
    try:
        for client in (a, a_peer, b):
            assert (await client.call("room:join", {"room": room}))["ok"]
        first = await a.call("message:send", {"room": room, "text": "before", "client_id": "1"})
        await b.wait_for("message:new", where=lambda m: m["seq"] == first["message"]["seq"])

        redis_server.stop()
        body = await wait_health(node_a.url, 503)
        assert body["status"] == "unhealthy" and body["checks"]["redis"]["ok"] is False
        assert body["checks"]["store"]["ok"] is True

        during = await a.call("message:send", {"room": room, "text": "during", "client_id": "2"})
        assert during["ok"] is True and during["message"]["seq"] == 2
        await a_peer.wait_for(
            "message:new", where=lambda m: m["seq"] == 2
        )  # local delivery goes on

        redis_server.restart()
        await wait_health(node_a.url, 200)
        await wait_health(node_b.url, 200)

        # Cross-instance delivery resumes without a restart (listener resubscribes).
        deadline = asyncio.get_running_loop().time() + 15
        n = 3
        while True:
            await a.call("message:send", {"room": room, "text": f"after{n}", "client_id": str(n)})
            try:
                await b.wait_for(
                    "message:new", where=lambda m: m["text"].startswith("after"), timeout=1
                )
                break
            except TimeoutError:
                assert asyncio.get_running_loop().time() < deadline, node_b.log_tail()
                n += 1

        # What was acked during the outage is in history (the store is the authority).
        history = await b.call("message:history", {"room": room})
        texts = [m["text"] for m in history["messages"]]
        assert texts[:2] == ["before", "during"]
        assert [m["seq"] for m in history["messages"]] == list(range(1, len(texts) + 1))

        # Presence healed: Redis lost its data, the instances registered their connections again.
        async def online() -> bool:
            state = await b.call("presence:subscribe", {"users": [a.user]})
            return state["presence"][a.user]["status"] == "online"

        await until(online, "presence to be registered again")
    finally:
        for client in (a, a_peer, b):
            await client.disconnect()
