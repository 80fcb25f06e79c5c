"""Configuration that fails closed, operator faults, and secrets kept out of logs and health.

Every test runs the real ``chat-server`` command or a real uvicorn process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import socketio

from tests.support.clients import ChatClient
from tests.support.servers import ROOT, TEST_SECRET, ServerProcess, chat_server, make_token

DEV_SECRET = "dev-secret-not-for-production-0123456789"  # settings.toml [development]
STRONG = "a-production-secret-of-at-least-32-characters"
MACHINE_ADDRESS = "192.0.2.2"  # this host's non-loopback address (tests/README: eth0)


def check(env: dict[str, str]):
    return chat_server("check-config", env={"STORE": "memory", **env}, timeout=60)


def refused(result, words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert words in result.stderr, result.stderr


def test_production_refuses_dev_tokens():
    result = check({"CHAT_ENV": "production", "JWT_SECRET": STRONG, "DEV_TOKENS": "true"})
    refused(result, "DEV_TOKENS=true in production")


@pytest.mark.parametrize("secret", [DEV_SECRET, TEST_SECRET])
def test_production_refuses_the_published_secrets(secret):
    refused(
        check({"CHAT_ENV": "production", "JWT_SECRET": secret}),
        "JWT_SECRET is the development secret published in settings.toml",
    )


@pytest.mark.parametrize(
    "keys",
    [
        {"JWT_JWKS_URL": "https://www.googleapis.com/service_accounts/v1/jwk/x"},
        {"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----"},
    ],
    ids=["jwks", "public-key"],
)
@pytest.mark.parametrize(
    "claims",
    [{}, {"JWT_AUDIENCE": "my-project"}, {"JWT_ISSUER": "https://securetoken.google.com/p"}],
    ids=["neither", "audience-only", "issuer-only"],
)
def test_public_keys_need_audience_and_issuer(keys, claims):
    env = {"CHAT_ENV": "development", "JWT_ALGORITHMS": "RS256", "JWT_SECRET": "", **keys}
    refused(check({**env, **claims}), "need JWT_AUDIENCE and JWT_ISSUER")


def test_public_keys_with_audience_and_issuer_start():
    result = check(
        {
            "CHAT_ENV": "development",
            "JWT_ALGORITHMS": "RS256",
            "JWT_SECRET": "",
            "JWT_JWKS_URL": "https://www.googleapis.com/service_accounts/v1/jwk/x",
            "JWT_AUDIENCE": "my-project",
            "JWT_ISSUER": "https://securetoken.google.com/my-project",
        }
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("level", ["warning", "Info", "debug", "ERROR"])
def test_log_level_in_any_case(level):
    result = check({"CHAT_ENV": "development", "LOG_LEVEL": level})
    assert result.returncode == 0, result.stderr


def test_trusted_proxies_must_be_addresses():
    refused(check({"CHAT_ENV": "development", "TRUSTED_PROXIES": "10.0.0.0/8,nginx"}), "nginx")


# --- a production-like instance -----------------------------------------------------------
@pytest.fixture(scope="module")
def production():
    proc = ServerProcess(
        {
            "CHAT_ENV": "production",
            "STORE": "memory",
            "JWT_SECRET": STRONG,
            "METRICS_TOKEN": "scrape-me-0123456789",
            "LOG_LEVEL": "info",
        }
    ).start()
    yield proc
    proc.stop()


async def test_production_serves_no_api_docs(production):
    async with httpx.AsyncClient(timeout=10) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(production.url + path)).status_code == 404, path
        assert (await http.get(production.url + "/api/health")).status_code == 200


async def test_metrics_behind_a_token(production):
    async with httpx.AsyncClient(timeout=10) as http:
        url = production.url + "/metrics"
        assert (await http.get(url)).status_code == 401
        wrong = {"Authorization": "Bearer scrape-me-WRONG"}
        assert (await http.get(url, headers=wrong)).status_code == 401
        right = {"Authorization": "Bearer scrape-me-0123456789"}
        response = await http.get(url, headers=right)
        assert response.status_code == 200 and "chat_connections" in response.text


async def test_development_docs_and_open_metrics(server):
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(server.url + "/openapi.json")).status_code == 200
        assert (await http.get(server.url + "/metrics")).status_code == 200


# --- development tokens: loopback clients only, announced at start ---------------------------
@pytest.fixture(scope="module")
def reachable_dev_server():
    """A development instance listening on every address, so a non-loopback peer can call it."""
    proc = ServerProcess({"CHAT_ENV": "development", "STORE": "memory"}, host="0.0.0.0").start()
    yield proc
    proc.stop()


async def test_dev_tokens_only_for_loopback_clients(reachable_dev_server):
    port = reachable_dev_server.port
    async with httpx.AsyncClient(timeout=10) as http:
        local = await http.post(f"http://127.0.0.1:{port}/api/dev/token", json={"user": "ann"})
        assert local.status_code == 200 and local.json()["token"]
        remote = await http.post(
            f"http://{MACHINE_ADDRESS}:{port}/api/dev/token", json={"user": "ann"}
        )
        assert remote.status_code == 403
        assert "token" not in remote.json()
        # A forwarded header naming loopback changes nothing: the direct peer decides.
        spoofed = await http.post(
            f"http://{MACHINE_ADDRESS}:{port}/api/dev/token",
            json={"user": "ann"},
            headers={"X-Forwarded-For": "127.0.0.1"},
        )
        assert spoofed.status_code == 403


def test_dev_tokens_warned_at_start(reachable_dev_server):
    assert "auth.dev_tokens_enabled" in reachable_dev_server.log_path.read_text()


# --- no token or password in any log line or in /api/health ----------------------------------
async def test_tokens_never_reach_the_log(server, uid):
    """uvicorn logs each websocket URL at INFO: a ``?token=`` in it is redacted."""
    user = uid("u")
    token = make_token(user)
    client = ChatClient(user)
    await client.sio.connect(
        f"{server.url}?token={token}",
        namespaces=["/chat"],
        transports=["websocket"],
        wait_timeout=10,
    )
    await client.wait_for("session")
    bad = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.not-a-valid-signature-x"
    refused_client = ChatClient(uid("v"))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await refused_client.sio.connect(
            f"{server.url}?token={bad}",
            namespaces=["/chat"],
            transports=["polling"],
            wait_timeout=5,
        )
    await client.disconnect()
    await asyncio.sleep(0.3)
    text = server.log_path.read_text()
    assert "token=[redacted]" in text  # the line is there, without the token
    assert token not in text and token.split(".")[2] not in text
    assert bad not in text and "not-a-valid-signature" not in text


def test_redis_password_never_logged_or_reported(tmp_path):
    proc = ServerProcess(
        {
            "STORE": "memory",
            "REDIS_URL": "redis://chat:hunter2-very-secret@127.0.0.1:1/0",
            "REDIS_TIMEOUT": "0.5",
        }
    )
    proc.start(wait=False)
    try:
        with pytest.raises((RuntimeError, TimeoutError)):
            proc.wait_healthy(timeout=8, accept_unhealthy=False)
        try:
            body = httpx.get(f"{proc.url}/api/health", timeout=3).text
        except httpx.HTTPError:
            body = ""
        assert "hunter2" not in body
    finally:
        proc.stop()
    assert "hunter2" not in proc.log_path.read_text()


# --- `chat-server verify` from a plain `pip install .` ---------------------------------------
def uv_binary() -> str | None:
    return shutil.which("uv") or next(
        (str(p) for p in [ROOT / ".tools" / "bin" / "uv"] if p.exists()), None
    )


@pytest.mark.timeout(600)
def test_verify_works_from_a_plain_install(tmp_path, server):
    """What Heroku does: ``pip install .`` (no dev dependencies), then ``chat-server verify``."""
    uv = uv_binary()
    if uv is None:
        pytest.skip("uv is not installed (make install provides it)")
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(python), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "UV_SYSTEM_CERTS": "1"},
    )
    assert installed.returncode == 0, installed.stderr
    result = subprocess.run(
        [
            str(Path(venv) / "bin" / "chat-server"),
            "verify",
            server.url,
            "--token-secret",
            TEST_SECRET,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deployment verified" in result.stdout
