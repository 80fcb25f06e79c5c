"""python-socketio AsyncClient helpers that record what each client receives."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime
from typing import Any

import httpx
import socketio

from tests.support.servers import GRACE, ServerProcess, make_token

NAMESPACE = "/chat"


class ChatClient:
    """A connected test user: records events by name, sends events with acks."""

    def __init__(self, user: str, name: str | None = None) -> None:
        self.user = user
        self.name = name
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: dict[str, list[Any]] = defaultdict(list)
        self.log: list[tuple[str, Any]] = []  # every event, in arrival order
        self._arrived = asyncio.Event()
        self.sio.on("*", self._record, namespace=NAMESPACE)

    async def _record(self, event: str, data: Any = None) -> None:
        self.events[event].append(data)
        self.log.append((event, data))
        self._arrived.set()

    async def connect(
        self, url: str, token: str | None = None, transports=("websocket",), **kwargs
    ) -> ChatClient:
        token = token or make_token(self.user, self.name)
        await self.sio.connect(
            url,
            namespaces=[NAMESPACE],
            auth={"token": token},
            transports=list(transports),
            wait_timeout=10,
            **kwargs,
        )
        await self.wait_for("session")
        return self

    async def call(self, event: str, data: Any = None, timeout: float = 10) -> Any:
        return await self.sio.call(event, data, namespace=NAMESPACE, timeout=timeout)

    async def wait_for(
        self, event: str, count: int = 1, timeout: float = 10, where=None
    ) -> list[Any]:
        """Wait until ``count`` events named ``event`` (matching ``where``) have arrived."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [e for e in self.events[event] if where is None or where(e)]
            if len(found) >= count:
                return found
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.user}: {len(found)}/{count} {event!r} events; got {dict(self.events)}"
                )
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass

    async def disconnect(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


async def connected(url: str, *users: str) -> list[ChatClient]:
    return list(await asyncio.gather(*(ChatClient(u).connect(url) for u in users)))


QUIET = 0.3  # how long a "must not receive" check listens


def error_code(ack: object) -> str | None:
    """The code of an error ack, after checking the ack has exactly the error shape."""
    assert isinstance(ack, dict) and set(ack) == {"ok", "error"} and ack["ok"] is False, ack
    assert isinstance(ack["error"]["message"], str) and ack["error"]["message"]
    return ack["error"]["code"]


async def send(client: ChatClient, room: str, text: str, client_id: str | None = None) -> dict:
    return await client.call(
        "message:send", {"room": room, "text": text, "client_id": client_id or text}
    )


async def connect_and_close(url: str, user: str) -> None:
    """Open a connection for ``user`` and close it at once (no waiting for ``session``)."""
    client = socketio.AsyncClient(reconnection=False)
    await client.connect(
        url,
        namespaces=[NAMESPACE],
        auth={"token": make_token(user)},
        transports=["websocket"],
        wait_timeout=10,
    )
    await client.disconnect()


async def until(check, what: str, timeout: float = 20, interval: float = 0.1):
    """Call ``check()`` (sync or async) until it returns something true (returned); fail
    after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)


def parse_iso(text: str) -> float:
    """An ISO 8601 UTC time of the protocol ("…Z") → POSIX seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def metrics_of(url: str) -> dict[str, float]:
    """The Prometheus figures of the instance at ``url``."""
    async with httpx.AsyncClient(timeout=10) as http:
        return metric_values((await http.get(f"{url}/metrics")).text)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text exposition → {"name{labels}": value}."""
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def attempt(
    url: str, *, auth=None, headers=None, query: str = "", transports=("websocket",)
) -> dict:
    """One connection attempt: ``{"ok": True, "session": ..., "sid": ...}`` or ``{"ok": False, "error": ...}``."""
    sio = socketio.AsyncClient(reconnection=False)
    errors: list = []
    sessions: list = []
    arrived = asyncio.Event()

    async def on_error(data=None):
        errors.append(data)

    async def on_session(data):
        sessions.append(data)
        arrived.set()

    sio.on("connect_error", on_error, namespace=NAMESPACE)
    sio.on("session", on_session, namespace=NAMESPACE)
    try:
        await sio.connect(
            url + query,
            namespaces=[NAMESPACE],
            auth=auth,
            headers=headers or {},
            transports=list(transports),
            wait_timeout=10,
        )
    except socketio.exceptions.ConnectionError:
        assert len(errors) == 1, errors
        return {"ok": False, "error": errors[0]}
    try:
        await asyncio.wait_for(arrived.wait(), 10)
        return {"ok": True, "session": sessions[0], "sid": sio.get_sid(NAMESPACE)}
    finally:
        if "polling" in transports:
            # The python client would wait for its pending long-poll (up to a ping cycle).
            await sio.eio.disconnect(abort=True)
        else:
            await sio.disconnect()


def first_join_ack(room: str) -> dict:
    """The ``room:join`` ack of a public room that has no messages and no changes yet."""
    return {
        "ok": True,
        "room": {"id": room, "kind": "public", "name": room},
        "last_seq": 0,
        "missed": [],
        "has_more": False,
        "change_seq": 0,
        "changes": [],
        "changes_has_more": False,
    }


def refused(code: str) -> dict:
    return {"ok": False, "error": {"message": "unauthorized", "data": {"code": code}}}


async def exchange(node_a: ServerProcess, node_b: ServerProcess, room: str, uid) -> None:
    """A message and a presence change cross from one instance to the other."""
    b_id = uid("b")
    a = await ChatClient(uid("a")).connect(node_a.url)
    try:
        await a.call("presence:subscribe", {"users": [b_id]})
        b = await ChatClient(b_id).connect(node_b.url)
        assert (await a.wait_for("presence"))[0]["status"] == "online"
        for client in (a, b):
            assert (await client.call("room:join", {"room": room}))["ok"]
        sent = await a.call("message:send", {"room": room, "text": "hi", "client_id": "1"})
        assert (await b.wait_for("message:new")) == [sent["message"]]
        await b.disconnect()
        assert (await a.wait_for("presence", count=2, timeout=GRACE + 5))[1]["status"] == "offline"
    finally:
        await a.disconnect()
