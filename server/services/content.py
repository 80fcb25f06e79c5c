"""What a message holds and how clients see it: text, mention and emoji rules, quotes, views.

Every rule here is a configurable limit (``ContentLimits``, from settings by the
composition root); a refusal counts in ``chat_limit_refusals_total{limit}``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from server.core.errors import ChatError
from server.core.ids import is_user_id
from server.core.models import Message, iso
from server.services.rooms import refuse
from server.store.base import Store

#: ``@id`` not preceded by an id character (so ``a@b.c`` is no mention). A trailing ``.``
#: or ``:`` is read as punctuation ("thanks @bob.").
_MENTION = re.compile(r"(?<![A-Za-z0-9_.:@-])@([A-Za-z0-9_.:@-]+)")


@dataclass(frozen=True, slots=True)
class ContentLimits:
    max_length: int = 4000  # characters of text after trimming
    max_mentions: int = 20  # distinct users mentioned by one message
    max_reaction_length: int = 32  # characters of one reaction
    max_reactions: int = 20  # distinct reactions on one message
    quote_length: int = 100  # characters of a reply quote and of a room-list preview
    unread_cap: int = 100  # unread counts stop here ("100" means 100 or more)


def clean_text(raw: str, limits: ContentLimits) -> str:
    """The trimmed text; empty → bad_request, longer than the limit → too_large."""
    text = raw.strip()
    if not text:
        raise ChatError("bad_request", "text is empty after trimming")
    if len(text) > limits.max_length:
        raise refuse(
            "message_length",
            "too_large",
            f"text is {len(text)} characters; the limit is {limits.max_length}",
        )
    return text


def parse_mentions(text: str, limits: ContentLimits) -> list[str]:
    """The distinct user ids of ``@id`` tokens in ``text``, in order of appearance."""
    if "@" not in text:  # most messages: no regex scan
        return []
    found: dict[str, None] = {}
    for match in _MENTION.finditer(text):
        user_id = match.group(1).rstrip(".:")
        if is_user_id(user_id):
            found[user_id] = None
    if len(found) > limits.max_mentions:
        raise refuse(
            "mentions",
            "too_large",
            f"{len(found)} users mentioned; the limit is {limits.max_mentions}",
        )
    return list(found)


def check_emoji(emoji: str, limits: ContentLimits) -> str:
    """A reaction: 1..max_reaction_length characters, no spaces, no control characters."""
    if len(emoji) > limits.max_reaction_length:
        raise refuse(
            "reaction_length",
            "too_large",
            f"reaction is {len(emoji)} characters; the limit is {limits.max_reaction_length}",
        )
    # Format characters (ZWJ) and unassigned code points (emojis newer than Python's
    # Unicode tables) are allowed: emoji sequences need them.
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs") for ch in emoji):
        raise ChatError("bad_request", "emoji: no spaces or control characters")
    return emoji


def quote(message: Message | None, message_id: str, length: int) -> dict:
    """A short quote of a reply's parent; a deleted (or vanished) parent shows as deleted."""
    if message is None:
        return {"id": message_id, "seq": None, "sender": None, "text": "", "deleted": True}
    return {
        "id": message.id,
        "seq": message.seq,
        "sender": {"id": message.sender_id, "name": message.sender_name},
        "text": message.text[:length],
        "deleted": message.deleted,
    }


def preview(message: Message, length: int) -> dict:
    """A room list's and room:activity's view of a message: its quote and its time."""
    return {**quote(message, message.id, length), "created_at": iso(message.created_at)}


class Views:
    """Messages as one viewer sees them: parent quotes and the viewer's own reactions."""

    def __init__(self, store: Store, limits: ContentLimits) -> None:
        self.store = store
        self.limits = limits

    async def render(self, room_id: str, messages: list[Message], viewer: str | None) -> list[dict]:
        """Two batched store reads at most, whatever the number of messages."""
        if not messages:
            return []
        known = {m.id: m for m in messages}
        wanted = list({m.reply_to for m in messages if m.reply_to and m.reply_to not in known})
        parents = {**known, **(await self.store.get_messages(room_id, wanted) if wanted else {})}
        reacted = [m.id for m in messages if m.reactions]
        mine = (
            await self.store.my_reactions(room_id, viewer, reacted)
            if viewer is not None and reacted
            else {}
        )
        return [
            m.to_wire(
                quote(parents.get(m.reply_to), m.reply_to, self.limits.quote_length)
                if m.reply_to
                else None,
                mine.get(m.id, frozenset()),
            )
            for m in messages
        ]

    async def one(self, message: Message, viewer: str | None) -> dict:
        if message.reply_to is None and not message.reactions:  # a new message: no reads
            return message.to_wire()
        return (await self.render(message.room, [message], viewer))[0]
