"""Several real server processes on one Redis behave as one server (contract §4–§6)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.clients import (
    QUIET,
    ChatClient,
    connect_and_close,
    metric_values,
    parse_iso,
    until,
)
from tests.support.servers import (
    HEARTBEAT,
    TEST_SECRET,
    ServerProcess,
    chat_server,
    cluster_env,
    deployment,
    free_port,
    key_prefix,
    make_token,
)

#: The grace period of the three-instance cluster: long enough that a reconnection made
#: "inside the grace period" lands inside it even on a loaded machine.
TRIO_GRACE = 3.0


@pytest.fixture(scope="module")
def trio(redis_url, tmp_path_factory):
    """Three instances sharing one Redis and one SQLite file."""
    tmp = tmp_path_factory.mktemp("trio")
    with deployment(redis_url, tmp, 3, "node", WS_GRACE_PERIOD=TRIO_GRACE) as servers:
        yield servers


@pytest.fixture
async def users():
    made: list[ChatClient] = []

    async def connect(user: str, server: ServerProcess) -> ChatClient:
        client = await ChatClient(user).connect(server.url)
        made.append(client)
        return client

    yield connect
    for client in made:
        await client.disconnect()


async def test_session_names_the_instance(trio, users, uid):
    clients = [await users(uid("u"), server) for server in trio]
    assert [c.events["session"][0]["instance_id"] for c in clients] == [
        "node-0",
        "node-1",
        "node-2",
    ]


async def test_every_broadcast_kind_crosses_instances(trio, users, uid):
    room, a_id, b_id = uid("room"), uid("a"), uid("b")
    a, b = await users(a_id, trio[0]), await users(b_id, trio[1])
    watcher = await users(uid("w"), trio[2])
    sub = await watcher.call("presence:subscribe", {"users": [b_id]})
    assert sub["presence"][b_id]["status"] == "online"
    for client in (a, b):
        assert (await client.call("room:join", {"room": room}))["ok"]

    sent = await a.call("message:send", {"room": room, "text": "across", "client_id": "x1"})
    assert (await b.wait_for("message:new")) == [sent["message"]]

    assert (await b.call("message:read", {"room": room, "seq": 1}))["ok"]
    read = await a.wait_for("message:read")
    assert read == [{"room": room, "user": b_id, "seq": 1}]

    assert (await a.call("typing", {"room": room, "typing": True}))["ok"]
    assert (await b.wait_for("typing")) == [{"room": room, "user": a_id, "typing": True}]

    await b.disconnect()
    offline = await watcher.wait_for("presence", timeout=TRIO_GRACE + 10)
    assert offline[0]["user"] == b_id and offline[0]["status"] == "offline"
    assert offline[0]["last_seen"].endswith("Z")


async def test_removed_member_leaves_room_on_every_instance(trio, users, uid):
    room, owner_id, member_id = uid("priv"), uid("owner"), uid("member")
    owner = await users(owner_id, trio[0])
    member_tabs = [await users(member_id, trio[1]), await users(member_id, trio[2])]
    created = await owner.call(
        "room:create", {"room": room, "private": True, "members": [member_id]}
    )
    assert created["ok"] and created["room"]["kind"] == "private"
    for client in (owner, *member_tabs):
        assert (await client.call("room:join", {"room": room}))["ok"]
    removed = await owner.call("room:members:remove", {"room": room, "users": [member_id]})
    assert removed["ok"] and removed["removed"] == [member_id]
    for tab in member_tabs:
        assert (await tab.wait_for("room:removed")) == [{"room": room}]
    await owner.call("message:send", {"room": room, "text": "secret", "client_id": "s1"})
    await asyncio.sleep(0.4)
    assert all(tab.events["message:new"] == [] for tab in member_tabs)
    refused = await member_tabs[0].call(
        "message:send", {"room": room, "text": "hi", "client_id": "m"}
    )
    assert refused["error"]["code"] == "forbidden"


async def test_presence_exactly_once_with_three_instances_and_two_devices(trio, users, uid):
    alice_id, bob_id = uid("alice"), uid("bob")
    watchers = [await users(uid("watch"), server) for server in trio]
    for watcher in watchers:
        await watcher.call("presence:subscribe", {"users": [alice_id, bob_id]})
    alice = [await users(alice_id, trio[0]), await users(alice_id, trio[1])]
    bob = [await users(bob_id, trio[1]), await users(bob_id, trio[2])]
    for watcher in watchers:
        await watcher.wait_for("presence", count=2)
    await asyncio.sleep(0.3)
    for watcher in watchers:
        got = sorted((e["user"], e["status"]) for e in watcher.events["presence"])
        assert got == sorted([(alice_id, "online"), (bob_id, "online")])
    await alice[0].disconnect()
    await bob[1].disconnect()
    await asyncio.sleep(TRIO_GRACE + 1.0)
    assert all(len(w.events["presence"]) == 2 for w in watchers)  # one device left each
    await alice[1].disconnect()
    await bob[0].disconnect()
    for watcher in watchers:
        await watcher.wait_for("presence", count=4, timeout=TRIO_GRACE + 10)
    await asyncio.sleep(1.0)  # a second announcement would come within a sweep
    for watcher in watchers:
        statuses = sorted((e["user"], e["status"]) for e in watcher.events["presence"])
        assert statuses == sorted(
            [(alice_id, "online"), (bob_id, "online"), (alice_id, "offline"), (bob_id, "offline")]
        )


async def test_reconnect_to_another_instance_inside_grace_is_silent(trio, users, uid):
    user_id = uid("roamer")
    watcher = await users(uid("w"), trio[0])
    await watcher.call("presence:subscribe", {"users": [user_id]})
    first = await users(user_id, trio[1])
    await watcher.wait_for("presence")
    await first.disconnect()
    await asyncio.sleep(0.3)
    await users(user_id, trio[2])
    await asyncio.sleep(TRIO_GRACE + 1.0)
    assert [e["status"] for e in watcher.events["presence"]] == ["online"]
    state = await watcher.call("presence:subscribe", {"users": [user_id]})
    assert state["presence"][user_id]["status"] == "online"


async def test_concurrent_sends_on_two_instances_get_unique_dense_seqs(trio, users, uid):
    room = uid("busy")
    senders = [
        await users(uid("s"), trio[0]),
        await users(uid("s"), trio[1]),
        await users(uid("s"), trio[2]),
    ]
    for sender in senders:
        await sender.call("room:join", {"room": room})

    async def burst(client: ChatClient, n: int) -> list[int]:
        acks = await asyncio.gather(
            *(
                client.call(
                    "message:send",
                    {"room": room, "text": f"m{i}", "client_id": f"{client.user}-{i}"},
                )
                for i in range(n)
            )
        )
        return [ack["message"]["seq"] for ack in acks]

    results = await asyncio.gather(*(burst(s, 20) for s in senders))
    seqs = sorted(seq for result in results for seq in result)
    assert seqs == list(range(1, 61))
    history = await senders[0].call("message:history", {"room": room, "limit": 100})
    assert [m["seq"] for m in history["messages"]] == list(range(1, 61))


async def test_cluster_figures_in_health(trio, users, uid):
    for server in trio:
        await users(uid("h"), server)
    # The cluster figures are sampled each heartbeat: they catch up with the local counts
    # (earlier tests' clients may still be counted for a heartbeat or two).
    deadline = asyncio.get_running_loop().time() + HEARTBEAT * 20
    while True:
        async with httpx.AsyncClient() as http:
            bodies = [(await http.get(f"{server.url}/api/health")).json() for server in trio]
        local_total = sum(b["connections"] for b in bodies)
        if all(b["cluster"] and b["cluster"]["connections"] == local_total for b in bodies):
            break
        assert asyncio.get_running_loop().time() < deadline, bodies
        await asyncio.sleep(HEARTBEAT / 2)
    for body in bodies:
        assert body["status"] == "healthy" and body["checks"]["redis"]["ok"] is True
        assert body["cluster"]["instances"] == 3
        assert body["cluster"]["connections"] >= 3 and body["cluster"]["online_users"] >= 3


def test_duplicate_instance_id_is_refused(trio, redis_url, tmp_path):
    env = {**trio[0].env, "SQLITE_PATH": str(tmp_path / "other.db")}
    twin = ServerProcess(env)
    twin.start(wait=False)
    code = twin.proc.wait(20)
    assert code != 0
    assert "another live instance holds INSTANCE_ID='node-0'" in twin.log_tail(80)


async def test_crashed_instance_users_go_offline(redis_url, tmp_path, uid):
    """A killed instance is detected after 3 missed heartbeats; then the grace period runs.

    ``last_seen`` is the moment of the reaping, and the offline event comes at least one full
    grace period after it (exact however loaded the machine is). The reaping itself must come
    within 3 heartbeats plus one sweep of the kill, with a margin for a loaded machine.
    """
    grace = 2.0
    prefix = key_prefix()
    env = {"WS_GRACE_PERIOD": grace}
    survivor = ServerProcess(
        cluster_env(redis_url, prefix, tmp_path, INSTANCE_ID="survivor", **env)
    ).start()
    doomed = ServerProcess(
        cluster_env(redis_url, prefix, tmp_path, INSTANCE_ID="doomed", **env)
    ).start()
    victim_id = uid("victim")
    watcher = await ChatClient(uid("w")).connect(survivor.url)
    victim = await ChatClient(victim_id).connect(doomed.url)
    try:
        await watcher.call("presence:subscribe", {"users": [victim_id]})
        killed_at = time.time()
        doomed.kill()
        events = await watcher.wait_for(
            "presence",
            where=lambda e: e["status"] == "offline",
            timeout=3 * HEARTBEAT + grace + 10,
        )
        arrived = time.time()
        assert events[0]["user"] == victim_id
        reaped_at = parse_iso(events[0]["last_seen"])
        assert killed_at < reaped_at <= killed_at + 4 * HEARTBEAT + 5, (killed_at, events[0])
        assert arrived >= reaped_at + grace, (reaped_at, arrived)  # the grace period ran
        await asyncio.sleep(QUIET)
        assert len([e for e in watcher.events["presence"] if e["status"] == "offline"]) == 1
    finally:
        await victim.disconnect()
        await watcher.disconnect()
        survivor.stop()
        doomed.stop()


async def test_stats_lists_every_live_instance_for_admins(trio, users, uid):
    from tests.support.servers import make_token

    for server in trio:
        await users(uid("st"), server)
    async with httpx.AsyncClient() as http:
        denied = await http.get(
            f"{trio[1].url}/api/stats", headers={"Authorization": f"Bearer {make_token(uid('x'))}"}
        )
        assert denied.status_code == 403
        assert (await http.get(f"{trio[1].url}/api/stats")).status_code == 401
        admin = make_token(uid("admin"), role="admin")

        async def counted() -> dict | None:  # heartbeats carry the new connection counts
            response = await http.get(
                f"{trio[1].url}/api/stats", headers={"Authorization": f"Bearer {admin}"}
            )
            body = response.json()
            instances = body["cluster"]["instances"]
            return (
                body if len(instances) == 3 and all(i["connections"] for i in instances) else None
            )

        body = await until(counted, "every instance's heartbeat to count a connection")
    assert body["instance"]["id"] == "node-1"
    ids = sorted(i["id"] for i in body["cluster"]["instances"])
    assert ids == ["node-0", "node-1", "node-2"]
    assert all(
        i["connections"] >= 1 and i["last_heartbeat"].endswith("Z")
        for i in body["cluster"]["instances"]
    )
    assert body["cluster"]["connections"] == sum(
        i["connections"] for i in body["cluster"]["instances"]
    )
    assert body["cluster"]["online_users"] >= 3


async def test_metrics_expose_cluster_figures(trio, users, uid):
    room = uid("m")
    a, b = await users(uid("a"), trio[0]), await users(uid("b"), trio[1])
    for client in (a, b):
        await client.call("room:join", {"room": room})
    await a.call("message:send", {"room": room, "text": "x", "client_id": "1"})
    await b.wait_for("message:new")
    async with httpx.AsyncClient() as http:

        async def sampled() -> bool:  # the cluster gauges are sampled every heartbeat
            text = (await http.get(f"{trio[1].url}/metrics")).text
            return metric_values(text).get("chat_cluster_connections", 0) >= 2

        await until(sampled, "the cluster gauges to count both connections")
        text_a = (await http.get(f"{trio[0].url}/metrics")).text
        text_b = (await http.get(f"{trio[1].url}/metrics")).text
    assert 'chat_acks_total{code="ok"}' in text_a
    lines = metric_values(text_b)
    assert lines["chat_messages_delivered_total"] >= 1
    assert lines["chat_cluster_connections"] >= 2
    assert lines["chat_online_users"] >= 2
    assert lines["chat_redis_used_memory_bytes"] > 0
    text_a_lines = metric_values(text_a)
    assert text_a_lines['chat_store_seconds_count{op="add_message"}'] >= 1
    assert text_a_lines['chat_redis_seconds_count{op="presence_connect"}'] >= 1


async def test_grace_started_by_a_dead_instance_is_finished_by_another(redis_url, tmp_path, uid):
    prefix = key_prefix()
    finisher = ServerProcess(
        cluster_env(redis_url, prefix, tmp_path, INSTANCE_ID="finisher", WS_GRACE_PERIOD=2)
    ).start()
    starter = ServerProcess(
        cluster_env(redis_url, prefix, tmp_path, INSTANCE_ID="starter", WS_GRACE_PERIOD=2)
    ).start()
    leaver_id = uid("leaver")
    watcher = await ChatClient(uid("w")).connect(finisher.url)
    try:
        await watcher.call("presence:subscribe", {"users": [leaver_id]})
        leaver = await ChatClient(leaver_id).connect(starter.url)
        await watcher.wait_for("presence")
        await leaver.disconnect()  # the starter begins the grace period ...
        await asyncio.sleep(0.3)
        starter.kill()  # ... and dies before it ends
        offline = await watcher.wait_for("presence", count=2, timeout=10)
        assert offline[1]["user"] == leaver_id and offline[1]["status"] == "offline"
        await asyncio.sleep(1)
        assert len(watcher.events["presence"]) == 2
    finally:
        await watcher.disconnect()
        finisher.stop()
        starter.stop()


def test_verify_command_passes_on_a_healthy_cluster(trio):
    result = chat_server("verify", *(s.url for s in trio), "--token-secret", TEST_SECRET)
    assert result.returncode == 0, result.stdout + result.stderr
    results = {}  # check name -> "ok" / "FAIL", from the printed table
    for line in result.stdout.splitlines()[1:-1]:
        name, outcome = line.split("  ")[0].strip(), line[len(line.split("  ")[0]) :].split()[0]
        results[name] = outcome
    assert sorted(results) == sorted(
        [
            *(f"health {s.url}" for s in trio),
            "send on node-0",
            "message node-0 → node-1",
            "message node-0 → node-2",
            "presence node-2 → node-0",
        ]
    ), result.stdout
    assert set(results.values()) == {"ok"}
    assert result.stdout.splitlines()[-1] == "deployment verified"


def test_verify_command_fails_when_an_instance_is_down(trio):
    dead = f"http://127.0.0.1:{free_port()}"
    result = chat_server(
        "verify", trio[0].url, dead, "--token-secret", TEST_SECRET, "--timeout", "3"
    )
    assert result.returncode == 1
    assert f"health {dead}" in result.stdout and "FAIL" in result.stdout
    assert "deployment NOT verified" in result.stderr


def test_verify_through_a_load_balancer_meets_every_instance(trio):
    from tests.support.balancer import RoundRobinBalancer

    balancer = RoundRobinBalancer([server.port for server in trio])
    try:
        result = chat_server("verify", balancer.url, "--token-secret", TEST_SECRET)
    finally:
        balancer.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "instances met" in result.stdout and "3 of 3: node-0, node-1, node-2" in result.stdout
    assert result.stdout.splitlines()[-1] == "deployment verified"


def test_verify_with_one_ready_token(trio):
    result = chat_server("verify", trio[1].url, trio[2].url, "--token", make_token("ops-bot"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "presence state on node-2" in result.stdout and "ops-bot: online" in result.stdout


async def test_connections_closed_at_once_never_leave_a_user_online(trio, users, uid):
    """Connect-and-close storms (flaky networks, reloads) end with the user offline."""
    user_id = uid("flaky")
    watcher = await users(uid("w"), trio[0])
    for _ in range(3):
        await asyncio.gather(*(connect_and_close(trio[i % 3].url, user_id) for i in range(12)))

    async def offline() -> bool:
        state = await watcher.call("presence:subscribe", {"users": [user_id]})
        return state["presence"][user_id]["status"] == "offline"

    await until(offline, "the user to go offline", timeout=TRIO_GRACE + 20)
