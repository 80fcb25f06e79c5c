"""Engine.IO / Socket.IO transport: every change this server makes to the two libraries.

Pinned: python-socketio 5.18.1, python-engineio 4.15.1, uvicorn 0.54.0 (pyproject.toml).
Each class below subclasses a library class or fills a documented hook; no installed file is
edited. What changes, and why:

Fan-out cost (one process must push as many deliveries as Node's Socket.IO)
  * :class:`BroadcastManager` (``AsyncManager.emit``): an emit without callback is encoded
    once, to one Engine.IO packet whose websocket frame is built once; every recipient gets
    that same object, synchronously. Upstream creates one asyncio Task per recipient and
    waits for all of them. Emits carry JSON only (the chat protocol has no binary), so the
    per-emit scan for binary values is skipped.
  * :class:`ChatSocket` (``AsyncSocket``): a websocket socket writes each packet straight
    to the transport when nothing is waiting before it, instead of queueing it for a
    per-socket writer task. Only when the client reads slower than we write (the transport
    paused writing) are packets queued, and one short-lived flush task drains them in
    order, then ends. So an idle socket has no task at all, and a broadcast costs one
    append of shared bytes per websocket recipient. The frames a socket gets during one
    loop iteration are written together at its end (``loop.call_soon``): one
    ``transport.write`` (one syscall, uvloop writes at once) per socket per iteration, not
    per delivery, so a busy instance makes fewer syscalls per message the busier it is.
    Packet order per socket is kept: a packet is written directly only when the queue is
    empty and no flush is running.
  * ``AsyncServer.create_queue``: an :class:`Outbox` of about 100 bytes instead of a
    3.3 KB ``asyncio.Queue`` per session.
  * ``AsyncSocket.poll``: ``asyncio.timeout`` instead of ``asyncio.wait_for``; on Python
    3.11 ``wait_for`` creates a Task for every packet (upstream:
    https://github.com/miguelgrinberg/python-engineio/issues/372 discusses the cost of
    ``wait_for``; fixed in CPython 3.12 by gh-96764).
  * The websocket reader: a plain await per read instead of ``ensure_future`` +
    ``wait_for`` (two Tasks per received packet); a client that stops answering pings is
    closed by the session monitor, which ends the read.
  * Pings: the session monitor's pass (once a second, over every session) sends the PINGs
    that are due, instead of a Task sleeping through every ping interval per socket; a
    PING may go up to a second late, well within the client's ``pingTimeout`` (≥ 5 s).
  * ``AsyncServer._service_task``: one pass over the sockets per second without a
    ``wait_for`` Task per socket.
  * :class:`ChatWebSocket` (the ``websocket`` entry of the ASGI driver table, engineio's
    hook for its transport): under uvicorn's default websocket implementation
    (``websockets-sansio``) it writes finished frames to the connection's transport. Server
    frames are unmasked, so the bytes are the same for every recipient; an uncompressed
    frame is valid whether or not permessage-deflate was negotiated. Any other ASGI
    server gets the plain ASGI ``websocket.send`` path (correct, slower).
  * :class:`ChatPacket` (``serializer``): no scan of every packet's data for binary parts.
  * Receiving: an Engine.IO MESSAGE goes straight to Socket.IO's handler
    (``AsyncSocket.receive``) and an EVENT straight to its event dispatch
    (``AsyncServer._handle_eio_message`` / ``_handle_event``). Upstream builds a log line
    for each (with the logger off, its arguments are still formatted), checks the handler
    is a coroutine function and wraps it in a closure per packet. Each event handler still
    runs in a Task of its own (upstream's default ``async_handlers=True``), so a slow
    store call never holds up the socket's next packets.
  * A broadcast with no local recipient (a room whose only socket here is the sender's)
    is not encoded at all.

Memory per connection (an idle connection must cost about what it costs Node; upstream's
per-connection memory, measured the same way with tracemalloc, is discussed in
https://github.com/Kludex/uvicorn/issues/1862, there for compression, which this server
declines)
  * Once the namespace is connected, a session's environ (Socket.IO keeps it per session;
    about 2.5 KB of header strings) keeps only ``KEPT_ENVIRON``, and its ASGI scope's
    header list is emptied: the connect handler has read the headers, and a token passed in
    the query string no longer lingers in memory.
  * In raw mode uvicorn's protocol drops the handshake's request and response objects
    (their header maps) after the accept; uvicorn never reads them again (0.54.0).
  * uvicorn's incoming queue and Engine.IO's outgoing one are both a :class:`LeanQueue`,
    whose deque exists only while something waits in it (an ``asyncio.Queue`` is 3.3 KB
    empty).
  * websockets' handshake parser keeps the request in its frame for the connection's
    lifetime (websockets 17.4 ``ServerProtocol.parse``); its headers are cleared.
  * No timeout object per websocket read (see ``_websocket_handler``), and no timer per
    socket for pings (see Pings above); uvicorn's own websocket keepalive pings (every
    ``--ws-ping-interval``) are stopped on raw connections: Engine.IO's heartbeat
    (``WS_HEARTBEAT_INTERVAL``) is the one heartbeat.

Hardening
  * Only the configured namespace exists (``namespaces=[...]`` and no handler on ``/``):
    a CONNECT to any other namespace gets CONNECT_ERROR.
  * Binary attachments are refused before anything is buffered: a packet announcing one
    (BINARY_EVENT / BINARY_ACK), or any binary Engine.IO message, closes that connection.
    Upstream keeps every attachment frame until the announced count (up to 10 digits) is
    reached.
  * An Engine.IO session that has not connected the namespace within ``connect_timeout``
    seconds is closed (one timer per session, cancelled when the namespace connects).
  * Each socket's unsent backlog is bounded in packets and bytes (what waits in its queue
    plus the transport's own write buffer). Past either bound the socket is disconnected
    with the reason ``backlog exceeded``, its queue dropped and its transport aborted, so
    its memory is freed at once. Upstream's per-socket ``asyncio.Queue()`` is unbounded.
  * A long-polling POST whose body is not valid Engine.IO (invalid UTF-8, a packet type
    that is not a digit, an empty packet, too many packets, too long) or carries a packet
    type a client may not send (NOOP, an unknown digit) closes its session at once and gets
    400 (``AsyncSocket.handle_post_request``, ``AsyncSocket.receive``). Upstream answered
    a malformed body 200 "ok" with an error log line per request; an unknown type with
    ``server.disconnect(sid)``, which waits for the session's queue to drain (on a polling
    session nobody drains it: the POST hung until the client gave up), and with a 500 when
    closing the session had already removed it (its response variable left unbound).

Every forced close is counted in ``chat_transport_closed_total{reason}`` and logged once.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import engineio
import socketio
import structlog
from engineio import async_socket
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from engineio.async_drivers import asgi as eio_asgi
from prometheus_client import Counter
from socketio import packet as sio_packet

_RawProtocol: type[WebSocketsSansIOProtocol] | None
try:  # uvicorn's default websocket protocol: frames can go straight to its transport
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    _RawProtocol = WebSocketsSansIOProtocol
except ImportError:  # pragma: no cover - another ASGI server: plain ASGI sends
    _RawProtocol = None

log = structlog.get_logger(__name__)

TRANSPORT_CLOSED = Counter(
    "chat_transport_closed_total",
    "Engine.IO sessions closed by the server's transport limits, by reason",
    ["reason"],
)

BACKLOG_EXCEEDED = "backlog exceeded"
BINARY_REFUSED = "binary attachments are not accepted"
CONNECT_TIMEOUT = "namespace not connected in time"
UNKNOWN_PACKET = "packet type a client may not send"
BAD_PAYLOAD = "malformed polling payload"
_METRIC_REASON = {
    UNKNOWN_PACKET: "unknown_packet",
    BAD_PAYLOAD: "bad_payload",
    BACKLOG_EXCEEDED: "backlog_exceeded",
    BINARY_REFUSED: "binary_refused",
    CONNECT_TIMEOUT: "connect_timeout",
}

_SERVICE_PERIOD = 1.0  # seconds between two passes of the session monitor
#: what a session's WSGI-style environ keeps once its namespace is connected: the connect
#: handler has read the rest (headers, the query string with a token, if any)
KEPT_ENVIRON = ("REMOTE_ADDR", "REQUEST_METHOD", "PATH_INFO", "asgi.scope")


def ws_frame(data: str | bytes) -> bytes:
    """One unfragmented, unmasked websocket frame (RFC 6455 §5.2) carrying ``data``."""
    if isinstance(data, str):
        payload, first = data.encode(), 0x81
    else:
        payload, first = bytes(data), 0x82
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def frame_of(pkt: eio_packet.Packet) -> bytes:
    """The websocket frame of an Engine.IO packet, built once per packet object."""
    frame = pkt.__dict__.get("ws_frame")
    if frame is None:
        frame = pkt.ws_frame = ws_frame(pkt.encode())
    return frame


class LeanQueue:
    """What uvicorn and Engine.IO use of ``asyncio.Queue`` (``put_nowait``, ``get``,
    ``get_nowait``, ``empty``, ``qsize``) in about 100 bytes while empty: an
    ``asyncio.Queue`` holds four deques and an Event (3.3 KB), and every connection has
    two (uvicorn's incoming events, Engine.IO's outgoing packets). The deque exists only
    while something is queued. Single consumer or many; unbounded."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque | None = None
        self._waiters: list[asyncio.Future] | None = None

    def __bool__(self) -> bool:
        return bool(self._items)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiters = self._waiters
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None  # an empty deque still holds a 600-byte block
        return item

    async def get(self) -> Any:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        return self.get_nowait()


