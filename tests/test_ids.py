"""The one id definition refuses what Firestore refuses as a document id, for every store."""

from __future__ import annotations

import pytest

from server.core.errors import ChatError
from server.core.ids import is_user_id
from server.services.payloads import ChangeMembers, CreateRoom, PresenceUsers, RoomRef, parse

REFUSED_BY_FIRESTORE = [".", "..", "__x__", "____", "__.__", "__id7__"]
FINE = ["a", "a.b", "...", "__a", "a__", "_", "__", "___", "dm:a:b", "a..b"]


@pytest.mark.parametrize("value", REFUSED_BY_FIRESTORE)
def test_firestore_reserved_ids_are_refused_everywhere(value):
    assert not is_user_id(value)
    payloads = [
        (RoomRef, {"room": value}),
        (CreateRoom, {"room": "r", "members": [value]}),
        (ChangeMembers, {"room": "r", "users": [value]}),
        (PresenceUsers, {"users": [value]}),
    ]
    for model, data in payloads:
        with pytest.raises(ChatError) as info:
            parse(model, data)
        assert info.value.code == "bad_request"


@pytest.mark.parametrize("value", FINE)
def test_ids_firestore_accepts_still_pass(value):
    assert parse(RoomRef, {"room": value}).room == value
    if not value.startswith("dm:"):
        assert is_user_id(value)
