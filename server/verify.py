"""``chat-server verify URL...``: check a live deployment end to end, as an operator would.

Given instance URLs (or one load balancer URL), it checks ``/api/health`` everywhere,
connects a test user to every instance (through a load balancer it reconnects until it has
met every live instance id the health figures announce), sends a message on one instance
and confirms that it arrives on every other, checks that presence crosses instances, prints
a table and exits non-zero on any failure.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import httpx
import jwt
import socketio

from server.auth import DevTokens

NAMESPACE = "/chat"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Probe:
    """One connected test socket and what it received."""

    url: str
    user: str
    client: socketio.AsyncClient
    instance_id: str = ""
    events: dict[str, list] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, event: str, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(item) for item in self.events.get(event, [])):
                return True
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                pass
        return False


class Verifier:
    def __init__(
        self,
        urls: list[str],
        token_secret: str | None,
        token: str | None,
        timeout: float = 10.0,
        algorithm: str = "HS256",
    ) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self.token_secret = token_secret
        self.token = token
        self.timeout = timeout
        self.algorithm = algorithm
        self.checks: list[Check] = []
        self.run_id = uuid.uuid4().hex[:8]

    def record(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def token_for(self, user: str) -> str:
        if self.token:
            return self.token
        minter = DevTokens(secret=self.token_secret or "", algorithm=self.algorithm)
        return minter.mint(user, user, ttl=600)

    async def health(self, http: httpx.AsyncClient) -> dict[str, dict]:
        found = {}
        for url in self.urls:
            try:
                response = await http.get(f"{url}/api/health")
                body = response.json()
                ok = response.status_code == 200 and body.get("status") == "healthy"
                failing = {k: v for k, v in body.get("checks", {}).items() if not v.get("ok")}
                self.record(
                    f"health {url}",
                    ok,
                    f"{body.get('status')} instance={body.get('instance_id')}"
                    + (f" failing={failing}" if failing else ""),
                )
                found[url] = body
            except Exception as exc:
                self.record(f"health {url}", False, f"no answer: {exc}")
        return found

    async def connect(self, url: str, user: str) -> Probe:
        client = socketio.AsyncClient(reconnection=False)
        probe = Probe(url, user, client)

        async def record(event, data=None):
            probe.events.setdefault(event, []).append(data)
            if event == "session":
                probe.instance_id = data.get("instance_id", "")
            probe.arrived.set()

        client.on("*", record, namespace=NAMESPACE)
        await client.connect(
            url,
            namespaces=[NAMESPACE],
            auth={"token": self.token_for(user)},
            transports=["websocket"],
            wait_timeout=self.timeout,
        )
        await probe.wait("session", lambda _: True, self.timeout)
        return probe

    async def probes(self, health: dict[str, dict]) -> list[Probe]:
        """One probe per live instance: per URL, or by reconnecting through one URL."""
        if len(self.urls) > 1:
            probes = [
                await self.connect(url, f"verify-{self.run_id}-{i}")
                for i, url in enumerate(self.urls)
            ]
            return probes
        url = self.urls[0]
        cluster = (health.get(url) or {}).get("cluster") or {}
        wanted = int(cluster.get("instances") or 1)
        by_instance: dict[str, Probe] = {}
        for attempt in range(max(10, wanted * 10)):
            probe = await self.connect(url, f"verify-{self.run_id}-{attempt}")
            if probe.instance_id in by_instance:
                await probe.client.disconnect()
            else:
                by_instance[probe.instance_id] = probe
            if len(by_instance) >= wanted:
                break
        self.record(
            "instances met",
            len(by_instance) >= wanted,
            f"{len(by_instance)} of {wanted}: {', '.join(sorted(by_instance))}",
        )
        return list(by_instance.values())

    async def message_crosses(self, probes: list[Probe]) -> None:
        room = f"verify-{self.run_id}"
        for probe in probes:
            ack = await probe.client.call(
                "room:join", {"room": room}, namespace=NAMESPACE, timeout=self.timeout
            )
            if not ack.get("ok"):
                self.record(f"join on {probe.instance_id}", False, str(ack))
                return
        sender, receivers = probes[0], probes[1:]
        ack = await sender.client.call(
            "message:send",
            {"room": room, "text": "verify", "client_id": self.run_id},
            namespace=NAMESPACE,
            timeout=self.timeout,
        )
        if not self.record(
            f"send on {sender.instance_id}", bool(ack.get("ok")), str(ack.get("error") or "acked")
        ):
            return
        seq = ack["message"]["seq"]
        for receiver in receivers:
            got = await receiver.wait(
                "message:new", lambda m: m.get("room") == room and m.get("seq") == seq, self.timeout
            )
            self.record(
                f"message {sender.instance_id} → {receiver.instance_id}",
                got,
                "delivered" if got else "not delivered",
            )

    async def presence_crosses(self, probes: list[Probe]) -> None:
        watcher, target_url = probes[0], probes[-1].url
        if self.token:  # one ready token: every probe is the same user, so read its state
            user = jwt.decode(self.token, options={"verify_signature": False}).get("sub", "")
            await watcher.client.disconnect()
            ack = await probes[-1].client.call(
                "presence:subscribe", {"users": [user]}, namespace=NAMESPACE, timeout=self.timeout
            )
            status = ((ack.get("presence") or {}).get(user) or {}).get("status")
            self.record(
                f"presence state on {probes[-1].instance_id}",
                status == "online",
                f"{user}: {status}",
            )
            return
        user = f"verify-{self.run_id}-presence"
        await watcher.client.call(
            "presence:subscribe", {"users": [user]}, namespace=NAMESPACE, timeout=self.timeout
        )
        visitor = await self.connect(target_url, user)
        seen = await watcher.wait(
            "presence",
            lambda e: e.get("user") == user and e.get("status") == "online",
            self.timeout,
        )
        self.record(
            f"presence {visitor.instance_id} → {watcher.instance_id}",
            seen,
            "online seen" if seen else "no online event",
        )
        await visitor.client.disconnect()

    async def run(self) -> bool:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            health = await self.health(http)
        if not health:
            return False
        probes: list[Probe] = []
        try:
            probes = await self.probes(health)
            if len(probes) < 2:
                self.record(
                    "cross-instance checks",
                    len(probes) == 1 and len(self.urls) == 1,
                    "one instance: nothing crosses",
                )
            else:
                await self.message_crosses(probes)
                await self.presence_crosses(probes)
        except Exception as exc:
            self.record("connect", False, f"{type(exc).__name__}: {exc}")
        finally:
            for probe in probes:
                await probe.client.disconnect()
        return all(check.ok for check in self.checks)

    def table(self) -> str:
        width = max(len(check.name) for check in self.checks)
        lines = [f"{'check':<{width}}  result  detail"]
        lines += [
            f"{c.name:<{width}}  {'ok' if c.ok else 'FAIL':<6}  {c.detail}" for c in self.checks
        ]
        return "\n".join(lines)