class Outbox(LeanQueue):
    """A socket's outgoing packets: a :class:`LeanQueue` with Engine.IO's ``task_done``
    and ``join``, its size in bytes, and an ``on_put`` callback (so a websocket can start
    its flush)."""

    __slots__ = ("nbytes", "on_put", "_unfinished", "_idle")

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0
        self.on_put: Any = None
        self._unfinished = 0
        self._idle: asyncio.Future | None = None

    def put_nowait(self, item: Any) -> None:
        self._unfinished += 1
        if item is not None:
            self.nbytes += len(frame_of(item))
        super().put_nowait(item)
        if self.on_put is not None:
            self.on_put()

    def get_nowait(self) -> Any:
        item = super().get_nowait()
        if item is not None:
            self.nbytes -= len(frame_of(item))
        return item

    def task_done(self) -> None:
        if self._unfinished > 0:
            self._unfinished -= 1
        if self._unfinished == 0 and self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None

    async def join(self) -> None:
        if self._unfinished > 0:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)

    def discard_all(self) -> None:
        """Drop every queued packet (the socket is going away)."""
        while self._items:
            self.get_nowait()
            self.task_done()


def lean_receive_queue(proto: Any) -> None:
    """Swap uvicorn's per-connection ``asyncio.Queue`` of incoming ASGI events for a
    :class:`LeanQueue`, keeping what it holds. Called on the accepting task, before
    anyone awaits the queue; uvicorn uses only ``put_nowait``, ``get`` and ``empty``."""
    queue, lean = proto.queue, LeanQueue()
    while not queue.empty():
        lean.put_nowait(queue.get_nowait())
    proto.queue = lean


