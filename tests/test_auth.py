"""Authentication of every connection (contract §2), through real clients and servers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from datetime import UTC, datetime

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support.clients import ChatClient, attempt, refused, until
from tests.support.servers import TEST_SECRET, ServerProcess, make_token, start_all

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
AUDIENCE = "chat-clients"
ISSUER = "https://issuer.example.test/"
#: What a public-key server needs besides its key (it refuses to start without aud and iss).
KEYED = {"JWT_SECRET": "", "JWT_AUDIENCE": AUDIENCE, "JWT_ISSUER": ISSUER}


# --- helpers ------------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict, claims: dict, secret: bytes | None) -> str:
    """A JWT assembled by hand (PyJWT refuses some of the keys and algorithms used here)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims_for(user: str, ttl: float = 3600, **extra) -> dict:
    now = int(time.time())
    # Public-key servers must check aud and iss; HS servers without them ignore both.
    return {"sub": user, "iat": now, "exp": now + ttl, "aud": AUDIENCE, "iss": ISSUER, **extra}


# --- keys and dedicated servers -----------------------------------------------------------
def pem_public(private_key) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_keys():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048), rsa.generate_private_key(
        public_exponent=65537, key_size=2048
    )


@pytest.fixture(scope="module")
def ec_keys():
    return ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def key_servers(rsa_keys, ec_keys):
    """RS256, ES256 and aud/iss-checking servers, started together."""
    rs = ServerProcess(
        {"JWT_ALGORITHMS": "RS256", "JWT_PUBLIC_KEY": pem_public(rsa_keys[0]), **KEYED}
    )
    es = ServerProcess(
        {"JWT_ALGORITHMS": "ES256", "JWT_PUBLIC_KEY": pem_public(ec_keys[0]), **KEYED}
    )
    claims = ServerProcess({"JWT_AUDIENCE": AUDIENCE, "JWT_ISSUER": ISSUER})
    started = start_all([rs, es, claims])
    yield {"rs": rs, "es": es, "claims": claims}
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def limited_server():
    proc = ServerProcess({"RATE_LIMIT_CONNECTS_PER_MINUTE": "3"}).start()
    yield proc
    proc.stop()


# --- where the token comes from -----------------------------------------------------------
async def test_token_in_auth_object(server, uid):
    user = uid("u")
    result = await attempt(server.url, auth={"token": make_token(user, "Ada")})
    assert result["ok"] is True
    assert result["session"]["user"] == {"id": user, "name": "Ada"}


async def test_token_in_bearer_header(server, uid):
    user = uid("u")
    result = await attempt(server.url, headers={"Authorization": f"Bearer {make_token(user)}"})
    assert result["ok"] is True
    assert result["session"]["user"] == {"id": user, "name": user}


async def test_token_in_bearer_header_over_polling(server, uid):
    user = uid("u")
    result = await attempt(
        server.url, headers={"Authorization": f"Bearer {make_token(user)}"}, transports=("polling",)
    )
    assert result["ok"] is True
    assert result["session"]["user"]["id"] == user


async def test_token_in_query_string(server, uid):
    user = uid("u")
    result = await attempt(server.url, query=f"?token={make_token(user)}")
    assert result["ok"] is True
    assert result["session"]["user"]["id"] == user


async def test_auth_token_wins_over_header_and_query(server, uid):
    first, second, third = uid("a"), uid("b"), uid("c")
    result = await attempt(
        server.url,
        auth={"token": make_token(first)},
        headers={"Authorization": f"Bearer {make_token(second)}"},
        query=f"?token={make_token(third)}",
    )
    assert result["session"]["user"]["id"] == first


async def test_session_event_shape(server, uid):
    user = uid("u")
    before = datetime.now(UTC)
    result = await attempt(server.url, auth={"token": make_token(user, "Grace H")})
    after = datetime.now(UTC)
    session = result["session"]
    assert set(session) == {"user", "sid", "instance_id", "server_time"}
    assert session["user"] == {"id": user, "name": "Grace H"}
    assert session["sid"] == result["sid"]
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{server.url}/api/health")).json()
    assert session["instance_id"] == health["instance_id"] and session["instance_id"]
    assert ISO_MS.match(session["server_time"])
    server_time = datetime.fromisoformat(session["server_time"].replace("Z", "+00:00"))
    assert before.timestamp() - 1 <= server_time.timestamp() <= after.timestamp() + 1


