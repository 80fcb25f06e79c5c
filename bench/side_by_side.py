"""Side by side: this server against Node's Socket.IO, same machine, same Redis, same load.

    make bench                                   # RATES="100 200 500 2000" DUR=8 IDLE=1
    .venv/bin/python -m bench.side_by_side --rates 200,500 --duration 8 --no-idle

Starts a private ``redis-server`` on a free port, two instances of this server (SQLite in a
temporary folder, the default store) and two instances of ``bench/node/reference-server.js``
(Socket.IO 4.8 with @socket.io/redis-adapter, the same protocol subset: JWT on connect,
``room:join``, ``message:send`` with ack, ``message:new``), all on free ports and all on the
one Redis. For each rate, ``bench/node/loadgen.js`` (socket.io-client, websocket) runs the
same scenario against the Node pair, then against ours: 1 000 clients in 10 rooms of 100,
open-loop sends at that many per second in all. Then ``bench/node/idle.js`` holds 5 000
idle connections to a fresh instance of each and the resident memory they added is read.

Prints one JSON line per scenario (``node-r200``, ``ours-r200``, ..., ``idle-node``,
``idle-ours``) and a last line with the ratios, ours / Node's: ``saturation_ratio`` (best
delivered/s over the rates), ``p99_ratio_r200`` and ``p99_ratio_r500`` (send→delivery p99
at 20 000 and 50 000 deliveries/s), ``kb_per_conn_ratio``. Progress goes to stderr.

``--detail`` adds, per scenario, the CPU each server process used while connecting and while
sending, and the Redis commands run in each phase (``INFO commandstats`` deltas). Abuse
limits that a load from one loopback address trips may be lifted in ``bench/compare.env``
(``KEY=VALUE`` lines, our instances only; settings that change what the server does are
ignored there). The machine is shared by both sides and the load generator: compare the
ratios of one run, never absolute figures across runs.

``--instances``, ``--targets``, ``--clients``, ``--rooms`` and ``--ours-env`` change the
layout for the cost measurements of docs/benchmarks.md (room size, an instance with no
member of the busy rooms).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import cpu_seconds
from tests.support.redis_servers import RedisServer
from tests.support.servers import ROOT, ServerProcess, free_port

NODE_DIR = ROOT / "bench" / "node"
COMPARE_ENV = ROOT / "bench" / "compare.env"
SECRET = "bench-secret-0123456789abcdef0123"
#: compare.env may not change what the server does, only lift abuse limits.
PROTECTED = ("STORE", "SQLITE", "REDIS", "JWT", "FIRESTORE", "WS_", "CHAT_ENV", "INSTANCE_ID")


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def extra_env(path: Path = COMPARE_ENV) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``bench/compare.env``, without the protected settings."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        if key.startswith(PROTECTED):
            log(f"compare.env: ignoring {key}")
            continue
        values[key] = value
    return values


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class NodeReference:
    """One process of ``bench/node/reference-server.js``."""

    def __init__(self, redis_url: str, instance_id: str, workdir: Path) -> None:
        self.port = free_port()
        self.instance_id = instance_id
        env = {
            **os.environ,
            "PORT": str(self.port),
            "REDIS_URL": redis_url,
            "JWT_SECRET": SECRET,
            "INSTANCE_ID": instance_id,
        }
        self.log_path = workdir / f"{instance_id}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                ["node", str(NODE_DIR / "reference-server.js")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_healthy(self, timeout: float = 30) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.instance_id} exited:\n{self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.instance_id} not healthy on {self.port}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Cluster:
    """The private Redis and every server process of a run; all stopped on exit."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="chat-side-by-side-"))
        self.redis = RedisServer()
        self.ours: list[ServerProcess] = []
        self.node: list[NodeReference] = []
        self.extra = extra_env()
        #: --ours-env: settings of our instances for a measurement (none by default)
        self.ours_env: dict[str, str] = {}
        self._stats_client = None
        self._info_calls = 0

    def start_redis(self) -> None:
        self.redis.start()

    def start_ours(self, name: str) -> ServerProcess:
        env = {
            **self.extra,
            **self.ours_env,
            "CHAT_ENV": "development",
            "INSTANCE_ID": name,
            "JWT_SECRET": SECRET,
            "STORE": "sqlite",
            "REDIS_URL": "",
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(self.redis.port),
            "SQLITE_PATH": str(self.workdir / "bench.db"),
            "WS_GRACE_PERIOD": "60",
            "WS_HEARTBEAT_INTERVAL": "30",
            "DEV_TOKENS": "false",
            "LOG_LEVEL": "WARNING",
            "RATE_LIMIT_EVENTS_PER_SECOND": "1000000",
            "RATE_LIMIT_EVENTS_BURST": "1000000",
        }
        server = ServerProcess(env)
        server.start(wait=False)
        self.ours.append(server)
        return server

    def start_node(self, name: str) -> NodeReference:
        server = NodeReference(self.redis.url, name, self.workdir)
        self.node.append(server)
        return server

    def redis_calls(self) -> dict[str, int]:
        """Calls per Redis command so far, less this method's own ``INFO`` calls."""
        if self._stats_client is None:
            self._stats_client = self.redis.client()
        stats = self._stats_client.info("commandstats")
        self._info_calls += 1
        calls = {key.removeprefix("cmdstat_"): value["calls"] for key, value in stats.items()}
        calls["info"] = calls.get("info", 0) - (self._info_calls - 1)
        return calls

    def close(self) -> None:
        if self._stats_client is not None:
            self._stats_client.close()
        for server in self.ours:
            server.stop(timeout=10)
        for server in self.node:
            server.stop()
        self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    running = Cluster()
    try:
        running.start_redis()
        yield running
    finally:
        running.close()


