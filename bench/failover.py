"""Failover: how long N clients take to come back after their instance is SIGKILLed.

    .venv/bin/python -m bench.failover --clients 5000

Starts a private ``redis-server`` and two instances of this server (SQLite, the production
heartbeat of 25 s and grace period of 60 s unless ``--ours-env`` says otherwise), connects
``--clients`` sockets to the first with ``bench/node/failover.js``, then kills that instance
with SIGKILL. Each socket that drops reconnects to the second instance after a random
delay below 1 s. An observer on the second instance follows the presence of 500 of those
users throughout. Prints one JSON line: seconds from the first drop until every socket is
back (and percentiles), and the presence events the observer saw until ``--watch`` seconds
later (default: three heartbeats, the detection of the dead instance, plus the grace period
plus 15 s). With no flap there is none.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

from bench.side_by_side import NODE_DIR, SECRET, cluster, log, wait_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--observe", type=int, default=500)
    parser.add_argument(
        "--watch", type=float, default=0, help="seconds; 0: 3 heartbeats + grace + 15"
    )
    parser.add_argument("--ours-env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = {"WS_HEARTBEAT_INTERVAL": "25", "WS_GRACE_PERIOD": "60"}
    settings |= dict(item.split("=", 1) for item in args.ours_env)
    watch = args.watch or (
        3 * float(settings["WS_HEARTBEAT_INTERVAL"]) + float(settings["WS_GRACE_PERIOD"]) + 15
    )
    with cluster() as run:
        run.ours_env = settings
        doomed, survivor = run.start_ours("py-doomed"), run.start_ours("py-survivor")
        wait_all([doomed, survivor])
        command = [
            "node",
            str(NODE_DIR / "failover.js"),
            "--url",
            doomed.url,
            "--fallback",
            survivor.url,
            "--clients",
            str(args.clients),
            "--observe",
            str(args.observe),
            "--secret",
            SECRET,
            "--watch",
            str(watch),
        ]
        log(f"{args.clients} clients on {doomed.url}; watching presence for {watch:g} s after")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed_at: list[float] = []

        def follow() -> None:
            for line in proc.stderr:
                if line.startswith("phase ready"):
                    log("all connected; SIGKILL to the first instance")
                    doomed.kill()
                    killed_at.append(time.monotonic())
                elif line.startswith("phase back"):
                    log(f"all back {time.monotonic() - killed_at[0]:.1f} s after the kill")
                else:
                    sys.stderr.write(line)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        out = proc.stdout.read()
        proc.wait(60)
        follower.join(5)
        if proc.returncode != 0 or not out.strip():
            raise SystemExit(f"failover.js failed with {proc.returncode}")
        row = json.loads(out.strip().splitlines()[-1])
        row["settings"] = settings
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
