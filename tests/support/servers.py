"""Real server processes for tests: uvicorn on a free port, stopped and killed on demand."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt

ROOT = Path(__file__).resolve().parents[2]
TEST_SECRET = "test-secret-0123456789-0123456789-abcdef"
LOG_DIR = ROOT / ".run" / "logs"
#: SQLite files of this test session's servers (removed when the session ends).
DATA_DIR = Path(tempfile.mkdtemp(prefix="chat-test-data-"))
atexit.register(shutil.rmtree, DATA_DIR, True)

#: How long a server process may take to answer its health check. A cold start imports a
#: lot; on a loaded 2-core machine several starting at once took more than 90 s
#: (load average above 30).
STARTUP_TIMEOUT = 180.0

#: Presence timings of the multi-instance tests (seconds).
GRACE = 1.0
HEARTBEAT = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_token(
    user: str, name: str | None = None, ttl: float = 3600, secret: str = TEST_SECRET, **claims
) -> str:
    now = int(time.time())
    payload = {"sub": user, "iat": now, "exp": now + ttl, **claims}
    if name:
        payload["name"] = name
    return jwt.encode(payload, secret, algorithm="HS256")


@dataclass
class ServerProcess:
    """One uvicorn process of the chat server.

    Without ``STORE`` in ``env`` it runs on SQLite (the default store), in a database file
    of its own; give ``STORE`` and ``SQLITE_PATH`` to share a file or to pick another store.
    """

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    #: ``uvicorn --workers N`` when above 1 (the supervisor is ``proc``).
    workers: int = 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"server-{self.port}-{int(time.time() * 1000)}.log"
        env = {
            **os.environ,
            "CHAT_ENV": "testing",
            "JWT_SECRET": TEST_SECRET,
            "STORE": "sqlite",
            "SQLITE_PATH": str(DATA_DIR / f"server-{self.port}.db"),
            **self.env,
            "PORT": str(self.port),
        }
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "server.main:app",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--ws-per-message-deflate",
                "false",
                # As the Procfile: the client IP is ours to work out (TRUSTED_PROXIES), and
                # the websocket layer refuses frames over the frame limit, in bytes.
                "--no-proxy-headers",
                "--ws-max-size",
                self.env.get("MAX_FRAME_BYTES", "65536"),
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "5",
                # uvicorn kills a worker that misses a 5 s health ping: too short for a
                # worker importing the app on a loaded test machine.
                *(
                    ["--workers", str(self.workers), "--timeout-worker-healthcheck", "60"]
                    if self.workers > 1
                    else []
                ),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            try:
                self.wait_healthy(timeout)
            except BaseException:
                self.stop(signal.SIGKILL)  # a server that never got healthy outlives no test
                raise
        return self

    def wait_healthy(
        self, timeout: float = STARTUP_TIMEOUT, accept_unhealthy: bool = False
    ) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/api/health", timeout=2)
                last = response.json()
                if response.status_code == 200 or accept_unhealthy:
                    return last
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise TimeoutError(f"server on {self.port} not healthy: {last}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def start_all(
    servers: list[ServerProcess], timeout: float = STARTUP_TIMEOUT
) -> list[ServerProcess]:
    """Start every process at once, then wait for each to be healthy (faster than one by one)."""
    for server in servers:
        server.start(wait=False)
    try:
        for server in servers:
            server.wait_healthy(timeout)
    except BaseException:
        for server in servers:  # the fixture's teardown never runs when its setup fails
            server.stop(signal.SIGKILL)
        raise
    return servers


def key_prefix() -> str:
    """A fresh REDIS_KEY_PREFIX, so that tests sharing one Redis never see each other's keys."""
    import uuid

    return f"t{uuid.uuid4().hex[:8]}:"


@contextlib.contextmanager
def deployment(
    redis_url: str, tmp_path, count: int, name: str, **extra
) -> Iterator[list[ServerProcess]]:
    """``count`` instances on one Redis (a fresh key prefix) and one SQLite file, as behind
    a load balancer, named ``<name>-0`` …; stopped on the way out."""
    prefix = key_prefix()
    servers = start_all(
        [
            ServerProcess(
                cluster_env(redis_url, prefix, tmp_path, INSTANCE_ID=f"{name}-{i}", **extra)
            )
            for i in range(count)
        ]
    )
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def cluster_env(redis_url: str, prefix: str, tmp_path, **extra) -> dict[str, str]:
    """Settings of one instance of a cluster: shared Redis and SQLite file, short timings."""
    return {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "STORE": "sqlite",
        "SQLITE_PATH": str(tmp_path / "shared.db"),
        "WS_GRACE_PERIOD": str(GRACE),
        "WS_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        **{k: str(v) for k, v in extra.items()},
    }


def chat_server(*args: str, env: dict[str, str] | None = None, timeout: float = 90):
    """Run the ``chat-server`` console command (as ``python -m server.cli``) and capture it."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
