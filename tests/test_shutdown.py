"""SIGTERM drains an instance: clients move to another instance, nobody sees presence change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
from dataclasses import dataclass

import httpx
import pytest

from tests.support.clients import ChatClient, attempt, until
from tests.support.servers import (
    ROOT,
    ServerProcess,
    cluster_env,
    key_prefix,
    make_token,
    start_all,
)

#: uvicorn re-raises SIGTERM once its graceful shutdown is complete, so a drained process ends
#: "killed by SIGTERM" (143 in a shell); a crash would exit 1, a forced stop by SIGKILL.
DRAINED_EXIT = -signal.SIGTERM

NODE_CLIENT = r"""
const { io } = require("socket.io-client");
const [urlA, urlB, token] = process.argv.slice(2);
// A two-address "load balancer": every (re)connection goes to the next URL.
const urls = [urlA, urlB]; let next = 0;
const seen = [];
function open() {
  const s = io(urls[next++ % 2] + "/chat", { auth: { token }, transports: ["websocket"], reconnection: false });
  s.on("session", (x) => { seen.push(x.instance_id); if (seen.filter((v) => !v.startsWith("disconnect:")).length === 2) { console.log(JSON.stringify({ seen })); } });
  s.on("disconnect", (reason) => { seen.push("disconnect:" + reason); setTimeout(open, 100); });
  s.on("connect_error", (e) => { setTimeout(open, 200); });
}
open();
setTimeout(() => { console.log(JSON.stringify({ seen, timeout: true })); process.exit(1); }, 30000);
"""


@pytest.fixture
def pair(redis_url, tmp_path):
    prefix = key_prefix()
    servers = start_all(
        [
            ServerProcess(
                cluster_env(redis_url, prefix, tmp_path, INSTANCE_ID=f"d{i}", WS_GRACE_PERIOD=3)
            )
            for i in range(2)
        ]
    )
    yield servers
    for server in servers:
        server.stop()


async def test_sigterm_moves_clients_without_presence_change(pair, uid):
    node_a, node_b = pair
    user_id = uid("mover")
    watcher = await ChatClient(uid("w")).connect(node_b.url)
    await watcher.call("presence:subscribe", {"users": [user_id]})
    script = ROOT / ".run" / "drain_client.js"
    script.parent.mkdir(exist_ok=True)
    script.write_text(NODE_CLIENT)
    client = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        node_a.url,
        node_b.url,
        make_token(user_id),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await watcher.wait_for("presence")  # online, on node A
    loop = asyncio.get_running_loop()
    node_a.proc.terminate()
    line = await asyncio.wait_for(client.stdout.readline(), 20)
    result = json.loads(line.decode() or "{}")
    assert result["seen"] == ["d0", "disconnect:transport close", "d1"], (result, node_a.log_tail())
    assert await loop.run_in_executor(None, node_a.proc.wait, 40) == DRAINED_EXIT, node_a.log_tail()
    assert '"shutdown.drained"' in node_a.log_tail(200)
    await asyncio.sleep(3.5)  # longer than the grace period: no offline may come
    try:
        assert [e["status"] for e in watcher.events["presence"]] == ["online"]
    finally:
        client.kill()
        await client.wait()
        await watcher.disconnect()


async def _in_flight(http: httpx.AsyncClient, url: str) -> bool:
    admin = make_token("ops", role="admin")
    response = await http.get(f"{url}/api/stats", headers={"Authorization": f"Bearer {admin}"})
    return response.json()["instance"]["in_flight"] >= 1


@dataclass
class HeldSend:
    """A server whose one running send waits for SQLite's write lock, held by the test."""

    node: ServerProcess
    alice: ChatClient
    room: str
    locker: sqlite3.Connection
    pending: asyncio.Task


@contextlib.asynccontextmanager
async def held_send(tmp_path, uid, shutdown_timeout: int):
    path = tmp_path / "chat.db"
    env = {
        "SQLITE_PATH": str(path),
        "STORE_TIMEOUT": "30",
        "SHUTDOWN_TIMEOUT": str(shutdown_timeout),
    }
    node = ServerProcess(env).start()
    room = uid("room")
    alice = await ChatClient(uid("alice")).connect(node.url)
    locker = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        assert (await alice.call("room:join", {"room": room}))["ok"]
        locker.execute("BEGIN EXCLUSIVE")  # the send below waits for this lock
        pending = asyncio.create_task(
            alice.call("message:send", {"room": room, "text": "held", "client_id": "1"}, timeout=60)
        )
        async with httpx.AsyncClient(timeout=10) as http:
            await until(lambda: _in_flight(http, node.url), "the send to be in flight")
        yield HeldSend(node, alice, room, locker, pending)
    finally:
        locker.close()
        await alice.disconnect()
        node.stop()


async def test_drain_reports_draining_refuses_handshakes_and_finishes_acks(tmp_path, uid):
    """SIGTERM while a send waits for the store: health says draining (503), new handshakes
    get 503, the running send is acked after all, and the process finishes its shutdown."""
    async with held_send(tmp_path, uid, shutdown_timeout=40) as held:
        node = held.node
        node.proc.terminate()
        async with httpx.AsyncClient(timeout=10) as http:

            async def draining():
                try:
                    response = await http.get(f"{node.url}/api/health")
                except httpx.ConnectError:
                    pytest.fail("the server went away without waiting for the running send")
                return response if response.json()["status"] == "draining" else None

            health = await until(draining, "health to report draining")
            assert health.status_code == 503
            handshake = await http.get(f"{node.url}/socket.io/?EIO=4&transport=polling")
            assert handshake.status_code == 503
        refused = await attempt(node.url, auth={"token": make_token(uid("late"))})
        assert refused["ok"] is False
        assert not held.pending.done()
        # Transports stay open while a handler runs, so that its ack can still go out.
        await asyncio.sleep(0.5)
        assert held.alice.sio.connected, "the transport was closed before the running send's ack"
        assert node.proc.poll() is None
        held.locker.execute("ROLLBACK")
        ack = await held.pending
        assert ack["ok"] is True and ack["message"]["text"] == "held", ack
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, node.proc.wait, 40) == DRAINED_EXIT, node.log_tail()
        assert '"Finished server process' in node.log_tail(5)
    node.start()  # the acked message was stored before the process went away
    try:
        reader = await ChatClient(uid("reader")).connect(node.url)
        history = await reader.call("message:history", {"room": held.room})
        assert [m["text"] for m in history["messages"]] == ["held"]
        await reader.disconnect()
    finally:
        node.stop()


async def test_shutdown_timeout_bounds_the_wait_for_running_handlers(tmp_path, uid):
    """A handler stuck on the store does not hold the drain past SHUTDOWN_TIMEOUT - 3 s.

    (What the process does after the drain is uvicorn's and the store's shutdown: a store call
    stuck on a lock still holds the exit until STORE_TIMEOUT; see docs/testing.md.)
    """
    async with held_send(tmp_path, uid, shutdown_timeout=4) as held:
        held.node.proc.terminate()

        async def gave_up() -> bool:
            return '"shutdown.drain_timeout"' in held.node.log_tail(50)

        # The store would answer only after STORE_TIMEOUT (30 s): the drain gives up long before.
        await until(gave_up, "the drain to give up on the running handler", timeout=20)
        assert '"in_flight": 1' in held.node.log_tail(50)
        assert not held.pending.done()
        held.pending.cancel()
