"""One behaviour suite for every Presence implementation (see the ``deployment`` fixture).

Each test runs against ``MemoryPresence`` (one instance) and ``RedisPresence`` (several
instances on a real Redis, keys under a prefix of the test's own). A *deployment* hands
out instances that share one transition recorder, so "announced once" means once for the
whole deployment. With memory presence every instance is the same object: one process
holds every connection.

Waits poll until a deadline; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime

import pytest

from server.bus.connection import RedisClient, RedisConfig, create_redis
from server.bus.keys import Keys
from server.bus.registry import InstanceRegistry
from server.core.models import utcnow
from server.presence.base import Presence, PresenceState, Transition
from server.presence.memory import MemoryPresence
from server.presence.redis import RedisPresence

GRACE = 1.0
IDLE_HEARTBEAT = 3600.0  # instances that must not claim each other during a test
WAIT = 20.0


class Transitions:
    """Every transition announced by any instance of a deployment, in order."""

    def __init__(self) -> None:
        self.seen: list[Transition] = []

    async def record(self, transition: Transition) -> None:
        self.seen.append(transition)

    def of(self, user_id: str) -> list[Transition]:
        return [t for t in self.seen if t.user_id == user_id]

    def statuses(self, user_id: str) -> list[str]:
        return [t.status for t in self.of(user_id)]

    async def wait(self, user_id: str, count: int) -> list[Transition]:
        """The user's transitions once there are at least ``count`` of them."""
        deadline = time.monotonic() + WAIT
        while len(self.of(user_id)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{user_id}: {count} transitions expected, got {self.statuses(user_id)}"
                )
            await asyncio.sleep(0.02)
        return self.of(user_id)


class Deployment:
    """Presence instances of one kind that share state (Redis) or are one (memory)."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.prefix = f"pc-{uuid.uuid4().hex[:10]}:"
        self.transitions = Transitions()
        self.running: list[Presence] = []
        self.clients: list[RedisClient] = []

    async def instance(self, grace: float = GRACE, heartbeat: float = IDLE_HEARTBEAT) -> Presence:
        """A started instance (memory: the one instance, made on the first call)."""
        if self.kind == "memory":
            if not self.running:
                presence = MemoryPresence(grace, self.transitions.record)
                await presence.start()
                self.running.append(presence)
            return self.running[0]
        assert self.redis_url is not None
        client = create_redis(RedisConfig(url=self.redis_url, pubsub_url=self.redis_url))
        self.clients.append(client)
        keys = Keys(self.prefix)
        registry = InstanceRegistry(client, keys, f"{self.prefix}{len(self.clients)}", heartbeat)
        presence = RedisPresence(grace, self.transitions.record, client, keys, registry)
        await presence.start()
        self.running.append(presence)
        return presence

    async def crash(self, presence: Presence) -> None:
        """Stop an instance the way a killed process stops: no disconnects, no goodbye."""
        await presence.close()
        self.running.remove(presence)

    async def settle(self) -> None:
        """Finish every grace period already due, on every instance (Redis sweeps now)."""
        for presence in self.running:
            if isinstance(presence, RedisPresence):
                await presence.expire_due()

    async def close(self) -> None:
        for presence in self.running:
            await presence.close()
        for client in self.clients:
            for pattern in (f"{self.prefix}*", f"{{{self.prefix}*"):
                keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
                if keys:
                    await client.delete(*keys)
            await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def deployment(request):
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = Deployment(request.param, redis_url)
    yield made
    await made.close()


def to_ms(moment: datetime) -> datetime:
    """``moment`` truncated to milliseconds, the precision presence keeps."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def test_online_is_announced_once(deployment, uid):
    a, b = await deployment.instance(), await deployment.instance()
    user = uid("u")
    await asyncio.gather(a.connect(user, "c1"), b.connect(user, "c2"), a.connect(user, "c3"))
    assert deployment.transitions.of(user) == [Transition(user, "online", None)]
    await a.disconnect(user, "c1")
    await a.disconnect(user, "c3")  # c2 is still connected: still online, nothing to say
    assert (await b.states([user]))[user] == PresenceState("online", None)
    assert await a.online_users() == 1
    await deployment.settle()
    assert deployment.transitions.statuses(user) == ["online"]


