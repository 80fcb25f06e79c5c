"""Other Redis set-ups the server supports: Sentinel, and a separate Redis for pub/sub."""

from __future__ import annotations

import asyncio

import redis as redis_sync

from tests.support.clients import exchange
from tests.support.redis_servers import RedisServer
from tests.support.servers import ServerProcess, cluster_env, key_prefix


async def test_instances_through_sentinel(redis_sentinel, tmp_path, uid):
    prefix = key_prefix()
    servers = [
        ServerProcess(
            cluster_env(redis_sentinel.url, prefix, tmp_path, INSTANCE_ID=f"s{i}")
        ).start()
        for i in range(2)
    ]
    try:
        health = servers[0].wait_healthy()
        assert health["checks"]["redis"]["ok"] is True
        await exchange(servers[0], servers[1], uid("room"), uid)
    finally:
        for server in servers:
            server.stop()


async def test_separate_pubsub_redis_carries_the_broadcasts(redis_url, tmp_path, uid):
    pubsub = RedisServer().start()
    prefix = key_prefix()
    env = cluster_env(redis_url, prefix, tmp_path, REDIS_PUBSUB_URL=pubsub.url)
    servers = [ServerProcess({**env, "INSTANCE_ID": f"p{i}"}).start() for i in range(2)]
    try:
        await exchange(servers[0], servers[1], uid("room"), uid)
        channels = pubsub.client().pubsub_channels()
        assert f"{prefix}socketio" in channels
        main = redis_sync.Redis.from_url(redis_url, decode_responses=True)
        assert f"{prefix}socketio" not in main.pubsub_channels()
        assert main.exists(f"{{{prefix}instances}}:all")  # state stays on the main Redis
    finally:
        for server in servers:
            server.stop()
        pubsub.stop()
        await asyncio.sleep(0)


async def test_instances_with_an_acl_user(tmp_path, uid):
    """REDIS_USERNAME/REDIS_PASSWORD: an ACL user (the default user is switched off)."""
    private = RedisServer().start()
    admin = private.client()
    admin.execute_command("ACL", "SETUSER", "chat", "on", ">chat-pw-1", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    env = cluster_env(
        "",
        key_prefix(),
        tmp_path,
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=private.address[1],
        REDIS_USERNAME="chat",
        REDIS_PASSWORD="chat-pw-1",
        REDIS_DB=3,
    )
    env.pop("REDIS_URL")
    servers = [ServerProcess({**env, "INSTANCE_ID": f"acl{i}"}).start() for i in range(2)]
    try:
        await exchange(servers[0], servers[1], uid("room"), uid)
        user = redis_sync.Redis(
            host="127.0.0.1", port=private.address[1], username="chat", password="chat-pw-1", db=3
        )
        assert user.exists(f"{{{env['REDIS_KEY_PREFIX']}instances}}:all")
    finally:
        for server in servers:
            server.stop()
        private.stop()
