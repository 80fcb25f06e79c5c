"""Messages end to end through real Socket.IO clients against a real server process."""

from __future__ import annotations

import asyncio
import re

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_send_receive_between_two_clients(clients, uid):
    room = uid("room")
    alice, bob = await clients(uid("alice")), await clients(uid("bob"))
    joined = await alice.call("room:join", {"room": room})
    assert joined["ok"] is True
    assert joined["room"] == {"id": room, "kind": "public", "name": room}
    assert joined["last_seq"] == 0 and joined["missed"] == [] and joined["has_more"] is False
    assert (await bob.call("room:join", {"room": room}))["ok"]
    ack = await alice.call("message:send", {"room": room, "text": "  hello  ", "client_id": "c1"})
    assert ack["ok"] is True
    message = ack["message"]
    assert message["seq"] == 1 and message["text"] == "hello" and message["room"] == room
    assert message["sender"] == {"id": alice.user, "name": alice.user}
    assert message["client_id"] == "c1" and ISO_MS.match(message["created_at"])
    received = await bob.wait_for("message:new")
    assert received == [message]
    await asyncio.sleep(0.2)
    assert alice.events["message:new"] == []  # never echoed to the sending socket


async def test_sender_other_tab_receives(clients, uid):
    room, user = uid("room"), uid("u")
    tab1, tab2 = await clients(user), await clients(user)
    for tab in (tab1, tab2):
        await tab.call("room:join", {"room": room})
    ack = await tab1.call("message:send", {"room": room, "text": "x", "client_id": "c"})
    assert (await tab2.wait_for("message:new"))[0] == ack["message"]
