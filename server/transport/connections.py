"""The sockets connected to this instance: admission, token expiry, after-connect, goodbye.

Invariants:
- a socket is in ``ConnectionRegistry`` exactly while its ``/chat`` connection is admitted;
- admission does the cheap refusals first: draining, then the refused-attempt limiter and
  the per-address cap (before the token is verified, so a flood of bad tokens costs one
  lookup each), then the token, then the per-user cap;
- concurrent connections are capped per client address (this instance; handshakes in
  progress count) and per user (cluster-wide through the presence backend's counts,
  exact on this instance); each refusal carries its own ``err.data.code``;
- admission never half-connects: any failure refuses the connection cleanly
  (python-socketio only logs other exceptions and keeps the sid in its rooms);
- presence of a connection is registered before its ``session`` event is sent, and
  undone on disconnect, in that order per socket;
- with ``member_rooms``, the instance hears (follows) the rooms the user is a member of
  (the first ``max_followed_member_rooms`` by id) before the ``session`` event is sent
  (``room:activity`` reaches the connection from then on), and stops counting the
  connection's interest on disconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import socketio
import structlog

from server.auth import AuthError, TokenVerifier, token_from_connect
from server.core import metrics
from server.core.clientip import ClientAddress, limit_key
from server.core.models import Identity, iso, utcnow
from server.core.ratelimit import TokenBucket
from server.core.refusals import Refusals
from server.core.state import InstanceState
from server.services.moderation import Moderation
from server.services.presence import PresenceService
from server.transport.channels import NAMESPACE, user_channel
from server.transport.interest import RoomInterest

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class Connection:
    """What this instance knows about one connected socket."""

    sid: str
    identity: Identity
    ip: str
    bucket: TokenBucket
    ip_key: str = ""
    joined: set[str] = field(default_factory=set)
    presence: set[str] = field(default_factory=set)
    expiry: asyncio.TimerHandle | None = None  # a timer, not a sleeping task, per socket
    typing: dict[str, asyncio.TimerHandle] = field(default_factory=dict)


class ConnectionRegistry:
    """The admitted sockets of this instance, by sid, with counts per user and per address."""

    def __init__(self, worker: str = "") -> None:
        self.by_sid: dict[str, Connection] = {}
        self.per_user: Counter[str] = Counter()
        self.per_ip: Counter[str] = Counter()
        self._worker_gauge = metrics.WORKER_CONNECTIONS.labels(worker or "main")

    def __len__(self) -> int:
        return len(self.by_sid)

    def get(self, sid: str) -> Connection | None:
        return self.by_sid.get(sid)

    def add(self, conn: Connection) -> None:
        self.by_sid[conn.sid] = conn
        self.per_user[conn.identity.user_id] += 1
        self.per_ip[conn.ip_key] += 1
        self._count_changed()

    def remove(self, sid: str) -> Connection | None:
        conn = self.by_sid.pop(sid, None)
        if conn is not None:
            if conn.expiry is not None:
                conn.expiry.cancel()
            for handle in conn.typing.values():
                handle.cancel()
            _decrement(self.per_user, conn.identity.user_id)
            _decrement(self.per_ip, conn.ip_key)
        self._count_changed()
        return conn

    def _count_changed(self) -> None:
        metrics.CONNECTIONS.set(len(self.by_sid))
        self._worker_gauge.set(len(self.by_sid))

    def sids(self) -> list[str]:
        return list(self.by_sid)


def _decrement(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def peer_address(environ: dict) -> str:
    """The direct peer of the handshake (a proxy, when there is one)."""
    client = (environ.get("asgi.scope") or {}).get("client")
    return client[0] if client else environ.get("REMOTE_ADDR", "unknown")


class Refused(socketio.exceptions.ConnectionRefusedError):
    """A refusal: ``err.message`` is ``message``, ``err.data.code`` is ``code``."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, {"code": code})
        self.code = code


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
        moderation: Moderation,
        *,
        refusals: Refusals,
        client_address: ClientAddress,
        max_connections_per_user: int,
        max_connections_per_ip: int,
        events_per_second: float,
        events_burst: int,
        interest: RoomInterest,
        member_rooms: Callable[[str, int], Awaitable[list[str]]] | None = None,
        max_followed_member_rooms: int = 1000,
    ) -> None:
        self.sio = sio
        self.registry = registry
        self.state = state
        self.verifier = verifier
        self.presence = presence
        self.remember_user = remember_user
        self.moderation = moderation
        self.refusals = refusals
        self.client_address = client_address
        self.max_per_user = max_connections_per_user
        self.max_per_ip = max_connections_per_ip
        self.events_per_second = events_per_second
        self.events_burst = events_burst
        self._handshakes: Counter[str] = Counter()  # per address, being verified now
        self.interest = interest
        #: the rooms a user is a member of, to follow them (None: one instance, no need)
        self.member_rooms = member_rooms
        self.max_followed_member_rooms = max_followed_member_rooms

    async def connect(self, sid: str, environ: dict, auth: Any = None) -> None:
        """Authenticate and register; anything unexpected refuses cleanly (never half-connects)."""
        try:
            await self._admit(sid, environ, auth)
        except Refused as refusal:
            metrics.CONNECTIONS_REFUSED.labels(refusal.code).inc()
            raise
        except socketio.exceptions.ConnectionRefusedError:
            raise
        except Exception:
            log.exception("connect.failed", sid=sid)
            self.registry.remove(sid)
            self.interest.drop(sid)
            raise socketio.exceptions.ConnectionRefusedError(
                "internal", {"code": "internal"}
            ) from None

    async def _admit(self, sid: str, environ: dict, auth: Any) -> None:
        ip = self.client_address.of(peer_address(environ), environ.get("HTTP_X_FORWARDED_FOR", ""))
        key = limit_key(ip)
        if self.state.draining:
            raise Refused("unavailable", "draining")
        if await self.refusals.blocked(key):
            raise Refused("rate_limited", "rate_limited")
        if self.registry.per_ip[key] + self._handshakes[key] >= self.max_per_ip:
            log.info("connect.ip_limit", ip=ip, limit=self.max_per_ip)
            raise Refused("too_many_connections", "ip_connection_limit")
        self._handshakes[key] += 1
        try:
            identity = await self._identity(auth, environ, ip, key)
            await self._check_user_cap(identity.user_id)
        finally:
            _decrement(self._handshakes, key)
        conn = Connection(
            sid, identity, ip, TokenBucket(self.events_per_second, self.events_burst), key
        )
        self.registry.add(conn)
        self.interest.open(sid)
        await self.sio.enter_room(sid, user_channel(identity.user_id), namespace=NAMESPACE)
        self.schedule_expiry(conn)
        self.sio.start_background_task(self._after_connect, conn)

    async def _identity(self, auth: Any, environ: dict, ip: str, key: str) -> Identity:
        try:
            identity = await self.verifier.verify(token_from_connect(auth, environ))
        except AuthError as exc:
            metrics.AUTH_FAILURES.labels(exc.code).inc()
            await self.refusals.record(key)
            log.info("auth.refused", code=exc.code, reason=exc.reason, ip=ip)
            raise Refused("unauthorized", exc.code) from None
        if await self.moderation.revoked(identity):
            metrics.AUTH_FAILURES.labels("token_revoked").inc()
            log.info("auth.refused", code="token_revoked", user=identity.user_id, ip=ip)
            raise Refused("unauthorized", "token_revoked")
        return identity

    async def _check_user_cap(self, user_id: str) -> None:
        """Refuse a user at ``max_per_user`` connections, counted on every instance.

        Cap refusals are not refused *attempts*: a user with one tab too many must not get
        their address blocked for everyone behind it."""
        local = self.registry.per_user[user_id]
        cluster = local
        if local < self.max_per_user:
            try:
                cluster = await self.presence.connection_count(user_id)
            except Exception as exc:  # the backend is down: this instance's count decides
                log.warning("connect.user_count_unavailable", error=str(exc))
        # Re-read after the await: admissions of this instance never overshoot.
        if max(cluster, self.registry.per_user[user_id]) >= self.max_per_user:
            log.info("connect.user_limit", user=user_id, limit=self.max_per_user)
            raise Refused("too_many_connections", "user_connection_limit")

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
        if self.member_rooms is not None:
            await quietly("bus.follow_member_rooms", self._follow_member_rooms(conn))
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

    async def _follow_member_rooms(self, conn: Connection) -> None:
        assert self.member_rooms is not None
        cap = self.max_followed_member_rooms
        rooms = await self.member_rooms(conn.identity.user_id, cap + 1)
        if len(rooms) > cap:  # room:activity of the others needs a join
            metrics.LIMIT_REFUSALS.labels("followed_member_rooms").inc()
            log.info("connect.member_rooms_capped", user=conn.identity.user_id, limit=cap)
            rooms = rooms[:cap]
        await self.interest.members(conn.sid, rooms)  # nothing if it disconnected meanwhile

    async def disconnect(self, sid: str) -> None:
        self.interest.drop(sid)
        conn = self.registry.remove(sid)
        if conn is not None:
            await quietly(
                "presence.disconnect", self.presence.disconnect(conn.identity.user_id, sid)
            )

    def schedule_expiry(self, conn: Connection) -> None:
        """Disconnect ``conn`` when its token expires (a refresh reschedules)."""
        if conn.expiry is not None:
            conn.expiry.cancel()
        expires_at = conn.identity.expires_at
        conn.expiry = asyncio.get_running_loop().call_later(
            max(0.0, expires_at - time.time()), self._expiry_due, conn, expires_at
        )

    def _expiry_due(self, conn: Connection, expires_at: float) -> None:
        conn.expiry = None
        self.sio.start_background_task(self._expire, conn, expires_at)

    async def _expire(self, conn: Connection, expires_at: float) -> None:
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
