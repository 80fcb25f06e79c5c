"""HTTP routes beside Socket.IO: health, development tokens, the demo page."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from .auth import AuthError, mint_dev_token

if TYPE_CHECKING:
    from .chat import ChatServer

DEMO_DIR = Path(__file__).resolve().parent.parent / "client-demo"
router = APIRouter()


def chat_of(request: Request) -> ChatServer:
    return request.app.state.chat


async def timed_check(name: str, check, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        return {"ok": False, "error": f"{name} did not answer within {timeout}s"}
    except Exception as exc:
        return {"ok": False, "error": f"{name}: {exc}"[:300]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


@router.get("/api/health")
async def health(request: Request) -> JSONResponse:
    chat = chat_of(request)
    timeout = chat.settings.HEALTH_CHECK_TIMEOUT
    if chat.cluster is not None:
        store, redis = await asyncio.gather(
            timed_check("store", chat.store.ping, timeout),
            timed_check("redis", chat.cluster.ping, timeout),
        )
    else:
        store = await timed_check("store", chat.store.ping, timeout)
        redis = {"ok": True, "mode": "disabled (single instance)"}
    checks = {"store": store, "redis": redis}
    status = "healthy"
    if chat.gateway.draining:
        status = "draining"
    elif not all(check["ok"] for check in checks.values()):
        status = "unhealthy"
    body = {
        "status": status,
        "instance_id": chat.instance_id,
        "version": chat.version,
        "checks": checks,
        "connections": len(chat.gateway.connections),
        "cluster": chat.cluster_summary,
    }
    return JSONResponse(body, status_code=200 if status == "healthy" else 503)


class DevTokenRequest(BaseModel):
    user: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:@-]{1,128}$")]
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None


@router.post("/api/dev/token")
async def dev_token(body: DevTokenRequest, request: Request) -> dict:
    settings = chat_of(request).settings
    if not settings.DEV_TOKENS:
        raise HTTPException(404, "development tokens are disabled (DEV_TOKENS=false)")
    if not settings.JWT_ALGORITHMS[0].startswith("HS"):
        raise HTTPException(404, "development tokens need an HS* algorithm and JWT_SECRET")
    return {"token": mint_dev_token(settings, body.user, body.name)}


@router.get("/api/stats")
async def stats(request: Request) -> dict:
    """Instance and cluster figures, for an admin token (claim ``role: "admin"``)."""
    chat = chat_of(request)
    header = request.headers.get("authorization", "")
    token = (
        header[7:].strip() if header[:7].lower() == "bearer " else request.query_params.get("token")
    )
    try:
        identity = await chat.verifier.verify(token)
    except AuthError as exc:
        raise HTTPException(401, f"{exc.code}: {exc.reason}") from None
    if identity.role != "admin":
        raise HTTPException(403, "an admin token (claim role: admin) is required")
    return await chat.figures()


@router.get("/metrics")
async def metrics_text() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def demo_page() -> FileResponse:
    return FileResponse(DEMO_DIR / "index.html")