async def test_offline_is_announced_once_after_grace(deployment, uid):
    a, b = await deployment.instance(), await deployment.instance()
    user = uid("u")
    await a.connect(user, "c1")
    await b.connect(user, "c2")
    await asyncio.gather(a.disconnect(user, "c1"), b.disconnect(user, "c2"))
    # The grace period counts as online.
    assert (await a.states([user]))[user] == PresenceState("online", None)
    await deployment.transitions.wait(user, 2)
    await deployment.settle()  # every instance's sweep has had its chance to announce too
    assert deployment.transitions.statuses(user) == ["online", "offline"]
    assert await b.online_users() == 0


async def test_return_within_grace_is_silent(deployment, uid):
    a, b = await deployment.instance(grace=3.0), await deployment.instance(grace=3.0)
    user, marker = uid("u"), uid("marker")
    await a.connect(user, "c1")
    await a.disconnect(user, "c1")
    await b.connect(user, "c2")  # back before the grace period ends (on another instance)
    # The marker's grace period starts later and ends later than the user's would have.
    await a.connect(marker, "m1")
    await a.disconnect(marker, "m1")
    await deployment.transitions.wait(marker, 2)
    await deployment.settle()
    assert deployment.transitions.statuses(user) == ["online"]
    assert (await a.states([user]))[user] == PresenceState("online", None)


async def test_last_seen_is_when_the_last_connection_closed(deployment, uid):
    a = await deployment.instance()
    user, never = uid("u"), uid("never")
    await a.connect(user, "c1")
    await a.connect(user, "c2")
    await a.disconnect(user, "c1")
    before = to_ms(utcnow())
    await a.disconnect(user, "c2")
    after = utcnow()
    offline = (await deployment.transitions.wait(user, 2))[1]
    assert offline.status == "offline"
    assert offline.last_seen is not None and before <= offline.last_seen <= after
    states = await a.states([user, never])
    assert states == {
        user: PresenceState("offline", offline.last_seen),
        never: PresenceState("offline", None),
    }
    # Online again: last_seen is null while online, in the announcement and in the state.
    await a.connect(user, "c3")
    assert deployment.transitions.of(user)[2] == Transition(user, "online", None)
    assert (await a.states([user]))[user] == PresenceState("online", None)


async def test_unknown_disconnect_changes_nothing(deployment, uid):
    a = await deployment.instance()
    user = uid("u")
    await a.disconnect(user, "never-connected")
    await deployment.settle()
    assert deployment.transitions.of(user) == []
    assert (await a.states([user]))[user] == PresenceState("offline", None)


async def test_dead_instance_connections_are_reaped(deployment, uid):
    """An instance that stops heartbeating loses its connections; their grace runs as usual."""
    if deployment.kind == "memory":
        pytest.skip("one process: an instance that dies takes its memory presence with it")
    beat = 0.2  # dead after 3 missed heartbeats
    dying, survivor = (
        await deployment.instance(heartbeat=beat),
        await deployment.instance(heartbeat=beat),
    )
    gone, kept = uid("gone"), uid("kept")
    await dying.connect(gone, "g1")
    await dying.connect(kept, "k1")
    await survivor.connect(kept, "k2")
    before = to_ms(utcnow())
    await deployment.crash(dying)
    offline = (await deployment.transitions.wait(gone, 2))[1]
    await deployment.settle()
    assert deployment.transitions.statuses(gone) == ["online", "offline"]
    assert offline.last_seen is not None and offline.last_seen >= before
    # A user also connected to a live instance stays online, and nothing is announced.
    assert deployment.transitions.statuses(kept) == ["online"]
    assert (await survivor.states([kept]))[kept] == PresenceState("online", None)
