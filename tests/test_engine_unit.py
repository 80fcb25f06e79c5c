"""In-process checks of server/transport/engine.py's building blocks (no server needed).

The behaviour end to end (websocket and polling clients, order, limits) is tested against real
server processes in test_transport_limits.py, test_messages.py and test_js_client.py.
"""

from __future__ import annotations

import asyncio

import pytest
import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet
from websockets.frames import Frame, Opcode

from server.bus.manager import ControlEvents, LocalManager
from server.bus.redis_manager import RedisManager
from server.transport.engine import (
    BroadcastManager,
    ChatPacket,
    ChatSocketServer,
    LeanQueue,
    Outbox,
    frame_of,
    with_broadcast_fast_path,
    ws_frame,
)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_ws_frame_matches_the_websockets_serializer(size, kind):
    data: str | bytes = "é" * (size // 2) + "x" * (size % 2) if kind == "text" else b"\x01" * size
    opcode = Opcode.TEXT if kind == "text" else Opcode.BINARY
    payload = data.encode() if isinstance(data, str) else data
    expected = Frame(opcode, payload).serialize(mask=False, extensions=[])
    assert ws_frame(data) == expected


def test_a_packet_is_framed_once():
    pkt = eio_packet.Packet(eio_packet.MESSAGE, '2/chat,["message:new",{"text":"hi"}]')
    first = frame_of(pkt)
    assert frame_of(pkt) is first
    assert first == ws_frame('42/chat,["message:new",{"text":"hi"}]')


async def test_outbox_counts_bytes_and_reports_puts():
    box = Outbox()
    puts = []
    box.on_put = lambda: puts.append(box.qsize())
    a = eio_packet.Packet(eio_packet.MESSAGE, "x" * 200)
    box.put_nowait(a)
    box.put_nowait(None)
    assert box.nbytes == len(frame_of(a)) and puts == [1, 2]
    assert box.get_nowait() is a and box.nbytes == 0
    box.task_done()
    box.discard_all()
    assert box.empty() and not box
    # a waiting get is woken by a put; join waits for task_done of everything put
    getter = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)
    assert not getter.done()
    box.put_nowait(a)
    assert await asyncio.wait_for(getter, 1) is a
    joined = asyncio.ensure_future(box.join())
    await asyncio.sleep(0)
    assert not joined.done()
    box.task_done()
    await asyncio.wait_for(joined, 1)
    with pytest.raises(asyncio.QueueEmpty):
        box.get_nowait()


async def test_lean_queue_is_fifo_wakes_every_getter_and_frees_its_deque_when_empty():
    queue = LeanQueue()
    getters = [asyncio.ensure_future(queue.get()) for _ in range(3)]
    await asyncio.sleep(0)
    for item in ("a", "b", "c"):
        queue.put_nowait(item)
    assert sorted(await asyncio.wait_for(asyncio.gather(*getters), 1)) == ["a", "b", "c"]
    assert queue.empty() and queue.qsize() == 0 and queue._items is None
    for item in range(5):
        await queue.put(item)
    assert queue.qsize() == 5 and [queue.get_nowait() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert queue._items is None  # an idle connection's queue holds no deque
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


def test_chat_packets_never_scan_for_binary_and_encode_as_upstream(monkeypatch):
    data = ["message:new", {"text": "hi", "nested": [{"a": 1}, "b"]}]
    upstream = sio_packet.Packet(sio_packet.EVENT, namespace="/chat", data=data, id=7)
    upstream_ack = sio_packet.Packet(sio_packet.ACK, namespace="/chat", data=[{"ok": 1}], id=7)

    def no_scan(cls, value):
        raise AssertionError("scanned for binary")

    monkeypatch.setattr(sio_packet.Packet, "data_is_binary", classmethod(no_scan))
    ours = ChatPacket(sio_packet.EVENT, namespace="/chat", data=data, id=7)
    assert ours.packet_type == sio_packet.EVENT and ours.encode() == upstream.encode()
    ack = ChatPacket(sio_packet.ACK, namespace="/chat", data=[{"ok": 1}], id=7)
    assert ack.encode() == upstream_ack.encode()


@pytest.mark.parametrize("manager_class", [LocalManager, RedisManager])
def test_fast_path_sits_just_above_async_manager(manager_class):
    manager = manager_class() if manager_class is LocalManager else manager_class("redis://x")
    with_broadcast_fast_path(manager)
    mro = type(manager).__mro__
    assert isinstance(manager, manager_class)
    assert mro.index(ControlEvents) < mro.index(BroadcastManager)
    assert mro.index(BroadcastManager) + 1 == mro.index(socketio.AsyncManager)
    with_broadcast_fast_path(manager)  # idempotent
    assert type(manager).__mro__ == mro


async def test_server_accepts_only_its_namespace_and_builds_the_fast_manager():
    server = ChatSocketServer(
        namespace="/chat",
        connect_timeout=1,
        max_backlog_packets=10,
        max_backlog_bytes=65536,
        async_mode="asgi",
        client_manager=LocalManager(),
    )
    assert server.namespaces == ["/chat"]
    assert isinstance(server.manager, BroadcastManager)
    assert server.eio.max_backlog_packets == 10
    assert server.packet_class is ChatPacket
    # the driver table of other Engine.IO servers in the process is left alone
    other = socketio.AsyncServer(async_mode="asgi")
    assert other.eio._async["websocket"] is not server.eio._async["websocket"]
    await asyncio.sleep(0)
