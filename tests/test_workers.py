"""`uvicorn server.main:app --workers N` with one INSTANCE_ID: each worker a cluster member."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.support.clients import ChatClient, metric_values, send
from tests.support.servers import ServerProcess, cluster_env, key_prefix

# Two workers start slowly on a loaded machine.
pytestmark = pytest.mark.timeout(400)


async def all_workers_registered(url: str, workers: int, timeout: float = 120) -> None:
    """Wait until every worker has started and registered (health counts them)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            try:
                cluster = (await http.get(f"{url}/api/health")).json().get("cluster") or {}
            except httpx.HTTPError:
                cluster = {}
            if cluster.get("instance_workers", 0) >= workers:
                return
            assert time.monotonic() < deadline, f"workers never all registered: {cluster}"
            await asyncio.sleep(0.2)


async def clients_on_every_worker(
    url: str, uid, workers: int, rounds: int = 8, per_round: int = 10
) -> dict[str, ChatClient]:
    """Connect users until one sits on each worker (the kernel picks the worker).

    Connections open concurrently and stay open while more are made: an idle worker that
    wins every accept of one-at-a-time connects never lets the other one take a turn.
    """
    await all_workers_registered(url, workers)
    by_worker: dict[str, ChatClient] = {}
    spare: list[ChatClient] = []
    try:
        for _ in range(rounds):
            made = await asyncio.gather(
                *(ChatClient(uid("u")).connect(url) for _ in range(per_round))
            )
            for client in made:
                member = client.events["session"][0]["instance_id"]
                if member in by_worker:
                    spare.append(client)
                else:
                    by_worker[member] = client
            if len(by_worker) == workers:
                return by_worker
    finally:
        for client in spare:
            await client.disconnect()
    for client in by_worker.values():
        await client.disconnect()
    raise AssertionError(f"connections reached only {sorted(by_worker)}")


def worker_pid(member: str) -> int:
    instance, _, pid = member.rpartition("/p")
    assert instance and pid.isdigit(), member
    return int(pid)


@pytest.fixture
def web1(redis_url, tmp_path):
    server = ServerProcess(
        cluster_env(redis_url, key_prefix(), tmp_path, INSTANCE_ID="web-1"), workers=2
    ).start(timeout=300)
    yield server
    server.stop()


async def test_workers_are_members_of_one_instance(web1, uid):
    clients = await clients_on_every_worker(web1.url, uid, 2)
    try:
        assert all(member.startswith("web-1/p") for member in clients)
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 20
            while True:
                body = (await http.get(f"{web1.url}/api/health")).json()
                cluster = body["cluster"] or {}
                if cluster.get("instance_workers") == 2 and cluster.get("connections") == 2:
                    break
                assert time.monotonic() < deadline, body
                await asyncio.sleep(0.2)
        assert body["status"] == "healthy" and body["instance"] == "web-1"
        assert body["instance_id"] in clients
    finally:
        for client in clients.values():
            await client.disconnect()


async def test_one_metrics_answer_covers_every_worker(web1, uid):
    clients = await clients_on_every_worker(web1.url, uid, 2)
    room = uid("room")
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            before = metric_values((await http.get(f"{web1.url}/metrics")).text)
            for client in clients.values():
                assert (await client.call("room:join", {"room": room}))["ok"]
                for n in range(3):
                    assert (await send(client, room, f"{client.user}-{n}"))["ok"]
            # Whichever worker answers, the figures are the instance's.
            for _ in range(4):
                after = metric_values((await http.get(f"{web1.url}/metrics")).text)
                received = after["chat_messages_received_total"] - before.get(
                    "chat_messages_received_total", 0
                )
                assert received == 6
                assert after["chat_connections"] == 2
                for member in clients:
                    assert after[f'chat_worker_connections{{worker="{member}"}}'] == 1
    finally:
        for client in clients.values():
            await client.disconnect()


async def test_sigkilled_worker_is_reaped(web1, uid):
    clients = await clients_on_every_worker(web1.url, uid, 2)
    (victim_member, victim), (survivor_member, watcher) = list(clients.items())
    try:
        sub = await watcher.call("presence:subscribe", {"users": [victim.user]})
        assert sub["presence"][victim.user]["status"] == "online"
        os.kill(worker_pid(victim_member), signal.SIGKILL)
        # Three missed heartbeats, a sibling reaps it, then the grace period runs out.
        offline = await watcher.wait_for(
            "presence", timeout=30, where=lambda e: e["user"] == victim.user
        )
        assert offline[0]["status"] == "offline"
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 20
            while True:
                text = (await http.get(f"{web1.url}/metrics")).text
                values = metric_values(text)
                if f'chat_worker_connections{{worker="{victim_member}"}}' not in values:
                    break
                assert time.monotonic() < deadline, text
                await asyncio.sleep(0.3)
        assert values[f'chat_worker_connections{{worker="{survivor_member}"}}'] == 1
        assert web1.proc is not None and web1.proc.poll() is None  # the instance stays up
        assert "presence.instance_reaped" in web1.log_tail(400)
    finally:
        for client in clients.values():
            await client.disconnect()


async def test_sigterm_drains_every_worker(web1, uid):
    clients = await clients_on_every_worker(web1.url, uid, 2)
    assert web1.proc is not None
    web1.proc.send_signal(signal.SIGTERM)
    for client in clients.values():
        deadline = time.monotonic() + 20
        while client.sio.connected:
            assert time.monotonic() < deadline, "a worker did not close its clients"
            await asyncio.sleep(0.1)
    assert await asyncio.to_thread(web1.proc.wait, 30) is not None
    log = web1.log_tail(400)
    assert log.count('"shutdown.drained"') == 2, log


def test_workers_without_redis_refuse_to_start(tmp_path):
    server = ServerProcess({"STORE": "memory"}, workers=2)
    server.start(wait=False)
    assert server.proc is not None
    try:
        server.proc.wait(90)
    except Exception:
        server.kill()
        raise
    assert "uvicorn --workers N needs Redis" in server.log_tail(400)


def test_one_process_without_redis_still_starts():
    server = ServerProcess({"STORE": "memory"}).start()
    try:
        assert server.wait_healthy()["instance"] == server.wait_healthy()["instance_id"]
    finally:
        server.stop()


async def test_workers_of_a_sigkilled_supervisor_drain_and_exit(web1, uid):
    clients = await clients_on_every_worker(web1.url, uid, 2)
    pids = [worker_pid(member) for member in clients]
    assert web1.proc is not None
    web1.proc.kill()  # the supervisor only: nothing but the kernel tells the workers
    try:
        for client in clients.values():
            deadline = time.monotonic() + 30
            while client.sio.connected:
                assert time.monotonic() < deadline, "an orphaned worker kept its clients"
                await asyncio.sleep(0.1)
        for pid in pids:
            deadline = time.monotonic() + 30
            while _running(pid):
                assert time.monotonic() < deadline, f"worker {pid} outlived its supervisor"
                await asyncio.sleep(0.1)
        log = web1.log_tail(400)
        assert log.count('"shutdown.drained"') == 2, log
    finally:
        for client in clients.values():
            await client.disconnect()


def _running(pid: int) -> bool:
    """The process exists and has not exited (an exited child of a dead parent may linger
    as a zombie until init reaps it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status.split("State:", 1)[-1].split("\n", 1)[0]
