"""The one definition of what a user id and a room id may be.

Every entry point (token ``sub``, socket payloads, HTTP bodies) checks ids against these
patterns, so an id that passes one door passes them all. Patterns are matched whole
(``fullmatch``): ``"alice\\n"`` is not ``"alice"``.

Ids become Firestore document ids, so the ids Firestore refuses are refused here too, for
every store (behaviour must not change with the backend). Firestore's documented rules
(https://firebase.google.com/docs/firestore/quotas#collections_documents_and_fields):
valid UTF-8, at most 1,500 bytes, no ``/``, not ``.`` or ``..``, not matching ``__.*__``.
The character classes below already exclude ``/`` and non-ASCII and cap the length;
:data:`RESERVED_ID_PATTERN` covers the rest.
"""

from __future__ import annotations

import re
from typing import TypeGuard

USER_ID_PATTERN = r"[A-Za-z0-9_.:@-]{1,128}"
#: Public and private room ids; direct rooms are ``dm:<a>:<b>`` and may hold ``@``.
ROOM_ID_PATTERN = r"(?:[A-Za-z0-9_.:-]{1,128}|dm:[A-Za-z0-9_.:@-]{3,125})"
#: Whole ids that Firestore refuses as document ids although the patterns above allow them.
RESERVED_ID_PATTERN = r"\.{1,2}|__.*__"
RESERVED_ID_RULE = "not '.', '..' or '__…__'"
USER_ID_RULE = f"1-128 characters of [A-Za-z0-9_.:@-], {RESERVED_ID_RULE}"

_USER_ID = re.compile(USER_ID_PATTERN)
_RESERVED = re.compile(RESERVED_ID_PATTERN, re.DOTALL)


def is_reserved_id(value: str) -> bool:
    """True for ``.``, ``..`` and ``__…__``: ids Firestore refuses as document ids."""
    return _RESERVED.fullmatch(value) is not None


def is_user_id(value: object) -> TypeGuard[str]:
    """True when ``value`` is a whole, valid user id."""
    return (
        isinstance(value, str)
        and _USER_ID.fullmatch(value) is not None
        and not is_reserved_id(value)
    )


def not_reserved(value: str) -> str:
    """Pydantic ``AfterValidator``: refuse ids Firestore refuses (the pattern checks the rest)."""
    if is_reserved_id(value):
        raise ValueError(f"ids may not be '.', '..' or start and end with '__' ({value!r})")
    return value