# --- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"auth": {}},
        {"auth": {"token": ""}},
        {"auth": {"token": None}},
        {"headers": {"Authorization": "Bearer "}},
        {"headers": {"Authorization": "Basic dXNlcjpwdw=="}},
        {"query": "?token="},
    ],
    ids=[
        "nothing",
        "empty-auth",
        "empty-token",
        "null-token",
        "empty-bearer",
        "basic-auth",
        "empty-query",
    ],
)
async def test_missing_token(server, kwargs):
    assert await attempt(server.url, **kwargs) == refused("missing_token")


async def test_expired_token(server, uid):
    token = make_token(uid("u"), ttl=-10)
    assert await attempt(server.url, auth={"token": token}) == refused("token_expired")


async def test_bad_signature(server, uid):
    token = make_token(uid("u"), secret="another-secret-0123456789-0123456789")
    assert await attempt(server.url, auth={"token": token}) == refused("invalid_token")


async def test_tampered_payload(server, uid):
    header, _, signature = make_token(uid("u")).split(".")
    forged = b64url(json.dumps(claims_for("admin", role="admin")).encode())
    token = f"{header}.{forged}.{signature}"
    assert await attempt(server.url, auth={"token": token}) == refused("invalid_token")


@pytest.mark.parametrize(
    "token", ["garbage", "a.b.c", "x" * 300], ids=["word", "three-parts", "long"]
)
async def test_malformed_token(server, token):
    assert await attempt(server.url, auth={"token": token}) == refused("invalid_token")


async def test_alg_none_refused(server, uid):
    token = raw_token({"alg": "none", "typ": "JWT"}, claims_for(uid("u")), None)
    assert await attempt(server.url, auth={"token": token}) == refused("invalid_token")


async def test_alg_none_with_signature_refused(server, uid):
    # "none" in the header, but signed with the real secret: the algorithm is still refused.
    token = raw_token({"alg": "none", "typ": "JWT"}, claims_for(uid("u")), TEST_SECRET.encode())
    assert await attempt(server.url, auth={"token": token}) == refused("invalid_token")


async def test_hand_made_hs256_is_accepted(server, uid):
    # Control for the hand-made tokens above: the same construction with HS256 is valid.
    user = uid("u")
    token = raw_token({"alg": "HS256", "typ": "JWT"}, claims_for(user), TEST_SECRET.encode())
    result = await attempt(server.url, auth={"token": token})
    assert result["ok"] is True and result["session"]["user"]["id"] == user


async def test_nbf_in_the_future_refused(server, uid):
    token = make_token(uid("u"), nbf=int(time.time()) + 600)
    assert await attempt(server.url, auth={"token": token}) == refused("invalid_token")


async def test_nbf_in_the_past_accepted(server, uid):
    user = uid("u")
    result = await attempt(server.url, auth={"token": make_token(user, nbf=int(time.time()) - 5)})
    assert result["ok"] is True and result["session"]["user"]["id"] == user


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "x" * 129},
        {"sub": "bad user"},
        {"sub": "a/b"},
        {"sub": "é"},
        {"sub": ""},
        {"sub": 12345},
        {"sub": None},
        {"sub": "."},
        {"sub": ".."},
        {"sub": "__x__"},
    ],
    ids=[
        "too-long",
        "space",
        "slash",
        "non-ascii",
        "empty",
        "number",
        "null",
        "dot",
        "dot-dot",
        "dunder",
    ],
)
async def test_bad_sub_refused(server, claims):
    token = raw_token(
        {"alg": "HS256", "typ": "JWT"},
        {**claims_for("placeholder"), **claims},
        TEST_SECRET.encode(),
    )
    assert await attempt(server.url, auth={"token": token}) == refused("invalid_token")


async def test_sub_of_128_allowed_characters_accepted(server):
    user = ("Ab9_.:@-" * 16)[:128]
    result = await attempt(server.url, auth={"token": make_token(user)})
    assert result["ok"] is True and result["session"]["user"]["id"] == user


@pytest.mark.parametrize("missing", ["sub", "exp"])
async def test_required_claims(server, uid, missing):
    claims = claims_for(uid("u"))
    del claims[missing]
    token = jwt.encode(claims, TEST_SECRET, algorithm="HS256")
    assert await attempt(server.url, auth={"token": token}) == refused("invalid_token")


