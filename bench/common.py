"""Shared pieces of the chat benchmarks: server processes, clients, timings and tables.

Everything runs on this machine over 127.0.0.1: the servers are real uvicorn processes
(``tests.support.servers.ServerProcess``) and the clients are python-socketio AsyncClients
on the websocket transport, like the test suite's.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
import socketio

from tests.support.servers import ROOT, ServerProcess, make_token

NAMESPACE = "/chat"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# CHAT_ENV=testing brings the test JWT secret; the rest undoes what would distort figures:
# production heartbeats (testing pings every 2 s) and per-connection event limits far above
# any rate reached here (a refused send would be counted, not hidden, but skews the rate).
BENCH_ENV = {
    "CHAT_ENV": "testing",
    "WS_HEARTBEAT_INTERVAL": "25",
    "WS_GRACE_PERIOD": "60",
    "RATE_LIMIT_EVENTS_PER_SECOND": "1000000",
    "RATE_LIMIT_EVENTS_BURST": "1000000",
}


class BenchError(RuntimeError):
    """The benchmark could not set itself up (a refused join, a server that did not start)."""


# --- servers --------------------------------------------------------------------------------


def check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError as exc:
        raise BenchError(f"Redis at {url} does not answer ({exc}); --instances 2 needs it") from exc


def forget_redis_keys(url: str, prefix: str) -> int:
    """Delete the keys a run left under its own prefix; returns how many."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    return len(keys)


