"""Prometheus metrics of one instance (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("chat_connections", "Socket.IO connections on this instance")
CLUSTER_CONNECTIONS = Gauge("chat_cluster_connections", "Connections on every live instance")
ONLINE_USERS = Gauge("chat_online_users", "Users online cluster-wide (grace periods included)")
MESSAGES_RECEIVED = Counter(
    "chat_messages_received_total", "Messages stored from senders on this instance"
)
MESSAGES_DELIVERED = Counter(
    "chat_messages_delivered_total", "message:new events handed to local sockets"
)
ACKS = Counter("chat_acks_total", "Acks sent, by result code", ["code"])
AUTH_FAILURES = Counter("chat_auth_failures_total", "Refused connection attempts", ["code"])
REDIS_LATENCY = Histogram("chat_redis_seconds", "Redis command latency", ["op"])
STORE_LATENCY = Histogram("chat_store_seconds", "Store call latency", ["op"])
REDIS_MEMORY = Gauge("chat_redis_used_memory_bytes", "Redis used_memory from INFO (sampled)")
