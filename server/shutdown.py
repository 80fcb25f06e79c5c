"""Graceful drain on SIGTERM (contract §9).

1. ``/api/health`` answers 503 ``draining`` and new Engine.IO handshakes get 503, so the
   load balancer and reconnecting clients go elsewhere.
2. Handlers already running finish and send their acks.
3. Every client transport is closed (the websocket itself, not only an Engine.IO CLOSE
   packet) after its queued packets, so socket.io-client reconnects by itself, through
   the load balancer.
4. Then the server's own shutdown proceeds; all of it within ``SHUTDOWN_TIMEOUT``.

Users see no presence change: their connections return elsewhere inside the grace period.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from .chat import ChatServer

log = structlog.get_logger(__name__)


class Drainer:
    def __init__(self, chat: ChatServer) -> None:
        self.chat = chat
        self._previous: Any = None
        self._task: asyncio.Task | None = None

    def install(self) -> None:
        """Take SIGTERM; the previous handler (the ASGI server's) runs once the drain is done."""
        try:
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:  # not the main thread (e.g. embedded in tests): no signal handling
            self._previous = None
        self._loop = asyncio.get_running_loop()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._task is not None:  # a second SIGTERM: stop waiting
            self._forward(signum, frame)
            return
        self._task = self._loop.create_task(self._drain_then_exit(signum, frame))

    def _forward(self, signum: int, frame: Any) -> None:
        if callable(self._previous):
            self._previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signum)

    async def _drain_then_exit(self, signum: int, frame: Any) -> None:
        try:
            await asyncio.wait_for(self.drain(), max(1.0, self.chat.settings.SHUTDOWN_TIMEOUT - 3))
        except TimeoutError:
            log.warning("shutdown.drain_timeout", in_flight=self.chat.gateway.in_flight)
        except Exception:
            log.exception("shutdown.drain_failed")
        self._forward(signum, frame)

    async def drain(self) -> None:
        gateway = self.chat.gateway
        started = time.monotonic()
        gateway.draining = True
        count = len(gateway.connections)
        log.info("shutdown.draining", connections=count)
        acks_deadline = started + self.chat.settings.SHUTDOWN_TIMEOUT / 2
        while gateway.in_flight > 0 and time.monotonic() < acks_deadline:
            await asyncio.sleep(0.02)
        await gateway.close_all_transports()
        log.info(
            "shutdown.drained", connections=count, seconds=round(time.monotonic() - started, 3)
        )
