"""CPU per send of the service path alone, in process: no socket, no client; prints figures.

    .venv/bin/python -m bench.send_path --stores memory,sqlite --sends 40000 --concurrency 32

Builds one instance exactly as ``uvicorn server.main:app`` does (``server.node.Node``, the
testing environment, no Redis), opens ``--concurrency`` public rooms and sends from that
many concurrent callers through ``MessageService.send``: validation, sanction and
membership checks, the store, the views, the room broadcast and ``room:activity``, metrics.
What the websocket, Engine.IO and Socket.IO layers add on top is what
``bench.send_throughput`` measures with real clients. Figures: sends per second (wall
clock), CPU per send of the whole process and of the event loop's thread alone (the
difference is SQLite's writer thread).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

from server.config import load_settings
from server.core.models import Identity
from server.node import Node
from server.services.payloads import SendMessage


async def run_store(store: str, sends: int, concurrency: int, folder: Path) -> None:
    settings = load_settings(STORE=store, SQLITE_PATH=str(folder / f"{store}.db"))
    node = Node(settings)
    await node.start()
    try:
        who = Identity("bench-sender", "Bench", expires_at=time.time() + 3600)
        tag = uuid.uuid4().hex[:8]
        rooms = [f"sp-{tag}-{i}" for i in range(concurrency)]
        for room in rooms:
            await node.rooms.open_for_join(who, room)

        async def caller(index: int, count: int, phase: str) -> None:
            for n in range(count):
                await node.messages.send(
                    who,
                    f"sid-{index}",
                    SendMessage(
                        room=rooms[index],
                        text=f"{n} from {index} " + "x" * 48,
                        client_id=f"{phase}-{index}-{n}",
                    ),
                )

        await asyncio.gather(*(caller(i, 100, "warm") for i in range(concurrency)))
        each = max(1, sends // concurrency)
        wall, cpu, loop = time.perf_counter(), time.process_time(), time.thread_time()
        await asyncio.gather(*(caller(i, each, "run") for i in range(concurrency)))
        wall = time.perf_counter() - wall
        cpu, loop = time.process_time() - cpu, time.thread_time() - loop
        done = each * concurrency
        print(
            f"{store:>6} {done:>7} {done / wall:>9.0f} {1e6 * cpu / done:>9.1f} "
            f"{1e6 * loop / done:>9.1f}",
            flush=True,
        )
    finally:
        await node.stop()


async def run(args: argparse.Namespace) -> None:
    print(f"{args.concurrency} concurrent callers, each in a room of its own")
    print(" store   sends   sends/s   cpu µs    loop µs")
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
        for store in args.stores:
            await run_store(store, args.sends, args.concurrency, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stores", type=lambda t: [s for s in t.split(",") if s], default=["memory", "sqlite"]
    )
    parser.add_argument("--sends", type=int, default=40_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("CHAT_ENV", "testing")
    os.environ.setdefault("LOG_LEVEL", "warning")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