class ChatWebSocket(eio_asgi.WebSocket):
    """Engine.IO's ASGI websocket wrapper, able to write finished frames to uvicorn's
    transport (see the module docstring). ``raw`` is False on any other server."""

    def __init__(self, handler: Any, server: Any) -> None:
        super().__init__(handler, server)
        self.server = server
        self.proto: Any = None
        self.transport: Any = None
        self.closed = False
        #: frames of this loop iteration, written together by :meth:`uncork`
        self.cork: list[bytes] | None = None

    async def __call__(self, environ: dict) -> str:
        self.asgi_receive = environ["asgi.receive"]
        self.asgi_send = environ["asgi.send"]
        await self.asgi_send({"type": "websocket.accept"})
        proto = getattr(self.asgi_send, "__self__", None)
        if _RawProtocol is not None and type(proto) is _RawProtocol:
            self.proto = proto
            self.transport = proto.transport
            lean_receive_queue(proto)
            # uvicorn keeps the handshake's request and response (their headers) for the
            # connection's lifetime and never reads them after the accept: 3 KB apiece
            if proto.request is not None:  # websockets' parser keeps it too, headers cleared
                proto.request.headers.clear()
            for kept_by_uvicorn in ("request", "response"):
                setattr(proto, kept_by_uvicorn, None)
            # one heartbeat is enough: Engine.IO's PING/PONG keeps the connection alive
            # and closes a silent client; uvicorn's websocket pings would be a second
            proto.stop_keepalive()
        await self.handler(self)
        return ""

    @property
    def raw(self) -> bool:
        return self.proto is not None

    def writable(self) -> bool:
        """True when a frame written now goes out at once (raw mode, open, not paused)."""
        proto = self.proto
        return (
            proto is not None
            and not self.closed
            and not proto.close_sent
            and not proto.disconnected
            and proto.writable.is_set()
        )

    def write_frame(self, frame: bytes) -> None:
        """Write ``frame`` at the end of this loop iteration, with the others of this
        iteration: one syscall per socket per iteration, however many broadcasts."""
        cork = self.cork
        if cork is None:
            self.cork = [frame]
            self.server.corked(self)
        else:
            cork.append(frame)

    def uncork(self) -> None:
        cork = self.cork
        if cork is not None:
            self.cork = None
            proto = self.proto
            if not (self.closed or proto.close_sent or proto.disconnected):
                self.transport.write(cork[0] if len(cork) == 1 else b"".join(cork))

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    async def send_packet(self, pkt: eio_packet.Packet) -> None:
        if self.closed:
            raise OSError("websocket closed")
        proto = self.proto
        if proto is None:
            await self.send(pkt.encode())
            return
        self.uncork()
        if not proto.writable.is_set():
            await proto.writable.wait()
        if self.closed or proto.close_sent or proto.disconnected:
            raise OSError("websocket closed")
        self.transport.write(frame_of(pkt))

    async def close(self) -> None:
        if self.proto is not None:
            self.uncork()
        self.closed = True
        await super().close()

    def abort(self) -> None:
        """Drop the connection and whatever it still buffers."""
        self.closed = True
        self.cork = None
        if self.transport is not None:
            self.transport.abort()


