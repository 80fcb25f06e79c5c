"""SIGTERM drains an instance: clients move to another instance, nobody sees presence change."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.support.servers import ROOT, ServerProcess, cluster_env, key_prefix, make_token

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
    servers = [
        ServerProcess(
            cluster_env(redis_url, prefix, tmp_path, INSTANCE_ID=f"d{i}", WS_GRACE_PERIOD=3)
        ).start()
        for i in range(2)
    ]
    yield servers
    for server in servers:
        server.stop()


async def test_sigterm_moves_clients_without_presence_change(pair, uid):
    from tests.support.clients import ChatClient

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
    started = loop.time()
    node_a.proc.terminate()
    line = await asyncio.wait_for(client.stdout.readline(), 20)
    result = json.loads(line.decode() or "{}")
    assert result["seen"] == ["d0", "disconnect:transport close", "d1"], (result, node_a.log_tail())
    code = await loop.run_in_executor(None, node_a.proc.wait, 30)
    assert loop.time() - started < 25
    assert code is not None
    assert '"shutdown.drained"' in node_a.log_tail(200) or "shutdown.drained" in node_a.log_tail(
        200
    )
    await asyncio.sleep(3.5)  # longer than the grace period
    try:
        assert [e["status"] for e in watcher.events["presence"]] == ["online"]
    finally:
        client.kill()
        await client.wait()
        await watcher.disconnect()
