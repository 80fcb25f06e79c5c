"""Redis credentials that rotate while instances run (REDIS_PASSWORD_FILE; IAM tokens use
the same credential provider)."""

from __future__ import annotations

import asyncio

import pytest
import redis as redis_sync

from tests.support.clients import ChatClient, metrics_of, send
from tests.support.redis_servers import RedisServer
from tests.support.servers import ServerProcess, cluster_env, key_prefix, start_all

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def acl_redis():
    server = RedisServer().start()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "chat", "on", ">pw-1", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    yield server, admin
    server.stop()


def rotating_env(server: RedisServer, password_file, prefix: str, tmp_path) -> dict[str, str]:
    env = cluster_env(
        "",
        prefix,
        tmp_path,
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=server.address[1],
        REDIS_USERNAME="chat",
        REDIS_PASSWORD_FILE=str(password_file),
    )
    env.pop("REDIS_URL")
    return env


async def test_password_rotates_during_a_conversation(acl_redis, tmp_path, uid):
    server, admin = acl_redis
    secret = tmp_path / "redis-password"
    secret.write_text("pw-1\n")
    prefix = key_prefix()
    env = rotating_env(server, secret, prefix, tmp_path)
    instances = start_all(
        [ServerProcess({**env, "INSTANCE_ID": f"rot{i}"}) for i in range(2)], timeout=120
    )
    late: ServerProcess | None = None
    room = uid("room")
    alice = await ChatClient(uid("alice")).connect(instances[0].url)
    bob = await ChatClient(uid("bob")).connect(instances[1].url)
    clients = [alice, bob]
    acked: list[int] = []

    async def talk(count: int, tag: str) -> None:
        for n in range(count):
            ack = await send(alice, room, f"{tag}-{n}")
            assert ack["ok"], ack
            acked.append(ack["message"]["seq"])

    try:
        for client in clients:
            assert (await client.call("room:join", {"room": room}))["ok"]
        await talk(5, "before")

        # The secret manager rotates: new password on, file rewritten, old password off.
        admin.execute_command("ACL", "SETUSER", "chat", ">pw-2")
        secret.write_text("pw-2\n")
        admin.execute_command("ACL", "SETUSER", "chat", "<pw-1")
        with pytest.raises(redis_sync.AuthenticationError):
            redis_sync.Redis(port=server.address[1], username="chat", password="pw-1").ping()
        await talk(5, "rotated")

        # Every command connection of the instances is cut: they must come back with pw-2.
        admin.execute_command("CLIENT", "KILL", "USER", "chat", "SKIPME", "yes")
        await talk(10, "reconnected")

        # A new instance starts on the rotated secret; its pub/sub hears the room.
        late = ServerProcess({**env, "INSTANCE_ID": "rot-late"}).start(timeout=120)
        carol = await ChatClient(uid("carol")).connect(late.url)
        clients.append(carol)
        assert (await carol.call("room:join", {"room": room}))["ok"]
        await talk(5, "late")

        got = await bob.wait_for("message:new", count=len(acked), timeout=30)
        assert [m["seq"] for m in got] == acked  # none lost, in order
        heard = await carol.wait_for("message:new", count=5, timeout=30)
        assert [m["seq"] for m in heard] == acked[-5:]
        # The instances reconnected as the ACL user, with the new password.
        assert any(c.get("user") == "chat" for c in admin.client_list())
        values = await metrics_of(instances[0].url)
        assert values["chat_redis_credentials_renewed_total"] >= 2
    finally:
        for client in clients:
            await client.disconnect()
        for instance in [*instances, *([late] if late else [])]:
            instance.stop()


def test_rotating_credentials_refuse_a_fixed_password(tmp_path):
    from server.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="REDIS_PASSWORD_FILE / REDIS_IAM_AUTH"):
        load_settings(
            REDIS_HOST="cache", REDIS_PASSWORD="x", REDIS_PASSWORD_FILE=str(tmp_path / "p")
        )
    with pytest.raises(ConfigError, match="REDIS_IAM_CACHE_NAME"):
        load_settings(REDIS_HOST="cache", REDIS_IAM_AUTH="elasticache", REDIS_USERNAME="u")


def test_iam_tokens_are_renewed_before_they_expire():
    from server.bus.credentials import IAM_TOKEN_LIFETIME, RenewingCredentials

    made: list[str] = []

    def make() -> str:
        made.append(f"token-{len(made)}")
        return made[-1]

    provider = RenewingCredentials("chat-user", make, renew_after=0.2)
    assert provider.get_credentials() == ("chat-user", "token-0")
    assert provider.get_credentials() == ("chat-user", "token-0")  # cached while young
    import time

    time.sleep(0.25)
    assert provider.get_credentials() == ("chat-user", "token-1")
    assert asyncio.run(provider.get_credentials_async()) == ("chat-user", "token-1")
    from server.config import load_settings

    settings = load_settings(
        REDIS_HOST="cache",
        REDIS_IAM_AUTH="elasticache",
        REDIS_USERNAME="u",
        REDIS_IAM_CACHE_NAME="chat-redis",
        REDIS_IAM_REGION="eu-west-1",
    )
    assert settings.REDIS_CREDENTIALS_RENEW_AFTER < IAM_TOKEN_LIFETIME
    assert "@" not in settings.redis_url  # the provider authenticates, not the URL