class ChatSocket(async_socket.AsyncSocket):
    """An Engine.IO session without a task per packet, with a bounded backlog."""

    # set by engineio's base socket, which has no type annotations
    connected: bool
    last_ping: float | None

    def __init__(self, server: ChatEngineServer, sid: str) -> None:
        super().__init__(server, sid)
        self.queue.on_put = self._kick
        self.wire: ChatWebSocket | None = None
        self._flusher: asyncio.Task | None = None
        #: loop time at which the session monitor sends the next PING (None: not scheduled)
        self.ping_due_at: float | None = None
        self.overflowed = False

    # --- sending ----------------------------------------------------------------------
    async def send(self, pkt: eio_packet.Packet) -> None:
        self.send_nowait(pkt)

    def send_nowait(self, pkt: eio_packet.Packet) -> None:
        """Write ``pkt`` now if nothing waits before it, otherwise queue it (bounded)."""
        if self.closed or self.overflowed:
            return
        wire = self.wire
        queue = self.queue
        if (
            wire is not None
            and self._flusher is None
            and not queue
            and (wire.cork is not None or wire.writable())
        ):
            wire.write_frame(frame_of(pkt))
            return
        queue.put_nowait(pkt)
        server = self.server
        if (
            queue.qsize() > server.max_backlog_packets
            or queue.nbytes + (wire.buffered() if wire is not None else 0)
            > server.max_backlog_bytes
        ):
            self._overflow()

    def _kick(self) -> None:
        """Something was queued: a websocket starts (or keeps) its flush task."""
        wire = self.wire
        if wire is not None and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush(wire))

    async def _flush(self, wire: ChatWebSocket) -> None:
        """Drain the queue to ``wire`` in order; ends when it is empty. ``None`` in the
        queue closes the websocket after what came before it."""
        queue = self.queue
        try:
            while not queue.empty():
                pkt = queue.get_nowait()
                queue.task_done()
                if pkt is None:
                    queue.discard_all()
                    await wire.close()
                    return
                await wire.send_packet(pkt)
        except Exception:
            queue.discard_all()
            wire.closed = True
        finally:
            self._flusher = None

    def _overflow(self) -> None:
        """Past the backlog bound: free the backlog now and disconnect the socket."""
        self.overflowed = True
        wire = self.wire
        packets = self.queue.qsize()
        nbytes = self.queue.nbytes + (wire.buffered() if wire is not None else 0)
        self.queue.discard_all()
        if wire is not None:
            wire.abort()
        else:  # a long-polling client learns it on its next GET
            self.queue.put_nowait(eio_packet.Packet(eio_packet.CLOSE))
        self.server.count_close(
            BACKLOG_EXCEEDED,
            self.sid,
            packets=packets,
            bytes=nbytes,
            transport="websocket" if wire is not None else "polling",
        )
        self.server.start_background_task(
            self.close, wait=False, abort=True, reason=BACKLOG_EXCEEDED
        )

    async def terminate(self, reason: str) -> None:
        """Close the session and its transport now, dropping whatever was still unsent."""
        self.queue.discard_all()
        if self.wire is not None:
            self.wire.abort()
        else:  # a pending long-polling GET answers CLOSE at once
            self.queue.put_nowait(eio_packet.Packet(eio_packet.CLOSE))
        await self.close(wait=False, abort=True, reason=reason)

    async def receive(self, pkt: eio_packet.Packet) -> None:
        if pkt.packet_type == eio_packet.MESSAGE:
            # Every Socket.IO packet: straight to Socket.IO's handler, as upstream's
            # ``_trigger_event`` does once it has built a log line (the logger is off), checked
            # that the handler is a coroutine function and made a closure for it.
            handler = self.server.handlers.get("message")
            if handler is not None:
                try:
                    await handler(self.sid, pkt.data)
                except asyncio.CancelledError:  # pragma: no cover - as upstream
                    pass
                except Exception:
                    self.server.logger.exception("message async handler error")
            return
        # Upstream indexes its packet names by type before checking it: a type past them
        # raised IndexError, which a polling POST answered "ok", the packet ignored.
        if not 0 <= pkt.packet_type < len(eio_packet.packet_names):
            raise eio_exceptions.UnknownPacketError()
        await super().receive(pkt)

    async def handle_post_request(self, environ: dict) -> None:
        """A long-polling POST. A payload that is not valid Engine.IO, or a packet the client
        may not send, closes the session now and gets 400 (see the module doc)."""
        try:
            await super().handle_post_request(environ)
        except (eio_exceptions.EngineIOError, ValueError) as exc:  # UnicodeDecodeError too
            reason = (
                UNKNOWN_PACKET
                if isinstance(exc, eio_exceptions.UnknownPacketError)
                else BAD_PAYLOAD
            )
            self.server.count_close(reason, self.sid, error=type(exc).__name__)
            await self.terminate(reason)
            # Upstream answers 400 only while it still lists the session (otherwise its
            # response variable is unbound: a 500); closing may already have removed it.
            # Listed again, the closed socket is removed by upstream's disconnect at once.
            self.server.sockets.setdefault(self.sid, self)
            raise eio_exceptions.UnknownPacketError() from exc

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        self.ping_due_at = None
        await super().close(wait=wait, abort=abort, reason=reason)

    # --- polling ----------------------------------------------------------------------
    async def poll(self) -> list[eio_packet.Packet]:
        """Wait for packets to send (long-polling GET); no Task per wait."""
        queue = self.queue
        try:
            if queue.empty():
                async with asyncio.timeout(self.server.ping_interval + self.server.ping_timeout):
                    first = await queue.get()
            else:
                first = queue.get_nowait()
            queue.task_done()
        except (TimeoutError, asyncio.CancelledError):
            raise eio_exceptions.QueueEmpty() from None
        if first is None:
            return []
        packets = [first]
        while not queue.empty():
            pkt = queue.get_nowait()
            queue.task_done()
            if pkt is None:
                queue.put_nowait(None)
                break
            packets.append(pkt)
        return packets

    # --- pings ------------------------------------------------------------------------
    def schedule_ping(self) -> None:
        """The next PING goes ``ping_interval`` from now (sent by the session monitor)."""
        if self.last_ping:
            self.last_ping = None
            self.ping_due_at = asyncio.get_running_loop().time() + self.server.ping_interval

    def ping_due(self) -> None:
        self.ping_due_at = None
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            self.send_nowait(eio_packet.Packet(eio_packet.PING))

    # --- websocket --------------------------------------------------------------------
    async def _websocket_handler(self, ws: ChatWebSocket) -> None:
        """Upstream's handler, without a writer task and without Tasks per read."""
        server = self.server
        max_size = server.max_http_buffer_size
        read_timeout = server.ping_interval + server.ping_timeout

        async def websocket_wait(timeout: float | None = None) -> Any:
            if timeout is None:  # the read loop below: no Timeout object per packet
                data = await ws.wait()
            else:
                async with asyncio.timeout(timeout):
                    data = await ws.wait()
            if data and len(data) > max_size:
                raise ValueError("packet is too large")
            return data

        if self.connected:  # an upgrade from polling: probe, then UPGRADE
            self.upgrading = True
            try:
                probe = eio_packet.Packet(encoded_packet=await websocket_wait(read_timeout))
                if probe.packet_type != eio_packet.PING or probe.data != "probe":
                    return
                await ws.send(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
                self.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))  # ends the pending poll
                upgrade = eio_packet.Packet(encoded_packet=await websocket_wait(read_timeout))
                if upgrade.packet_type != eio_packet.UPGRADE:
                    return
            except (Exception, asyncio.CancelledError):  # the websocket went away meanwhile
                return
            finally:
                self.upgrading = False
            self.upgraded = True
        else:
            self.connected = True
            self.upgraded = True

        self.wire = ws
        if not self.queue.empty():
            self._kick()

        # No timeout per read: the session monitor closes a socket whose client stopped
        # answering pings (``_service_task``), which ends this wait; an idle socket keeps
        # no timer and a received packet creates no Timeout.
        while True:
            try:
                data = await websocket_wait()
            except (Exception, asyncio.CancelledError):  # disconnect, oversized frame
                break
            if data is None:
                break
            try:
                packet = eio_packet.Packet(encoded_packet=data)
            except Exception:  # not an Engine.IO packet: the client broke the protocol
                break  # close this connection only, as upstream's handler does
            try:
                await self.receive(packet)
            except eio_exceptions.UnknownPacketError:  # pragma: no cover
                pass
            except eio_exceptions.SocketIsClosedError:  # pragma: no cover
                break
            except Exception:  # pragma: no cover
                server.logger.exception("Unknown receive error")

        if self._flusher is not None:
            self.queue.put_nowait(None)
            flusher = self._flusher
            if flusher is not None:
                await asyncio.wait([flusher])
        if not ws.closed:
            await ws.close()
        await self.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)


