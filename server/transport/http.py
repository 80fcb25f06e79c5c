"""HTTP routes beside Socket.IO: health, development tokens, stats, metrics, the demo page.

The routes read one :class:`HttpContext`, built by the composition root and kept on
``app.state.http``; they hold no state of their own.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import AfterValidator, BaseModel, Field

from server.auth import AuthError, DevTokens, TokenVerifier, bearer_token
from server.core import metrics
from server.core.ids import USER_ID_PATTERN, not_reserved
from server.core.text import check_name
from server.services.figures import Figures
from server.services.health import Health

router = APIRouter()


@dataclass(frozen=True, slots=True)
class HttpContext:
    """What the HTTP routes need. ``dev_tokens`` is None when they are not served, and
    ``dev_tokens_off`` then says why. ``metrics_token``, when set, guards ``/metrics``."""

    health: Health
    figures: Figures
    verifier: TokenVerifier
    dev_tokens: DevTokens | None
    dev_tokens_off: str
    demo_dir: Path
    metrics_token: str = ""


def context(request: Request) -> HttpContext:
    return request.app.state.http


@router.get("/api/health")
async def health(request: Request) -> JSONResponse:
    body, healthy = await context(request).health.report()
    return JSONResponse(body, status_code=200 if healthy else 503)


class DevTokenRequest(BaseModel):
    user: Annotated[str, Field(pattern=f"^{USER_ID_PATTERN}$"), AfterValidator(not_reserved)]
    name: Annotated[str, Field(min_length=1, max_length=128), AfterValidator(check_name)] | None = (
        None
    )


@router.post("/api/dev/token")
async def dev_token(body: DevTokenRequest, request: Request) -> dict:
    ctx = context(request)
    if ctx.dev_tokens is None:
        raise HTTPException(404, ctx.dev_tokens_off)
    if not is_loopback(request.client.host if request.client else ""):
        # The direct peer, never a forwarded address: a proxy in front makes this remote.
        raise HTTPException(403, "development tokens are served to loopback clients only")
    return {"token": ctx.dev_tokens.mint(body.user, body.name)}


@router.get("/api/stats")
async def stats(request: Request) -> dict:
    """Figures of this instance and of every live instance, for an admin token (claim
    ``role: "admin"``)."""
    ctx = context(request)
    token = bearer_token(request.headers.get("authorization")) or request.query_params.get("token")
    try:
        identity = await ctx.verifier.verify(token)
    except AuthError as exc:
        raise HTTPException(401, f"{exc.code}: {exc.reason}") from None
    if identity.role != "admin":
        raise HTTPException(403, "an admin token (claim role: admin) is required")
    return await ctx.figures.collect()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get("/metrics")
async def metrics_text(request: Request) -> Response:
    expected = context(request).metrics_token
    if expected:
        given = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "metrics need Authorization: Bearer <METRICS_TOKEN>")
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def demo_page(request: Request) -> FileResponse:
    return FileResponse(context(request).demo_dir / "index.html")
