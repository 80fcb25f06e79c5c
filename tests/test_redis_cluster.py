"""Instances on a 6-node Redis Cluster (REDIS_CLUSTER=true): delivery, presence, failover."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.balancer import RoundRobinBalancer
from tests.support.clients import ChatClient, metrics_of
from tests.support.servers import GRACE, ServerProcess, cluster_env, key_prefix, start_all


@pytest.fixture(scope="module")
def cluster_pair(redis_cluster, tmp_path_factory):
    prefix = key_prefix()
    tmp = tmp_path_factory.mktemp("cluster")
    servers = [
        ServerProcess(
            cluster_env(redis_cluster.url, prefix, tmp, REDIS_CLUSTER="true", INSTANCE_ID=f"c{i}")
        )
        for i in range(2)
    ]
    start_all(servers)
    yield servers
    for server in servers:
        server.stop()


async def test_delivery_and_presence_across_instances_on_a_cluster(cluster_pair, uid):
    node_a, node_b = cluster_pair
    room, a_id, b_id = uid("room"), uid("a"), uid("b")
    watcher = await ChatClient(uid("w")).connect(node_a.url)
    a = await ChatClient(a_id).connect(node_a.url)
    try:
        await watcher.call("presence:subscribe", {"users": [b_id]})
        b = await ChatClient(b_id).connect(node_b.url)
        online = await watcher.wait_for("presence")
        assert online[0]["user"] == b_id and online[0]["status"] == "online"
        for client in (a, b):
            assert (await client.call("room:join", {"room": room}))["ok"]
        sent = await a.call("message:send", {"room": room, "text": "sharded", "client_id": "1"})
        assert (await b.wait_for("message:new")) == [sent["message"]]
        await b.call("typing", {"room": room, "typing": True})
        assert (await a.wait_for("typing"))[0]["user"] == b_id
        await b.disconnect()
        offline = await watcher.wait_for("presence", count=2, timeout=GRACE + 5)
        assert offline[1]["status"] == "offline"
    finally:
        await a.disconnect()
        await watcher.disconnect()


async def test_delivery_resumes_after_master_failover(cluster_pair, redis_cluster, uid):
    node_a, node_b = cluster_pair
    room = uid("room")
    a, b = (
        await ChatClient(uid("a")).connect(node_a.url),
        await ChatClient(uid("b")).connect(node_b.url),
    )
    channel_master = redis_cluster.master_for_key(node_a.env["REDIS_KEY_PREFIX"] + "socketio")
    try:
        for client in (a, b):
            await client.call("room:join", {"room": room})
        redis_cluster.kill_node(channel_master)
        await asyncio.get_running_loop().run_in_executor(
            None, redis_cluster.wait_failover, channel_master, 20
        )
        deadline = asyncio.get_running_loop().time() + 25
        sent: list[str] = []
        while True:  # keep sending until one crosses: the listener resubscribes to the new master
            sent.append(f"after {len(sent)}")
            ack = await a.call(
                "message:send", {"room": room, "text": sent[-1], "client_id": sent[-1]}
            )
            assert ack["ok"], ack
            try:
                await b.wait_for("message:new", timeout=1)
                break
            except TimeoutError:
                assert asyncio.get_running_loop().time() < deadline, node_b.log_tail()
        for i in range(5):
            sent.append(f"steady {i}")
            await a.call("message:send", {"room": room, "text": sent[-1], "client_id": sent[-1]})
        # Every message crosses, in order: those sent while b's instance was not subscribed
        # are read back from the store when it subscribes again, once each.
        await b.wait_for("message:new", count=len(sent), timeout=20)
        await asyncio.sleep(0.5)
        assert [m["text"] for m in b.events["message:new"]] == sent
    finally:
        await a.disconnect()
        await b.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, redis_cluster.heal)


@pytest.mark.parametrize("transports", [("polling",), ("polling", "websocket")])
async def test_sessions_are_served_by_any_instance_on_a_cluster(cluster_pair, uid, transports):
    """No sticky sessions on Redis Cluster: every request of these clients goes to the next
    instance, so most polling requests and upgrades reach one that does not own them."""
    balancer = RoundRobinBalancer([s.port for s in cluster_pair], affinity=False)
    room = uid("room")
    a = await ChatClient(uid("a")).connect(balancer.url, transports=transports)
    b = await ChatClient(uid("b")).connect(balancer.url, transports=transports)
    try:
        for client in (a, b):
            assert (await client.call("room:join", {"room": room}))["ok"]
        sent = []
        for n in range(5):
            ack = await a.call("message:send", {"room": room, "text": f"m{n}", "client_id": f"{n}"})
            assert ack["ok"], ack
            sent.append(ack["message"]["seq"])
        got = await b.wait_for("message:new", count=5)
        assert [m["seq"] for m in got] == sent
        assert balancer.requests >= 4  # the balancer did carry them, spread over both
        forwarded = 0.0
        for instance in cluster_pair:
            values = await metrics_of(instance.url)
            forwarded += sum(
                v for k, v in values.items() if k.startswith("chat_sessions_forwarded_total")
            )
        assert forwarded >= 1
    finally:
        await a.disconnect()
        await b.disconnect()
        balancer.close()
