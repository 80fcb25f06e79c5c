"""Engine.IO-level limits (issue 8 §1-2), against a real server process.

- only ``/chat`` exists; any other namespace is refused;
- a packet announcing binary attachments, or a binary frame, closes that connection;
- an Engine.IO session that does not connect ``/chat`` in time is closed;
- a socket whose unsent backlog passes its bound is disconnected, counted, and its memory
  freed: parked sockets in a flooded room leave server memory flat.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import httpx
import pytest

from tests.support.clients import ChatClient, metric_values, until
from tests.support.servers import ServerProcess, make_token

CONNECT_TIMEOUT = 1.5
BACKLOG_PACKETS = 100
BACKLOG_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """One instance with short transport limits; SQLite, so stored messages stay out of RSS."""
    data = tmp_path_factory.mktemp("limits")
    proc = ServerProcess(
        {
            "STORE": "sqlite",
            "SQLITE_PATH": str(data / "chat.db"),
            "WS_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
            "WS_MAX_BACKLOG_PACKETS": str(BACKLOG_PACKETS),
            "WS_MAX_BACKLOG_BYTES": str(BACKLOG_BYTES),
            # Engine.IO pings every minute: no socket of these tests is closed by a ping timeout.
            "WS_HEARTBEAT_INTERVAL": "60",
        }
    ).start(timeout=60)
    yield proc
    proc.stop()


def closed_count(server: ServerProcess, reason: str) -> float:
    values = metric_values(httpx.get(f"{server.url}/metrics", timeout=5).text)
    return values.get(f'chat_transport_closed_total{{reason="{reason}"}}', 0.0)


def rss_kb(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Raw:
    """A websocket speaking Engine.IO by hand; ``frames`` collects what the server sent.
    With ``pong=False`` it never answers Engine.IO pings (a client gone silent)."""

    def __init__(self, url: str, pong: bool = True) -> None:
        self.url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        self.frames: list[str | bytes] = []
        self.closed = asyncio.Event()
        self.pong = pong

    async def __aenter__(self) -> Raw:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await until(lambda: self.frames, "the OPEN packet", timeout=10)
        assert str(self.frames[0]).startswith("0{")
        return self

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    break
                if message.data == "2" and self.pong:  # answer pings: the session stays alive
                    await self.ws.send_str("3")
                    continue
                self.frames.append(message.data)
        finally:
            self.closed.set()

    async def connect_chat(self) -> None:
        await self.ws.send_str("40/chat," + json.dumps({"token": make_token("raw-user")}))
        await until(
            lambda: any(str(f).startswith("40/chat,{") for f in self.frames),
            "the namespace CONNECT",
            timeout=10,
        )

    async def wait_closed(self, timeout: float = 20.0) -> bool:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def __aexit__(self, *exc) -> None:
        self._reader.cancel()
        await self.ws.close()
        await self.session.close()


# --- namespaces ---------------------------------------------------------------------------
@pytest.mark.parametrize("namespace", ["/", "/admin", "/chat2"])
async def test_only_chat_namespace_can_be_connected(limited, namespace):
    async with Raw(limited.url) as raw:
        connect = "40" if namespace == "/" else f"40{namespace},"
        await raw.ws.send_str(connect + json.dumps({"token": make_token("ns-user")}))
        prefix = "44" if namespace == "/" else f"44{namespace},"
        await until(
            lambda: any(str(f).startswith(prefix) for f in raw.frames),
            f"a {prefix!r} frame",
            timeout=10,
        )
        assert not any(str(f).startswith("40") for f in raw.frames[1:]), raw.frames
        # the same session may still connect /chat
        await raw.connect_chat()


# --- binary attachments ---------------------------------------------------------------------
BINARY_PACKETS = {
    "announced-attachments-anonymous": ['459999999999-["x",{"_placeholder":true,"num":0}]'],
    "announced-attachment-on-chat": [
        '451-/chat,6["room:join",{"room":{"_placeholder":true,"num":0}}]'
    ],
    "binary-ack": ['461-/chat,7[{"_placeholder":true,"num":0}]'],
    "bare-binary-frame": [b"\x00" * 1000],
}


@pytest.mark.parametrize("case", sorted(BINARY_PACKETS))
async def test_binary_attachments_close_the_connection(limited, case):
    before = closed_count(limited, "binary_refused")
    bystander = await ChatClient("bystander-bin").connect(limited.url)
    try:
        async with Raw(limited.url) as raw:
            if "anonymous" not in case:
                await raw.connect_chat()
            for packet in BINARY_PACKETS[case]:
                if isinstance(packet, bytes):
                    await raw.ws.send_bytes(packet)
                else:
                    await raw.ws.send_str(packet)
            # what would have been attachments: never buffered, the connection is gone
            for _ in range(20):
                if raw.closed.is_set():
                    break
                try:
                    await raw.ws.send_bytes(b"\xff" * 60_000)
                except (ConnectionError, RuntimeError, aiohttp.ClientError):
                    break
                await asyncio.sleep(0.05)
            assert await raw.wait_closed(10), "the server kept a connection that sent binary"
        await until(
            lambda: closed_count(limited, "binary_refused") >= before + 1,
            "the binary_refused close counted",
            timeout=10,
        )
        assert (await bystander.call("room:join", {"room": "bin-room"}))["ok"] is True
    finally:
        await bystander.disconnect()


async def test_binary_over_polling_closes_the_session(limited):
    async with httpx.AsyncClient(base_url=limited.url, timeout=10) as http:
        opened = await http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
        sid = json.loads(opened.text[1:])["sid"]
        params = {"EIO": "4", "transport": "polling", "sid": sid}
        token = json.dumps({"token": make_token("poll-bin")})
        await http.post("/socket.io/", params=params, content=f"40/chat,{token}")
        await http.get("/socket.io/", params=params)  # CONNECT answer
        await http.post(
            "/socket.io/", params=params, content='451-/chat,6["room:join",{"_placeholder":true}]'
        )

        async def session_gone() -> bool:
            answer = await http.get("/socket.io/", params=params)
            return answer.status_code == 400 or answer.text.startswith("1")

        await until(session_gone, "the session closed", timeout=10)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"6", "unknown_packet"),  # NOOP: only the server sends it
        (b"9", "unknown_packet"),
        (b"3\x1e6", "unknown_packet"),
        (b"x", "bad_payload"),  # not a packet type
        (b"3\x1e\x1e3", "bad_payload"),  # an empty packet
        (b"4\xed\xa0\x80", "bad_payload"),  # not UTF-8
    ],
)
async def test_a_malformed_polling_post_gets_400_at_once(limited, packet, reason):
    before = closed_count(limited, reason)
    async with httpx.AsyncClient(base_url=limited.url, timeout=5) as http:
        sessions = []
        for _ in range(2):
            opened = await http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
            sessions.append(
                {"EIO": "4", "transport": "polling", "sid": json.loads(opened.text[1:])["sid"]}
            )
        culprit, bystander = sessions
        answer = await http.post("/socket.io/", params=culprit, content=packet)  # no ReadTimeout
        assert answer.status_code == 400
        assert (await http.post("/socket.io/", params=culprit, content="3")).status_code == 400
        # the other session is untouched: a PONG is taken as usual
        answer = await http.post("/socket.io/", params=bystander, content="3")
        assert answer.status_code == 200
    assert closed_count(limited, reason) == before + 1


# --- sessions that never connect /chat ------------------------------------------------------
async def test_session_without_chat_is_closed_after_the_deadline(limited):
    before = closed_count(limited, "connect_timeout")
    async with Raw(limited.url) as idle, Raw(limited.url) as member:
        await member.connect_chat()
        assert await idle.wait_closed(CONNECT_TIMEOUT + 15), "an idle session was kept"
        # the session that connected /chat in time stays
        assert not member.closed.is_set()
        await member.ws.send_str('42/chat,5["room:join",{"room":"deadline-room"}]')
        await until(
            lambda: any(str(f).startswith("43/chat,5") for f in member.frames),
            "the ack of the member's join",
        )
    assert closed_count(limited, "connect_timeout") >= before + 1


async def test_polling_session_without_chat_is_closed(limited):
    async with httpx.AsyncClient(base_url=limited.url, timeout=10) as http:
        opened = await http.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
        sid = json.loads(opened.text[1:])["sid"]
        params = {"EIO": "4", "transport": "polling", "sid": sid}

        async def session_gone() -> bool:
            try:  # a live session holds the GET open until it has something to send
                answer = await http.get("/socket.io/", params=params)
            except httpx.ReadTimeout:
                return False
            return answer.status_code == 400 or answer.text.startswith("1")

        await until(session_gone, "the session closed", timeout=CONNECT_TIMEOUT + 15)


# --- bounded backlog --------------------------------------------------------------------------
class Parked:
    """A websocket that joined a room and then stopped reading (the TCP window fills)."""

    def __init__(self, url: str, user: str, room: str) -> None:
        self.url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        self.user = user
        self.room = room

    async def start(self) -> Parked:
        self.session = aiohttp.ClientSession()
        # aiohttp stops reading the socket once 64 KiB of messages wait unread
        self.ws = await self.session.ws_connect(self.url, autoping=False)
        assert (await self.ws.receive_str(timeout=10)).startswith("0{")
        await self.ws.send_str("40/chat," + json.dumps({"token": make_token(self.user)}))
        await self.ws.send_str(f'42/chat,1["room:join",{{"room":"{self.room}"}}]')
        while True:
            frame = await self.ws.receive_str(timeout=10)
            if frame.startswith("43/chat,1"):
                assert json.loads(frame[len("43/chat,1") :])[0]["ok"] is True
                return self

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_parked_sockets_are_disconnected_and_memory_stays_flat(limited, uid, transport):
    room = uid("flood")
    parked = [await Parked(limited.url, uid("parked"), room).start() for _ in range(6)]
    if transport == "polling":
        # A long-polling client that stops polling is parked the same way.
        sleeper = ChatClient(uid("sleeper"))
        await sleeper.connect(limited.url, transports=("polling",))
        await sleeper.call("room:join", {"room": room})
    senders = [await ChatClient(uid("sender")).connect(limited.url) for _ in range(4)]
    reader = await ChatClient(uid("reader")).connect(limited.url)
    before = closed_count(limited, "backlog_exceeded")
    try:
        for s in [*senders, reader]:
            assert (await s.call("room:join", {"room": room}))["ok"] is True
        if transport == "polling":
            # stop the polling loop without telling the server
            sleeper.sio.eio.state = "disconnected"
            await asyncio.sleep(1)
        text = "f" * 3000
        rss_before = rss_kb(limited)
        per_sender = 400

        async def flood(client: ChatClient, n: int) -> None:
            for i in range(n):
                ack = await client.call(
                    "message:send",
                    {"room": room, "text": text, "client_id": f"{client.user}-{i}"},
                    timeout=30,
                )
                assert ack["ok"] is True, ack

        await asyncio.gather(*(flood(s, per_sender) for s in senders))
        expected_parked = len(parked) + (1 if transport == "polling" else 0)
        await until(
            lambda: closed_count(limited, "backlog_exceeded") >= before + expected_parked,
            f"{expected_parked} backlog_exceeded closes",
            timeout=30,
        )
        # a reading client got everything, in order per sender
        total = per_sender * len(senders)
        got = await reader.wait_for("message:new", total, timeout=60)
        for s in senders:
            seqs = [m["seq"] for m in got if m["sender"]["id"] == s.user]
            assert seqs == sorted(seqs) and len(seqs) == per_sender
        # 4.8 MB were sent to each parked socket; what the server kept for them is bounded
        grown_mb = (rss_kb(limited) - rss_before) / 1024
        assert grown_mb < 25, f"server RSS grew by {grown_mb:.1f} MB"
    finally:
        for p in parked:
            await p.close()
        for c in [*senders, reader]:
            await c.disconnect()
        if transport == "polling":
            await sleeper.sio.eio.disconnect(abort=True)


# --- silent clients -----------------------------------------------------------------------
async def test_a_client_that_stops_answering_pings_is_closed(tmp_path):
    """The websocket reader has no timeout of its own: the session monitor must close a
    socket whose client keeps its TCP connection open but answers no ping."""
    proc = ServerProcess(
        {"STORE": "sqlite", "SQLITE_PATH": str(tmp_path / "chat.db"), "WS_HEARTBEAT_INTERVAL": "1"}
    ).start(timeout=60)
    try:
        async with Raw(proc.url) as answering, Raw(proc.url, pong=False) as silent:
            await answering.connect_chat()
            await silent.connect_chat()
            # ping every 1 s, 5 s to answer: closed within about 6 s, well before 20
            assert await silent.wait_closed(timeout=20)
            assert not answering.closed.is_set()  # the one answering pings stays
            assert "2" in silent.frames and silent.frames[-1] == "1"  # pinged, then CLOSE
    finally:
        proc.stop()
