"""The SQLite store alone, in this process: sends per second and CPU per send; figures only.

    .venv/bin/python -m bench.sqlite_store --concurrency 1,8,32 --sends 20000

No server and no network: ``--concurrency`` tasks each check their room (``get_room``, as
every send does) and add a message to it (``add_message``), one after the other, until
``--sends`` are stored, on a database in a temporary folder. CPU is the process's (the
event loop and the store's two threads together), per stored send.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.send_throughput import number_list
from server.core.models import MessageDraft, Room
from server.store.sqlite import SQLiteStore


async def run_case(concurrency: int, total: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
        store = SQLiteStore(Path(tmp) / "chat.db")
        await store.start()
        try:
            for index in range(concurrency):
                await store.create_room(Room(f"room-{index}", "public", "bench"), [f"u{index}"])
            done = 0

            async def sender(index: int) -> None:
                nonlocal done
                sent = 0
                while done < total:
                    done += 1
                    sent += 1
                    room = f"room-{index}"
                    await store.get_room(room)
                    draft = MessageDraft(room, f"u{index}", "U", "hello there", f"c{index}-{sent}")
                    await store.add_message(draft)

            began, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(sender(index) for index in range(concurrency)))
            wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        finally:
            await store.close()
    print(
        f"{concurrency:11d} {done:7d} {done / wall:9.0f} {1e6 * cpu / done:11.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=number_list, default=[1, 8, 32])
    parser.add_argument("--sends", type=int, default=20_000)
    args = parser.parse_args()
    print("concurrency   sends   sends/s  CPU us/send")
    for concurrency in args.concurrency:
        asyncio.run(run_case(concurrency, args.sends))


if __name__ == "__main__":
    main()
