"""Acked sends per second: K senders, each as fast as its acks allow; prints figures only.

    .venv/bin/python -m bench.send_throughput --stores sqlite,memory --instances 1 --senders 1,8,32
    .venv/bin/python -m bench.send_throughput --stores sqlite --instances 2 --rooms shared
    .venv/bin/python -m bench.send_throughput --client node --stores sqlite --senders 128

``--client python`` (the default) runs the senders as python-socketio clients in this
process; ``--client node`` runs them in ``bench/node/sender.js`` (socket.io-client), which
needs about a fifth of the CPU per send: a Python client process runs out of CPU near
4 000 sends/s, before the server does.

For each store and instance count, starts the server process(es) (two or more share the
local Redis under a fresh key prefix and, for SQLite, one database file), then for each
sender count K connects K clients over websocket (round-robin over the instances) and joins
them to their rooms: ``--rooms own`` gives each sender its own room (nobody receives its
messages), ``--rooms shared`` puts all K in one room (every send is delivered to the K-1
others, so they are receivers too). Each sender sends one message at a time, the next as soon
as the ack arrives, for ``--duration`` seconds (at most ``--max-sends`` each). Figures: acked
sends per second, ack latency, errors by code, store calls per SQLite write transaction
(``/commit``, the writer's group commit; blank for other stores), and the CPU each side used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import subprocess
import time
import uuid
from collections import Counter

import httpx

from bench.common import (
    BenchError,
    CpuMeter,
    Table,
    add_common_arguments,
    connect_and_join,
    describe_machine,
    disconnect_all,
    latency_ms,
    padded,
    print_failures,
    running_servers,
    timed_send,
)
from tests.support.clients import metric_values
from tests.support.servers import ROOT, TEST_SECRET, ServerProcess

NODE_SENDER = ROOT / "bench" / "node" / "sender.js"

TABLE = Table(
    [
        ("store", 6, ""),
        ("inst", 4, "d"),
        ("rooms", 6, ""),
        ("senders", 7, "d"),
        ("sends", 7, "d"),
        ("sends/s", 8, ".1f"),
        ("p50 ms", 7, ".1f"),
        ("p99 ms", 7, ".1f"),
        ("max ms", 7, ".1f"),
        ("errors", 6, "d"),
        ("/commit", 7, ".1f"),
        ("srv%", 5, ".0f"),
        ("cli%", 5, ".0f"),
        ("oth%", 5, ".0f"),
    ]
)


def writer_commits(servers: list[ServerProcess]) -> tuple[float, float]:
    """(transactions, calls in them) of the SQLite writers so far, from /metrics."""
    batches = calls = 0.0
    for server in servers:
        values = metric_values(httpx.get(f"{server.url}/metrics", timeout=10).text)
        batches += values.get('chat_store_batch_calls_count{lane="writer"}', 0.0)
        calls += values.get('chat_store_batch_calls_sum{lane="writer"}', 0.0)
    return batches, calls


def run_node_case(
    servers: list[ServerProcess], store: str, senders: int, args: argparse.Namespace
) -> None:
    """The same case with ``bench/node/sender.js`` as the senders."""
    command = [
        "node",
        str(NODE_SENDER),
        "--urls",
        ",".join(server.url for server in servers),
        "--secret",
        TEST_SECRET,
        "--senders",
        str(senders),
        "--duration",
        str(args.duration),
        "--rooms",
        args.rooms,
        "--text",
        str(args.text_size),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    meter = CpuMeter({"server": [s.proc.pid for s in servers], "clients": [proc.pid]})
    commits_before = writer_commits(servers)
    cpu: dict[str, float] = {}
    commits_after = commits_before
    for line in proc.stderr:
        if line.startswith("phase counting"):
            commits_before = writer_commits(servers)
            meter.start()
        elif line.startswith("phase done"):
            cpu = meter.stop()
            commits_after = writer_commits(servers)
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0 or not out.strip():
        raise BenchError(f"bench/node/sender.js failed (exit {proc.returncode})")
    figures = json.loads(out.strip().splitlines()[-1])
    commits = [after - before for after, before in zip(commits_after, commits_before, strict=True)]
    ack = figures["ack_ms"]
    report(
        store,
        servers,
        args,
        figures["senders"],
        figures["sends"],
        figures["sends_per_s"],
        {key: ack[key] or 0.0 for key in ("p50", "p99", "max")},
        figures["errors"],
        commits,
        cpu,
    )


def report(
    store: str,
    servers: list[ServerProcess],
    args: argparse.Namespace,
    senders: int,
    sends: int,
    per_second: float,
    ms: dict[str, float],
    errors: dict[str, int],
    commits: list[float],
    cpu: dict[str, float],
) -> None:
    """One row of the table (and the errors by code, if any), for either kind of senders."""
    TABLE.row(
        store,
        len(servers),
        args.rooms,
        senders,
        sends,
        per_second,
        ms["p50"],
        ms["p99"],
        ms["max"],
        sum(errors.values()),
        commits[1] / commits[0] if commits[0] else "",
        cpu.get("server", float("nan")),
        cpu.get("clients", float("nan")),
        cpu.get("other", float("nan")),
    )
    if errors:
        print(f"  errors by code: {dict(errors)}", flush=True)


async def run_case(
    servers: list[ServerProcess], store: str, senders: int, args: argparse.Namespace
) -> None:
    urls = [server.url for server in servers]
    tag = uuid.uuid4().hex[:8]
    targets = [
        (
            urls[i % len(urls)],
            f"sender-{i}",
            f"tp-{tag}-{i}" if args.rooms == "own" else f"tp-{tag}",
        )
        for i in range(senders)
    ]
    joined = await connect_and_join(targets)
    print_failures("senders failed to connect or join", joined.failures)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    meter = CpuMeter(
        {
            "server": [s.proc.pid for s in servers],
            "clients": [multiprocessing.current_process().pid],
        }
    )

    async def send_loop(index: int, sio, stop_at: float) -> None:
        room = targets[index][2]
        for n in range(args.max_sends):
            if time.monotonic() >= stop_at:
                return
            text = padded(f"{n} from sender {index} ", args.text_size)
            seconds, error = await timed_send(sio, room, text, f"s{index}-{n}")
            if error:
                errors[error] += 1
            else:
                latencies.append(seconds)

    commits_before = writer_commits(servers)
    try:
        meter.start()
        began = time.monotonic()
        stop_at = began + args.duration
        await asyncio.gather(
            *(
                send_loop(i, sio, stop_at)
                for i, sio in zip(joined.indexes, joined.clients, strict=True)
            )
        )
        elapsed = time.monotonic() - began
        cpu = meter.stop()
        commits = [
            after - before
            for after, before in zip(writer_commits(servers), commits_before, strict=True)
        ]
    finally:
        await disconnect_all(joined.clients)

    report(
        store,
        servers,
        args,
        len(joined.clients),
        len(latencies),
        len(latencies) / elapsed,
        latency_ms(latencies),
        errors,
        commits,
        cpu,
    )


async def run(args: argparse.Namespace) -> None:
    print(describe_machine(args.quiet_wait))
    print(
        f"{args.duration:g} s per case; text {args.text_size} chars; senders: "
        + ("bench/node/sender.js" if args.client == "node" else "python-socketio, this process")
        + "; CPU in % of one core: srv servers, cli senders, oth other programs"
    )
    TABLE.header()
    for store in args.stores:
        for instances in args.instances:
            with running_servers(instances, store, args.redis_url) as servers:
                for senders in args.senders:
                    if args.client == "node":
                        run_node_case(servers, store, senders, args)
                    else:
                        await run_case(servers, store, senders, args)


def number_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give positive numbers separated by commas")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stores",
        type=lambda text: [s for s in text.split(",") if s],
        default=["sqlite", "memory"],
        help="comma-separated: sqlite, memory",
    )
    parser.add_argument("--instances", type=number_list, default=[1], help="e.g. 1,2")
    parser.add_argument("--senders", type=number_list, default=[1, 8, 32], help="e.g. 1,8,32")
    parser.add_argument("--rooms", choices=["own", "shared"], default="own")
    parser.add_argument(
        "--client",
        choices=["python", "node"],
        default="python",
        help="senders: python-socketio in this process, or bench/node/sender.js",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per case")
    parser.add_argument("--max-sends", type=int, default=100_000, help="per sender and case")
    add_common_arguments(parser)
    args = parser.parse_args()
    unknown = set(args.stores) - {"sqlite", "memory"}
    if unknown:
        parser.error(f"unknown store(s): {', '.join(sorted(unknown))}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
