"""firebase.json + firestore.indexes.json deploy from the repository and match the codec.

Every field the store writes is exempt from indexing except the ones queries filter or order
on; one composite index serves unread mentions, one the webhook outbox's queues
(``firebase deploy --only firestore:indexes``, docs/firestore.md).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from server.core.models import MessageDraft, OutboxEntry, Room, SanctionKey
from server.store.firestore import codec

ROOT = Path(__file__).resolve().parents[1]
QUERIED = {
    ("messages", "seq"),
    ("members", "user"),  # member pages
    ("messages", "change_seq"),  # changes_after
    ("messages", "mentions"),  # unread mentions (with the composite index)
    ("reactions", "message_id"),  # erasing a deleted message's reactions
    ("outbox", "state"),  # outbox counts (and, with the composite index, the queues)
}
MENTIONS_INDEX = {
    "collectionGroup": "messages",
    "queryScope": "COLLECTION",
    "fields": [
        {"fieldPath": "mentions", "arrayConfig": "CONTAINS"},
        {"fieldPath": "seq", "order": "ASCENDING"},
    ],
}
#: the outbox claim's walk: state ==, queue >, ordered by queue, recorded_at, stamp
OUTBOX_INDEX = {
    "collectionGroup": "outbox",
    "queryScope": "COLLECTION",
    "fields": [
        {"fieldPath": "state", "order": "ASCENDING"},
        {"fieldPath": "queue", "order": "ASCENDING"},
        {"fieldPath": "recorded_at", "order": "ASCENDING"},
        {"fieldPath": "stamp", "order": "ASCENDING"},
    ],
}


def written_fields() -> set[tuple[str, str]]:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    draft = MessageDraft("r", "u", "U", "text", "c", reply_to="p", mentions=("v",))
    changed = {"edited_at": now, "revision": 1, "deleted_at": now, "change_seq": 1}
    changed["reactions"] = (("x", 1),)
    records = {
        "messages": {
            **codec.message_record(draft, 1, now, "w"),
            **codec.message_changes(changed),
        },
        "counters": {"change_seq": 1},
        "reactions": codec.reaction_record("m", "x", "u"),
        "seqs": codec.guard_record("m"),
        "members": codec.member_record("u", now),
        "read_markers": codec.marker_record(1),
        "rooms": {
            **codec.room_record(Room("r", "public", "r")),
            "last_seq": 1,  # older data
            **codec.membership_record(now),  # users/{user}/rooms/{room} mirrors
        },
        "users": {"name": "U", "last_seen": now},
        "system": {"kind": "health", "created_at": now},
        "sanctions": codec.sanction_record(SanctionKey("ban", "r", "u"), None),
        "outbox": {
            **codec.outbox_record(OutboxEntry("e", "0", "r", "{}"), 1),
            **codec.outbox_settled(1, 2.0, False, "HTTP 500"),
            **codec.outbox_lease("instance", 3.0),
        },
    }
    return {(group, field) for group, record in records.items() for field in record}


def test_firebase_json_deploys_the_index_file():
    config = json.loads((ROOT / "firebase.json").read_text())
    assert (ROOT / config["firestore"]["indexes"]).is_file()


def test_every_written_field_but_seq_is_exempt_from_indexing():
    indexes = json.loads((ROOT / "firestore.indexes.json").read_text())
    assert indexes["indexes"] == [MENTIONS_INDEX, OUTBOX_INDEX]  # the composite indexes
    exempt = {
        (o["collectionGroup"], o["fieldPath"])
        for o in indexes["fieldOverrides"]
        if o["indexes"] == []
    }
    assert exempt == written_fields() - QUERIED


def test_the_outbox_claim_projects_every_field_it_judges_by():
    """The emulator ignores projections; production returns only the selected fields."""
    record = {**codec.outbox_record(OutboxEntry("e", "0", "r", "{}"), 7), "recorded_at": 1}
    projected = {name: record[name] for name in codec.OUTBOX_QUEUE_FIELDS}
    assert codec.outbox_due(projected, now=0.0)
    assert codec.outbox_place(projected) == (1, 7)
    assert not codec.outbox_due({**projected, **codec.outbox_lease("i", 5.0)}, now=1.0)