class ChatEngineServer(engineio.AsyncServer):
    """Engine.IO server that makes :class:`ChatSocket` sessions (see the module docstring)."""

    # set by engineio's base server, which has no type annotations
    _async: dict[str, Any]
    start_service_task: bool

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The driver table is shared by every server of the process: copy it, then fill
        # its documented ``websocket`` entry.
        self._async = {**self._async, "websocket": ChatWebSocket}
        self.max_backlog_packets = 1000
        self.max_backlog_bytes = 1 << 20
        self._corked: list[ChatWebSocket] = []

    def corked(self, wire: ChatWebSocket) -> None:
        """``wire`` holds frames: write them (with every other wire's) once this iteration's
        ready callbacks have run."""
        if not self._corked:
            asyncio.get_running_loop().call_soon(self._uncork_all)
        self._corked.append(wire)

    def _uncork_all(self) -> None:
        corked, self._corked = self._corked, []
        for wire in corked:
            try:
                wire.uncork()
            except Exception:  # pragma: no cover - a transport that broke meanwhile
                wire.abort()

    def create_queue(self, *args: Any, **kwargs: Any) -> Outbox:
        return Outbox()

    def count_close(self, reason: str, sid: str, **details: Any) -> None:
        TRANSPORT_CLOSED.labels(_METRIC_REASON.get(reason, "other")).inc()
        log.warning("transport.closed", reason=reason, eio_sid=sid, **details)

    def broadcast(self, pkt: eio_packet.Packet, eio_sids: Iterable[str]) -> int:
        """Send one shared packet to many sessions; returns how many exist here."""
        sockets = self.sockets
        count = 0
        for eio_sid in eio_sids:
            socket = sockets.get(eio_sid)
            if socket is not None:
                socket.send_nowait(pkt)
                count += 1
        return count

    async def send_packet(self, sid: str, pkt: eio_packet.Packet) -> None:
        socket = self.sockets.get(sid)
        if socket is not None:
            socket.send_nowait(pkt)

    async def _handle_connect(self, environ: dict, transport: str, jsonp_index: Any = None):
        """Upstream's ``_handle_connect`` (4.15.1), making a :class:`ChatSocket`."""
        if self.start_service_task:
            self.start_service_task = False
            self.service_task_handle = self.start_background_task(self._service_task)

        sid = self.generate_id()
        s = ChatSocket(self, sid)
        self.sockets[sid] = s

        pkt = eio_packet.Packet(
            eio_packet.OPEN,
            {
                "sid": sid,
                "upgrades": self._upgrades(sid, transport),
                "pingTimeout": int(self.ping_timeout * 1000),
                "pingInterval": int(self.ping_interval + self.ping_interval_grace_period) * 1000,
                "maxPayload": self.max_http_buffer_size,
            },
        )
        await s.send(pkt)

        ret = await self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            return self._unauthorized(ret or None)

        s.schedule_ping()

        if transport == "websocket":
            ret = await s.handle_get_request(environ)
            if s.closed and sid in self.sockets:
                del self.sockets[sid]
            return ret
        s.connected = True
        headers = None
        if self.cookie:
            cookie = (
                self.cookie
                if isinstance(self.cookie, dict)
                else {"name": self.cookie, "path": "/", "SameSite": "Lax"}
            )
            headers = [("Set-Cookie", self._generate_sid_cookie(sid, cookie))]
        try:
            return self._ok(await s.poll(), headers=headers, jsonp_index=jsonp_index)
        except eio_exceptions.QueueEmpty:
            return self._bad_request()

    async def _service_task(self) -> None:  # pragma: no cover - runs for the process lifetime
        """Once a second: forget closed sessions, send the PINGs that are due, close the
        sessions whose client stopped ponging."""
        self.service_task_event = self.create_event()
        while not self.service_task_event.is_set():
            try:
                async with asyncio.timeout(_SERVICE_PERIOD):
                    await self.service_task_event.wait()
                break
            except TimeoutError:
                pass
            now, clock = time.time(), asyncio.get_running_loop().time()
            for sid, s in list(self.sockets.items()):
                try:
                    if s.closed:
                        self.sockets.pop(sid, None)
                    elif s.ping_due_at is not None and clock >= s.ping_due_at:
                        s.ping_due()
                    elif not s.closing and s.last_ping and now - s.last_ping > self.ping_timeout:
                        await s.check_ping_timeout()
                        if s.wire is not None:
                            s.queue.put_nowait(None)  # ends the websocket after the CLOSE packet
                except Exception:
                    self.logger.exception("service task exception")