def wait_all(servers: list) -> None:
    for server in servers:
        server.wait_healthy(timeout=60)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    changed = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    return dict(sorted(changed.items(), key=lambda kv: -kv[1]))


def run_load(run: Cluster, name: str, servers: list, args: argparse.Namespace, rate: int) -> dict:
    """One loadgen run against ``servers``; its JSON line, named, with details if asked."""
    command = [
        "node",
        str(NODE_DIR / "loadgen.js"),
        "--urls",
        ",".join(s.url for s in servers[: args.targets or None]),
        "--secret",
        SECRET,
        "--tag",
        name,
        "--clients",
        str(args.clients),
        "--rooms",
        str(args.rooms),
        "--rate",
        str(rate),
        "--duration",
        str(args.duration),
    ]
    pids = [s.proc.pid if isinstance(s, ServerProcess) else s.pid for s in servers]
    samples: dict[str, tuple[float, list[float], dict[str, int]]] = {}

    def sample(phase: str) -> None:
        calls = run.redis_calls() if args.detail else {}
        samples[phase] = (time.monotonic(), [cpu_seconds(p) for p in pids], calls)

    sample("start")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def follow_phases() -> None:
        for line in proc.stderr:
            if line.startswith("phase "):
                sample(line.split()[1])
            else:
                sys.stderr.write(line)

    follower = threading.Thread(target=follow_phases, daemon=True)
    follower.start()
    out = proc.stdout.read()  # stderr belongs to the follower
    proc.wait(timeout=60)
    follower.join(5)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"loadgen {name} failed with {proc.returncode}")
    time.sleep(args.settle)  # the servers see the disconnections
    sample("closed")
    row = {"scenario": name, **json.loads(out.strip().splitlines()[-1])}
    if args.detail:
        row["detail"] = phase_detail(samples)
    return row


def phase_detail(samples: dict[str, tuple[float, list[float], dict[str, int]]]) -> dict:
    """CPU seconds per server process and Redis calls between consecutive phases."""
    order = [
        p for p in ("start", "connected", "joined", "sending", "sent", "closed") if p in samples
    ]
    detail = {}
    for first, second in zip(order, order[1:], strict=False):
        t0, cpu0, calls0 = samples[first]
        t1, cpu1, calls1 = samples[second]
        detail[f"{first}->{second}"] = {
            "seconds": round(t1 - t0, 2),
            "cpu_s": [round(b - a, 2) for a, b in zip(cpu0, cpu1, strict=True)],
            "redis_calls": delta(calls1, calls0),
        }
    return detail


def idle_probe(name: str, pid: int, url: str, clients: int) -> dict:
    """Hold ``clients`` idle connections to ``url``; RSS added per connection, in KB."""
    before = rss_kb(pid)
    with tempfile.TemporaryFile("w+") as out:
        probe = subprocess.Popen(
            [
                "node",
                str(NODE_DIR / "idle.js"),
                "--url",
                url,
                "--clients",
                str(clients),
                "--secret",
                SECRET,
            ],
            stdout=out,
        )
        try:
            deadline = time.monotonic() + 90
            summary = ""
            while time.monotonic() < deadline and not summary:
                time.sleep(1)
                out.seek(0)
                summary = out.read().strip()
            time.sleep(2)
            after = rss_kb(pid)
        finally:
            probe.kill()
            probe.wait(10)
    figures = json.loads(summary) if summary else {"ok": None, "bad": None, "connect_s": None}
    return {"scenario": name, **figures, "kb_per_conn": int((after - before) / clients)}


