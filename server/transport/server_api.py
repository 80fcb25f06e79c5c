"""The server API: the application's backend talks to the chat over HTTP, under /api/server.

Authentication is an API key in ``Authorization: Bearer <key>`` (or ``X-API-Key``),
checked against configured SHA-256 digests (``SERVER_API_KEYS``). A read-only key may
call the GET routes and ``POST /presence`` only. Every key has its own token bucket.

Errors use the socket acks' vocabulary: ``{"ok": false, "error": {"code", "message"}}``
with the HTTP status of the code (``STATUS``). A missing or unknown key gets 401 and
nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr

from server.auth import ApiKey, ApiKeys, bearer_token
from server.core import metrics
from server.core.errors import ChatError
from server.core.ids import ROOM_ID_PATTERN, USER_ID_PATTERN, not_reserved
from server.core.models import iso_from_epoch
from server.core.ratelimit import TokenBucket
from server.services.admin import Admin, acting_as
from server.services.payloads import ClientId, CreateRoom, History, SendMessage

PREFIX = "/api/server"
STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "banned": 403,
    "muted": 403,
    "blocked": 403,
    "too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
}
# Ids as everywhere else (server/core/ids.py), Firestore's reserved ids included.
UserId = Annotated[StrictStr, Field(pattern=f"^{USER_ID_PATTERN}$"), AfterValidator(not_reserved)]
UserPath = Annotated[str, Field(pattern=f"^{USER_ID_PATTERN}$"), AfterValidator(not_reserved)]
RoomPath = Annotated[str, Field(pattern=f"^{ROOM_ID_PATTERN}$"), AfterValidator(not_reserved)]


@dataclass(frozen=True, slots=True)
class ServerApiContext:
    admin: Admin
    keys: ApiKeys
    rate_per_second: float
    burst: int


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sender(Body):
    id: UserId
    name: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None


class PostMessage(Body):
    text: StrictStr
    #: idempotency: the same client_id (or Idempotency-Key header) gives the same message once
    client_id: ClientId | None = None
    #: omit (or null) to post as the system
    sender: Sender | None = None


class NewRoom(Body):
    room: Annotated[StrictStr, Field(pattern=f"^{ROOM_ID_PATTERN}$"), AfterValidator(not_reserved)]
    name: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    private: StrictBool = False
    owner: UserId | None = None
    members: Annotated[list[UserId], Field(max_length=1000)] = []


class Users(Body):
    users: Annotated[list[UserId], Field(min_length=1, max_length=1000)]


class OneUser(Body):
    user: UserId


class Ban(Body):
    user: UserId
    #: seconds from now; omit for a ban until lifted
    seconds: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = None


class Mute(Body):
    user: UserId
    seconds: Annotated[float, Field(gt=0, le=365 * 86400)]


class Disconnect(Body):
    reason: Annotated[StrictStr, Field(min_length=1, max_length=200)] = "disconnected by the server"


class Revoke(Body):
    #: tokens issued before this time are refused; omit for now
    issued_before: datetime | None = None


def context(request: Request) -> ServerApiContext:
    return request.app.state.server_api


class Buckets:
    """One token bucket per key name, made on first use."""

    def __init__(self) -> None:
        self.by_key: dict[str, TokenBucket] = {}

    def take(self, key: ApiKey, rate: float, burst: int) -> bool:
        bucket = self.by_key.get(key.name)
        if bucket is None:
            bucket = self.by_key[key.name] = TokenBucket(rate, burst)
        return bucket.take()


BUCKETS = Buckets()


def _key(request: Request, authorization: str | None, x_api_key: str | None) -> ApiKey:
    ctx = context(request)
    key = ctx.keys.find(bearer_token(authorization) or x_api_key)
    if key is None:
        metrics.SERVER_API_REQUESTS.labels("-", "unauthorized").inc()
        raise ChatError("unauthorized", "a valid server API key is required")
    if not BUCKETS.take(key, ctx.rate_per_second, ctx.burst):
        metrics.SERVER_API_REQUESTS.labels(key.name, "rate_limited").inc()
        raise ChatError("rate_limited", "too many requests for this key; slow down")
    request.state.api_key = key.name
    return key


def reader(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> ApiKey:
    return _key(request, authorization, x_api_key)


def writer(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> ApiKey:
    key = _key(request, authorization, x_api_key)
    if not key.writable:
        metrics.SERVER_API_REQUESTS.labels(key.name, "forbidden").inc()
        raise ChatError("forbidden", "this key is read-only")
    return key


Read = Annotated[ApiKey, Depends(reader)]
Write = Annotated[ApiKey, Depends(writer)]
router = APIRouter(prefix=PREFIX, tags=["server API"])


def ok(key: ApiKey, **body) -> dict:
    metrics.SERVER_API_REQUESTS.labels(key.name, "ok").inc()
    return {"ok": True, **body}


@router.post("/rooms/{room}/messages", summary="Post a message as a user or as the system")
async def post_message(
    room: RoomPath,
    body: PostMessage,
    request: Request,
    key: Write,
    idempotency_key: Annotated[str | None, Header(max_length=64)] = None,
) -> dict:
    client_id = body.client_id or idempotency_key
    if not client_id:
        raise ChatError("bad_request", "give client_id or an Idempotency-Key header")
    sender = acting_as(body.sender.id, body.sender.name) if body.sender else None
    who = sender or acting_as(None)
    message, created = await context(request).admin.post(
        who, SendMessage(room=room, text=body.text, client_id=client_id)
    )
    [view] = await context(request).admin.render(room, [message])
    return ok(key, message=view, created=created)


@router.get("/rooms/{room}/messages", summary="Read history, paged like message:history")
async def read_history(
    room: RoomPath,
    request: Request,
    key: Read,
    before: Annotated[int | None, Field(ge=1)] = None,
    after: Annotated[int | None, Field(ge=0)] = None,
    limit: Annotated[int, Field(ge=1, le=100)] = 50,
) -> dict:
    request_model = History(room=room, before=before, after=after, limit=limit)
    messages, has_more = await context(request).admin.history(request_model)
    views = await context(request).admin.render(room, messages)
    return ok(key, messages=views, has_more=has_more)


@router.post("/rooms", summary="Create a room with members (idempotent for the same owner)")
async def create_room(body: NewRoom, request: Request, key: Write) -> dict:
    created = await context(request).admin.create_room(
        body.owner,
        CreateRoom(room=body.room, name=body.name, private=body.private, members=body.members),
    )
    return ok(key, room=created.to_wire())


@router.post("/rooms/{room}/members", summary="Add members")
async def add_members(room: RoomPath, body: Users, request: Request, key: Write) -> dict:
    added = await context(request).admin.add_members(room, body.users)
    return ok(key, room=room, added=added)


@router.post("/rooms/{room}/members/remove", summary="Remove members; live access ends at once")
async def remove_members(room: RoomPath, body: Users, request: Request, key: Write) -> dict:
    removed = await context(request).admin.remove_members(room, body.users)
    return ok(key, room=room, removed=removed)


@router.post("/presence", summary="Presence of a list of users")
async def presence(body: Users, request: Request, key: Read) -> dict:
    return ok(key, presence=await context(request).admin.presence_of(body.users))


@router.post("/users/{user}/disconnect", summary="Close every connection of a user")
async def disconnect(
    user: UserPath,
    body: Disconnect,
    request: Request,
    key: Write,
) -> dict:
    await context(request).admin.disconnect(user, body.reason)
    return ok(key, user=user)


@router.post("/users/{user}/revoke-tokens", summary="Refuse a user's tokens issued before a time")
async def revoke_tokens(
    user: UserPath,
    body: Revoke,
    request: Request,
    key: Write,
) -> dict:
    before = body.issued_before.timestamp() if body.issued_before else None
    cutoff = await context(request).admin.revoke_tokens(user, before)
    return ok(key, user=user, issued_before=iso_from_epoch(cutoff))


@router.post("/rooms/{room}/bans", summary="Ban a user from a room")
async def ban(room: RoomPath, body: Ban, request: Request, key: Write) -> dict:
    until = _until(body.seconds)
    await context(request).admin.ban(room, body.user, until)
    return ok(key, room=room, user=body.user, until=iso_from_epoch(until) if until else None)


@router.post("/rooms/{room}/bans/remove", summary="Lift a ban")
async def unban(room: RoomPath, body: OneUser, request: Request, key: Write) -> dict:
    await context(request).admin.lift("ban", room, body.user)
    return ok(key, room=room, user=body.user)


@router.post("/rooms/{room}/mutes", summary="Mute a user in a room for a duration")
async def mute(room: RoomPath, body: Mute, request: Request, key: Write) -> dict:
    until = _until(body.seconds)
    assert until is not None
    await context(request).admin.mute(room, body.user, until)
    return ok(key, room=room, user=body.user, until=iso_from_epoch(until))


@router.post("/rooms/{room}/mutes/remove", summary="Lift a mute")
async def unmute(room: RoomPath, body: OneUser, request: Request, key: Write) -> dict:
    await context(request).admin.lift("mute", room, body.user)
    return ok(key, room=room, user=body.user)


@router.post("/users/{user}/blocks", summary="As this user, block another: DMs between them end")
async def block(
    user: UserPath,
    body: OneUser,
    request: Request,
    key: Write,
) -> dict:
    if body.user == user:
        raise ChatError("bad_request", "a user cannot block themselves")
    await context(request).admin.block(user, body.user)
    return ok(key, user=user, blocked=body.user)


@router.post("/users/{user}/blocks/remove", summary="As this user, lift a block")
async def unblock(
    user: UserPath,
    body: OneUser,
    request: Request,
    key: Write,
) -> dict:
    await context(request).admin.lift("block", body.user, user)
    return ok(key, user=user, unblocked=body.user)


def _until(seconds: float | None) -> float | None:
    import time

    return None if seconds is None else time.time() + seconds


def error_response(request: Request, code: str, message: str) -> JSONResponse:
    key = getattr(request.state, "api_key", None)
    if key is not None:
        metrics.SERVER_API_REQUESTS.labels(key, code).inc()
    return JSONResponse(
        {"ok": False, "error": {"code": code, "message": message}},
        status_code=STATUS.get(code, 400),
        headers={"WWW-Authenticate": "Bearer"} if code == "unauthorized" else None,
    )


def install(api: FastAPI, ctx: ServerApiContext) -> None:
    """Mount the routes and answer errors under /api/server in the acks' vocabulary."""
    api.state.server_api = ctx
    api.include_router(router)

    @api.exception_handler(ChatError)
    async def chat_error(request: Request, exc: ChatError) -> JSONResponse:
        return error_response(request, exc.code, exc.message)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if not request.url.path.startswith(PREFIX):  # FastAPI's own answer elsewhere
            return await request_validation_exception_handler(request, exc)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        return error_response(request, "bad_request", problems or "invalid request")
