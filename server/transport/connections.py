"""The sockets connected to this instance: admission, token expiry, after-connect, goodbye.

Invariants:
- a socket is in ``ConnectionRegistry`` exactly while its ``/chat`` connection is admitted;
- admission never half-connects: any failure refuses the connection cleanly
  (python-socketio only logs other exceptions and keeps the sid in its rooms);
- presence of a connection is registered before its ``session`` event is sent, and
  undone on disconnect, in that order per socket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import socketio
import structlog

from server.auth import AuthError, TokenVerifier, token_from_connect
from server.core import metrics
from server.core.models import Identity, iso, utcnow
from server.core.ratelimit import TokenBucket, WindowCounter
from server.core.state import InstanceState
from server.services.presence import PresenceService
from server.transport.channels import NAMESPACE, user_channel

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class Connection:
    """What this instance knows about one connected socket."""

    sid: str
    identity: Identity
    ip: str
    bucket: TokenBucket
    joined: set[str] = field(default_factory=set)
    presence: set[str] = field(default_factory=set)
    expiry: asyncio.Task | None = None


class ConnectionRegistry:
    """The admitted sockets of this instance, by sid."""

    def __init__(self) -> None:
        self.by_sid: dict[str, Connection] = {}

    def __len__(self) -> int:
        return len(self.by_sid)

    def get(self, sid: str) -> Connection | None:
        return self.by_sid.get(sid)

    def add(self, conn: Connection) -> None:
        self.by_sid[conn.sid] = conn
        metrics.CONNECTIONS.set(len(self.by_sid))

    def remove(self, sid: str) -> Connection | None:
        conn = self.by_sid.pop(sid, None)
        if conn is not None and conn.expiry is not None:
            conn.expiry.cancel()
        metrics.CONNECTIONS.set(len(self.by_sid))
        return conn

    def sids(self) -> list[str]:
        return list(self.by_sid)


def client_ip(environ: dict, trust_proxy: bool) -> str:
    if trust_proxy:
        forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded:
            return forwarded.split(",")[0].strip()
    client = (environ.get("asgi.scope") or {}).get("client")
    return client[0] if client else environ.get("REMOTE_ADDR", "unknown")


async def quietly(what: str, work: Awaitable[Any]) -> None:
    """Await ``work``; a failure is logged, never raised (the instance keeps serving)."""
    try:
        await work
    except Exception as exc:
        log.warning(
            f"{what}_failed",
            error=str(exc),
            hint="the instance keeps serving; state heals on reconnect",
        )


class Admission:
    """Admits sockets to ``/chat`` and sees them out."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        registry: ConnectionRegistry,
        state: InstanceState,
        verifier: TokenVerifier,
        presence: PresenceService,
        remember_user: Callable[[str, str], Awaitable[Any]],
        *,
        connect_limiter: WindowCounter,
        events_per_second: float,
        events_burst: int,
        trust_proxy_headers: bool,
    ) -> None:
        self.sio = sio
        self.registry = registry
        self.state = state
        self.verifier = verifier
        self.presence = presence
        self.remember_user = remember_user
        self.connect_limiter = connect_limiter
        self.events_per_second = events_per_second
        self.events_burst = events_burst
        self.trust_proxy_headers = trust_proxy_headers

    async def connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        """Authenticate and register; anything unexpected refuses cleanly (never half-connects)."""
        try:
            await self._admit(sid, environ, auth)
        except socketio.exceptions.ConnectionRefusedError:
            raise
        except Exception:
            log.exception("connect.failed", sid=sid)
            self.registry.remove(sid)
            raise socketio.exceptions.ConnectionRefusedError(
                "internal", {"code": "internal"}
            ) from None

    async def _admit(self, sid: str, environ: dict, auth: Any) -> None:
        ip = client_ip(environ, self.trust_proxy_headers)
        if self.state.draining:
            raise socketio.exceptions.ConnectionRefusedError("unavailable", {"code": "draining"})
        try:
            identity = await self.verifier.verify(token_from_connect(auth, environ))
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.code).inc()
            if not self.connect_limiter.hit(ip):
                raise socketio.exceptions.ConnectionRefusedError(
                    "rate_limited", {"code": "rate_limited"}
                ) from None
            log.info("auth.refused", code=exc.code, reason=exc.reason, ip=ip)
            raise socketio.exceptions.ConnectionRefusedError(
                "unauthorized", {"code": exc.code}
            ) from None
        conn = Connection(sid, identity, ip, TokenBucket(self.events_per_second, self.events_burst))
        self.registry.add(conn)
        await self.sio.enter_room(sid, user_channel(identity.user_id), namespace=NAMESPACE)
        self.schedule_expiry(conn)
        self.sio.start_background_task(self._after_connect, conn)

    async def _after_connect(self, conn: Connection) -> None:
        """Work that must not delay or fail the handshake: presence, session event, user record."""
        for _ in range(200):  # the CONNECT packet goes out after the handler returns
            if (
                self.sio.manager.is_connected(conn.sid, NAMESPACE)
                or self.registry.get(conn.sid) is None
            ):
                break
            await asyncio.sleep(0.005)
        if self.registry.get(conn.sid) is None:
            return
        who = conn.identity
        # Presence first, with no await since the check above: a disconnect from here on
        # finds the connection registered and undoes it.
        await quietly("presence.connect", self.presence.connect(who.user_id, conn.sid))
        await self.sio.emit(
            "session",
            {
                "user": {"id": who.user_id, "name": who.name},
                "sid": conn.sid,
                "instance_id": self.state.instance_id,
                "server_time": iso(utcnow()),
            },
            to=conn.sid,
            namespace=NAMESPACE,
            ignore_queue=True,  # a socket of this instance: no need to publish through Redis
        )
        await quietly("store.upsert_user", self.remember_user(who.user_id, who.name))

    async def disconnect(self, sid: str) -> None:
        conn = self.registry.remove(sid)
        if conn is not None:
            await quietly(
                "presence.disconnect", self.presence.disconnect(conn.identity.user_id, sid)
            )

    def schedule_expiry(self, conn: Connection) -> None:
        """Disconnect ``conn`` when its token expires (a refresh reschedules)."""
        if conn.expiry is not None:
            conn.expiry.cancel()
        conn.expiry = asyncio.get_running_loop().create_task(
            self._expire(conn, conn.identity.expires_at)
        )

    async def _expire(self, conn: Connection, expires_at: float) -> None:
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        if self.registry.get(conn.sid) is conn and conn.identity.expires_at <= expires_at:
            log.info("auth.token_expired_disconnect", user=conn.identity.user_id, sid=conn.sid)
            await self.sio.emit(
                "auth:expired",
                {"reason": "token_expired"},
                to=conn.sid,
                namespace=NAMESPACE,
                ignore_queue=True,
            )
            await self.sio.disconnect(conn.sid, namespace=NAMESPACE)
