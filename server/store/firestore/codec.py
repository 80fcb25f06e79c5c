"""Firestore documents <-> the chat models: the only place that knows field names.

Invariants: a decoder takes what the library returns (a ``DocumentSnapshot``) and gives a
model or None for a missing document; times come back as plain aware UTC datetimes
(Firestore keeps microseconds); an encoder's dict is exactly what one document holds.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from google.cloud.firestore_v1 import SERVER_TIMESTAMP

from server.core.models import (
    Message,
    MessageDraft,
    OutboxEntry,
    OutboxItem,
    Room,
    SanctionKey,
    UserRecord,
    utcnow,
)


def utc(value: Any) -> datetime | None:
    """A plain aware UTC datetime from what Firestore returns (DatetimeWithNanoseconds)."""
    if value is None:
        return None
    value = value.astimezone(UTC)
    return datetime(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        tzinfo=UTC,
    )


def fields(snapshot: Any) -> dict[str, Any]:
    """The document's fields, ``{}`` when it does not exist."""
    return (snapshot.to_dict() or {}) if snapshot.exists else {}


# ---------------------------------------------------------------- rooms/{room}


def room_record(room: Room) -> dict[str, Any]:
    return {
        "kind": room.kind,
        "name": room.name,
        "owner": room.owner,
        "created_at": room.created_at,
    }


def room_from(snapshot: Any) -> Room | None:
    data = fields(snapshot)
    if "kind" not in data:  # missing, or only a seq counter: messages but no room record
        return None
    return Room(
        id=snapshot.id,
        kind=data["kind"],
        name=data["name"],
        owner=data.get("owner"),
        created_at=utc(data.get("created_at")) or utcnow(),
    )


def member_record(user_id: str, joined_at: datetime) -> dict[str, Any]:
    return {"user": user_id, "joined_at": joined_at}


def membership_record(joined_at: datetime) -> dict[str, Any]:
    """``users/{user}/rooms/{room}``: mirrors ``rooms/{room}/members/{user}``."""
    return {"joined_at": joined_at}


# ---------------------------------------------------------------- rooms/{room}/messages/{id}


def message_record(draft: MessageDraft, seq: int, now: datetime, write_id: str) -> dict[str, Any]:
    """``write_id`` marks the call that wrote it (see ``store.add_message``)."""
    return {
        "room": draft.room,
        "seq": seq,
        "sender_id": draft.sender_id,
        "sender_name": draft.sender_name,
        "text": draft.text,
        "client_id": draft.client_id,
        "created_at": now,
        "write_id": write_id,
        "reply_to": draft.reply_to,
        "mentions": list(draft.mentions),
    }


def message_from(snapshot: Any) -> Message:
    data = fields(snapshot)
    return Message(
        id=snapshot.id,
        room=data["room"],
        seq=int(data["seq"]),
        sender_id=data["sender_id"],
        sender_name=data["sender_name"],
        text=data["text"],
        client_id=data["client_id"],
        created_at=utc(data["created_at"]) or utcnow(),
        reply_to=data.get("reply_to"),
        mentions=tuple(data.get("mentions") or ()),
        edited_at=utc(data.get("edited_at")),
        revision=int(data.get("revision", 0)),
        deleted_at=utc(data.get("deleted_at")),
        change_seq=int(data.get("change_seq", 0)),
        reactions=tuple(sorted((str(e), int(c)) for e, c in (data.get("reactions") or {}).items())),
    )


def message_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """The document fields of changed ``Message`` fields (an edit, a deletion, reactions)."""
    record = dict(changes)
    if "mentions" in record:
        record["mentions"] = list(record["mentions"])
    if "reactions" in record:
        record["reactions"] = dict(record["reactions"])
    return record


# ---------------------------------------------------------------- changes and reactions


def change_seq_of(snapshot: Any) -> int:
    """``rooms/{room}/counters/changes``: the room's change seq, 0 before the first."""
    return int(fields(snapshot).get("change_seq", 0))


def reaction_record(message_id: str, emoji: str, user_id: str) -> dict[str, Any]:
    """``rooms/{room}/reactions/{key}``: one user's reaction with one emoji to one message."""
    return {"message_id": message_id, "emoji": emoji, "user": user_id}


