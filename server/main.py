"""The ASGI application: Socket.IO at /socket.io (namespace /chat) beside the FastAPI routes.

Run it with ``uvicorn server.main:app``; settings come from settings.toml and the
environment (see server/config.py).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import socketio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from server.config import Settings, load_settings
from server.core.logs import configure_logging
from server.core.workers import member_id
from server.node import Node
from server.transport import server_api
from server.transport.http import router
from server.transport.lifecycle import RefuseWhileDraining


def create_app(settings: Settings | None = None) -> Any:
    settings = settings or load_settings()
    configure_logging(
        settings.LOG_LEVEL,
        settings.LOG_FORMAT,
        member_id(settings.instance_id),
        settings.LOG_LIBRARY_ERRORS_PER_MINUTE,
    )
    node = Node(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await node.start()
        try:
            yield
        finally:
            await node.stop()

    docs = settings.API_DOCS
    api = FastAPI(
        title="chat-server",
        version=node.state.version,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    api.state.http = node.http
    if settings.CORS_ORIGINS:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=settings.CORS_ORIGINS,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    api.include_router(router)
    server_api.install(api, node.server_api)
    api.mount("/static", StaticFiles(directory=node.http.demo_dir), name="static")
    asgi = socketio.ASGIApp(node.sio, other_asgi_app=api, socketio_path="socket.io")
    if node.sessions is not None:  # polling and upgrades reaching another process
        asgi = node.sessions.wrap(asgi)
    return RefuseWhileDraining(asgi, node.state)


app = create_app()