def ratios(rows: dict[str, dict]) -> dict:
    """The figures the comparison is judged on, ours / Node's."""

    def best(side: str) -> float:
        values = [r["delivered_per_s"] for k, r in rows.items() if k.startswith(f"{side}-r")]
        return max(values, default=0)

    result: dict = {
        "saturation_ratio": round(best("ours") / max(best("node"), 1), 3),
        "ours_max_delivered": best("ours"),
        "node_max_delivered": best("node"),
    }
    for rate in ("200", "500"):
        ours, node = rows.get(f"ours-r{rate}"), rows.get(f"node-r{rate}")
        if ours and node:
            ours_p99 = ours["lat_ms"]["p99"] or 1e9
            node_p99 = max(node["lat_ms"]["p99"] or 1, 0.1)
            result[f"p99_ratio_r{rate}"] = round(ours_p99 / node_p99, 2)
            result[f"loss_ours_r{rate}"] = ours["loss"]
    if "idle-ours" in rows and "idle-node" in rows:
        result["kb_per_conn_ratio"] = round(
            rows["idle-ours"]["kb_per_conn"] / max(rows["idle-node"]["kb_per_conn"], 1), 2
        )
        result["idle_refused_ours"] = rows["idle-ours"].get("bad", 0)
    return result


def emit(row: dict, rows: dict[str, dict]) -> None:
    rows[row["scenario"]] = row
    print(json.dumps(row, separators=(",", ":")), flush=True)


def main() -> None:
    # stopped with SIGTERM, still stop every process started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates",
        default=os.environ.get("RATES", "100 200 500 2000"),
        help="sends per second in all, space or comma separated (env RATES)",
    )
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DUR", 8)))
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--idle-clients", type=int, default=5000)
    parser.add_argument(
        "--no-idle",
        dest="idle",
        action="store_false",
        default=os.environ.get("IDLE", "1") == "1",
        help="skip the idle-memory part (env IDLE=0)",
    )
    parser.add_argument("--sides", default="node,ours", help="which sides to run, in order")
    parser.add_argument("--detail", action="store_true", help="CPU and Redis calls per phase")
    parser.add_argument("--instances", type=int, default=2, help="instances per side")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds after the load ends before the last sample (--detail)",
    )
    parser.add_argument(
        "--targets",
        type=int,
        default=0,
        help="clients connect to the first N instances only (0: all); the others stay idle",
    )
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of our instances for this run (repeatable)",
    )
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.replace(",", " ").split()]
    sides = [s for s in args.sides.split(",") if s]

    rows: dict[str, dict] = {}
    with cluster() as run:
        log(f"redis-server on {run.redis.port}; work folder {run.workdir}")
        run.ours_env = dict(item.split("=", 1) for item in args.ours_env)
        names = [chr(ord("a") + i) for i in range(args.instances)]
        ours = [run.start_ours(f"py-{c}") for c in names] if "ours" in sides else []
        node = [run.start_node(f"node-{c}") for c in names] if "node" in sides else []
        wait_all(ours + node)
        for rate in rates:
            for side in sides:
                servers = ours if side == "ours" else node
                log(f"{side}: {args.clients} clients, {args.rooms} rooms, {rate} sends/s")
                emit(run_load(run, f"{side}-r{rate}", servers, args, rate), rows)
        if args.idle:
            # fresh processes: memory left from the load scenarios would blur the figure
            fresh = {}
            if "ours" in sides:
                fresh["ours"] = run.start_ours("py-idle")
            if "node" in sides:
                fresh["node"] = run.start_node("node-idle")
            wait_all(list(fresh.values()))
            time.sleep(2)
            for side in ("node", "ours"):
                if side in fresh:
                    server = fresh[side]
                    pid = server.proc.pid
                    log(f"{side}: {args.idle_clients} idle connections")
                    emit(idle_probe(f"idle-{side}", pid, server.url, args.idle_clients), rows)
                    time.sleep(2)
    print(json.dumps(ratios(rows)), flush=True)


if __name__ == "__main__":
    main()
