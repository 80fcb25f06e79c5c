"""Sustained sends per second to ONE room on the Firestore store's two seq paths, and the
writes each document path takes per second.

    .venv/bin/python -m bench.firestore_seq [--duration 5] [--senders 1,8,32] [--instances 2]

(a) ``group``: ``add_message(draft)``; the store allocates seqs itself and writes a room's
    queued sends in one commit (the path without Redis, where there is one process: this
    case always uses one store object).
(b) ``explicit``: ``add_message(draft, seq=n)`` with ``n`` from a shared counter, the way a
    Redis INCR allocator hands them out, over ``--instances`` store objects (one gRPC
    channel each, like separate server instances).

Each sender sends one message at a time for ``--duration`` seconds. Every commit is seen
by a counting gRPC interceptor (tests/support/firestore_counter.py): ``hot/s`` is the most
writes any single document path took within one second, ``room doc`` the writes to
``rooms/{room}`` itself. Runs against a Firestore emulator started here unless
``--emulator-host`` is given. The emulator has no per-document write limit, no
transaction isolation and is one Node process on this machine: sends/s compare the paths
here, they are not production throughput; the write counts per document are what
production would see. Prints figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import statistics
import time
import uuid

from server.core.models import MessageDraft
from server.store.firestore import FirestoreStore
from tests.support.firestore_counter import FirestoreCounter
from tests.support.firestore_emulator import FirestoreEmulator


async def run_case(
    host: str, path: str, senders: int, instances: int, duration: float
) -> dict[str, float | int | str]:
    counter = FirestoreCounter()
    instances = 1 if path == "group" else instances
    stores = [
        FirestoreStore(
            project="chat-bench",
            emulator_host=host,
            timeout=10.0,
            interceptors=counter.interceptors,
        )
        for _ in range(instances)
    ]
    for store in stores:
        await store.start()
    room = f"bench-{path}-{senders}-{uuid.uuid4().hex[:8]}"
    allocator = itertools.count(1)  # stands in for INCR chat:room:{room}:seq
    latencies: list[float] = []
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration

    async def sender(index: int) -> None:
        store = stores[index % instances]
        for n in itertools.count():
            if loop.time() >= stop_at:
                return
            draft = MessageDraft(
                room=room,
                sender_id=f"u{index}",
                sender_name=f"User {index}",
                text=f"message {n} from sender {index}",
                client_id=f"c{index}-{n}",
            )
            started = time.perf_counter()
            try:
                if path == "group":
                    await store.add_message(draft)
                else:
                    await store.add_message(draft, seq=next(allocator))
            except Exception as exc:  # a figure, not a failure: count and go on
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(senders)))
    elapsed = time.perf_counter() - began
    last = await stores[0].last_seq(room)
    stored = len(await stores[0].messages_after(room, 0, len(latencies) + 10))
    for store in stores:
        await store.close()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    room_doc = sum(n for p, n in counter.writes_by_path.items() if p.endswith(f"/rooms/{room}"))
    hot = max(counter.writes_by_path_second.values(), default=0)
    return {
        "path": path,
        "senders": senders,
        "instances": instances,
        "sends": len(latencies),
        "per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(ms) if ms else float("nan"),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else float("nan"),
        "errors": len(errors),
        "last_seq": last,
        "stored": stored,
        "commits": counter.calls["Commit"],
        "hot": hot,
        "room_doc": room_doc,
        "first_error": errors[0] if errors else "",
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per case")
    parser.add_argument("--senders", default="1,8,32", help="comma-separated sender counts")
    parser.add_argument("--instances", type=int, default=2, help="store objects (channels)")
    parser.add_argument("--paths", default="group,explicit", help="group, explicit or both")
    parser.add_argument("--emulator-host", default="", help="use a running emulator")
    args = parser.parse_args()
    sender_counts = [int(x) for x in args.senders.split(",") if x]
    paths = [p for p in args.paths.split(",") if p]

    emulator = None
    host = args.emulator_host
    if not host:
        emulator = FirestoreEmulator.launch()
        host = emulator.host
    print(
        f"firestore emulator at {host}; python {platform.python_version()}; {args.duration}s per case"
    )
    header = (
        f"{'path':<9} {'senders':>7} {'inst':>4} {'sends':>7} {'sends/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'last_seq':>8} {'stored':>7} "
        f"{'commits':>7} {'hot/s':>5} {'room doc':>8}"
    )
    print(header)
    print("-" * len(header))
    try:
        for path in paths:
            for senders in sender_counts:
                r = await run_case(host, path, senders, args.instances, args.duration)
                print(
                    f"{r['path']:<9} {r['senders']:>7} {r['instances']:>4} {r['sends']:>7} "
                    f"{r['per_s']:>9.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                    f"{r['errors']:>6} {r['last_seq']:>8} {r['stored']:>7} "
                    f"{r['commits']:>7} {r['hot']:>5} {r['room_doc']:>8}",
                    flush=True,
                )
                if r["first_error"]:
                    print(f"          first error: {r['first_error']}")
    finally:
        if emulator is not None:
            emulator.close()


if __name__ == "__main__":
    asyncio.run(main())
