"""firebase.json + firestore.indexes.json deploy from the repository and match the codec.

Every field the store writes is exempt from indexing except the fields a query filters or
orders on (``messages.seq``, ``members.user``) (``firebase deploy --only firestore:indexes``, docs/firestore.md).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from server.core.models import MessageDraft, Room, SanctionKey
from server.store.firestore import codec

ROOT = Path(__file__).resolve().parents[1]
QUERIED = {("messages", "seq"), ("members", "user")}  # history, last_seq; member pages


def written_fields() -> set[tuple[str, str]]:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    draft = MessageDraft("r", "u", "U", "text", "c")
    records = {
        "messages": codec.message_record(draft, 1, now, "w"),
        "seqs": codec.guard_record("m"),
        "members": codec.member_record("u", now),
        "read_markers": codec.marker_record(1),
        "rooms": {**codec.room_record(Room("r", "public", "r")), "last_seq": 1},  # older data
        "users": {"name": "U", "last_seen": now},
        "system": {"kind": "health", "created_at": now},
        "sanctions": codec.sanction_record(SanctionKey("ban", "r", "u"), None),
    }
    return {(group, field) for group, record in records.items() for field in record}


def test_firebase_json_deploys_the_index_file():
    config = json.loads((ROOT / "firebase.json").read_text())
    assert (ROOT / config["firestore"]["indexes"]).is_file()


def test_every_written_field_but_seq_is_exempt_from_indexing():
    indexes = json.loads((ROOT / "firestore.indexes.json").read_text())
    assert indexes["indexes"] == []  # single-field queries only: no composite index
    exempt = {
        (o["collectionGroup"], o["fieldPath"])
        for o in indexes["fieldOverrides"]
        if o["indexes"] == []
    }
    assert exempt == written_fields() - QUERIED
