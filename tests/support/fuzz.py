"""A seeded packet fuzzer for Engine.IO / Socket.IO servers: raw websocket and polling.

``Fuzzer(url, seed, token_for).run(total)`` throws ``total`` packets: random text, random
bytes, and mutations (flipped, inserted, truncated, spliced, repeated characters) of valid
Engine.IO and Socket.IO packets of this server's protocol, half over raw websockets and
half over HTTP long-polling, half of the sessions authenticated on ``/chat`` first. The
same seed throws the same packets in the same sessions, whatever the server answers
(every random choice is drawn before the packets it shapes are sent); only the tokens
differ between runs, since they carry the current time.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

EVENTS = [
    "room:join",
    "room:leave",
    "room:create",
    "room:members",
    "room:members:add",
    "room:members:remove",
    "message:send",
    "message:history",
    "message:read",
    "typing",
    "presence:subscribe",
    "presence:unsubscribe",
    "auth:refresh",
    "connect",
    "disconnect",
    "__proto__",
]
NAMESPACES = ["/chat", "/", "/admin", "", "/chat/../", "/" + "x" * 300]


@dataclass
class Tally:
    sent: int = 0
    websocket: int = 0
    polling: int = 0
    sessions: int = 0
    authenticated_sessions: int = 0
    closed_by_server: int = 0
    http_status: dict[int, int] = field(default_factory=dict)


class Packets:
    """Valid-looking packets and their mutations, all from one ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def value(self, depth: int = 0):
        r = self.rng.random()
        if depth > 3 or r < 0.3:
            return self.rng.choice(
                [
                    "",
                    "general",
                    "a" * self.rng.randint(0, 3000),
                    "dm:a:b",
                    "alice\n",
                    "\u202eevil",
                    "zero\u200bwidth",
                    -1,
                    0,
                    2**63,
                    1.5e308,
                    True,
                    None,
                    "é" * 50,
                ]
            )
        if r < 0.6:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 5))]
        keys = ["room", "text", "client_id", "users", "since", "seq", "typing", "token", "x"]
        return {self.rng.choice(keys): self.value(depth + 1) for _ in range(self.rng.randint(0, 6))}

    def valid(self, token: str) -> str:
        ns = self.rng.choice(NAMESPACES)
        prefix = f"{ns}," if ns not in ("", "/") else ""
        event = self.rng.choice(EVENTS)
        ack = str(self.rng.randint(0, 10**6)) if self.rng.random() < 0.5 else ""
        body = json.dumps([event, self.value()])
        return self.rng.choice(
            [
                "2",
                "3",
                "3probe",
                "5",
                "6",
                "1",
                "4",
                "40",
                f"40{prefix}" + json.dumps({"token": token}),
                f"40{prefix}" + json.dumps({"token": self.value()}),
                f"41{prefix}",
                f"42{prefix}{ack}{body}",
                f"43{prefix}{ack}{body}",
                f"44{prefix}" + json.dumps({"message": "x"}),
                f"45{self.rng.randint(0, 3)}-{prefix}{ack}{body}",
                f"46{self.rng.randint(0, 3)}-{prefix}{ack}{body}",
                f'42{prefix}["message:send",{{"room":"general","text":"hi","client_id":"c"}}]',
            ]
        )

    def mutate(self, packet: str) -> str:
        chars = list(packet)
        for _ in range(self.rng.randint(1, 4)):
            op = self.rng.randrange(5)
            at = self.rng.randrange(len(chars) + 1)
            if op == 0 and chars:
                chars[min(at, len(chars) - 1)] = chr(self.rng.randrange(0, 0x3000))
            elif op == 1:
                chars.insert(at, self.rng.choice('[]{}",:-/0123456789\x00\x1e\\'))
            elif op == 2:
                chars = chars[:at]
            elif op == 3:
                chars = chars + chars[at:]
            else:
                chars.insert(at, self.rng.choice(["null", "[", "{", '"', "\ud800", "9" * 40]))
        return "".join(chars)

    def random_text(self) -> str:
        size = self.rng.choice([0, 1, 2, 5, 50, 500, 5000])
        alphabet = string.printable + "\u0000\u202e\u200b\ufffd\x1e"
        return "".join(self.rng.choice(alphabet) for _ in range(size))

    def one(self, token: str) -> str | bytes:
        r = self.rng.random()
        if r < 0.55:
            return self.mutate(self.valid(token))
        if r < 0.8:
            return self.valid(token)
        if r < 0.95:
            return self.random_text()
        return self.rng.randbytes(self.rng.choice([1, 10, 300]))


