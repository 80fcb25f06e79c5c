"""Keys from a JWKS URL (Firebase Auth, Cognito, Auth0 style): cached, refreshed on an unknown
kid, never fetched more often than JWT_JWKS_MIN_REFRESH."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.clients import ChatClient, attempt, refused, until
from tests.support.servers import ServerProcess, free_port

MIN_REFRESH = 5.0
#: The server stamps a fetch when it starts it, this JWKS server when the request arrives;
#: on a loaded machine the two differ by up to a second or so.
SKEW = 2.0


def new_key(kid: str) -> tuple[rsa.RSAPrivateKey, dict]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return private, {**public, "kid": kid, "use": "sig", "alg": "RS256"}


class JwksServer:
    """Serves a JWKS document on loopback and counts the fetches."""

    def __init__(self) -> None:
        self.keys: list[dict] = []
        self.fetched_at: list[float] = []  # monotonic time of each fetch
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                owner.fetched_at.append(time.monotonic())
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def fetches(self) -> int:
        return len(self.fetched_at)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()


AUDIENCE = "chat-jwks-test"
ISSUER = "https://issuer.example.test/jwks"


def token(private, kid: str, user: str) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": user, "exp": now + 600, "iat": now, "aud": AUDIENCE, "iss": ISSUER},
        private,
        algorithm="RS256",
        headers={"kid": kid},
    )


@pytest.fixture(scope="module")
def jwks_setup():
    jwks = JwksServer()
    first_private, first_public = new_key("k1")
    jwks.keys = [first_public]
    server = ServerProcess(
        {
            "STORE": "memory",
            "JWT_ALGORITHMS": "RS256",
            "JWT_SECRET": "",
            "JWT_JWKS_URL": jwks.url,
            "JWT_JWKS_MIN_REFRESH": str(MIN_REFRESH),
            "JWT_AUDIENCE": AUDIENCE,
            "JWT_ISSUER": ISSUER,
        }
    ).start()
    yield jwks, server, first_private
    server.stop()
    jwks.close()


async def test_jwks_keys_cached_rotated_and_rate_limited(jwks_setup, uid):
    """Known kids are served from the cache; an unknown kid refetches, but never sooner than
    MIN_REFRESH after the previous fetch (checked on the fetch times, whatever the load)."""
    jwks, server, first_private = jwks_setup
    clients = []
    for _ in range(3):
        user = uid("u")
        clients.append(
            await ChatClient(user).connect(server.url, token=token(first_private, "k1", user))
        )
    assert jwks.fetches == 1  # one fetch serves every connection
    second_private, second_public = new_key("k2")
    jwks.keys = [jwks.keys[0], second_public]  # the issuer rotates in a new key
    for _ in range(3):  # unknown kids do not make the server hammer the JWKS URL
        started = time.monotonic()
        result = await attempt(server.url, auth={"token": token(second_private, "k9", uid("x"))})
        assert result == refused("invalid_token")
        if started - jwks.fetched_at[-1] < MIN_REFRESH - SKEW:
            assert jwks.fetches == 1  # fetched under MIN_REFRESH ago: not refetched
    user = uid("w")

    async def rotated_in():
        result = await attempt(server.url, auth={"token": token(second_private, "k2", user)})
        return result if result["ok"] else None

    rotated = await until(rotated_in, "the rotated key to be fetched", timeout=MIN_REFRESH + 20)
    assert rotated["session"]["user"]["id"] == user
    gaps = [b - a for a, b in zip(jwks.fetched_at, jwks.fetched_at[1:], strict=False)]
    assert len(gaps) >= 1 and all(gap >= MIN_REFRESH - SKEW for gap in gaps), gaps
    for client in clients:
        await client.disconnect()


async def test_jwks_refuses_a_key_it_does_not_publish(jwks_setup, uid):
    _, server, _ = jwks_setup
    stranger, _ = new_key("k1")  # same kid, different key
    assert await attempt(server.url, auth={"token": token(stranger, "k1", uid("s"))}) == refused(
        "invalid_token"
    )
