"""Pytest fixtures for real Redis processes (see tests/support/redis_servers.py).

``redis_url`` is shared by every test: use unique key and channel names, never FLUSHALL.
``private_redis`` is a fresh server per test, for tests that restart or kill Redis.
"""

from __future__ import annotations

import pytest

from tests.support.redis_servers import (
    RedisCluster,
    RedisSentinel,
    RedisServer,
    ensure_default_redis,
)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """redis://127.0.0.1:6379/0 (started on that port if nothing answers there)."""
    return ensure_default_redis()


@pytest.fixture(scope="session")
def redis_cluster():
    """A 6-node Redis Cluster (3 masters + 3 replicas) for the whole session.

    Tests that kill nodes must call ``redis_cluster.heal()`` when done.
    """
    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel():
    """Master + replica + one sentinel monitoring ``chatmaster``; ``.url`` is redis+sentinel://."""
    sentinel = RedisSentinel().start()
    yield sentinel
    sentinel.stop()


@pytest.fixture
def private_redis():
    """A Redis of this test's own, free to restart (``.restart()``) or kill (``.kill()``)."""
    server = RedisServer().start()
    yield server
    server.stop()
