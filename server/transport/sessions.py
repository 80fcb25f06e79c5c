"""Engine.IO sessions served by any process: no sticky sessions at the load balancer.

An Engine.IO session lives in the process that made it. Polling requests and the
websocket upgrade name it (``?sid=``), and a load balancer without affinity, or another
worker of ``uvicorn --workers N`` behind the same port, sends them anywhere; upstream then
answers ``400 Invalid session`` (python-socketio #371:
https://github.com/miguelgrinberg/python-socketio/issues/371, Flask-SocketIO #439:
https://github.com/miguelgrinberg/Flask-SocketIO/issues/439; Socket.IO's documentation
makes sticky sessions a requirement).

Here every session id names its owner: :class:`RoutedSessionIds` (a subclass hook on
``engineio.AsyncServer.generate_id``, a public method) appends ``.<route tag>``, a random
tag of the process. :class:`SessionRouter`, an ASGI middleware in front of Socket.IO,
reads the tag of each request that carries a ``sid``:

* the tag is this process's, or there is none: the request goes on, untouched;
* another process's: the request is carried through Redis pub/sub to the owner, on the
  owner's channel ``<prefix>eio:<tag>``. A polling request travels whole (method, path,
  query, headers, body) and its answer comes back on the sender's channel; a websocket
  upgrade becomes a tunnel, each frame one message each way, in order.

Costs. A websocket-only client never sends a ``sid`` (the handshake makes the session
where it lands): it pays one byte search of its query string at connect, and nothing
after. A polling request that reaches its owner pays the same search. Only a request that
lands elsewhere pays Redis: two publishes, and for a tunnel two per frame. Nothing is
written to Redis per session (the route is in the id), so a dead owner is noticed at once:
no process listens on its channel, the publish reaches nobody, and the request gets
``400 Invalid session`` as upstream would answer, upon which the client reconnects.

Invariants: frames of one tunnel are published one at a time in each direction, so they
arrive in order; a request whose owner does not answer within ``request_timeout``
seconds gets 504 and the client's Engine.IO retries or reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import socketio
import structlog

from server.bus.direct import DirectChannel
from server.core import metrics
from server.transport.engine import ChatSocketServer

log = structlog.get_logger(__name__)

SEPARATOR = "."
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def session_channel(prefix: str, tag: str) -> str:
    """The pub/sub channel of the process whose route tag is ``tag``."""
    return f"{prefix}eio:{tag}"


def new_route_tag() -> str:
    return secrets.token_hex(5)


def route_of(sid: str) -> str:
    """The route tag in a session id ('' for an id made without one)."""
    _, sep, tag = sid.rpartition(SEPARATOR)
    return tag if sep else ""


class RoutedSessionIds:
    """Mixin for ``engineio.AsyncServer``: session ids end with ``.<route_tag>``."""

    route_tag: str = ""

    def generate_id(self) -> str:
        sid = super().generate_id()  # type: ignore[misc]
        return f"{sid}{SEPARATOR}{self.route_tag}" if self.route_tag else sid


class RoutedSessions:
    """Mixin for ``socketio.AsyncServer``: its Engine.IO server makes routed session ids.

    Uses the server's ``_engineio_server_class`` hook, whatever class it returns.
    """

    def __init__(self, *args: Any, route_tag: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eio.route_tag = route_tag  # type: ignore[attr-defined]

    def _engineio_server_class(self) -> type:
        base = super()._engineio_server_class()  # type: ignore[misc]
        return type(f"Routed{base.__name__}", (RoutedSessionIds, base), {})


class RoutedAsyncServer(RoutedSessions, socketio.AsyncServer):
    """``socketio.AsyncServer`` whose sessions can be served from any process."""


class RoutedChatSocketServer(RoutedSessions, ChatSocketServer):
    """This server's Socket.IO server (server/transport/engine.py), sessions served anywhere."""


def _encode(header: dict, body: bytes = b"") -> bytes:
    return orjson.dumps(header) + b"\n" + body


def _decode(data: bytes) -> tuple[dict, bytes]:
    head, _, body = data.partition(b"\n")
    return orjson.loads(head), body


def _tunnel_frame(kind: str, ident: str, message: dict) -> tuple[dict, bytes]:
    """The tunnel header and body of the ASGI websocket frame ``message`` (``bytes`` or
    ``text``); ``bin`` marks a binary frame."""
    data = message.get("bytes")
    if data is not None:
        return {"k": kind, "id": ident, "bin": 1}, data
    return {"k": kind, "id": ident}, (message.get("text") or "").encode()


def _asgi_frame(event: str, header: dict, body: bytes) -> dict:
    """The ASGI ``event`` (websocket.send or websocket.receive) of a tunnelled frame."""
    if header.get("bin"):
        return {"type": event, "bytes": body}
    return {"type": event, "text": body.decode()}


