"""Webhooks: signed HTTP callbacks to the application's backend, from a durable outbox.

Recording. Every event is written to the store's outbox, one entry per endpoint. The
events of stored changes go in the same transaction as their change: ``message.created``
(``Outgoing`` on the draft), ``message.updated`` / ``message.deleted`` (``Outgoing`` given to
``edit_message`` / ``delete_message``), ``room.member_added`` / ``room.member_removed``
(entries given to ``create_room`` / ``add_members`` / ``remove_members``). ``user.online`` /
``user.offline`` come from presence (Redis), not from the store, so they are recorded
right after the transition instead (``record``). An event id is stable: a delivery
retried, or delivered twice after a crash, carries the same ``id``.

Delivery. Every instance runs a :class:`Dispatcher`. It leases due entries from the
store; the store hands out only the oldest pending entry of each (endpoint, ordering)
queue and only while nobody else holds its lease, so per room (per user for presence)
events go out in order, one at a time, through exactly one instance. A failed attempt
is retried after ``min(backoff_max, backoff_base * 2**attempts)`` seconds (with jitter);
after ``max_attempts`` the entry is dead (``chat_webhook_outbox{state="dead"}``,
``/api/stats``) and its queue moves on. An instance that dies mid-delivery loses its
lease after ``lease`` seconds and another instance delivers the entry again: delivery is
at least once, and receivers deduplicate on ``id``.

Signing (Stripe-style). Header ``Chat-Signature: t=<unix seconds>,v1=<hex>`` where the hex
is HMAC-SHA256 with the endpoint's secret over ``f"{t}.{body}"``. Receivers recompute it
over the raw body and refuse a ``t`` far from their clock (docs/webhooks.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import orjson
import structlog

from server.core import metrics
from server.core.models import (
    Message,
    MessageDraft,
    OutboxEntry,
    OutboxItem,
    Outgoing,
    iso,
    utcnow,
)
from server.store.base import Store

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "Chat-Signature"


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # "0", "1", ...: the position in WEBHOOK_URLS, stored with each entry
    url: str
    secret: str


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Chat-Signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def event_body(event_id: str, kind: str, data: dict) -> str:
    return orjson.dumps(
        {"id": event_id, "type": kind, "created_at": iso(utcnow()), "data": data}
    ).decode()


class Webhooks:
    """Records events in the outbox. Disabled (records nothing) without endpoints."""

    def __init__(
        self,
        store: Store,
        endpoints: list[Endpoint],
        online: Callable[[list[str]], Awaitable[set[str]]],
    ) -> None:
        self.store = store
        self.endpoints = endpoints
        self.names = tuple(e.name for e in endpoints)
        self.online = online
        self.recorded = asyncio.Event()  # wakes the local dispatcher

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)

    async def for_message(self, draft: MessageDraft) -> Outgoing | None:
        """``message.created`` for ``draft``, listing the room's members offline right now."""
        if not self.enabled:
            return None
        members = await self.store.list_members(draft.room)
        online = await self.online(members) if members else set()
        offline = [m for m in members if m not in online and m != draft.sender_id]

        def render(message: Message) -> str:
            return event_body(
                f"evt_msg_{message.id}",
                "message.created",
                {"message": message.to_wire(), "offline_members": offline},
            )

        return Outgoing(f"evt_msg_{draft.message_id}", self.names, render)

    def entries(self, kind: str, ordering: str, data: dict) -> list[OutboxEntry]:
        """One new event (a fresh id), one entry per endpoint."""
        event_id = f"evt_{uuid.uuid4().hex}"
        body = event_body(event_id, kind, data)
        return [OutboxEntry(event_id, name, ordering, body) for name in self.names]

    async def record(self, kind: str, ordering: str, data: dict) -> None:
        """Record an event that no store write carries (presence), and wake the dispatcher."""
        if not self.enabled:
            return
        await self.store.outbox_add(self.entries(kind, ordering, data))
        self.recorded.set()

    def for_change(self, kind: str) -> Outgoing:
        """``message.updated`` or ``message.deleted``, for the store to record with the
        change; one id per change (its change seq)."""

        def event_id(message: Message) -> str:
            return f"evt_chg_{message.id}_{message.change_seq}"

        def render(message: Message) -> str:
            data: dict = {"id": message.id, "room": message.room, "seq": message.seq}
            if kind == "updated":
                data.update(
                    text=message.text,
                    mentions=list(message.mentions),
                    edited_at=iso(message.edited_at),
                    revision=message.revision,
                )
            else:
                data["deleted_at"] = iso(message.deleted_at)
            return event_body(event_id(message), f"message.{kind}", {"message": data})

        return Outgoing(event_id, self.names, render)

    def for_members(self, room_id: str, users: list[str], added: bool) -> list[OutboxEntry]:
        """``room.member_added`` / ``room.member_removed``, for the store to record with the
        membership change (none when nobody's membership changes)."""
        if not users:
            return []
        kind = "room.member_added" if added else "room.member_removed"
        return self.entries(kind, room_id, {"room": room_id, "users": users})

    async def presence_changed(self, user_id: str, status: str, last_seen: str | None) -> None:
        await self.record(
            f"user.{status}", f"user:{user_id}", {"user": user_id, "last_seen": last_seen}
        )


