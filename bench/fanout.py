"""Fan-out of one room: one sender, N receivers, M messages; prints figures only.

    .venv/bin/python -m bench.fanout --instances 1 --receivers 200 --messages 200
    .venv/bin/python -m bench.fanout --instances 2 --receivers 1000 --messages 100 --rate 20

Starts ``--instances`` server processes (two or more share the local Redis under a fresh key
prefix), then ``--client-procs`` receiver processes that connect the receivers over websocket
(spread round-robin over the instances) and join one room. The sender, in this process and
connected to the first instance, sends M messages: with ``--rate 0`` each send waits for the
previous ack; otherwise at that many messages per second whatever the acks do.

Each message carries its number and its send time (CLOCK_MONOTONIC, shared by all processes
of this machine), so a receiver measures send→delivery itself. Figures: send→ack latency,
send→delivery latency over every delivery, deliveries per second (from the first send to the
last delivery), how many receivers got every acked message, and the CPU each side used. All
processes share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import time
import uuid
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.common import (
    BenchError,
    CpuMeter,
    Table,
    add_common_arguments,
    call_ok,
    connect_and_join,
    connect_client,
    describe_machine,
    disconnect_all,
    latency_ms,
    padded,
    print_failures,
    running_servers,
    timed_send,
)

# --- receiver process -----------------------------------------------------------------------


class Deliveries:
    """What the receivers of one process got: a bitmap per receiver and every latency."""

    def __init__(self, receivers: int, messages: int) -> None:
        self.got = [bytearray(messages) for _ in range(receivers)]
        self.latencies = array("d")
        self.duplicates = 0
        self.last = 0.0
        self.expected = float("inf")
        self.complete = asyncio.Event()

    def handlers_for(self, index: int) -> dict[str, Any]:
        seen = self.got[index]

        async def on_message(data: dict) -> None:
            now = time.monotonic()
            number, sent, _ = data["text"].split(" ", 2)
            n = int(number)
            if seen[n]:
                self.duplicates += 1
                return
            seen[n] = 1
            self.latencies.append(now - float(sent))
            self.last = now
            if len(self.latencies) >= self.expected:
                self.complete.set()

        return {"message:new": on_message}

    def summary(self, connected: list[int], acked: list[int]) -> dict[str, Any]:
        missing = [sum(1 for n in acked if not self.got[i][n]) for i in connected]
        return {
            "latencies": self.latencies.tobytes(),
            "duplicates": self.duplicates,
            "last": self.last,
            "complete": sum(1 for m in missing if m == 0),
            "missing": sum(missing),
        }


async def _receive(
    conn: multiprocessing.connection.Connection,
    targets: list[tuple[str, str, str]],
    messages: int,
    concurrency: int,
    wait_limit: float,
) -> None:
    deliveries = Deliveries(len(targets), messages)
    joined = await connect_and_join(targets, deliveries.handlers_for, concurrency)
    try:
        conn.send(
            (
                "ready",
                {
                    "connected": len(joined.clients),
                    "failures": joined.failures,
                    "seconds": joined.seconds,
                },
            )
        )
        if not await asyncio.to_thread(conn.poll, wait_limit):
            return  # the sender never finished: leave without a result
        try:
            kind, payload = conn.recv()
        except EOFError:
            return  # the parent stopped early
        if kind != "drain":
            return
        acked: list[int] = payload["acked"]
        deliveries.expected = len(acked) * len(joined.clients)
        if len(deliveries.latencies) >= deliveries.expected:
            deliveries.complete.set()
        try:
            await asyncio.wait_for(deliveries.complete.wait(), payload["seconds"])
        except TimeoutError:
            pass  # reported as missing deliveries
        conn.send(("result", deliveries.summary(joined.indexes, acked)))
    finally:
        await disconnect_all(joined.clients)


def receiver_process(
    conn: multiprocessing.connection.Connection,
    targets: list[tuple[str, str, str]],
    messages: int,
    concurrency: int,
    wait_limit: float,
) -> None:
    asyncio.run(_receive(conn, targets, messages, concurrency, wait_limit))


@dataclass
class ReceiverWorker:
    """One receiver process and the parent's end of its pipe."""

    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection

    @classmethod
    def start(cls, targets: list[tuple[str, str, str]], args: argparse.Namespace) -> ReceiverWorker:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        wait_limit = args.max_seconds + args.drain + 60
        process = context.Process(
            target=receiver_process,
            args=(child, targets, args.messages, args.connect_concurrency, wait_limit),
            daemon=True,
        )
        process.start()
        child.close()
        return cls(process, parent)

    async def receive(self, kind: str, timeout: float) -> dict[str, Any]:
        if not await asyncio.to_thread(self.conn.poll, timeout):
            raise BenchError(f"receiver process sent no {kind!r} within {timeout:.0f} s")
        got, payload = self.conn.recv()
        if got != kind:
            raise BenchError(f"receiver process sent {got!r}, expected {kind!r}")
        return payload

    def close(self) -> None:
        self.conn.close()
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


# --- sender ---------------------------------------------------------------------------------


@dataclass
class SendResult:
    first: float
    last_ack: float
    acked: list[int]
    ack_latencies: list[float]
    errors: Counter[str]


