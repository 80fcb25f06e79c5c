"""Domain records shared by the stores, the services and the wire format."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, NamedTuple, overload

RoomKind = Literal["public", "private", "direct"]


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def iso(ts: datetime) -> str: ...
@overload
def iso(ts: datetime | None) -> str | None: ...
def iso(ts: datetime | None) -> str | None:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-27T05:17:12.123Z``.

    The last answer is remembered by the datetime object's identity: a new message's
    time is formatted for its view, its preview and its webhook event in a row. The
    (object, text) pair is read and replaced whole, so threads cannot mix two answers."""
    if ts is None:
        return None
    last = _last_iso
    if last[0] is ts:
        return last[1]
    utc = ts if ts.tzinfo is UTC else ts.astimezone(UTC)
    # isoformat is C code; strftime and an f-string cost ~5 % of a busy send path
    text = utc.isoformat(timespec="milliseconds")[:-6] + "Z"  # "+00:00" → "Z"
    _remember_iso(ts, text)
    return text


_last_iso: tuple[datetime | None, str] = (None, "")


def _remember_iso(ts: datetime, text: str) -> None:
    global _last_iso
    _last_iso = (ts, text)


def parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def iso_from_epoch(seconds: float) -> str | None:
    """``iso`` of a Unix time; None beyond what a datetime holds (year > 9999)."""
    try:
        return iso(datetime.fromtimestamp(seconds, UTC))
    except (OverflowError, ValueError, OSError):
        return None


#: The sender of messages the application's backend posts "as the system". No token can
#: carry it: user ids never contain ``$``.
SYSTEM_USER_ID = "$system"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for (or the system, for the server API)."""

    user_id: str
    name: str
    expires_at: float
    role: str | None = None
    #: the token's ``iat``; 0 when it has none (then any revocation covers it)
    issued_at: float = 0.0

    @property
    def is_system(self) -> bool:
        return self.user_id == SYSTEM_USER_ID


@dataclass(frozen=True, slots=True)
class Room:
    id: str
    kind: RoomKind
    name: str
    owner: str | None = None
    created_at: datetime = field(default_factory=utcnow)

    def to_wire(self) -> dict:
        return {"id": self.id, "kind": self.kind, "name": self.name}


@dataclass(frozen=True, slots=True)
class MessageDraft:
    """What a sender asks to store; the store gives it an id, a seq and a time.

    ``mentions`` are the users the text mentions who may read the room (the sender
    included when they mention themselves); ``reply_to`` is a message id of the same room.
    """

    room: str
    sender_id: str
    sender_name: str
    text: str
    client_id: str
    #: webhook events to record in the same transaction as the message (when it is new)
    outgoing: Outgoing | None = field(default=None, compare=False)
    reply_to: str | None = None
    mentions: tuple[str, ...] = ()
    #: ``message_id(room, sender_id, client_id)``, worked out once
    message_id: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "message_id", message_id(self.room, self.sender_id, self.client_id)
        )

    def stored(self, seq: int, created_at: datetime) -> Message:
        """The message this draft becomes once stored with ``seq`` at ``created_at``."""
        return Message(
            id=self.message_id,
            room=self.room,
            seq=seq,
            sender_id=self.sender_id,
            sender_name=self.sender_name,
            text=self.text,
            client_id=self.client_id,
            created_at=created_at,
            reply_to=self.reply_to,
            mentions=self.mentions,
        )


#: (emoji, count) pairs sorted by emoji: a message's reactions, aggregated.
ReactionCounts = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message in its current state.

    ``change_seq`` is the room's change sequence at the message's last edit, deletion or
    reaction change (0 when it never changed). A deleted message is a tombstone: it keeps
    its id, seq, sender and times; ``text``, ``mentions`` and ``reactions`` are empty.
    """

    id: str
    room: str
    seq: int
    sender_id: str
    sender_name: str
    text: str
    client_id: str
    created_at: datetime
    reply_to: str | None = None
    mentions: tuple[str, ...] = ()
    edited_at: datetime | None = None
    revision: int = 0
    deleted_at: datetime | None = None
    change_seq: int = 0
    reactions: ReactionCounts = ()

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    def to_wire(self, reply: dict | None = None, mine: frozenset[str] = frozenset()) -> dict:
        """The message as clients see it; ``reply`` is its parent's quote, ``mine`` the
        emojis the viewer reacted with."""
        return {
            "id": self.id,
            "room": self.room,
            "seq": self.seq,
            "sender": {"id": self.sender_id, "name": self.sender_name},
            "text": self.text,
            "client_id": self.client_id,
            "created_at": iso(self.created_at),
            "reply_to": reply,
            "mentions": list(self.mentions),
            "edited_at": iso(self.edited_at),
            "revision": self.revision,
            "deleted": self.deleted,
            "change_seq": self.change_seq,
            "reactions": reactions_wire(self.reactions, mine),
        }


