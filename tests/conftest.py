"""Shared fixtures. Server processes, Redis and the Firestore emulator live in tests/support/."""

from __future__ import annotations

import itertools
import os
import uuid

import pytest

from server.store.base import Store

pytest_plugins = ["tests.support.fixtures_firestore", "tests.support.fixtures_redis"]

STORE_BACKENDS = ["memory", "sqlite"]
if os.environ.get("CHAT_TEST_FIRESTORE", "1") != "0":
    STORE_BACKENDS.append("firestore")


@pytest.fixture
def uid():
    """Unique ids per test, so tests never collide on shared backends."""
    run = uuid.uuid4().hex[:8]
    counter = itertools.count()

    def make(prefix: str = "x") -> str:
        return f"{prefix}-{run}-{next(counter)}"

    return make


@pytest.fixture(params=STORE_BACKENDS)
async def store(request, tmp_path) -> Store:
    backend = request.param
    if backend == "memory":
        from server.store.memory import MemoryStore

        instance: Store = MemoryStore()
    elif backend == "sqlite":
        from server.store.sqlite import SQLiteStore

        instance = SQLiteStore(tmp_path / "chat.db")
    else:
        emulator = request.getfixturevalue("firestore_emulator")
        from server.store.firestore import FirestoreStore

        instance = FirestoreStore(project="chat-test", emulator_host=emulator, timeout=5.0)
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture(scope="session")
def server():
    """One single-instance server on SQLite (the default store), shared by the tests that use
    unique ids."""
    from tests.support.servers import ServerProcess

    proc = ServerProcess({}).start()
    yield proc
    proc.stop()


@pytest.fixture
async def clients(server):
    """Factory of connected ChatClients on ``server``; all disconnected at the end."""
    from tests.support.clients import ChatClient

    made: list[ChatClient] = []

    async def make(user: str, url: str | None = None, **kwargs) -> ChatClient:
        client = await ChatClient(user).connect(url or server.url, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.disconnect()