async def test_refused_attempts_do_not_disturb_connected_clients(server, clients, uid):
    alice = await clients(uid("alice"))
    for _ in range(3):
        assert (await attempt(server.url, auth={"token": "garbage"}))["ok"] is False
    ack = await alice.call("room:join", {"room": uid("room")})
    assert ack["ok"] is True


# --- other algorithms and claims (dedicated servers) ---------------------------------------
async def test_rs256_accepted_with_the_right_key(key_servers, rsa_keys, uid):
    user = uid("u")
    token = jwt.encode(claims_for(user, name="Rita"), rsa_keys[0], algorithm="RS256")
    result = await attempt(key_servers["rs"].url, auth={"token": token})
    assert result["ok"] is True and result["session"]["user"] == {"id": user, "name": "Rita"}


async def test_rs256_signed_by_another_key_refused(key_servers, rsa_keys, uid):
    token = jwt.encode(claims_for(uid("u")), rsa_keys[1], algorithm="RS256")
    assert await attempt(key_servers["rs"].url, auth={"token": token}) == refused("invalid_token")


async def test_rs_server_refuses_hs_token_signed_with_public_key(key_servers, rsa_keys, uid):
    """Algorithm confusion: an HS256 token whose HMAC secret is the server's RSA public key."""
    pem = pem_public(rsa_keys[0])
    for secret in (pem, pem.strip()):
        token = raw_token({"alg": "HS256", "typ": "JWT"}, claims_for(uid("u")), secret.encode())
        assert await attempt(key_servers["rs"].url, auth={"token": token}) == refused(
            "invalid_token"
        )


async def test_rs_server_refuses_plain_hs_token_and_alg_none(key_servers, uid):
    assert await attempt(key_servers["rs"].url, auth={"token": make_token(uid("u"))}) == refused(
        "invalid_token"
    )
    none = raw_token({"alg": "none", "typ": "JWT"}, claims_for(uid("u")), None)
    assert await attempt(key_servers["rs"].url, auth={"token": none}) == refused("invalid_token")


async def test_rs_server_expired_token(key_servers, rsa_keys, uid):
    token = jwt.encode(claims_for(uid("u"), ttl=-10), rsa_keys[0], algorithm="RS256")
    assert await attempt(key_servers["rs"].url, auth={"token": token}) == refused("token_expired")


async def test_es256_accepted_with_the_right_key(key_servers, ec_keys, uid):
    user = uid("u")
    token = jwt.encode(claims_for(user), ec_keys[0], algorithm="ES256")
    result = await attempt(key_servers["es"].url, auth={"token": token})
    assert result["ok"] is True and result["session"]["user"] == {"id": user, "name": user}


async def test_es256_refusals(key_servers, ec_keys, rsa_keys, uid):
    url = key_servers["es"].url
    other_key = jwt.encode(claims_for(uid("u")), ec_keys[1], algorithm="ES256")
    assert await attempt(url, auth={"token": other_key}) == refused("invalid_token")
    rs_token = jwt.encode(claims_for(uid("u")), rsa_keys[0], algorithm="RS256")
    assert await attempt(url, auth={"token": rs_token}) == refused("invalid_token")
    confused = raw_token(
        {"alg": "HS256", "typ": "JWT"}, claims_for(uid("u")), pem_public(ec_keys[0]).encode()
    )
    assert await attempt(url, auth={"token": confused}) == refused("invalid_token")


async def test_audience_and_issuer_enforced(key_servers, uid):
    url = key_servers["claims"].url
    user = uid("u")
    good = make_token(user, aud=AUDIENCE, iss=ISSUER)
    result = await attempt(url, auth={"token": good})
    assert result["ok"] is True and result["session"]["user"]["id"] == user
    listed = make_token(user, aud=["someone-else", AUDIENCE], iss=ISSUER)
    assert (await attempt(url, auth={"token": listed}))["ok"] is True
    for token in (
        make_token(user, iss=ISSUER),
        make_token(user, aud="someone-else", iss=ISSUER),
        make_token(user, aud=AUDIENCE),
        make_token(user, aud=AUDIENCE, iss="https://evil.example.test/"),
    ):
        assert await attempt(url, auth={"token": token}) == refused("invalid_token")


async def test_audience_ignored_when_not_configured(server, uid):
    user = uid("u")
    result = await attempt(
        server.url, auth={"token": make_token(user, aud="anything", iss="anyone")}
    )
    assert result["ok"] is True and result["session"]["user"]["id"] == user


