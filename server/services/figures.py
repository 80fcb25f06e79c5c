"""Figures of this instance and of every live instance: connections, online users, heartbeats.

``collect`` reads them now (``/api/stats``); ``sample_forever`` refreshes ``summary`` and the
deployment-wide gauges every heartbeat, so ``/api/health`` serves them without extra calls.

The figures of every live instance are published under the key ``cluster`` (in
``/api/stats`` and ``/api/health``) and in the metrics ``chat_cluster_connections`` and
``chat_online_users``: documented names that stay, although in the code "cluster" means
Redis Cluster only and the set of live instances is the *deployment*.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from server.core import metrics
from server.core.models import iso, utcnow
from server.core.state import InstanceState

log = structlog.get_logger(__name__)


class InstanceFigures(Protocol):
    """One live instance as its last heartbeat described it."""

    @property
    def id(self) -> str: ...

    @property
    def connections(self) -> int: ...

    @property
    def heartbeat_at(self) -> float: ...

    @property
    def instance(self) -> str: ...


class Figures:
    """Counts what is connected here and across every live instance.

    ``live_instances`` is None for a single instance (no Redis): this instance is then
    the whole deployment.
    """

    def __init__(
        self,
        state: InstanceState,
        local_connections: Callable[[], int],
        online_users: Callable[[], Awaitable[int]],
        live_instances: Callable[[], Awaitable[Sequence[InstanceFigures]]] | None = None,
        used_memory: Callable[[], Awaitable[int | None]] | None = None,
        outbox_counts: Callable[[], Awaitable[dict[str, int]]] | None = None,
    ) -> None:
        self.state = state
        self.local_connections = local_connections
        self.online_users = online_users
        self.live_instances = live_instances
        self.used_memory = used_memory
        self.outbox_counts = outbox_counts
        #: The last sample (None until the first one).
        self.summary: dict | None = None

    async def collect(self) -> dict:
        local = self.local_connections()
        if self.live_instances is None:
            instances = [
                {
                    "id": self.state.instance_id,
                    "instance": self.state.instance_name,
                    "connections": local,
                    "last_heartbeat": iso(utcnow()),
                }
            ]
        else:
            instances = [
                {
                    "id": info.id,
                    "instance": info.instance,
                    "connections": info.connections,
                    "last_heartbeat": iso(datetime.fromtimestamp(info.heartbeat_at, UTC)),
                }
                for info in await self.live_instances()
            ]
        figures: dict[str, Any] = {
            "instance": {
                "id": self.state.instance_id,
                "instance": self.state.instance_name,
                "version": self.state.version,
                "connections": local,
                "in_flight": self.state.in_flight,
                "draining": self.state.draining,
            },
            "cluster": {
                "instances": instances,
                "connections": sum(i["connections"] for i in instances),
                "online_users": await self.online_users(),
            },
        }
        if self.outbox_counts is not None:
            figures["webhooks"] = await self.outbox_counts()
        return figures

    async def sample(self) -> None:
        figures = await self.collect()
        deployment = figures["cluster"]  # the documented key; see the module docstring
        mine = [i for i in deployment["instances"] if i["instance"] == self.state.instance_name]
        self.summary = {
            "instances": len(deployment["instances"]),
            "instance_workers": len(mine),
            "instance_connections": sum(i["connections"] for i in mine),
            "connections": deployment["connections"],
            "online_users": deployment["online_users"],
            "sampled_at": iso(utcnow()),
        }
        metrics.DEPLOYMENT_CONNECTIONS.set(deployment["connections"])
        metrics.ONLINE_USERS.set(deployment["online_users"])
        for state, count in figures.get("webhooks", {}).items():
            metrics.WEBHOOK_OUTBOX.labels(state).set(count)
        if self.used_memory is not None:
            used = await self.used_memory()
            if used is not None:
                metrics.REDIS_MEMORY.set(used)

    async def sample_forever(self, interval: float) -> None:
        """Sample every ``interval`` seconds until cancelled; a failed sample is retried next time."""
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("metrics.sample_failed", error=str(exc))
            await asyncio.sleep(interval)