@contextmanager
def running_servers(
    instances: int, store: str, redis_url: str = DEFAULT_REDIS_URL
) -> Iterator[list[ServerProcess]]:
    """``instances`` server processes on one store; two or more share Redis under a fresh prefix.

    SQLite instances share one database file in a temporary folder; memory stores are per
    process (seqs still come from Redis when there are several instances).
    """
    if instances > 1:
        check_redis(redis_url)
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
        env = {**BENCH_ENV, "STORE": store, "SQLITE_PATH": str(Path(tmp) / "chat.db")}
        if instances > 1:
            env |= {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": prefix}
        servers = [ServerProcess({**env, "INSTANCE_ID": f"bench-{i}"}) for i in range(instances)]
        try:
            for server in servers:
                server.start(wait=False)
            for server in servers:
                server.wait_healthy(timeout=30)
            yield servers
        finally:
            for server in servers:
                server.stop(timeout=15)
            if instances > 1:
                forget_redis_keys(redis_url, prefix)


# --- CPU accounting -------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class CpuMeter:
    """CPU used between ``start()`` and ``stop()``, in percent of one core.

    One figure per named process group, ``machine`` for all CPUs together (2 busy cores make
    200) and ``other`` for what the rest of the machine used meanwhile (other programs).
    """

    pids: dict[str, list[int]]
    _start: dict[str, float] = field(default_factory=dict)
    _ticks: tuple[int, int] = (0, 0)
    _began: float = 0.0

    def _sample(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}

    def start(self) -> None:
        self._began = time.monotonic()
        self._start = self._sample()
        self._ticks = machine_busy_ticks()

    def stop(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._began, 1e-9)
        end = self._sample()
        busy, total = machine_busy_ticks()
        used = {name: 100 * (end[name] - self._start[name]) / elapsed for name in self.pids}
        cpus = os.cpu_count() or 1
        machine = 100 * cpus * (busy - self._ticks[0]) / max(total - self._ticks[1], 1)
        used["other"] = max(0.0, machine - sum(used.values()))
        used["machine"] = machine
        return used


def busy_elsewhere(seconds: float = 1.0) -> float:
    """Percent of one core the machine spent busy over ``seconds`` (before a run starts)."""
    meter = CpuMeter({})
    meter.start()
    time.sleep(seconds)
    return meter.stop()["machine"]


def wait_until_quiet(limit: float, threshold: float = 20.0) -> float:
    """Wait up to ``limit`` seconds for other programs to use under ``threshold`` % of a core.

    Returns the last busy figure; the run goes ahead either way (and prints it).
    """
    deadline = time.monotonic() + limit
    busy = busy_elsewhere()
    while busy >= threshold and time.monotonic() < deadline:
        busy = busy_elsewhere()
    return busy


# --- clients --------------------------------------------------------------------------------


async def connect_client(
    url: str, user: str, handlers: dict[str, Callable[..., Any]] | None = None
) -> socketio.AsyncClient:
    # Offer per-message deflate as browsers do, so the server's setting decides (aiohttp
    # would not offer it by default).
    sio = socketio.AsyncClient(reconnection=False, websocket_extra_options={"compress": 15})
    for event, handler in (handlers or {}).items():
        sio.on(event, handler, namespace=NAMESPACE)
    await sio.connect(
        url,
        namespaces=[NAMESPACE],
        auth={"token": make_token(user)},
        transports=["websocket"],
        wait_timeout=30,
    )
    return sio


async def call_ok(sio: socketio.AsyncClient, event: str, data: Any, timeout: float = 30) -> dict:
    ack = await sio.call(event, data, namespace=NAMESPACE, timeout=timeout)
    if not ack or not ack.get("ok"):
        raise BenchError(f"{event} {data!r} answered {ack!r}")
    return ack


@dataclass
class Joined:
    """Clients that connected and joined their room, in request order; failures as text."""

    clients: list[socketio.AsyncClient]
    indexes: list[int]
    failures: list[str]
    seconds: float


async def connect_and_join(
    targets: Sequence[tuple[str, str, str]],
    handlers_for: Callable[[int], dict[str, Callable[..., Any]]] | None = None,
    concurrency: int = 50,
) -> Joined:
    """Connect one client per ``(url, user, room)`` and join it to its room.

    At most ``concurrency`` handshakes run at once. A client that fails is disconnected and
    reported in ``failures``; the others are kept.
    """
    gate = asyncio.Semaphore(concurrency)
    began = time.monotonic()

    async def one(index: int, url: str, user: str, room: str):
        async with gate:
            sio = None
            try:
                sio = await connect_client(url, user, handlers_for(index) if handlers_for else None)
                await call_ok(sio, "room:join", {"room": room})
                return index, sio, None
            except Exception as exc:  # counted and shown, never hidden
                if sio is not None:
                    await sio.disconnect()
                return index, None, f"{user}@{url}: {type(exc).__name__}: {exc}"

    results = await asyncio.gather(*(one(i, *t) for i, t in enumerate(targets)))
    return Joined(
        clients=[sio for _, sio, _ in results if sio is not None],
        indexes=[i for i, sio, _ in results if sio is not None],
        failures=[error for _, _, error in results if error],
        seconds=time.monotonic() - began,
    )


async def disconnect_all(clients: Sequence[socketio.AsyncClient], concurrency: int = 100) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(sio: socketio.AsyncClient) -> None:
        async with gate:
            try:
                await asyncio.wait_for(sio.disconnect(), 10)
            except Exception:  # the run is over; a slow goodbye changes no figure
                pass

    await asyncio.gather(*(one(sio) for sio in clients))


async def timed_send(
    sio: socketio.AsyncClient, room: str, text: str, client_id: str, timeout: float = 30
) -> tuple[float | None, str | None]:
    """``message:send``; returns (seconds to the ack, None) or (None, error code)."""
    started = time.monotonic()
    try:
        ack = await sio.call(
            "message:send",
            {"room": room, "text": text, "client_id": client_id},
            namespace=NAMESPACE,
            timeout=timeout,
        )
    except socketio.exceptions.TimeoutError:
        return None, "ack_timeout"
    except Exception as exc:
        return None, type(exc).__name__
    if ack and ack.get("ok"):
        return time.monotonic() - started, None
    return None, str((ack or {}).get("error", {}).get("code", "no_ack"))


def padded(text: str, size: int) -> str:
    """``text`` padded with letters to ``size`` characters (never trimmed by the server)."""
    return text + "x" * max(0, size - len(text))


# --- figures --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values; NaN when there are none."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_ms(values: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of latencies in seconds, as milliseconds."""
    ordered = sorted(values)
    return {
        "p50": 1000 * percentile(ordered, 50),
        "p99": 1000 * percentile(ordered, 99),
        "max": 1000 * ordered[-1] if ordered else float("nan"),
    }


def _spin(start_at: float, seconds: float) -> int:
    """Count loop turns for ``seconds`` from ``start_at`` (CLOCK_MONOTONIC, machine-wide)."""
    while time.monotonic() < start_at:
        time.sleep(0.001)
    end, turns = start_at + seconds, 0
    while time.monotonic() < end:
        turns += 1
    return turns


def parallel_cpu_factor(seconds: float = 1.0) -> float:
    """Work two busy processes do together, as a multiple of what one does alone.

    2.0 would be two full cores; on a machine whose two vCPUs share one core's time it is
    near 1.0, and then a client process and a server process slow each other down.
    """
    alone = _spin(time.monotonic(), seconds)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        start_at = time.monotonic() + 1.0
        together = sum(pool.starmap(_spin, [(start_at, seconds)] * 2))
    return together / alone


def code_version() -> str:
    """The commit the server code comes from, and whether ``server/`` differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "server"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "server code of unknown version"
    return f"server code at {commit or '?'}" + (" with local changes" if changed else "")


def describe_machine(quiet_wait: float = 0.0) -> str:
    """One line: CPUs, what else was busy, how two processes share them, and versions."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return (
        f"{os.cpu_count()} CPUs, busy {wait_until_quiet(quiet_wait):.0f}% of one core before the run "
        f"(other programs); two busy processes together do {parallel_cpu_factor():.2f}x "
        "the work of one; "
        f"{code_version()}; Python {platform.python_version()}; "
        f"python-socketio {version('python-socketio')}, uvicorn {version('uvicorn')}, "
        f"websockets {version('websockets')}, aiohttp {version('aiohttp')} (clients)"
    )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-size", type=int, default=64, help="characters per message")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="for 2+ instances")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="wait up to this long for other programs to leave the CPUs before starting",
    )


class Table:
    """A fixed-width table printed one row at a time (so a long run shows progress)."""

    def __init__(self, columns: Sequence[tuple[str, int, str]]) -> None:
        self.columns = columns  # (title, width, format spec for values)

    def header(self) -> None:
        line = " ".join(f"{title:>{width}}" for title, width, _ in self.columns)
        print(line)
        print("-" * len(line), flush=True)

    def row(self, *values: Any) -> None:
        cells = []
        for (_, width, spec), value in zip(self.columns, values, strict=True):
            text = format(value, spec) if isinstance(value, int | float) else str(value)
            cells.append(f"{text:>{width}}")
        print(" ".join(cells), flush=True)


def print_failures(label: str, failures: Sequence[str], shown: int = 3) -> None:
    if failures:
        print(f"  {len(failures)} {label}; first: " + " | ".join(failures[:shown]), flush=True)
