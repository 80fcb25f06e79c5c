"""The store interface: rooms, members, messages, read markers and user records.

One implementation per file beside this one (``memory.py``, ``sqlite.py``,
the ``firestore/`` package); ``tests/test_store_contract.py`` runs the same suite against each.
Every method may raise :class:`server.errors.StoreUnavailable` when the backend does not
answer; callers turn that into the ``unavailable`` ack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime

from server.core.models import (
    AddResult,
    ChangeResult,
    Message,
    MessageDraft,
    OutboxEntry,
    OutboxItem,
    Outgoing,
    Room,
    SanctionKey,
    Unread,
    UserRecord,
)


class Store(ABC):
    """Durable chat state. Implementations must be safe for concurrent use on one loop."""

    #: True when the store can allocate a room's next seq itself cheaply and atomically
    #: for every writer (SQLite, memory). False when an external allocator (Redis INCR)
    #: should do it when available, because the store's own way is slow (Firestore).
    allocates_seq_cheaply: bool = True

    async def start(self) -> None:
        """Open connections and create what is missing (tables, health document)."""

    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the store cannot serve a read now (used by /api/health)."""

    # rooms and members
    @abstractmethod
    async def get_room(self, room_id: str) -> Room | None: ...

    @abstractmethod
    async def create_room(
        self, room: Room, members: list[str], outbox: list[OutboxEntry] | None = None
    ) -> tuple[Room, bool]:
        """Create ``room`` with ``members`` unless it exists; return (stored room, created).

        ``outbox`` entries are recorded with the room, atomically, only when it is created."""

    @abstractmethod
    async def add_members(
        self, room_id: str, user_ids: list[str], outbox: list[OutboxEntry] | None = None
    ) -> None:
        """Add members; ``outbox`` entries are recorded in the same write (as by
        ``outbox_add``: one already recorded is left as it is)."""

    @abstractmethod
    async def remove_members(
        self, room_id: str, user_ids: list[str], outbox: list[OutboxEntry] | None = None
    ) -> None:
        """Remove members; ``outbox`` entries are recorded in the same write."""

    @abstractmethod
    async def is_member(self, room_id: str, user_id: str) -> bool: ...

    @abstractmethod
    async def list_members(
        self, room_id: str, after: str = "", limit: int | None = None
    ) -> list[str]:
        """Member ids above ``after``, sorted, at most ``limit`` (all when None)."""

    @abstractmethod
    async def count_members(self, room_id: str) -> int:
        """How many members the room has, without listing them."""

    # messages
    @abstractmethod
    async def add_message(self, draft: MessageDraft, seq: int | None = None) -> AddResult:
        """Store ``draft`` durably and return it with its id, seq and time; a new message's
        ``draft.outgoing`` entries are recorded in the same write.

        Idempotent on (room, sender, client_id): a repeat returns the stored message with
        ``created=False``. With ``seq=None`` the store allocates ``last_seq + 1``
        atomically; with a given ``seq`` it stores that one and raises
        :class:`server.errors.SeqTaken` if the room already has it.
        """

    @abstractmethod
    async def find_message(
        self, room_id: str, sender_id: str, client_id: str
    ) -> Message | None: ...

    @abstractmethod
    async def last_seq(self, room_id: str) -> int:
        """Highest stored seq of the room, 0 when it has no message."""

    @abstractmethod
    async def messages_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages with seq > ``after``, ascending."""

    @abstractmethod
    async def messages_before(self, room_id: str, before: int | None, limit: int) -> list[Message]:
        """The ``limit`` messages closest below ``before`` (latest when None), ascending."""

    @abstractmethod
    async def get_messages(self, room_id: str, ids: list[str]) -> dict[str, Message]:
        """The messages of ``room_id`` among ``ids`` (tombstones included), by id."""

    # changes: each one that happens bumps the room's change seq by exactly one and
    # stamps the message with it, atomically (the seq is dense per room).
    @abstractmethod
    async def change_seq(self, room_id: str) -> int:
        """The room's change seq: how many changes it has had (0 for none)."""

    @abstractmethod
    async def changes_after(self, room_id: str, after: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages whose ``change_seq`` is above ``after``, ascending by it."""

    @abstractmethod
    async def edit_message(
        self,
        room_id: str,
        message_id: str,
        text: str,
        mentions: tuple[str, ...],
        at: datetime,
        outgoing: Outgoing | None = None,
    ) -> ChangeResult:
        """Replace the text (revision + 1, ``edited_at``); unchanged when the text is the same,
        refused ``"deleted"`` on a tombstone. A stored edit records ``outgoing``'s entries
        for the edited message in the same transaction."""

    @abstractmethod
    async def delete_message(
        self, room_id: str, message_id: str, at: datetime, outgoing: Outgoing | None = None
    ) -> ChangeResult:
        """Make the message a tombstone: erase its text, mentions and reactions (their
        records too); unchanged when it already is one. A stored deletion records
        ``outgoing``'s entries for the tombstone in the same transaction."""

    @abstractmethod
    async def add_reaction(
        self, room_id: str, message_id: str, user_id: str, emoji: str, max_distinct: int
    ) -> ChangeResult:
        """One reaction per (message, user, emoji): unchanged when it exists, refused
        ``"deleted"`` on a tombstone and ``"full"`` when ``emoji`` would be the message's
        ``max_distinct + 1``-th distinct emoji."""

    @abstractmethod
    async def remove_reaction(
        self, room_id: str, message_id: str, user_id: str, emoji: str
    ) -> ChangeResult:
        """Remove the user's reaction; unchanged when there is none."""

    @abstractmethod
    async def my_reactions(
        self, room_id: str, user_id: str, message_ids: list[str]
    ) -> dict[str, frozenset[str]]:
        """The emojis ``user_id`` reacted with, for those of ``message_ids`` that have any."""

    # the room list
    async def member_rooms(self, user_id: str, limit: int | None = None) -> list[str]:
        """The ids of the rooms ``user_id`` is a member of, at most ``limit``, in room id
        order (each store answers from its membership index alone: no room and no message
        is read)."""
        found = sorted(room.id for room, _ in await self.user_rooms(user_id))
        return found if limit is None else found[:limit]

    @abstractmethod
    async def user_rooms(self, user_id: str) -> list[tuple[Room, Message | None]]:
        """Every room ``user_id`` is a member of, with its last message (None when empty)."""

    @abstractmethod
    async def unread(
        self, room_id: str, user_id: str, cap: int, marker: int | None = None
    ) -> Unread:
        """The read marker, the messages after it that are not deleted and not the user's
        own, and the user's mentions after it in messages not deleted; counts stop at ``cap``.
        A caller that knows the marker passes it (the store then does not read it)."""

    # read markers
    @abstractmethod
    async def set_read_marker(self, room_id: str, user_id: str, seq: int) -> int:
        """Move the marker forward to ``seq`` (never backwards); return the stored value."""

    @abstractmethod
    async def get_read_marker(self, room_id: str, user_id: str) -> int: ...

    async def advance_read_marker(self, room_id: str, user_id: str, seq: int) -> tuple[int, int]:
        """Move the marker forward to ``seq``; return (value before, stored value).

        This default asks twice; a store may answer both from one read (Firestore does it
        in its one transaction).
        """
        previous = await self.get_read_marker(room_id, user_id)
        return previous, await self.set_read_marker(room_id, user_id, seq)

    # users
    @abstractmethod
    async def upsert_user(self, user_id: str, name: str) -> None: ...

    @abstractmethod
    async def set_last_seen(self, user_id: str, when: datetime) -> None: ...

    @abstractmethod
    async def get_users(self, user_ids: list[str]) -> dict[str, UserRecord]: ...

    # sanctions: bans and mutes per room, blocks between users, token revocations
    @abstractmethod
    async def put_sanction(self, key: SanctionKey, until: float | None) -> None:
        """Record ``key`` in force until ``until`` (Unix time; None: until lifted)."""

    @abstractmethod
    async def delete_sanction(self, key: SanctionKey) -> None: ...

    @abstractmethod
    async def get_sanctions(self, keys: list[SanctionKey]) -> dict[SanctionKey, float | None]:
        """The recorded ones among ``keys``, expired or not (the caller judges ``until``)."""

    # webhook outbox: a table (SQLite), a collection (Firestore), dicts (memory)
    supports_outbox: bool = False

    async def outbox_add(self, entries: list[OutboxEntry]) -> None:
        """Record entries; one already recorded (same event and endpoint) is left as it is."""
        raise NotImplementedError("this store keeps no webhook outbox")

    async def outbox_claim(
        self, owner: str, now: float, lease: float, limit: int
    ) -> list[OutboxItem]:
        """Lease up to ``limit`` due entries to ``owner`` until ``now + lease``.

        Only the oldest pending entry of each (endpoint, ordering) is ever handed out, and
        only when nobody else holds its lease: per ordering, events go out one at a time,
        in order, through exactly one instance at a time.
        """
        raise NotImplementedError("this store keeps no webhook outbox")

    async def outbox_finish(
        self,
        item: OutboxItem,
        owner: str,
        delivered: bool,
        next_at: float = 0.0,
        dead: bool = False,
        error: str = "",
    ) -> bool:
        """Settle a claimed entry: delivered (removed), retried at ``next_at``, or dead.

        Does nothing and returns False when ``owner`` no longer holds the lease."""
        raise NotImplementedError("this store keeps no webhook outbox")

    async def outbox_counts(self) -> dict[str, int]:
        """``{"pending": n, "dead": m}``."""
        raise NotImplementedError("this store keeps no webhook outbox")