def _sid_in(query: bytes) -> str:
    """The ``sid`` parameter of a query string, '' when there is none."""
    start = query.find(b"sid=")
    while start > 0 and query[start - 1] != ord("&"):
        start = query.find(b"sid=", start + 1)
    if start < 0:
        return ""
    end = query.find(b"&", start)
    return query[start + 4 : end if end >= 0 else len(query)].decode("latin-1")


class SessionRouter:
    """ASGI middleware: requests for sessions of another process are served by their owner.

    ``app`` is the Socket.IO ASGI app (set with :meth:`wrap`); ``link`` this process's
    channel (``session_channel(channel_prefix, tag)``) on the pub/sub Redis, any topology;
    ``tag`` this process's route tag.
    """

    def __init__(
        self,
        link: DirectChannel,
        channel_prefix: str,
        tag: str,
        request_timeout: float,
        max_body: int,
        socketio_path: str = "/socket.io",
    ) -> None:
        self.link = link
        self.channel_prefix = channel_prefix
        self.tag = tag
        self.request_timeout = request_timeout
        self.max_body = max_body
        self.path = socketio_path
        self.app: Any = None
        self._pending: dict[str, asyncio.Future] = {}
        self._owner_tunnels: dict[str, asyncio.Queue] = {}  # tunnels we serve as owner
        self._client_tunnels: dict[str, asyncio.Queue] = {}  # tunnels we forward
        self._tasks: set[asyncio.Task] = set()
        self._listener: asyncio.Task | None = None

    def wrap(self, app: Any) -> SessionRouter:
        self.app = app
        return self

    def channel(self, tag: str) -> str:
        return session_channel(self.channel_prefix, tag)

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen_forever())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.link.subscribed.wait(), self.request_timeout)

    async def stop(self) -> None:
        for queue in self._client_tunnels.values():
            queue.put_nowait(({"k": "wsc", "code": 1012}, b""))
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.link.aclose()

    async def _listen_forever(self) -> None:
        async for data in self.link.listen():
            self._dispatch(data)

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self, data: bytes) -> None:
        try:
            header, body = _decode(data)
            kind, ident = header["k"], header["id"]
        except Exception:
            log.warning("sessions.bad_message")
            return
        if kind == "req":
            self._spawn(self._serve_http(header, body))
        elif kind == "res":
            future = self._pending.pop(ident, None)
            if future is not None and not future.done():
                future.set_result((header, body))
        elif kind == "wso":
            self._owner_tunnels[ident] = asyncio.Queue()
            self._spawn(self._serve_websocket(header))
        elif kind == "wsi":
            queue = self._owner_tunnels.get(ident)
            if queue is not None:
                queue.put_nowait((header, body))
        else:  # wsa, wss, wsc: the owner's side of a tunnel we forward
            queue = self._client_tunnels.get(ident)
            if queue is not None:
                queue.put_nowait((header, body))

    async def _publish(self, tag: str, header: dict, body: bytes = b"") -> int:
        return await self.link.publish(self.channel(tag), _encode(header, body))

    # --- the middleware -----------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket") and scope["path"].startswith(self.path):
            owner = route_of(_sid_in(scope.get("query_string", b"")))
            if owner and owner != self.tag:
                if kind == "http":
                    await self._forward_http(owner, scope, receive, send)
                else:
                    await self._forward_websocket(owner, scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _request_header(self, kind: str, scope: Scope) -> dict:
        client = scope.get("client")
        return {
            "k": kind,
            "id": uuid.uuid4().hex,
            "from": self.tag,
            "method": scope.get("method", "GET"),
            "path": scope["path"],
            "qs": scope.get("query_string", b"").decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "client": list(client) if client else None,
            "scheme": scope.get("scheme", "http"),
        }

    @staticmethod
    def _scope(kind: str, header: dict) -> Scope:
        scope: Scope = {
            "type": kind,
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": header["scheme"],
            "path": header["path"],
            "raw_path": header["path"].encode(),
            "root_path": "",
            "query_string": header["qs"].encode("latin-1"),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in header["headers"]],
            "client": tuple(header["client"]) if header["client"] else None,
            "server": None,
        }
        if kind == "http":
            scope["method"] = header["method"]
        else:
            scope["subprotocols"] = []
        return scope

    # --- polling ------------------------------------------------------------------------------
    async def _forward_http(self, owner: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await _plain(send, 413, b"Payload too large")
                return
            if not message.get("more_body"):
                break
        header = self._request_header("req", scope)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[header["id"]] = future
        try:
            if not await self._publish(owner, header, bytes(body)):
                metrics.SESSIONS_FORWARDED.labels("no_owner").inc()
                await _plain(send, 400, b"Invalid session")
                return
            metrics.SESSIONS_FORWARDED.labels("polling").inc()
            reply, answer = await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError:
            await _plain(send, 504, b"Session owner did not answer")
            return
        finally:
            self._pending.pop(header["id"], None)
        await send(
            {
                "type": "http.response.start",
                "status": reply["status"],
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in reply["headers"]
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    async def _serve_http(self, header: dict, body: bytes) -> None:
        """Run a forwarded polling request here, where its session lives; answer the sender."""
        delivered = False
        never = asyncio.Event()

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the client's connection is the sender's business
            return {"type": "http.disconnect"}

        status, headers, chunks = 500, [], []

        async def send(message: dict) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in message["headers"]
                ]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.app(self._scope("http", header), receive, send)
        except Exception:
            log.exception("sessions.forwarded_request_failed")
            status, headers, chunks = 500, [], [b"Internal error"]
        reply = {"k": "res", "id": header["id"], "status": status, "headers": headers}
        await self._publish(header["from"], reply, b"".join(chunks))

    # --- websocket tunnels --------------------------------------------------------------------
    async def _forward_websocket(
        self, owner: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        connect = await receive()
        if connect["type"] != "websocket.connect":
            return
        header = self._request_header("wso", scope)
        ident = header["id"]
        inbox: asyncio.Queue = asyncio.Queue()
        self._client_tunnels[ident] = inbox
        pump: asyncio.Task | None = None
        try:
            if not await self._publish(owner, header):
                metrics.SESSIONS_FORWARDED.labels("no_owner").inc()
                await send({"type": "websocket.close", "code": 1008})
                return
            metrics.SESSIONS_FORWARDED.labels("websocket").inc()
            try:
                first, _ = await asyncio.wait_for(inbox.get(), self.request_timeout)
            except TimeoutError:
                await send({"type": "websocket.close", "code": 1011})
                return
            if first["k"] != "wsa":
                await send({"type": "websocket.close", "code": first.get("code", 1008)})
                return
            await send({"type": "websocket.accept"})
            pump = asyncio.get_running_loop().create_task(
                self._client_to_owner(owner, ident, receive, inbox)
            )
            while True:
                frame, data = await inbox.get()
                if frame["k"] == "wss":
                    await send(_asgi_frame("websocket.send", frame, data))
                elif frame["k"] == "wsc":
                    if not frame.get("client_gone"):
                        with contextlib.suppress(Exception):
                            await send({"type": "websocket.close", "code": frame.get("code", 1000)})
                    return
        finally:
            self._client_tunnels.pop(ident, None)
            if pump is not None:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)

    async def _client_to_owner(
        self, owner: str, ident: str, receive: Receive, inbox: asyncio.Queue
    ) -> None:
        """Carry the client's frames to the owner, one publish at a time (in order)."""
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    await self._publish(owner, *_tunnel_frame("wsi", ident, message))
                elif message["type"] == "websocket.disconnect":
                    await self._publish(
                        owner,
                        {"k": "wsi", "id": ident, "close": 1, "code": message.get("code", 1000)},
                    )
                    inbox.put_nowait(({"k": "wsc", "client_gone": True}, b""))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("sessions.tunnel_failed", error=str(exc))
            inbox.put_nowait(({"k": "wsc", "client_gone": True}, b""))

    async def _serve_websocket(self, header: dict) -> None:
        """Run a forwarded websocket here, where its session lives, frames through Redis."""
        ident, back = header["id"], header["from"]
        inbox = self._owner_tunnels[ident]
        connected = False
        closed = False
        lock = asyncio.Lock()

        async def receive() -> dict:
            nonlocal connected
            if not connected:
                connected = True
                return {"type": "websocket.connect"}
            frame, data = await inbox.get()
            if frame.get("close"):
                return {"type": "websocket.disconnect", "code": frame.get("code", 1000)}
            return _asgi_frame("websocket.receive", frame, data)

        async def send(message: dict) -> None:
            nonlocal closed
            kind = message["type"]
            async with lock:
                if closed:
                    raise OSError("tunnel closed")
                if kind == "websocket.accept":
                    await self._publish(back, {"k": "wsa", "id": ident})
                elif kind == "websocket.send":
                    await self._publish(back, *_tunnel_frame("wss", ident, message))
                elif kind == "websocket.close":
                    closed = True
                    await self._publish(
                        back, {"k": "wsc", "id": ident, "code": message.get("code", 1000)}
                    )
                else:  # an HTTP denial of the upgrade
                    closed = True
                    await self._publish(back, {"k": "wsc", "id": ident, "code": 1008})

        try:
            await self.app(self._scope("websocket", header), receive, send)
        except Exception as exc:
            log.warning("sessions.forwarded_websocket_failed", error=str(exc))
        finally:
            self._owner_tunnels.pop(ident, None)
            async with lock:
                if not closed:
                    closed = True
                    with contextlib.suppress(Exception):
                        await self._publish(back, {"k": "wsc", "id": ident, "code": 1000})


async def _plain(send: Send, status: int, text: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": text})
