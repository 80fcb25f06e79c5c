"""Graceful drain on SIGTERM (contract §9).

1. ``/api/health`` answers 503 ``draining`` and new Engine.IO handshakes get 503, so the
   load balancer and reconnecting clients go elsewhere.
2. Handlers already running finish and send their acks.
3. Every client transport is closed (the websocket itself, not only an Engine.IO CLOSE
   packet: socket.io-client reacts only when the socket closes) after its queued packets,
   so socket.io-client reconnects by itself, through the load balancer.
4. Then the server's own shutdown proceeds; all of it within ``shutdown_timeout``.

Users see no presence change: their connections return elsewhere inside the grace period.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import socketio
import structlog

from server.core.state import InstanceState
from server.transport.channels import NAMESPACE
from server.transport.connections import ConnectionRegistry

log = structlog.get_logger(__name__)


class Drainer:
    """Takes SIGTERM, drains, then hands the signal to the ASGI server's own handler."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        registry: ConnectionRegistry,
        state: InstanceState,
        shutdown_timeout: float,
    ) -> None:
        self.sio = sio
        self.registry = registry
        self.state = state
        self.shutdown_timeout = shutdown_timeout
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
            await asyncio.wait_for(self.drain(), max(1.0, self.shutdown_timeout - 3))
        except TimeoutError:
            log.warning("shutdown.drain_timeout", in_flight=self.state.in_flight)
        except Exception:
            log.exception("shutdown.drain_failed")
        self._forward(signum, frame)

    async def drain(self) -> None:
        started = time.monotonic()
        self.state.draining = True
        count = len(self.registry)
        log.info("shutdown.draining", connections=count)
        acks_deadline = started + self.shutdown_timeout / 2
        while self.state.in_flight > 0 and time.monotonic() < acks_deadline:
            await asyncio.sleep(0.02)
        await self.close_all_transports()
        log.info(
            "shutdown.drained", connections=count, seconds=round(time.monotonic() - started, 3)
        )

    async def close_all_transports(self) -> None:
        """Close every client's transport so that it reconnects (elsewhere) by itself."""
        eio = self.sio.eio
        for sid in self.registry.sids():
            eio_sid = self.sio.manager.eio_sid_from_sid(sid, NAMESPACE)
            socket = eio.sockets.get(eio_sid) if eio_sid else None
            if socket is None:
                continue
            try:
                await socket.close(wait=False, reason="server shutting down")
                if socket.upgraded:  # end the websocket writer: it closes the websocket itself
                    await socket.queue.put(None)
            except Exception as exc:
                log.warning("shutdown.close_failed", sid=sid, error=str(exc))


class RefuseWhileDraining:
    """ASGI middleware: while draining, new Engine.IO handshakes get 503 (websocket: 1013)."""

    def __init__(self, app: Any, state: InstanceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if (
            self.state.draining
            and scope["type"] in ("http", "websocket")
            and scope["path"].startswith("/socket.io")
            and b"sid=" not in scope.get("query_string", b"")
        ):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"1")],
                }
            )
            await send({"type": "http.response.body", "body": b"draining"})
            return
        await self.app(scope, receive, send)
