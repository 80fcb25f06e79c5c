"""No sticky sessions: 2 instances × 2 workers behind a round-robin balancer without affinity.

Every HTTP request goes to the next instance (and, inside it, to whichever worker the
kernel picks), so polling requests and upgrades mostly reach a process that does not own
their Engine.IO session; they must be served as if they had reached the owner.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.balancer import RoundRobinBalancer
from tests.support.clients import metrics_of
from tests.support.servers import ServerProcess, cluster_env, key_prefix, make_token

# The whole JS client suite, collected again here, through the balancer: websocket,
# polling then upgrade, and polling only.
from tests.test_js_client import node_client as js_node_client  # noqa: F401
from tests.test_js_client import (  # noqa: F401
    run_js,
    test_js_auth_refusals,
    test_js_chat_between_two_clients,
    test_js_disconnected_at_token_expiry,
    test_js_edits_deletes_reactions_replies_mentions,
    test_js_token_sources,
)

# Four uvicorn processes start slowly on a loaded machine.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def node_client(js_node_client):  # noqa: F811 - the suite's fixture, by its own name
    return js_node_client


@dataclass
class Front:
    url: str
    instances: list[ServerProcess]


@pytest.fixture(scope="module")
def server(redis_url, tmp_path_factory):
    """The JS suite's ``server``: a balancer URL in front of 2 instances of 2 workers."""
    prefix = key_prefix()
    tmp = tmp_path_factory.mktemp("no-affinity")
    instances = [
        ServerProcess(
            cluster_env(redis_url, prefix, tmp, INSTANCE_ID=f"na-{i}", WS_HEARTBEAT_INTERVAL=2),
            workers=2,
        )
        for i in range(2)
    ]
    for instance in instances:
        instance.start(wait=False)
    for instance in instances:
        instance.wait_healthy(300)
    balancer = RoundRobinBalancer([s.port for s in instances], affinity=False)
    yield Front(balancer.url, instances)
    balancer.close()
    for instance in instances:
        instance.stop()


@pytest.mark.parametrize(
    "transports",
    [(["polling"], ["polling"]), (["polling", "websocket"], ["websocket"])],
    ids=["both-polling", "upgrade-and-websocket"],
)
async def test_js_chat_without_sticky_sessions(server, node_client, uid, transports):
    await test_js_chat_between_two_clients(server, node_client, uid, transports)


async def test_js_polling_then_upgrade_both_sides(server, node_client, uid):
    room = uid("room")
    alice_id, bob_id = uid("alice"), uid("bob")
    default = ["polling", "websocket"]
    out = await run_js(
        node_client,
        "chat.js",
        {
            "url": server.url,
            "room": room,
            "alice": {"token": make_token(alice_id, "Alice"), "transports": default},
            "bob": {"token": make_token(bob_id), "transports": default},
        },
    )
    message = out["send"]["message"]
    assert out["send"]["ok"] is True and out["bobReceived"] == [message]
    assert out["aliceReceived"] == [out["reply"]["message"]]
    assert out["history"]["messages"] == [message, out["reply"]["message"]]
    assert out["bobRead"] == [{"room": room, "user": alice_id, "seq": 2}]


async def test_js_every_token_source_on_polling(server, node_client, uid):
    users = {via: uid(via) for via in ("auth", "query", "header")}
    cases = [
        {"name": via, "token": make_token(user), "via": via, "transports": ["polling"]}
        for via, user in users.items()
    ]
    results = await run_js(node_client, "auth.js", {"url": server.url, "cases": cases})
    for result in results:
        assert result["connected"] is True, result
        assert result["session"]["user"]["id"] == users[result["name"]]


async def test_requests_were_forwarded(server):
    """The runs above did cross processes: some requests reached a non-owner."""
    forwarded = 0.0
    for instance in server.instances:
        values = await metrics_of(instance.url)
        forwarded += sum(
            v for k, v in values.items() if k.startswith("chat_sessions_forwarded_total")
        )
    assert forwarded > 0
