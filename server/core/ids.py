"""The one definition of what a user id and a room id may be.

Every entry point (token ``sub``, socket payloads, HTTP bodies) checks ids against these
patterns, so an id that passes one door passes them all. Patterns are matched whole
(``fullmatch``): ``"alice\\n"`` is not ``"alice"``.
"""

from __future__ import annotations

import re
from typing import TypeGuard

USER_ID_PATTERN = r"[A-Za-z0-9_.:@-]{1,128}"
#: Public and private room ids; direct rooms are ``dm:<a>:<b>`` and may hold ``@``.
ROOM_ID_PATTERN = r"(?:[A-Za-z0-9_.:-]{1,128}|dm:[A-Za-z0-9_.:@-]{3,125})"
USER_ID_RULE = "1-128 characters of [A-Za-z0-9_.:@-]"

_USER_ID = re.compile(USER_ID_PATTERN)


def is_user_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a whole, valid user id."""
    return isinstance(value, str) and _USER_ID.fullmatch(value) is not None
