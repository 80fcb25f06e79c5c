"""Authentication: where a connection's JWT comes from and how it is verified.

Verification follows the contract: the configured algorithms only (one family, so an HS
token signed with an RSA public key can never verify), ``exp`` and ``sub`` required,
``aud``/``iss`` checked when configured, ``nbf`` honoured. Keys come from ``JWT_SECRET``,
``JWT_PUBLIC_KEY`` or a JWKS URL fetched at most once a minute.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

import httpx
import jwt
import structlog

from .config import Settings

log = structlog.get_logger(__name__)

USER_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
RefusalCode = Literal["missing_token", "invalid_token", "token_expired"]
JWKS_MIN_REFRESH_SECONDS = 60.0


class AuthError(Exception):
    """A token was refused; ``code`` is what the client sees in ``err.data.code``."""

    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for."""

    user_id: str
    name: str
    expires_at: float
    role: str | None = None


def token_from_connect(auth: Any, environ: dict) -> str | None:
    """The token of a connection attempt: ``auth.token``, then Bearer header, then ``?token=``."""
    if isinstance(auth, dict):
        token = auth.get("token")
        if isinstance(token, str) and token:
            return token
    header = environ.get("HTTP_AUTHORIZATION", "")
    if header[:7].lower() == "bearer " and header[7:].strip():
        return header[7:].strip()
    values = parse_qs(environ.get("QUERY_STRING", "")).get("token")
    return values[0] if values and values[0] else None


class JwksCache:
    """Signing keys from a JWKS URL: cached, refreshed on an unknown ``kid`` once a minute at most."""

    def __init__(
        self, url: str, timeout: float = 5.0, min_refresh: float = JWKS_MIN_REFRESH_SECONDS
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.min_refresh = min_refresh
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        key = self._lookup(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._lookup(kid)
            if key is None and time.monotonic() - self._fetched_at >= self.min_refresh:
                await self._refresh()
                key = self._lookup(kid)
        if key is None:
            raise AuthError("invalid_token", f"no signing key for kid {kid!r}")
        return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid or "")

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(self.url)
                response.raise_for_status()
            jwk_set = jwt.PyJWKSet.from_dict(response.json())
        except Exception as exc:  # keep the old keys; the next refresh is a minute away
            log.error(
                "auth.jwks_fetch_failed",
                url=self.url,
                error=str(exc),
                hint="check JWT_JWKS_URL and outbound network access",
            )
            return
        self._keys = {key.key_id or "": key for key in jwt_set_keys(jwk_set)}
        log.info("auth.jwks_refreshed", url=self.url, keys=len(self._keys))


def jwt_set_keys(jwk_set: jwt.PyJWKSet) -> list[jwt.PyJWK]:
    return [key for key in jwk_set.keys if key.public_key_use in (None, "sig")]


class TokenVerifier:
    """Verifies connection tokens against the configured keys and claims."""

    def __init__(self, settings: Settings) -> None:
        self.algorithms = list(settings.JWT_ALGORITHMS)
        self.hmac = all(alg.startswith("HS") for alg in self.algorithms)
        self.secret = settings.JWT_SECRET
        self.public_key = settings.JWT_PUBLIC_KEY.replace("\\n", "\n")
        self.audience = settings.JWT_AUDIENCE or None
        self.issuer = settings.JWT_ISSUER or None
        self.leeway = settings.JWT_LEEWAY
        self.jwks = (
            JwksCache(settings.JWT_JWKS_URL, min_refresh=settings.JWT_JWKS_MIN_REFRESH)
            if settings.JWT_JWKS_URL and not self.hmac
            else None
        )

    async def _key(self, token: str) -> Any:
        if self.hmac:
            return self.secret
        if self.jwks is not None:
            try:
                kid = jwt.get_unverified_header(token).get("kid")
            except jwt.PyJWTError as exc:
                raise AuthError("invalid_token", f"malformed token header: {exc}") from exc
            return (await self.jwks.key_for(kid)).key
        return self.public_key

    async def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError(
                "missing_token", "no token in auth.token, Authorization header or ?token="
            )
        key = await self._key(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token_expired", "token has expired") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise AuthError("invalid_token", str(exc) or type(exc).__name__) from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not USER_ID.match(sub):
            raise AuthError("invalid_token", "sub must be 1-128 characters of [A-Za-z0-9_.:@-]")
        name = claims.get("name")
        name = name[:128] if isinstance(name, str) and name.strip() else sub
        role = claims.get("role") if isinstance(claims.get("role"), str) else None
        return Identity(user_id=sub, name=name, expires_at=float(claims["exp"]), role=role)


def mint_dev_token(
    settings: Settings, user_id: str, name: str | None, ttl: float = 3600 * 12
) -> str:
    """A token for development and the demo page (only served when DEV_TOKENS is true)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(ttl)}
    if name:
        claims["name"] = name
    if settings.JWT_AUDIENCE:
        claims["aud"] = settings.JWT_AUDIENCE
    if settings.JWT_ISSUER:
        claims["iss"] = settings.JWT_ISSUER
    return jwt.encode(claims, settings.JWT_SECRET, algorithm=settings.JWT_ALGORITHMS[0])
