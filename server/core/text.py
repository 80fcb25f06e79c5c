"""Which characters user-chosen text may hold.

Names and client ids are shown or compared, never laid out as prose: they refuse control
characters, format characters (bidi overrides such as U+202E that reverse what follows,
zero-width characters that make two names look alike), surrogates and line/paragraph
separators. Message text is prose: it keeps newlines and tabs, and format characters
(emoji sequences need U+200D), but no other control character.
"""

from __future__ import annotations

import unicodedata

NAME_REFUSED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
TEXT_REFUSED = frozenset({"Cc", "Cs"})
TEXT_ALLOWED = frozenset("\n\t")


def _first_refused(value: str, refused: frozenset[str], allowed: frozenset[str]) -> str | None:
    if value.isascii() and value.isprintable():
        return None  # the common case: one pass in C
    for char in value:
        if char not in allowed and unicodedata.category(char) in refused:
            return char
    return None


def check_name(value: str) -> str:
    """``value`` if it is a safe name or id; ValueError naming the first bad character."""
    bad = _first_refused(value, NAME_REFUSED, frozenset())
    if bad is not None:
        raise ValueError(f"character U+{ord(bad):04X} is not allowed here")
    return value


def check_text(value: str) -> str:
    """``value`` if it holds no control character but newlines and tabs."""
    bad = _first_refused(value, TEXT_REFUSED, TEXT_ALLOWED)
    if bad is not None:
        raise ValueError(f"control character U+{ord(bad):04X} is not allowed in text")
    return value


def is_safe_name(value: str) -> bool:
    try:
        check_name(value)
    except ValueError:
        return False
    return True
