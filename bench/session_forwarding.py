"""What serving a session from another process costs (no sticky sessions).

    .venv/bin/python -m bench.session_forwarding [--requests 300]

Starts a private ``redis-server`` and two instances (memory store). Opens one Engine.IO
polling session on instance A, then times ``--requests`` polling POSTs (a PONG packet,
answered ``ok``) sent straight to A, then the same number sent to B, which forwards them
through Redis to A. Also times the check every Socket.IO request goes through
(``SessionRouter``'s look for a ``sid`` and its route tag), on a websocket-only handshake
query (no ``sid``) and on a polling query of a local session. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import timeit

import httpx

from server.transport.sessions import _sid_in, route_of
from tests.support.redis_servers import RedisServer
from tests.support.servers import ServerProcess, key_prefix


def _times(client: httpx.Client, url: str, requests: int) -> list[float]:
    out = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.post(url, content=b"3", headers={"content-type": "text/plain"})
        out.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200 and response.text.lower() == "ok", response.text
    return out


def _summary(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p90_ms": round(samples[int(len(samples) * 0.9)], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    redis = RedisServer().start()
    env = {"REDIS_URL": redis.url, "REDIS_KEY_PREFIX": key_prefix(), "STORE": "memory"}
    a = ServerProcess({**env, "INSTANCE_ID": "bench-a"}).start(timeout=120)
    b = ServerProcess({**env, "INSTANCE_ID": "bench-b"}).start(timeout=120)
    try:
        with httpx.Client(timeout=30) as client:
            opened = client.get(f"{a.url}/socket.io/?EIO=4&transport=polling").text
            sid = json.loads(opened[1:])["sid"]
            path = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
            _times(client, a.url + path, 20)  # warm up both paths
            _times(client, b.url + path, 20)
            direct = _times(client, a.url + path, args.requests)
            forwarded = _times(client, b.url + path, args.requests)
        ws_query = b"EIO=4&transport=websocket"
        local_query = f"EIO=4&transport=polling&sid={sid}".encode()
        check = {}
        for name, query in (("websocket_handshake", ws_query), ("polling_local", local_query)):
            runs = 200_000
            seconds = timeit.timeit(lambda q=query: route_of(_sid_in(q)), number=runs)
            check[name] = round(seconds / runs * 1e9, 1)
        print(
            json.dumps(
                {
                    "requests": args.requests,
                    "polling_post_direct": _summary(direct),
                    "polling_post_forwarded": _summary(forwarded),
                    "router_check_ns": check,
                }
            )
        )
    finally:
        a.stop()
        b.stop()
        redis.stop()


if __name__ == "__main__":
    main()
