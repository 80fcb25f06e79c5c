"""Real Redis processes for tests: standalone, a 6-node Cluster, and Sentinel.

Every process listens on 127.0.0.1 only, runs in its own temporary directory with
``--save "" --appendonly no`` (a restart loses the data, on purpose), and dies with the
test process (atexit, and PDEATHSIG on Linux if the test process is killed).
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
REDIS_SERVER = shutil.which("redis-server") or "redis-server"
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"

_running: set[RedisServer] = set()
_reserved_ports: set[int] = set()


# ---------------------------------------------------------------- ports and processes


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    with (
        socket.socket() as sock
    ):  # nothing may be listening either (another user, another netns view)
        sock.settimeout(0.2)
        return sock.connect_ex((HOST, port)) != 0


def free_port(bus_offset: int | None = None, low: int = 20000, high: int = 45000) -> int:
    """A free loopback port; with ``bus_offset`` also ``port + bus_offset`` must be free."""
    for _ in range(500):
        port = random.randrange(low, high)
        if port in _reserved_ports or (bus_offset and port + bus_offset in _reserved_ports):
            continue
        if _port_is_free(port) and (bus_offset is None or _port_is_free(port + bus_offset)):
            _reserved_ports.add(port)
            if bus_offset:
                _reserved_ports.add(port + bus_offset)
            return port
    raise RuntimeError("no free port found")


# Redis dies with the test process: util-linux's setpriv sets PR_SET_PDEATHSIG and execs it.
# Not a preexec_fn: running Python in the forked child aborted it now and then (SIGABRT)
# once gRPC's fork handlers were loaded by the Firestore tests.
_SETPRIV = shutil.which("setpriv")


def _die_with_parent(command: list[str]) -> list[str]:
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *command] if _SETPRIV else command


def _wait(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
            last = result
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what} (last: {last!r})")


class RedisServer:
    """One ``redis-server`` process on a loopback port.

    ``RedisServer(port=None, password=None, args=())``: ``port=None`` picks a free port once
    (kept across restarts). ``args`` are extra command-line options, e.g.
    ``("--maxmemory", "10mb")``.
    """

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        args: Sequence[str] = (),
        *,
        bus_port: bool = False,
        sentinel: bool = False,
    ):
        self.port = port or free_port(10000 if bus_port else None)
        self.password = password
        self.args = list(args)
        self.sentinel = sentinel
        self.dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self.proc: subprocess.Popen | None = None
        self.paused = False

    # -- addresses

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def client(self, **kwargs) -> redis.Redis:
        """A synchronous client (decoded responses) for admin commands in tests."""
        options = {
            "socket_timeout": 2,
            "socket_connect_timeout": 2,
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
        }  # callers poll; no hidden reconnect loops
        return redis.Redis(
            host=HOST, port=self.port, password=self.password, **{**options, **kwargs}
        )

    # -- lifecycle

    def command_line(self) -> list[str]:
        if self.sentinel:
            return [REDIS_SERVER, str(self.dir / "sentinel.conf"), "--sentinel"]
        line = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--repl-diskless-sync-delay",
            "0",
            "--logfile",
            str(self.log_path),
        ]
        if self.password:
            line += ["--requirepass", self.password, "--masterauth", self.password]
        return line + self.args

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        # PDEATHSIG follows the forking *thread*: only safe from the main thread.
        main = threading.current_thread() is threading.main_thread()
        command = self.command_line()
        self.proc = subprocess.Popen(
            _die_with_parent(command) if main else command,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _running.add(self)
        try:
            self.wait_ready(timeout)
        except Exception:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ping() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis on {self.port} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            with self.client() as client:
                return bool(client.ping())

        try:
            _wait(ping, timeout, f"redis on port {self.port} to answer PING")
        except RuntimeError as exc:
            raise RuntimeError(str(exc)) from None

    @property
    def running(self) -> bool:
        """The process exists (it may be paused)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def responsive(self) -> bool:
        """Running and not paused."""
        return self.running and not self.paused

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        if self.running:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        if self.running and self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def request_shutdown(self) -> None:
        """Send SHUTDOWN NOSAVE (NOW: do not wait for lagging replicas) without waiting."""
        if not self.responsive:
            return
        with contextlib.suppress(Exception), self.client(socket_timeout=1) as client:
            try:
                client.execute_command("SHUTDOWN", "NOSAVE", "NOW")
            except redis.ResponseError:  # before Redis 7.0
                client.execute_command("SHUTDOWN", "NOSAVE")

    def _terminate(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        self.resume()
        self.request_shutdown()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        """Stop (SHUTDOWN NOSAVE, then SIGTERM, then SIGKILL) and remove the temp dir."""
        self._terminate()
        _running.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would. The temp dir stays, so ``start()`` works again."""
        if self.running:
            self.proc.kill()
            self.proc.wait(5)
        self.paused = False

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Same port, fresh process; the data is gone (nothing is persisted)."""
        self._terminate()
        return self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running})"


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)