def reactions_wire(counts: ReactionCounts, mine: frozenset[str] | None) -> list[dict]:
    """``[{emoji, count, me}]`` (``me`` left out when ``mine`` is None: a room broadcast)."""
    if mine is None:
        return [{"emoji": emoji, "count": count} for emoji, count in counts]
    return [{"emoji": emoji, "count": count, "me": emoji in mine} for emoji, count in counts]


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """Outcome of an edit, a deletion or a reaction change.

    ``message`` is None when no such message exists in the room. ``changed`` is False for
    a repeat (nothing stored, nothing to broadcast). ``refused`` names why a change was
    not made: ``"deleted"`` (the message is a tombstone) or ``"full"`` (the message has
    the most distinct reactions allowed).
    """

    message: Message | None
    changed: bool
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class Unread:
    """A user's position in a room: read marker, unread messages and unread mentions.

    Both counts stop at the cap they were asked with (a count at the cap means "at least").
    """

    read_seq: int
    unread: int
    mentions: int


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: str
    name: str
    last_seen: datetime | None = None


@dataclass(frozen=True, slots=True)
class AddResult:
    """Outcome of storing a draft: the stored message and whether this call created it."""

    message: Message
    created: bool


def message_id(room: str, sender_id: str, client_id: str) -> str:
    """Deterministic id of a message: the same (room, sender, client_id) always maps to it.

    Stores use it to make retried sends idempotent (a second create of the same id fails),
    and it is random-looking, so Firestore document ids do not hotspot.
    """
    key = f"{room}\x00{sender_id}\x00{client_id}".encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()


SanctionKind = Literal["ban", "mute", "block", "revoke"]


class SanctionKey(NamedTuple):
    """What a sanction applies to.

    - ``ban`` / ``mute``: ``user_id`` in room ``scope``;
    - ``block``: ``user_id`` blocks user ``scope`` (direct rooms between them are refused);
    - ``revoke``: tokens of ``user_id`` issued before the stored time (``scope`` is empty).

    A tuple, so hashing and comparing it (every send looks two up) is C code.
    """

    kind: SanctionKind
    scope: str
    user_id: str

    def document_id(self) -> str:
        """A stable id made only of characters every store accepts."""
        raw = f"{self.kind}\x00{self.scope}\x00{self.user_id}".encode()
        return hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Webhook events a message write asks for: one outbox entry per endpoint.

    The store calls :meth:`entries` inside the transaction that creates, edits or deletes
    the message, once it knows the message's seq, time and change seq, so the event exists
    exactly when the change does. ``event_id`` is the id itself, or made from the stored
    message (a change's id names its change seq); ``render(message)`` makes the body.
    """

    event_id: str | Callable[[Message], str]
    endpoints: tuple[str, ...]
    render: Callable[[Message], str]

    def entries(self, message: Message) -> list[OutboxEntry]:
        """The entries to record with ``message``, ordered in its room."""
        event_id = self.event_id if isinstance(self.event_id, str) else self.event_id(message)
        body = self.render(message)
        return [OutboxEntry(event_id, endpoint, message.room, body) for endpoint in self.endpoints]


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One event for one endpoint, waiting in the outbox.

    ``ordering`` groups events delivered in order (a room, or a user for presence); within
    it, events go out in the order they were recorded, one at a time.
    """

    event_id: str
    endpoint: str
    ordering: str
    body: str


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """An outbox entry claimed for delivery by one instance until its lease ends."""

    pos: int
    entry: OutboxEntry
    attempts: int