class Dispatcher:
    """Delivers this store's outbox; runs on every instance, each entry through one."""

    def __init__(
        self,
        store: Store,
        webhooks: Webhooks,
        owner: str,
        *,
        timeout: float,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
        concurrency: int = 16,
        idle_poll: float = 0.5,
    ) -> None:
        self.store = store
        self.webhooks = webhooks
        self.endpoints = {e.name: e for e in webhooks.endpoints}
        self.owner = owner
        self.timeout = timeout
        self.lease = 2 * timeout + 5  # longer than one attempt can take
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.concurrency = concurrency
        self.idle_poll = idle_poll
        self._task: asyncio.Task | None = None
        self._http: httpx.AsyncClient | None = None

    def start(self) -> None:
        if self.webhooks.enabled and self._task is None:
            self._http = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if self._http is not None:
            await self._http.aclose()

    async def _run(self) -> None:
        while True:
            try:
                delivered = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: try again later
                log.warning("webhooks.dispatch_failed", error=str(exc))
                delivered = 0
            if delivered == 0:
                self.webhooks.recorded.clear()
                try:
                    await asyncio.wait_for(self.webhooks.recorded.wait(), self.idle_poll)
                except TimeoutError:
                    pass

    async def run_once(self) -> int:
        """Claim due entries and deliver them concurrently; the number of entries settled."""
        items = await self.store.outbox_claim(self.owner, time.time(), self.lease, self.concurrency)
        if items:
            await asyncio.gather(*(self._deliver(item) for item in items))
        return len(items)

    async def _deliver(self, item: OutboxItem) -> None:
        endpoint = self.endpoints.get(item.entry.endpoint)
        if endpoint is None:  # an endpoint removed from the configuration
            await self.store.outbox_finish(
                item, self.owner, delivered=False, dead=True, error="endpoint not configured"
            )
            metrics.WEBHOOK_DELIVERIES.labels("dead").inc()
            return
        body = item.entry.body.encode()
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign(endpoint.secret, int(time.time()), body),
            "Chat-Event-Id": item.entry.event_id,
            "Chat-Delivered-By": self.owner,
            "user-agent": "chat-server-webhooks",
        }
        error = ""
        try:
            assert self._http is not None
            response = await self._http.post(endpoint.url, content=body, headers=headers)
            if 200 <= response.status_code < 300:
                await self.store.outbox_finish(item, self.owner, delivered=True)
                metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                return
            error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        attempts = item.attempts + 1
        dead = attempts >= self.max_attempts
        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempts - 1))
        next_at = time.time() + delay * random.uniform(0.8, 1.0)
        await self.store.outbox_finish(
            item, self.owner, delivered=False, next_at=next_at, dead=dead, error=error
        )
        metrics.WEBHOOK_DELIVERIES.labels("dead" if dead else "retry").inc()
        log.info(
            "webhooks.attempt_failed",
            event_id=item.entry.event_id,
            endpoint=endpoint.name,
            attempts=attempts,
            dead=dead,
            error=error,
        )