async def send_messages(sender, room: str, args: argparse.Namespace) -> SendResult:
    """M sends, paced by ``--rate`` or by the acks, stopping after ``--max-seconds`` anyway."""
    acked: list[int] = []
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    first = time.monotonic()
    stop_at = first + args.max_seconds
    last_ack = first

    async def one(n: int) -> None:
        nonlocal last_ack
        text = padded(f"{n} {time.monotonic():.6f} ", args.text_size)
        seconds, error = await timed_send(sender, room, text, f"m{n}")
        if error:
            errors[error] += 1
            return
        acked.append(n)
        latencies.append(seconds)
        last_ack = max(last_ack, time.monotonic())

    in_flight: list[asyncio.Task] = []
    for n in range(args.messages):
        if args.rate > 0:
            await asyncio.sleep(max(0.0, first + n / args.rate - time.monotonic()))
        if time.monotonic() >= stop_at:
            break
        if args.rate > 0:
            in_flight.append(asyncio.create_task(one(n)))
        else:
            await one(n)
    await asyncio.gather(*in_flight)
    return SendResult(first, last_ack, sorted(acked), latencies, errors)


# --- run ------------------------------------------------------------------------------------

TABLE = Table(
    [
        ("inst", 4, "d"),
        ("store", 6, ""),
        ("recv", 5, "d"),
        ("msgs", 5, "d"),
        ("rate", 5, ""),
        ("acked/s", 7, ".1f"),
        ("ack p50", 7, ".1f"),
        ("ack p99", 7, ".1f"),
        ("dlv p50", 7, ".1f"),
        ("dlv p99", 7, ".1f"),
        ("dlv max", 7, ".1f"),
        ("dlv/s", 7, ".0f"),
        ("complete", 11, ""),
        ("missing", 7, "d"),
        ("dup", 4, "d"),
        ("srv%", 5, ".0f"),
        ("cli%", 5, ".0f"),
        ("oth%", 5, ".0f"),
    ]
)


async def run(args: argparse.Namespace) -> None:
    print(describe_machine(args.quiet_wait))
    print(
        f"receivers in {args.client_procs} process(es), sender in this one; "
        f"text {args.text_size} chars; latencies in ms; CPU in % of one core over the send "
        "window: srv servers, cli receivers + sender, oth other programs"
    )
    with running_servers(args.instances, args.store, args.redis_url) as servers:
        urls = [server.url for server in servers]
        room = f"fanout-{uuid.uuid4().hex[:8]}"
        sender = await connect_client(urls[0], "sender")
        await call_ok(sender, "room:join", {"room": room})
        targets = [(urls[i % len(urls)], f"receiver-{i}", room) for i in range(args.receivers)]
        workers = [
            ReceiverWorker.start(targets[p :: args.client_procs], args)
            for p in range(args.client_procs)
        ]
        try:
            connect_limit = 60 + args.receivers / 10
            ready = [await worker.receive("ready", connect_limit) for worker in workers]
            connected = sum(r["connected"] for r in ready)
            print(
                f"{connected}/{args.receivers} receivers connected and joined in "
                f"{max(r['seconds'] for r in ready):.1f} s",
                flush=True,
            )
            print_failures("receivers failed", [f for r in ready for f in r["failures"]])
            await asyncio.sleep(1.0)  # let connection-time work (presence) settle

            meter = CpuMeter(
                {
                    "server": [s.proc.pid for s in servers],
                    "clients": [w.process.pid for w in workers]
                    + [multiprocessing.current_process().pid],
                }
            )
            meter.start()
            sent = await send_messages(sender, room, args)
            for worker in workers:
                worker.conn.send(("drain", {"seconds": args.drain, "acked": sent.acked}))
            results = [await worker.receive("result", args.drain + 30) for worker in workers]
            cpu = meter.stop()
        finally:
            for worker in workers:
                worker.close()
            await sender.disconnect()

    latencies = array("d")
    for r in results:
        latencies.frombytes(r["latencies"])
    last_delivery = max((r["last"] for r in results), default=0.0)
    delivered = len(latencies)
    ack = latency_ms(sent.ack_latencies)
    dlv = latency_ms(latencies)
    TABLE.header()
    TABLE.row(
        args.instances,
        args.store,
        args.receivers,
        args.messages,
        "acks" if args.rate <= 0 else f"{args.rate:g}",
        len(sent.acked) / max(sent.last_ack - sent.first, 1e-9),
        ack["p50"],
        ack["p99"],
        dlv["p50"],
        dlv["p99"],
        dlv["max"],
        delivered / max(last_delivery - sent.first, 1e-9) if delivered else 0.0,
        f"{sum(r['complete'] for r in results)}/{connected}",
        sum(r["missing"] for r in results),
        sum(r["duplicates"] for r in results),
        cpu["server"],
        cpu["clients"],
        cpu["other"],
    )
    print(
        f"acked {len(sent.acked)}/{args.messages} sends; deliveries {delivered} of "
        f"{len(sent.acked) * connected} expected; send errors {dict(sent.errors) or 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1, help="server processes (2+: Redis)")
    parser.add_argument("--store", default="memory", choices=["memory", "sqlite"])
    parser.add_argument("--receivers", type=int, default=200, help="N clients in the room")
    parser.add_argument("--messages", type=int, default=200, help="M messages to send")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="messages/s; 0: each send waits for the last ack"
    )
    parser.add_argument("--client-procs", type=int, default=1, help="receiver processes")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop sending after this long anyway"
    )
    parser.add_argument(
        "--drain", type=float, default=15.0, help="seconds to wait for deliveries after the sends"
    )
    add_common_arguments(parser)
    args = parser.parse_args()
    if args.receivers < 1 or args.messages < 1 or args.client_procs < 1 or args.instances < 1:
        parser.error("--receivers, --messages, --client-procs and --instances must be >= 1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
