"""The ASGI application: Socket.IO at /socket.io (namespace /chat) beside the FastAPI routes.

Run it with ``uvicorn server.main:app``; settings come from settings.toml and the
environment (see server/config.py).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import socketio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from .chat import ChatServer
from .config import Settings, load_settings
from .http import DEMO_DIR, router
from .logs import configure_logging


def create_app(settings: Settings | None = None) -> socketio.ASGIApp:
    settings = settings or load_settings()
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT, settings.instance_id)
    chat = ChatServer(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await chat.start()
        try:
            yield
        finally:
            await chat.stop()

    api = FastAPI(title="chat-server", version=chat.version, lifespan=lifespan)
    api.state.chat = chat
    if settings.CORS_ORIGINS:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=settings.CORS_ORIGINS,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    api.include_router(router)
    api.mount("/static", StaticFiles(directory=DEMO_DIR), name="static")
    asgi = socketio.ASGIApp(chat.sio, other_asgi_app=api, socketio_path="socket.io")
    return RefuseWhileDraining(asgi, chat)


class RefuseWhileDraining:
    """While draining, new Engine.IO handshakes get 503 so that clients retry elsewhere."""

    def __init__(self, app: socketio.ASGIApp, chat: ChatServer) -> None:
        self.app = app
        self.chat = chat

    async def __call__(self, scope, receive, send) -> None:
        if (
            self.chat.gateway.draining
            and scope["type"] in ("http", "websocket")
            and scope["path"].startswith("/socket.io")
            and b"sid=" not in scope.get("query_string", b"")
        ):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"1")],
                }
            )
            await send({"type": "http.response.body", "body": b"draining"})
            return
        await self.app(scope, receive, send)


app = create_app()