class BroadcastManager(socketio.AsyncManager):
    """``emit`` without callback: encoded once, the same packet object to every recipient,
    no Task per recipient. Returns how many local sockets it was handed to."""

    async def emit(
        self, event, data, namespace, room=None, skip_sid=None, callback=None, to=None, **kwargs
    ):
        eio = self.server.eio if self.server is not None else None
        if callback is not None or not isinstance(eio, ChatEngineServer):
            await super().emit(
                event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, to=to
            )
            return None
        room = to or room
        if namespace not in self.rooms:
            return 0
        skip = (
            set(skip_sid)
            if isinstance(skip_sid, list | tuple | set)
            else {skip_sid}
            if skip_sid is not None
            else ()
        )
        recipients = [
            eio_sid for sid, eio_sid in self.get_participants(namespace, room) if sid not in skip
        ]
        if not recipients:  # e.g. a room whose only joined socket is the sender's
            return 0
        if isinstance(data, tuple):
            data = list(data)
        elif data is not None:
            data = [data]
        else:
            data = []
        encoded = self.server.packet_class(
            sio_packet.EVENT, namespace=namespace, data=[event, *data], binary=False
        ).encode()
        return eio.broadcast(eio_packet.Packet(eio_packet.MESSAGE, encoded), recipients)


