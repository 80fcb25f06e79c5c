"""Pytest fixtures for real Redis processes (see tests/support/redis_servers.py).

Every test session starts its own Redis processes on free ports: two runs on one machine
never share (or stop) each other's Redis, and nothing touches a Redis on 6379.

``redis_url`` is shared by every test of the session: use unique key prefixes
(``key_prefix()``) and channel names, never FLUSHALL. ``private_redis`` is a fresh server
per test, for tests that restart or kill Redis.
"""

from __future__ import annotations

import pytest

from tests.support.redis_servers import RedisCluster, RedisSentinel, RedisServer
from tests.support.requirements import require_redis


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """This session's standalone Redis, on a free port (stopped at the end of the session)."""
    require_redis()
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    """redis://127.0.0.1:PORT/0 of this session's own Redis."""
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster():
    """A 6-node Redis Cluster (3 masters + 3 replicas) for the whole session.

    Tests that kill nodes must call ``redis_cluster.heal()`` when done.
    """
    require_redis()
    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel():
    """Master + replica + one sentinel monitoring ``chatmaster``; ``.url`` is redis+sentinel://."""
    require_redis()
    sentinel = RedisSentinel().start()
    yield sentinel
    sentinel.stop()


@pytest.fixture
def private_redis():
    """A Redis of this test's own, free to restart (``.restart()``) or kill (``.kill()``)."""
    require_redis()
    server = RedisServer().start()
    yield server
    server.stop()
