"""A real local HTTP receiver for webhook tests: records every request it answers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Received:
    event: dict
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Listens on ``port`` once started; ``status`` and ``delay`` shape its answers."""

    port: int
    status: int = 200
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        record = Received(json.loads(body), dict(request.headers), body)
        if self.delay:
            self.received.append(record)  # seen, though its answer is still to come
            self.arrived.set()
            await asyncio.sleep(self.delay)
            return web.Response(status=self.status)
        if 200 <= self.status < 300:
            self.received.append(record)
            self.arrived.set()
        return web.Response(status=self.status)

    async def wait_until(self, predicate, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self.received):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                kinds = [(r.event["type"], r.event["data"].get("room")) for r in self.received]
                raise TimeoutError(f"webhook receiver: condition not met; got {kinds}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass


def signature_valid(secret: str, record: Received) -> bool:
    parts = dict(part.split("=", 1) for part in record.headers["Chat-Signature"].split(","))
    expected = hmac.new(
        secret.encode(), f"{parts['t']}.".encode() + record.body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])
