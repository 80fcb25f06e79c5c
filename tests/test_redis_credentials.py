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
        # Started off the event loop: a blocked loop would miss the clients' heartbeats.
        late = ServerProcess({**env, "INSTANCE_ID": "rot-late"})
        await asyncio.to_thread(late.start, timeout=120)
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


@pytest.fixture
def aws_keys(monkeypatch, tmp_path):
    """Static AWS credentials from the environment, nothing else of the credential chain."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def sigv4_presign_signature(token: str, secret: str, region: str, service: str) -> str:
    """The SigV4 signature of a presigned GET ``token`` (host/?query), computed here from
    AWS's published algorithm, independently of botocore."""
    import hashlib
    import hmac
    from urllib.parse import parse_qsl, quote

    host, _, query = token.partition("/?")
    params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "X-Amz-Signature"]
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params)
    )
    empty_body = hashlib.sha256(b"").hexdigest()  # a GET: the hash of an empty payload
    canonical = f"GET\n/\n{canonical_query}\nhost:{host}\n\nhost\n{empty_body}"
    stamp = dict(params)["X-Amz-Date"]
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret}".encode()
    for part in (stamp[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("service", ["elasticache", "memorydb"])
def test_iam_token_is_a_signed_connect_request_valid_15_minutes(aws_keys, service):
    from urllib.parse import parse_qs

    from server.bus.credentials import iam_token

    access_key, secret = aws_keys
    token = iam_token(service, "chat-redis", "chat-user", "eu-west-1")()
    host, _, query = token.partition("/?")
    assert host == "chat-redis"  # no scheme: the token is the password as AWS documents it
    params = {k: v[0] for k, v in parse_qs(query).items()}
    assert params["Action"] == "connect"
    assert params["User"] == "chat-user"
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert params["X-Amz-Expires"] == "900"
    assert params["X-Amz-SignedHeaders"] == "host"
    assert params["X-Amz-Credential"] == (
        f"{access_key}/{params['X-Amz-Date'][:8]}/eu-west-1/{service}/aws4_request"
    )
    assert params["X-Amz-Signature"] == sigv4_presign_signature(token, secret, "eu-west-1", service)


async def test_iam_authentication_end_to_end(aws_keys, tmp_path, uid, monkeypatch):
    """Two instances authenticate to Redis as the IAM user with signed tokens (the local
    Redis takes any password for that user, as ElastiCache takes any valid token) and talk."""
    server = RedisServer().start()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "iam-user", "on", "nopass", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    env = rotating_env(server, tmp_path / "unused", key_prefix(), tmp_path)
    env.pop("REDIS_PASSWORD_FILE")
    env.update(
        REDIS_USERNAME="iam-user",
        REDIS_IAM_AUTH="elasticache",
        REDIS_IAM_CACHE_NAME="chat-redis",
        REDIS_IAM_REGION="eu-west-1",
        **{k: v for k, v in __import__("os").environ.items() if k.startswith("AWS_")},
    )
    instances = start_all([ServerProcess({**env, "INSTANCE_ID": f"iam{i}"}) for i in range(2)])
    clients = [
        await ChatClient(uid("alice")).connect(instances[0].url),
        await ChatClient(uid("bob")).connect(instances[1].url),
    ]
    try:
        room = uid("room")
        for client in clients:
            assert (await client.call("room:join", {"room": room}))["ok"]
        ack = await send(clients[0], room, "signed")
        assert ack["ok"], ack
        assert [m["seq"] for m in await clients[1].wait_for("message:new")] == [
            ack["message"]["seq"]
        ]
        connected = [c for c in admin.client_list() if c.get("user") == "iam-user"]
        assert len(connected) >= 4  # state clients and pub/sub of both instances
        for instance in instances:
            values = await metrics_of(instance.url)
            assert values["chat_redis_credentials_renewed_total"] >= 1
    finally:
        for client in clients:
            await client.disconnect()
        for instance in instances:
            instance.stop()
        server.stop()
