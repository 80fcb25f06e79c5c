"""``iso``: the one format of times on the wire (ISO 8601, UTC, milliseconds, ``Z``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from server.core.models import iso, parse_iso


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (datetime(2026, 11, 27, 5, 17, 12, 123456, tzinfo=UTC), "2026-11-27T05:17:12.123Z"),
        (datetime(2026, 11, 27, 5, 17, 12, tzinfo=UTC), "2026-11-27T05:17:12.000Z"),
        (datetime(2026, 11, 27, 5, 17, 12, 999999, tzinfo=UTC), "2026-11-27T05:17:12.999Z"),
        (  # another zone: converted, not relabelled
            datetime(2026, 11, 27, 7, 17, 12, 5000, tzinfo=timezone(timedelta(hours=2))),
            "2026-11-27T05:17:12.005Z",
        ),
    ],
)
def test_times_are_utc_with_milliseconds(ts, text):
    assert iso(ts) == text
    assert parse_iso(text) == ts.replace(microsecond=ts.microsecond // 1000 * 1000)


def test_no_time_is_none():
    assert iso(None) is None