_FAST_MANAGERS: dict[type, type] = {}
#: event handlers in progress (the loop keeps only weak references to Tasks)
_HANDLERS_RUNNING: set[asyncio.Task] = set()


def with_broadcast_fast_path(manager: socketio.AsyncManager) -> socketio.AsyncManager:
    """Give ``manager`` :class:`BroadcastManager`'s ``emit`` just above ``AsyncManager``'s.

    The managers (in-process, Redis, Redis Cluster) live in the bus layer, which knows
    nothing of this module; the server makes its manager's class a subclass that mixes the
    fast path in (C3 order: ``... ControlEvents, BroadcastManager, AsyncManager``), so every
    local delivery, whether emitted here or received from another instance, takes it.
    """
    cls = type(manager)
    if not issubclass(cls, BroadcastManager):
        fast = _FAST_MANAGERS.get(cls)
        if fast is None:
            fast = _FAST_MANAGERS[cls] = type(
                cls.__name__, (cls, BroadcastManager), {"__module__": cls.__module__}
            )
        manager.__class__ = fast
    return manager


class ChatPacket(sio_packet.Packet):
    """Socket.IO packets without binary events (python-socketio's ``serializer`` hook).

    Upstream scans every packet's data recursively for bytes when it builds it (each
    incoming event, each ack, each emit): about 5 % of a busy instance's time. This server
    refuses binary packets before they are decoded (see Hardening above) and sends none,
    so the scan can never find anything.
    """

    uses_binary_events = False


