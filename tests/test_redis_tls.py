"""Redis over TLS with AUTH, configured by the REDIS_HOST family of variables."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.support.clients import exchange
from tests.support.redis_servers import free_port
from tests.support.requirements import require_tool
from tests.support.servers import ServerProcess, cluster_env, key_prefix

PASSWORD = "tls-secret-1"


def openssl(*args: str, cwd) -> None:
    subprocess.run(
        [require_tool("openssl", "openssl"), *args], cwd=cwd, check=True, capture_output=True
    )


@pytest.fixture
def tls_redis(tmp_path):
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=chat-test-ca",
        cwd=tmp_path,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "redis.key",
        "-out",
        "redis.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=tmp_path,
    )
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost")
    openssl(
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "redis.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
        cwd=tmp_path,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "redis.crt",
            "--tls-key-file",
            "redis.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while (
        subprocess.run(
            [
                "redis-cli",
                "--tls",
                "--cacert",
                "ca.crt",
                "-p",
                str(port),
                "-a",
                PASSWORD,
                "--no-auth-warning",
                "ping",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        ).stdout.strip()
        != "PONG"
    ):
        assert time.monotonic() < deadline and proc.poll() is None, "TLS redis did not start"
        time.sleep(0.1)
    yield port, tmp_path / "ca.crt"
    proc.terminate()
    proc.wait(10)


async def test_instances_over_tls_with_password(tls_redis, tmp_path, uid):
    port, ca = tls_redis
    prefix = key_prefix()
    env = cluster_env(
        "",
        prefix,
        tmp_path,
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=port,
        REDIS_SSL="true",
        REDIS_PASSWORD=PASSWORD,
        REDIS_SSL_CA_CERTS=str(ca),
        REDIS_DB=2,
    )
    env.pop("REDIS_URL")
    servers = [ServerProcess({**env, "INSTANCE_ID": f"tls{i}"}).start() for i in range(2)]
    try:
        assert servers[0].wait_healthy()["checks"]["redis"]["ok"] is True
        await exchange(servers[0], servers[1], uid("room"), uid)
    finally:
        for server in servers:
            server.stop()


def test_wrong_redis_password_stops_the_start(tls_redis, tmp_path):
    port, ca = tls_redis
    env = cluster_env(
        "",
        "tbad:",
        tmp_path,
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=port,
        REDIS_SSL="true",
        REDIS_PASSWORD="wrong",
        REDIS_SSL_CA_CERTS=str(ca),
    )
    env.pop("REDIS_URL")
    server = ServerProcess(env)
    server.start(wait=False)
    try:
        server.proc.wait(20)
        assert server.proc.returncode != 0
        log = server.log_tail(60)
        assert "server.start_failed" in log
        # The start failed on the password, not on anything else (TLS, the address, ...).
        assert "WRONGPASS" in log or "invalid username-password" in log, log
    finally:
        server.stop()