def write_id_of(snapshot: Any) -> str | None:
    return fields(snapshot).get("write_id")


def guard_record(message_id: str) -> dict[str, Any]:
    """``rooms/{room}/seqs/{seq}``: exists once per used seq."""
    return {"message_id": message_id}


def seq_of(snapshot: Any) -> int:
    """The ``seq`` field of a message or read marker, 0 when missing."""
    return int(fields(snapshot).get("seq", 0))


# ---------------------------------------------------------------- read markers, users


def marker_record(seq: int) -> dict[str, Any]:
    return {"seq": seq, "updated_at": utcnow()}


def user_from(snapshot: Any) -> UserRecord | None:
    if not snapshot.exists:
        return None
    data = fields(snapshot)
    return UserRecord(snapshot.id, data.get("name", snapshot.id), utc(data.get("last_seen")))


# ---------------------------------------------------------------- sanctions/{key.document_id()}


def sanction_record(key: SanctionKey, until: float | None) -> dict[str, Any]:
    return {"kind": key.kind, "scope": key.scope, "user": key.user_id, "until": until}


def sanction_until(snapshot: Any) -> float | None:
    return fields(snapshot).get("until")


# ---------------------------------------------------------------- outbox/{outbox_id(...)}

#: The fields :meth:`FirestoreStore.outbox_claim` reads of each queued entry.
OUTBOX_QUEUE_FIELDS = ["queue", "recorded_at", "stamp", "state", "next_at", "lease_until"]


def outbox_id(event_id: str, endpoint: str) -> str:
    """One document per (event, endpoint): a repeat of the same event finds it."""
    key = f"{event_id}\x00{endpoint}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def outbox_queue(endpoint: str, ordering: str) -> str:
    """The queue an entry waits in; endpoint names hold no ``/``, so it is unambiguous."""
    return f"{endpoint}/{ordering}"


def outbox_record(entry: OutboxEntry, stamp: int) -> dict[str, Any]:
    """A pending entry. Its place in its queue is (``recorded_at``, ``stamp``): the commit
    time of the write that recorded it, then the writing process's increasing counter
    (entries of one commit, and the emulator's millisecond clock)."""
    return {
        "event_id": entry.event_id,
        "endpoint": entry.endpoint,
        "ordering": entry.ordering,
        "queue": outbox_queue(entry.endpoint, entry.ordering),
        "body": entry.body,
        "state": "pending",
        "attempts": 0,
        "next_at": 0.0,
        "lease_owner": None,
        "lease_until": 0.0,
        "last_error": None,
        "recorded_at": SERVER_TIMESTAMP,
        "stamp": stamp,
    }


def outbox_place(data: dict[str, Any]) -> tuple[Any, int]:
    """The sort key of an entry in its queue (and across queues, for claiming)."""
    return data["recorded_at"], int(data["stamp"])


def outbox_due(data: dict[str, Any], now: float) -> bool:
    """Pending, past its retry time, and nobody holds its lease at ``now``."""
    return (
        data.get("state") == "pending"
        and float(data.get("next_at", 0.0)) <= now
        and float(data.get("lease_until", 0.0)) <= now
    )


def outbox_lease(owner: str, until: float) -> dict[str, Any]:
    return {"lease_owner": owner, "lease_until": until}


def outbox_item_from(snapshot: Any) -> OutboxItem:
    """``pos`` is the entry's stamp (the document is found again by event and endpoint)."""
    data = fields(snapshot)
    entry = OutboxEntry(data["event_id"], data["endpoint"], data["ordering"], data["body"])
    return OutboxItem(int(data["stamp"]), entry, int(data.get("attempts", 0)))


def outbox_settled(attempts: int, next_at: float, dead: bool, error: str) -> dict[str, Any]:
    """A failed attempt: retried at ``next_at``, or dead; the lease is released."""
    return {
        "attempts": attempts,
        "next_at": next_at,
        "state": "dead" if dead else "pending",
        "last_error": error[:500],
        "lease_owner": None,
        "lease_until": 0.0,
    }
