"""Authentication: where a connection's JWT comes from and how it is verified.

Verification follows the contract: the configured algorithms only (one family, so an HS
token signed with an RSA public key can never verify), ``exp`` and ``sub`` required,
``aud``/``iss`` checked when configured, ``nbf`` honoured. Keys come from ``JWT_SECRET``,
``JWT_PUBLIC_KEY`` or a JWKS URL fetched at most once a minute.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

import httpx
import jwt
import structlog

from server.core.ids import USER_ID_RULE, is_user_id
from server.core.models import Identity
from server.core.text import is_safe_name

log = structlog.get_logger(__name__)

RefusalCode = Literal["missing_token", "invalid_token", "token_expired"]
JWKS_MIN_REFRESH_SECONDS = 60.0


class AuthError(Exception):
    """A token was refused; ``code`` is what the client sees in ``err.data.code``."""

    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if header and header[:7].lower() == "bearer " and header[7:].strip():
        return header[7:].strip()
    return None


def token_from_connect(auth: Any, environ: dict) -> str | None:
    """The token of a connection attempt: ``auth.token``, then Bearer header, then ``?token=``."""
    if isinstance(auth, dict):
        token = auth.get("token")
        if isinstance(token, str) and token:
            return token
    bearer = bearer_token(environ.get("HTTP_AUTHORIZATION", ""))
    if bearer:
        return bearer
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
    """Verifies connection tokens against the configured keys and claims.

    Invariant: only ``algorithms`` are accepted, and they are one family (HS* or
    public-key), so an HS token signed with a public key can never verify.
    """

    def __init__(
        self,
        *,
        algorithms: list[str],
        secret: str = "",
        public_key: str = "",
        jwks_url: str = "",
        jwks_min_refresh: float = JWKS_MIN_REFRESH_SECONDS,
        audience: str = "",
        issuer: str = "",
        leeway: float = 0,
    ) -> None:
        self.algorithms = list(algorithms)
        self.hmac = all(alg.startswith("HS") for alg in self.algorithms)
        self.secret = secret
        self.public_key = public_key.replace("\\n", "\n")
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = leeway
        self.jwks = (
            JwksCache(jwks_url, min_refresh=jwks_min_refresh)
            if jwks_url and not self.hmac
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
        if not is_user_id(sub):
            raise AuthError("invalid_token", f"sub must be {USER_ID_RULE}")
        name = claims.get("name")
        # A name that is blank or holds control, bidi or zero-width characters is not shown.
        name = name[:128] if isinstance(name, str) and name.strip() and is_safe_name(name) else sub
        role = claims.get("role") if isinstance(claims.get("role"), str) else None
        iat = claims.get("iat")
        return Identity(
            user_id=sub,
            name=name,
            expires_at=float(claims["exp"]),
            role=role,
            issued_at=float(iat) if isinstance(iat, int | float) else 0.0,
        )


class DevTokens:
    """Mints tokens for development and the demo page (served only when DEV_TOKENS is true)."""

    def __init__(
        self, *, secret: str, algorithm: str, audience: str = "", issuer: str = ""
    ) -> None:
        self.secret = secret
        self.algorithm = algorithm
        self.audience = audience
        self.issuer = issuer

    def mint(self, user_id: str, name: str | None, ttl: float = 3600 * 12) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(ttl)}
        if name:
            claims["name"] = name
        if self.audience:
            claims["aud"] = self.audience
        if self.issuer:
            claims["iss"] = self.issuer
        return jwt.encode(claims, self.secret, algorithm=self.algorithm)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A server API key as configured: its name, whether it may write, and its SHA-256."""

    name: str
    writable: bool
    digest: str


class ApiKeys:
    """Checks server API keys against configured SHA-256 digests; the keys themselves are
    never stored. Several keys may be valid at once, so a key rotates without downtime.

    Each configured entry is ``name:rw:<sha256 hex>`` or ``name:ro:<sha256 hex>``. Keys are
    random 32-byte secrets (``chat-server api-key`` makes one), so one SHA-256 round is
    enough: there is no password to guess.
    """

    def __init__(self, entries: list[str]) -> None:
        self.keys: list[ApiKey] = [parse_api_key_entry(entry) for entry in entries]

    def find(self, presented: str | None) -> ApiKey | None:
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).hexdigest()
        found = None
        for key in self.keys:  # compare with every key, in constant time each
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


def parse_api_key_entry(entry: str) -> ApiKey:
    """``name:rw|ro:<64 hex>`` → ApiKey; ValueError says what is wrong (never echoes a key)."""
    parts = entry.strip().split(":")
    if len(parts) != 3 or parts[1] not in ("rw", "ro"):
        raise ValueError("a server API key entry is name:rw:<sha256 hex> or name:ro:<sha256 hex>")
    name, scope, digest = parts
    if not name or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"server API key {name!r}: the digest must be 64 lowercase hex digits")
    return ApiKey(name, scope == "rw", digest)


def new_api_key(name: str, writable: bool = True) -> tuple[str, str]:
    """A fresh random key and its configuration entry."""
    key = "sk_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    return key, f"{name}:{'rw' if writable else 'ro'}:{digest}"
