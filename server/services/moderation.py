"""Bans and mutes per room, blocks between users, and token revocations.

The store keeps every sanction durably; this service answers "may this happen?" on hot
paths (send, join, connect) from a small per-instance cache. Invariants:
- a sanction set through any instance is enforced on every instance at once: the change
  publishes a ``sanction`` control event and each instance drops that key from its cache;
- if that event is lost (a Redis outage drops pub/sub messages), the cached answer is at
  most ``cache_ttl`` seconds old;
- an expired sanction (``until`` in the past) is not in force, wherever it is read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from server.core import metrics
from server.core.errors import ChatError
from server.core.models import Identity, SanctionKey
from server.services.ports import ControlPublisher
from server.store.base import Store

SANCTION = "sanction"


class Moderation:
    def __init__(
        self,
        store: Store,
        control: ControlPublisher,
        *,
        cache_ttl: float = 10.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.control = control
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.clock = clock
        self._cache: OrderedDict[SanctionKey, tuple[float | None, bool, float]] = OrderedDict()

    # --- reads ----------------------------------------------------------------------------
    async def in_force(self, keys: list[SanctionKey]) -> dict[SanctionKey, float | None]:
        """The sanctions among ``keys`` in force now, with their ``until`` (None: no end)."""
        now = self.clock()
        result: dict[SanctionKey, float | None] = {}
        missing: list[SanctionKey] = []
        for key in keys:
            cached = self._cache.get(key)
            if cached is None or now - cached[2] > self.cache_ttl:
                missing.append(key)
                continue
            self._cache.move_to_end(key)
            until, present, _ = cached
            if present and (until is None or until > now):
                result[key] = until
        if missing:
            found = await self.store.get_sanctions(missing)
            for key in missing:
                present = key in found
                until = found.get(key)
                self._remember(key, until, present, now)
                if present and (until is None or until > now):
                    result[key] = until
        return result

    def _remember(self, key: SanctionKey, until: float | None, present: bool, now: float) -> None:
        self._cache[key] = (until, present, now)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def check_send(self, room_id: str, user_id: str) -> None:
        """Raise ``banned`` or ``muted`` when ``user_id`` may not send in ``room_id`` now."""
        ban, mute = SanctionKey("ban", room_id, user_id), SanctionKey("mute", room_id, user_id)
        found = await self.in_force([ban, mute])
        if ban in found:
            metrics.SANCTIONS_ENFORCED.labels("ban").inc()
            raise ChatError("banned", f"you are banned from room {room_id!r}")
        if mute in found:
            metrics.SANCTIONS_ENFORCED.labels("mute").inc()
            until = found[mute]
            raise ChatError(
                "muted",
                f"you are muted in room {room_id!r} for {max(0, int((until or 0) - self.clock()))} s more",
            )

    async def check_join(self, room_id: str, user_id: str) -> None:
        if await self.in_force([SanctionKey("ban", room_id, user_id)]):
            metrics.SANCTIONS_ENFORCED.labels("ban").inc()
            raise ChatError("banned", f"you are banned from room {room_id!r}")

    async def check_direct(self, user_id: str, other: str) -> None:
        """Raise ``blocked`` when either user blocks the other."""
        keys = [SanctionKey("block", other, user_id), SanctionKey("block", user_id, other)]
        if await self.in_force(keys):
            metrics.SANCTIONS_ENFORCED.labels("block").inc()
            raise ChatError("blocked", "direct messages between these users are blocked")

    async def revoked(self, who: Identity) -> bool:
        """True when ``who``'s token was issued before a revocation of their tokens.

        A revocation's ``until`` is its cut-off time, which lies in the past: it is read
        from the store record, not judged as an expiry.
        """
        key = SanctionKey("revoke", "", who.user_id)
        cached = self._cache.get(key)
        now = self.clock()
        if cached is None or now - cached[2] > self.cache_ttl:
            found = await self.store.get_sanctions([key])
            self._remember(key, found.get(key), key in found, now)
            cached = self._cache[key]
        before, present, _ = cached
        return present and before is not None and who.issued_at < before

    # --- changes --------------------------------------------------------------------------
    async def set(self, key: SanctionKey, until: float | None) -> None:
        await self.store.put_sanction(key, until)
        await self._changed(key)

    async def lift(self, key: SanctionKey) -> None:
        await self.store.delete_sanction(key)
        await self._changed(key)

    async def revoke_tokens(self, user_id: str, before: float) -> None:
        """Tokens of ``user_id`` issued before ``before`` are refused from now on.

        Stored as a sanction whose ``until`` is the cut-off; it never expires by itself.
        """
        key = SanctionKey("revoke", "", user_id)
        await self.store.put_sanction(key, before)
        self._cache.pop(key, None)
        await self._changed(key)

    async def _changed(self, key: SanctionKey) -> None:
        self._cache.pop(key, None)
        await self.control.control(
            SANCTION, {"kind": key.kind, "scope": key.scope, "user": key.user_id}
        )

    def forget(self, data: dict) -> None:
        """A ``sanction`` control event from any instance: drop that key from the cache."""
        try:
            key = SanctionKey(data["kind"], str(data["scope"]), str(data["user"]))
        except (KeyError, TypeError):
            return
        self._cache.pop(key, None)