# --- expiry and refresh ---------------------------------------------------------------------
def exp_of(token: str) -> int:
    return jwt.decode(token, options={"verify_signature": False})["exp"]


async def test_disconnected_at_exp_unless_refreshed(server, uid):
    """Disconnected at ``exp``, never before; a refreshed connection lives to its new ``exp``.

    Tokens live 6 s and 12 s so that connecting still works on a loaded machine; only the
    lower bounds are exact, the waits' deadlines are the generous upper bounds.
    """
    user = uid("u")
    plain = ChatClient(user)
    refreshed = ChatClient(user)
    first, second = make_token(user, ttl=6), make_token(user, ttl=6)
    await plain.connect(server.url, token=first)
    await refreshed.connect(server.url, token=second)
    try:
        new_token = make_token(user, ttl=12)
        ack = await refreshed.call("auth:refresh", {"token": new_token})
        assert ack["ok"] is True
        gone_at = await until(
            lambda: not plain.sio.connected and time.monotonic(), "expiry", 20, interval=0.02
        )
        gone_wall = time.time() - (time.monotonic() - gone_at)
        assert gone_wall >= exp_of(first) - 0.05, (gone_wall, exp_of(first))
        assert plain.events["auth:expired"] == [{"reason": "token_expired"}]
        # The refreshed connection outlives its first token and still works...
        await asyncio.sleep(max(0.0, exp_of(second) + 0.5 - time.time()))
        assert refreshed.sio.connected
        assert (await refreshed.call("room:join", {"room": uid("room")}))["ok"] is True
        # ...until the new token's own expiry, not before.
        gone_at = await until(
            lambda: not refreshed.sio.connected and time.monotonic(), "expiry", 20, interval=0.02
        )
        gone_wall = time.time() - (time.monotonic() - gone_at)
        assert gone_wall >= exp_of(new_token) - 0.05, (gone_wall, exp_of(new_token))
        assert refreshed.events["auth:expired"] == [{"reason": "token_expired"}]
    finally:
        await plain.disconnect()
        await refreshed.disconnect()


async def test_refresh_for_another_user_refused(clients, uid):
    alice = await clients(uid("alice"))
    ack = await alice.call("auth:refresh", {"token": make_token(uid("mallory"))})
    assert ack["ok"] is False and ack["error"]["code"] == "forbidden"
    assert (await alice.call("room:join", {"room": uid("room")}))["ok"] is True


async def test_refresh_with_a_far_future_expiry(clients, uid):
    user = uid("alice")
    alice = await clients(user)
    ack = await alice.call(
        "auth:refresh", {"token": make_token(user, ttl=10**12)}
    )  # past year 9999
    assert ack["ok"] is True
    assert (await alice.call("room:join", {"room": uid("room")}))["ok"] is True


@pytest.mark.parametrize("kind", ["expired", "bad-signature", "garbage"])
async def test_refresh_with_invalid_token_refused(clients, uid, kind):
    user = uid("alice")
    alice = await clients(user)
    token = {
        "expired": make_token(user, ttl=-10),
        "bad-signature": make_token(user, secret="another-secret-0123456789-0123456789"),
        "garbage": "garbage",
    }[kind]
    ack = await alice.call("auth:refresh", {"token": token})
    assert ack["ok"] is False and ack["error"]["code"] == "forbidden"
    assert alice.sio.connected


# --- connection attempt limit ------------------------------------------------------------------
async def test_refused_attempts_over_the_limit_are_rate_limited(limited_server, uid):
    url = limited_server.url
    # TRUST_PROXY_HEADERS is false: X-Forwarded-For is ignored, every attempt counts for the
    # TCP peer (a client cannot dodge the limit by inventing addresses).
    for index in range(3):
        spoofed = {"X-Forwarded-For": f"198.51.100.{index}"}
        assert await attempt(url, auth={"token": "garbage"}, headers=spoofed) == refused(
            "invalid_token"
        )
    assert await attempt(
        url, auth={"token": "garbage"}, headers={"X-Forwarded-For": "198.51.100.99"}
    ) == {
        "ok": False,
        "error": {"message": "rate_limited", "data": {"code": "rate_limited"}},
    }
    assert (await attempt(url))["error"]["message"] == "rate_limited"
    # The block is decided before any token is verified: a valid one waits too
    # (tests/test_connection_limits.py shows that other addresses are not affected).
    result = await attempt(url, auth={"token": make_token(uid("u"))})
    assert result["error"]["message"] == "rate_limited"
