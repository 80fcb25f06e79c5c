"""Prometheus metrics of one instance (served at /metrics).

Under ``uvicorn --workers N`` every worker writes its values to the directory in
``PROMETHEUS_MULTIPROC_DIR`` (server/core/workers.py) and :func:`exposition` merges them,
so one scrape covers the whole instance: counters and histograms are summed over every
worker (dead ones included: counters never go back), ``chat_connections`` is summed over
live workers, ``chat_worker_connections`` keeps one series per live worker, and the
cluster-wide gauges (the same value sampled by each worker) show the most recent sample.
In a single process nothing of this applies and the default registry is served.
"""

from __future__ import annotations

import inspect
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

CONNECTIONS = Gauge(
    "chat_connections", "Socket.IO connections on this instance", multiprocess_mode="livesum"
)
WORKER_CONNECTIONS = Gauge(
    "chat_worker_connections",
    "Socket.IO connections per worker process of this instance (uvicorn --workers)",
    ["worker"],
    multiprocess_mode="livesum",
)
# The set of live instances is the "deployment" in the code; the metric names are documented
# interfaces and keep their historical "cluster" wording.
DEPLOYMENT_CONNECTIONS = Gauge(
    "chat_cluster_connections", "Connections on every live instance", multiprocess_mode="mostrecent"
)
ONLINE_USERS = Gauge(
    "chat_online_users",
    "Users online on every instance (grace periods included)",
    multiprocess_mode="mostrecent",
)
MESSAGES_RECEIVED = Counter(
    "chat_messages_received_total", "Messages stored from senders on this instance"
)
MESSAGES_DELIVERED = Counter(
    "chat_messages_delivered_total", "message:new events handed to local sockets"
)
MESSAGE_CHANGES = Counter(
    "chat_message_changes_total", "Edits, deletions and reaction changes stored", ["kind"]
)
MENTIONS = Counter("chat_mentions_total", "mention events sent (one per mentioned user)")
ACKS = Counter("chat_acks_total", "Acks sent, by result code", ["code"])
AUTH_FAILURES = Counter("chat_auth_failures_total", "Refused connection attempts", ["code"])
SANCTIONS_ENFORCED = Counter(
    "chat_sanctions_enforced_total", "Requests refused by a ban, mute or block", ["kind"]
)
WEBHOOK_DELIVERIES = Counter(
    "chat_webhook_deliveries_total",
    "Webhook delivery attempts by outcome (delivered, retry, dead)",
    ["result"],
)
WEBHOOK_OUTBOX = Gauge(
    "chat_webhook_outbox", "Webhook outbox entries by state (sampled)", ["state"]
)
SERVER_API_REQUESTS = Counter(
    "chat_server_api_requests_total", "Server API requests by key name and result", ["key", "code"]
)
REDIS_LATENCY = Histogram("chat_redis_seconds", "Redis command latency", ["op"])
BUS_PUBLISH_FAILURES = Counter(
    "chat_bus_publish_failures_total",
    "Emits given up after every publish attempt: other instances missed them",
)
BUS_LISTENER_RESUBSCRIBES = Counter(
    "chat_bus_listener_resubscribes_total",
    "Times the pub/sub listener lost its subscription and subscribed again",
)
BUS_MESSAGES_IN = Counter(
    "chat_bus_messages_in_total",
    "Pub/sub messages this instance's listener read (main channel and followed rooms)",
)
BUS_FOLLOWED_ROOMS = Gauge(
    "chat_bus_followed_rooms",
    "Chat rooms whose pub/sub channel this instance listens to (its connections joined them "
    "or their members are connected here)",
)
BUS_FOLLOW_TIMEOUTS = Counter(
    "chat_bus_follow_timeouts_total",
    "Room subscriptions Redis did not confirm within the wait (the join went on)",
)
BUS_CAUGHT_UP = Counter(
    "chat_bus_caught_up_messages_total",
    "Messages read from the store and handed to local sockets after a lost subscription",
)
DUPLICATES_SKIPPED = Counter(
    "chat_bus_duplicate_deliveries_skipped_total",
    "message:new emits not handed to local sockets because the message already was",
)
STORE_LATENCY = Histogram("chat_store_seconds", "Store call latency", ["op"])
STORE_BATCH = Histogram(
    "chat_store_batch_calls",
    "SQLite store calls that went to a connection's thread together (the writer's commit together)",
    ["lane"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BUS_BATCH = Histogram(
    "chat_bus_batch_commands",
    "Redis commands written together in one pipeline (publishes made in one turn of the loop)",
    ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
FIRESTORE_CACHE = Gauge(
    "chat_firestore_cache_entries",
    "Entries the Firestore store remembers, per memo (rooms, seqs, names; FIRESTORE_CACHE each)",
    ["memo"],
)
STORE_ROOM_CACHE = Gauge(
    "chat_store_room_cache_rooms", "Rooms the SQLite store keeps in memory (SQLITE_ROOM_CACHE)"
)
CONNECTIONS_REFUSED = Counter(
    "chat_connections_refused_total",
    "Refused connection attempts, by err.data.code (rate_limited, ip_connection_limit, "
    "user_connection_limit, missing_token, invalid_token, token_expired, draining)",
    ["reason"],
)
LIMITER_KEYS = Gauge("chat_refusal_limiter_keys", "Addresses the refused-attempt limiter holds")
LIMITER_EVICTIONS = Counter(
    "chat_refusal_limiter_evictions_total",
    "Addresses the refused-attempt limiter forgot to stay within its key cap (LRU)",
)
LIMIT_REFUSALS = Counter(
    "chat_limit_refusals_total",
    "Requests refused by a limit (room_members, joined_rooms, room_creates, member_changes, "
    "message_length, mentions, reaction_length, reactions)",
    ["limit"],
)
EVICTION_SOCKETS = Counter(
    "chat_eviction_sockets_checked_total",
    "Sockets looked at by evictions on this instance (those of the removed users only)",
)
CARRIED_OUTSIDE = Counter(
    "chat_carried_outside_total",
    "room:activity notices sent from here inside their message:new broadcast (no control event)",
)
CONTROL_EVENTS = Counter(
    "chat_control_events_total", "Control events between instances sent from here", ["name"]
)
TYPING_EXPIRED = Counter(
    "chat_typing_expired_total",
    "typing:false sent by the server (timeout, leave, disconnect or eviction)",
    ["why"],
)
LIBRARY_ERRORS = Counter(
    "chat_library_errors_total",
    "Warnings and errors python-socketio and python-engineio logged (mostly bad packets)",
)
LOG_LINES_DROPPED = Counter(
    "chat_log_lines_dropped_total",
    "Library error lines not written (over LOG_LIBRARY_ERRORS_PER_MINUTE)",
)
REDIS_MEMORY = Gauge(
    "chat_redis_used_memory_bytes",
    "Redis used_memory from INFO (sampled)",
    multiprocess_mode="mostrecent",
)
SESSIONS_FORWARDED = Counter(
    "chat_sessions_forwarded_total",
    "Engine.IO requests for a session owned by another process, carried through Redis "
    "(polling, websocket tunnel, or no_owner: the owner is gone)",
    ["kind"],
)
REDIS_CREDENTIALS_RENEWED = Counter(
    "chat_redis_credentials_renewed_total",
    "Redis secrets made or read again (IAM tokens, rotated password files)",
)
CONTENT_TYPE = CONTENT_TYPE_LATEST
_LIVE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


def _forget_dead_workers(path: str) -> None:
    """Drop the live gauges of workers that are gone (a SIGKILLed worker never says so)."""
    for entry in Path(path).iterdir():
        match = _LIVE_FILE.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            pass


def exposition() -> bytes:
    """The text of /metrics: this process, or every worker of the instance merged."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return generate_latest(REGISTRY)
    _forget_dead_workers(path)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)
    return generate_latest(registry)


def worker_exiting() -> None:
    """A worker stopping on its own removes its live gauges at once."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        multiprocess.mark_process_dead(os.getpid(), path)


@contextmanager
def timed(histogram: Histogram, op: str) -> Iterator[None]:
    """Observe how long the block took, in seconds, under label ``op``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.labels(op).observe(time.perf_counter() - started)


class TimedStore:
    """Wraps a store so that every coroutine method's latency lands in ``chat_store_seconds``."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        observe = STORE_LATENCY.labels(name).observe
        clock = time.perf_counter

        async def timed_call(*args, **kwargs):
            started = clock()
            try:
                return await attr(*args, **kwargs)
            finally:
                observe(clock() - started)

        setattr(self, name, timed_call)  # build the wrapper once per method
        return timed_call
