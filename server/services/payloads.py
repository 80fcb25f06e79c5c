"""Pydantic models of every client→server payload; ``parse`` turns errors into ``bad_request``."""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from server.core.errors import ChatError
from server.core.ids import ROOM_ID_PATTERN, USER_ID_PATTERN, not_reserved
from server.core.text import check_name, check_text

# The one definition lives in server/core/ids.py (direct rooms dm:<a>:<b> may hold "@").
RoomId = Annotated[StrictStr, Field(pattern=f"^{ROOM_ID_PATTERN}$"), AfterValidator(not_reserved)]
UserId = Annotated[StrictStr, Field(pattern=f"^{USER_ID_PATTERN}$"), AfterValidator(not_reserved)]
Seq = Annotated[StrictInt, Field(ge=0, le=2**53)]
ClientId = Annotated[StrictStr, Field(min_length=1, max_length=64), AfterValidator(check_name)]
#: Display names: no control, format (bidi override, zero-width) or separator characters.
Name = Annotated[StrictStr, Field(min_length=1, max_length=128), AfterValidator(check_name)]
MessageId = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9]{1,64}$")]  # ids are hex
#: Structural bound only; the configurable one (MAX_REACTION_LENGTH) answers too_large.
Emoji = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RoomRef(Payload):
    room: RoomId


class MembersPage(RoomRef):
    """``room:members``: without ``limit`` the first ROOM_MEMBERS_PAGE members."""

    after: UserId | None = None
    limit: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None


class JoinRoom(RoomRef):
    since: Seq | None = None
    changes_since: Seq | None = None


class CreateRoom(RoomRef):
    name: Name | None = None
    private: StrictBool = False
    members: Annotated[list[UserId], Field(max_length=1000)] = []


class ChangeMembers(RoomRef):
    users: Annotated[list[UserId], Field(min_length=1, max_length=1000)]


class SendMessage(RoomRef):
    text: Annotated[StrictStr, AfterValidator(check_text)]
    client_id: ClientId
    reply_to: MessageId | None = None


class MessageRef(RoomRef):
    id: MessageId


class EditMessage(MessageRef):
    text: StrictStr


class React(MessageRef):
    emoji: Emoji


class Changes(RoomRef):
    after: Seq
    limit: Annotated[StrictInt, Field(ge=1, le=100)] = 100


class ListRooms(Payload):
    limit: Annotated[StrictInt, Field(ge=1, le=100)] = 50
    cursor: Annotated[StrictStr, Field(min_length=1, max_length=1024)] | None = None


class History(RoomRef):
    before: Annotated[StrictInt, Field(ge=1, le=2**53)] | None = None
    after: Seq | None = None
    limit: Annotated[StrictInt, Field(ge=1, le=100)] = 50


class MarkRead(RoomRef):
    seq: Seq


class Typing(RoomRef):
    typing: StrictBool


class PresenceUsers(Payload):
    users: Annotated[list[UserId], Field(min_length=1, max_length=500)]


class RefreshToken(Payload):
    token: Annotated[StrictStr, Field(min_length=1, max_length=8192)]


P = TypeVar("P", bound=Payload)


def parse(model: type[P], data: object) -> P:
    """Validate ``data`` as ``model`` or raise ``ChatError('bad_request')`` naming the fields."""
    if not isinstance(data, dict):
        raise ChatError("bad_request", f"payload must be an object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'payload'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise ChatError("bad_request", problems) from None