# ---------------------------------------------------------------- cluster


class RedisCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each (default 3 + 3).

    ``cluster-node-timeout`` is 2000 ms, so a killed master is replaced in about 3-5 s.
    Node ports are free ports below 45000 whose bus port (port + 10000) is free too.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
        password: str | None = None,
    ):
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.replicas_per_master = replicas
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            "--cluster-require-full-coverage",
            "yes",
        ]
        self.nodes: dict[int, RedisServer] = {}
        for _ in range(masters * (1 + replicas)):
            node = RedisServer(password=password, args=args, bus_port=True)
            self.nodes[node.port] = node
        self.create_seconds: float | None = None
        self._killed_slots: dict[int, list[str]] = {}

    @property
    def ports(self) -> list[int]:
        return list(self.nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, for ``redis.asyncio.cluster.ClusterNode``."""
        return [(HOST, port) for port in self.nodes]

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT of a node that is running (the client discovers the rest)."""
        port = next((p for p, n in self.nodes.items() if n.responsive), self.ports[0])
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{port}"

    def client(self, port: int, **kwargs) -> redis.Redis:
        return self.nodes[port].client(**kwargs)

    def start(self, timeout: float = 30.0) -> RedisCluster:
        started = time.monotonic()
        for node in self.nodes.values():
            node.start()
        command = [REDIS_CLI]
        if self.password:
            command += ["-a", self.password, "--no-auth-warning"]
        command += [
            "--cluster",
            "create",
            *[f"{HOST}:{p}" for p in self.nodes],
            "--cluster-replicas",
            str(self.replicas_per_master),
            "--cluster-yes",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}"
            )
        self.wait_healthy(timeout)
        self.create_seconds = time.monotonic() - started
        return self

    # -- topology

    def _cluster_nodes(self, port: int | None = None) -> list[dict]:
        """CLUSTER NODES as seen by node ``port`` (default: the first running node)."""
        last: Exception | None = None
        candidates = (
            [port] if port is not None else [p for p, n in self.nodes.items() if n.responsive]
        )
        for candidate in candidates:
            try:
                with self.client(candidate) as client:
                    raw = client.execute_command("CLUSTER", "NODES")
                break
            except redis.RedisError as exc:
                last = exc
        else:
            raise RuntimeError(f"no cluster node answers: {last!r}")
        rows = []
        for line in raw.strip().splitlines():
            parts = line.split()
            address = parts[1].split("@")[0]
            rows.append(
                {
                    "id": parts[0],
                    "port": int(address.rsplit(":", 1)[1]),
                    "flags": set(parts[2].split(",")),
                    "master_id": parts[3],
                    "link": parts[7],
                    "slots": parts[8:],
                }
            )
        return rows

    def masters(self) -> list[int]:
        """Ports of the masters that own slots and are not marked failed."""
        return sorted(
            r["port"]
            for r in self._cluster_nodes()
            if "master" in r["flags"] and "fail" not in r["flags"] and r["slots"]
        )

    def replica_of(self, master: int) -> int:
        """Port of a (non-failed) replica of the master on port ``master``."""
        rows = self._cluster_nodes()
        master_id = next(r["id"] for r in rows if r["port"] == master)
        for row in rows:
            if row["master_id"] == master_id and "fail" not in row["flags"]:
                return row["port"]
        raise LookupError(f"master {master} has no live replica")

    def keyslot(self, key: str) -> int:
        with self.client(self._any_running()) as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def master_for_key(self, key: str) -> int:
        """Port of the master currently owning ``key``'s slot (also a channel's shard)."""
        slot = self.keyslot(key)
        for row in self._cluster_nodes():
            if "master" not in row["flags"] or "fail" in row["flags"]:
                continue
            for part in row["slots"]:
                if part.startswith("["):  # migrating/importing marker
                    continue
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return row["port"]
        raise LookupError(f"no master owns slot {slot}")

    def _any_running(self) -> int:
        return next(p for p, n in self.nodes.items() if n.responsive)

    # -- health and failures

    def cluster_info(self, port: int) -> dict[str, str]:
        with self.client(port) as client:
            raw = client.execute_command("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in raw.split() if ":" in line)

    def _healthy(self) -> bool:
        """Every running node: state ok, knows all nodes, sees no running node as failed, agrees
        with the others on who owns which slots; replicas' links are up; and, when no node is
        down, every master has its replicas."""
        running = [p for p, n in self.nodes.items() if n.responsive]
        views = set()
        for port in running:
            info = self.cluster_info(port)
            if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(
                len(self.nodes)
            ):
                return False
            rows = self._cluster_nodes(port)
            if any(
                r["flags"] & {"fail", "pfail", "handshake", "noaddr"}
                for r in rows
                if r["port"] in running
            ):
                return False
            masters = {
                r["id"]: (r["port"], tuple(r["slots"]))
                for r in rows
                if "master" in r["flags"] and "fail" not in r["flags"] and r["slots"]
            }
            views.add(tuple(sorted(masters.values())))
            if len(running) == len(self.nodes):
                for master_id in masters:
                    replicas = [r for r in rows if r["master_id"] == master_id]
                    if len(replicas) < self.replicas_per_master:
                        return False
            with self.client(port) as client:
                replication = client.info("replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return len(views) == 1

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until the cluster is consistent and ok on every running node (see ``_healthy``)."""
        _wait(self._healthy, timeout, "a healthy, consistent cluster", interval=0.1)

    def kill_node(self, port: int) -> None:
        """SIGKILL one node (its nodes.conf stays, so ``restart_node`` rejoins it)."""
        row = next((r for r in self._cluster_nodes() if r["port"] == port), None)
        if row is not None and row["slots"]:
            self._killed_slots[port] = [s for s in row["slots"] if not s.startswith("[")]
        self.nodes[port].kill()

    def restart_node(self, port: int, timeout: float = 20.0) -> None:
        """Start a killed node again; it rejoins (as a replica if it was failed over)."""
        self.nodes[port].start()
        self.wait_healthy(timeout)

    def wait_failover(self, old_master_port: int, timeout: float = 15.0) -> int:
        """Until another node owns the dead master's slots and every live node says ok.

        Returns the port of the new master (the promoted replica).
        """
        slots = self._killed_slots.get(old_master_port)
        if slots is None:
            row = next(r for r in self._cluster_nodes() if r["port"] == old_master_port)
            slots = [s for s in row["slots"] if not s.startswith("[")]
        if not slots:
            raise ValueError(f"node {old_master_port} owned no slots")

        def promoted() -> int | None:
            rows = self._cluster_nodes()
            owner = next(
                (
                    r
                    for r in rows
                    if slots[0] in r["slots"]
                    and "master" in r["flags"]
                    and "fail" not in r["flags"]
                ),
                None,
            )
            if owner is None or owner["port"] == old_master_port:
                return None
            live = (p for p, n in self.nodes.items() if n.responsive)
            if any(self.cluster_info(p).get("cluster_state") != "ok" for p in live):
                return None
            return owner["port"]

        new = _wait(promoted, timeout, f"failover of master {old_master_port}", interval=0.1)
        self._killed_slots.pop(old_master_port, None)
        return new

    def pause_node(self, port: int) -> None:
        """SIGSTOP one node: connections to it hang instead of failing (``heal`` resumes it)."""
        self.nodes[port].pause()

    def heal(self, timeout: float = 20.0) -> None:
        """Resume paused nodes, restart killed ones, and wait until the cluster is healthy."""
        for node in self.nodes.values():
            if node.paused:
                node.resume()
            elif not node.running:
                node.start()
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.request_shutdown()
        for node in self.nodes.values():
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- sentinel


class RedisSentinel:
    """One master, one replica and ``sentinels`` sentinels (1 or 3) monitoring ``chatmaster``.

    ``down-after-milliseconds`` 1000 and ``failover-timeout`` 3000, so failovers are quick.
    """

    SERVICE = "chatmaster"

    def __init__(
        self, sentinels: int = 1, down_after_ms: int = 1000, failover_timeout_ms: int = 3000
    ):
        self.master = RedisServer()
        self.replica = RedisServer(args=["--replicaof", HOST, str(self.master.port)])
        self.quorum = sentinels // 2 + 1
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.sentinels = [RedisServer(sentinel=True) for _ in range(sentinels)]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:S1[,127.0.0.1:S2...]/0/chatmaster``."""
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/0/{self.SERVICE}"

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    def _write_config(self, sentinel: RedisServer) -> None:
        sentinel.dir.mkdir(parents=True, exist_ok=True)
        (sentinel.dir / "sentinel.conf").write_text(
            "\n".join(
                [
                    f"port {sentinel.port}",
                    f"bind {HOST}",
                    f"dir {sentinel.dir}",
                    f"logfile {sentinel.log_path}",
                    "daemonize no",
                    f"sentinel monitor {self.SERVICE} {HOST} {self.master.port} {self.quorum}",
                    f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.SERVICE} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.SERVICE} 1",
                    "",
                ]
            )
        )

    def start(self, timeout: float = 20.0) -> RedisSentinel:
        self.master.start()
        self.replica.start()
        _wait(
            lambda: self.replica.client().info("replication").get("master_link_status") == "up",
            timeout,
            "replica in sync",
        )
        for sentinel in self.sentinels:
            self._write_config(sentinel)
            sentinel.start()
        self.wait_ready(timeout)
        return self

    def master_address(self) -> tuple[str, int]:
        """The master as the first live sentinel reports it."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with sentinel.client() as client:
                host, port = client.execute_command(
                    "SENTINEL GET-MASTER-ADDR-BY-NAME", self.SERVICE
                )
                return host, int(port)
        raise RuntimeError("no sentinel is running")

    def _ready(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                replicas = client.execute_command("SENTINEL REPLICAS", self.SERVICE)
                usable = [
                    r
                    for r in replicas
                    if isinstance(r, dict)
                    and not {"disconnected", "s_down", "o_down"} & set(r["flags"].split(","))
                    and r.get("master-link-status") == "ok"
                ]
                if not usable:
                    return False
                if len(self.sentinels) > 1:
                    others = client.execute_command("SENTINEL SENTINELS", self.SERVICE)
                    if len(others) < len(self.sentinels) - 1:
                        return False
        return True

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every sentinel has a promotable replica (and knows the other sentinels)."""
        _wait(self._ready, timeout, "sentinels to discover the replica and each other", 0.1)

    def failover(self, timeout: float = 20.0) -> tuple[str, int]:
        """Force a failover (SENTINEL FAILOVER) and wait until the new master accepts writes.

        Returns the new master's address. The old master becomes a replica.
        """
        old = self.master_address()
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL FAILOVER", self.SERVICE)

        def switched() -> tuple[str, int] | None:
            new = self.master_address()
            if new == old:
                return None
            server = self._server_on(new[1])
            with server.client() as c:
                return new if c.info("replication").get("role") == "master" else None

        new = _wait(switched, timeout, "sentinel failover", interval=0.1)
        self.master, self.replica = self._server_on(new[1]), self._server_on(old[1])
        return new

    def _server_on(self, port: int) -> RedisServer:
        return next(s for s in (self.master, self.replica) if s.port == port)

    def stop(self) -> None:
        servers = [*self.sentinels, self.replica, self.master]
        for server in servers:
            server.request_shutdown()
        for server in servers:
            server.stop()

    def __enter__(self) -> RedisSentinel:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