class Fuzzer:
    def __init__(
        self, url: str, seed: int, token_for: Callable[[str], str], concurrency: int = 4
    ) -> None:
        self.url = url.rstrip("/")
        self.seed = seed
        self.token_for = token_for
        self.concurrency = concurrency
        self.tally = Tally()

    async def run(self, total: int) -> Tally:
        share = total // self.concurrency
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await asyncio.gather(
                *(
                    self._worker(http, random.Random(f"{self.seed}-{n}"), share, n)
                    for n in range(self.concurrency)
                )
            )
        return self.tally

    async def _worker(
        self, http: aiohttp.ClientSession, rng: random.Random, share: int, n: int
    ) -> None:
        packets = Packets(rng)
        done = 0
        session = 0
        while done < share:
            session += 1
            authenticated = rng.random() < 0.5
            token = self.token_for(f"fuzz-{self.seed}-{n}-{session}")
            burst = min(share - done, rng.randint(20, 400))
            batch = [packets.one(token) for _ in range(burst)]
            self.tally.sessions += 1
            self.tally.authenticated_sessions += authenticated
            if rng.random() < 0.5:
                await self._websocket(http, batch, token if authenticated else None)
                self.tally.websocket += burst
            else:
                await self._polling(http, rng, batch, token if authenticated else None)
                self.tally.polling += burst
            done += burst
            self.tally.sent += burst

    async def _websocket(self, http: aiohttp.ClientSession, batch: list, token: str | None) -> None:
        url = self.url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket"
        try:
            async with http.ws_connect(url, max_msg_size=0, heartbeat=None) as ws:
                await ws.receive(timeout=10)  # the open packet
                if token:
                    await ws.send_str("40/chat," + json.dumps({"token": token}))
                for packet in batch:
                    if ws.closed:
                        self.tally.closed_by_server += 1
                        break
                    if isinstance(packet, bytes):
                        await ws.send_bytes(packet)
                    else:  # a text frame, lone surrogates (invalid UTF-8) included
                        data = packet.encode("utf-8", "surrogatepass")
                        await ws.send_frame(data, aiohttp.WSMsgType.TEXT)
                await asyncio.sleep(0)
        except (TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
            self.tally.closed_by_server += 1

    async def _polling(
        self, http: aiohttp.ClientSession, rng: random.Random, batch: list, token: str | None
    ) -> None:
        base = self.url + "/socket.io/?EIO=4&transport=polling"
        # How the batch is cut into bodies is drawn before anything is sent, so what the
        # server answers never changes what the generator draws next.
        cuts: list[int] = []
        while sum(cuts) < len(batch):
            cuts.append(rng.randint(1, 20))
        try:
            async with http.get(base) as response:
                text = await response.text()
            if not text.startswith("0"):
                self._status(response.status)
                return
            sid = json.loads(text[1:])["sid"]
            url = f"{base}&sid={sid}"
            if token:
                async with http.post(url, data="40/chat," + json.dumps({"token": token})) as r:
                    self._status(r.status)
            for cut in cuts:
                take, batch = batch[:cut], batch[cut:]
                body = "\x1e".join(p.decode("latin-1") if isinstance(p, bytes) else p for p in take)
                async with http.post(url, data=body.encode("utf-8", "surrogatepass")) as r:
                    self._status(r.status)
                    if r.status != 200:
                        self.tally.closed_by_server += 1
                        return
        except (TimeoutError, aiohttp.ClientError, ConnectionError, ValueError, KeyError):
            self.tally.closed_by_server += 1

    def _status(self, status: int) -> None:
        self.tally.http_status[status] = self.tally.http_status.get(status, 0) + 1