class ChatSocketServer(socketio.AsyncServer):
    """Socket.IO server with only ``namespace``, no binary packets, a connect deadline and
    bounded per-socket backlogs (see the module docstring)."""

    def __init__(
        self,
        *,
        namespace: str,
        connect_timeout: float,
        max_backlog_packets: int,
        max_backlog_bytes: int,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("serializer", ChatPacket)
        super().__init__(namespaces=[namespace], **kwargs)
        with_broadcast_fast_path(self.manager)
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        self.eio.max_backlog_packets = max_backlog_packets
        self.eio.max_backlog_bytes = max_backlog_bytes
        self._deadlines: dict[str, asyncio.TimerHandle] = {}

    def _engineio_server_class(self) -> type[ChatEngineServer]:
        return ChatEngineServer

    async def _handle_eio_connect(self, eio_sid: str, environ: dict) -> None:
        await super()._handle_eio_connect(eio_sid, environ)
        if self.connect_timeout > 0:
            self._arm_deadline(eio_sid)

    def _arm_deadline(self, eio_sid: str) -> None:
        self._deadlines[eio_sid] = asyncio.get_running_loop().call_later(
            self.connect_timeout, self._deadline_due, eio_sid
        )

    def _deadline_due(self, eio_sid: str) -> None:
        self._deadlines.pop(eio_sid, None)
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.closing or socket.closed:
            return
        sid = self.manager.sid_from_eio_sid(eio_sid, self.namespace)
        if sid is not None and self.manager.is_connected(sid, self.namespace):
            return
        if sid is not None:  # the connect handler is still running: give it one more period
            self._arm_deadline(eio_sid)
            return
        self.eio.count_close(CONNECT_TIMEOUT, eio_sid, seconds=self.connect_timeout)
        self.eio.start_background_task(socket.terminate, CONNECT_TIMEOUT)

    def _cancel_deadline(self, eio_sid: str) -> None:
        handle = self._deadlines.pop(eio_sid, None)
        if handle is not None:
            handle.cancel()

    async def _handle_connect(self, eio_sid: str, namespace: str, data: Any) -> None:
        await super()._handle_connect(eio_sid, namespace, data)
        sid = self.manager.sid_from_eio_sid(eio_sid, self.namespace)
        if sid is not None and self.manager.is_connected(sid, self.namespace):
            self._cancel_deadline(eio_sid)
            environ = self.environ.get(eio_sid)
            if environ is not None:
                kept = {key: environ[key] for key in KEPT_ENVIRON if key in environ}
                environ.clear()  # in place: Engine.IO's handlers hold the same dict
                environ.update(kept)
                scope = kept.get("asgi.scope")
                if isinstance(scope, dict) and scope.get("type") == "websocket":
                    scope["headers"] = []  # read at the handshake, never again

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if not isinstance(data, str) or data[:1] in ("5", "6"):
            socket = self.eio.sockets.get(eio_sid)
            if socket is not None and not (socket.closing or socket.closed):
                self.eio.count_close(BINARY_REFUSED, eio_sid)
                await socket.terminate(BINARY_REFUSED)
            return
        if data[:1] == "2":  # EVENT, nearly every packet: no dispatch on the other types
            pkt = self.packet_class(encoded_packet=data)
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
            return
        await super()._handle_eio_message(eio_sid, data)

    async def _handle_event(self, eio_sid: str, namespace: Any, id: Any, data: Any) -> None:
        """Upstream's, without its log line: the handler runs in a Task of its own (a slow
        store call never holds up the socket's next packets)."""
        namespace = namespace or "/"
        manager = self.manager
        sid = manager.sid_from_eio_sid(eio_sid, namespace)
        if not manager.is_connected(sid, namespace):
            return
        task = asyncio.get_running_loop().create_task(
            self._handle_event_internal(self, sid, eio_sid, data, namespace, id)
        )
        _HANDLERS_RUNNING.add(task)
        task.add_done_callback(_HANDLERS_RUNNING.discard)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any) -> None:
        self._cancel_deadline(eio_sid)
        await super()._handle_eio_disconnect(eio_sid, reason)
