"""Messages published while an instance's pub/sub subscription is down reach its sockets
all the same, once each and in order (server/transport/catchup.py, server/bus/ledger.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.clients import ChatClient, metrics_of, send
from tests.support.servers import ServerProcess, cluster_env, key_prefix, start_all

pytestmark = pytest.mark.timeout(240)


async def cut_subscriptions(admin, seconds: float) -> int:
    """Kill every pub/sub connection on the server, again and again for ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    killed = 0
    while loop.time() < deadline:
        killed += int(
            await asyncio.to_thread(admin.execute_command, "CLIENT", "KILL", "TYPE", "pubsub")
        )
        await asyncio.sleep(0.02)
    return killed


async def test_messages_sent_while_an_instance_is_unsubscribed_are_caught_up(
    private_redis, tmp_path, uid
):
    env = cluster_env(private_redis.url, key_prefix(), tmp_path)
    a, b = start_all([ServerProcess({**env, "INSTANCE_ID": f"gap-{i}"}) for i in "ab"])
    room = uid("room")
    alice = await ChatClient(uid("alice")).connect(a.url)
    bob = await ChatClient(uid("bob")).connect(b.url)
    admin = private_redis.client()
    try:
        for client in (alice, bob):
            assert (await client.call("room:join", {"room": room}))["ok"]
        acked: list[int] = []

        async def talk(count: int, tag: str, pause: float) -> None:
            for n in range(count):
                ack = await send(alice, room, f"{tag}-{n}")
                assert ack["ok"], ack
                acked.append(ack["message"]["seq"])
                await asyncio.sleep(pause)

        await talk(3, "before", 0)
        assert [m["seq"] for m in await bob.wait_for("message:new", count=3)] == acked
        cutting = asyncio.create_task(cut_subscriptions(admin, 2.0))
        await talk(20, "during", 0.08)
        assert await cutting > 0
        await talk(3, "after", 0)

        await bob.wait_for("message:new", count=len(acked), timeout=60)
        await asyncio.sleep(1.0)  # time for a second copy to show up
        # Every one, once, in order.
        assert [m["seq"] for m in bob.events["message:new"]] == acked
        values = await metrics_of(b.url)
        assert values["chat_bus_listener_resubscribes_total"] >= 1
        # Some of them could only have come from the store: the subscription was down.
        assert values["chat_bus_caught_up_messages_total"] >= 1
    finally:
        for client in (alice, bob):
            await client.disconnect()
        a.stop()
        b.stop()
