"""Parts built from settings, shared by the composition root and the operator CLI."""

from __future__ import annotations

from typing import cast

from server.auth import DevTokens, TokenVerifier
from server.bus.connection import RedisConfig
from server.bus.credentials import RenewingCredentials, iam_token, password_file
from server.config import Settings
from server.core import metrics
from server.services.webhooks import Endpoint
from server.store.base import Store


def build_store(settings: Settings) -> Store:
    """The configured store, with every call timed into ``chat_store_seconds``."""
    if settings.STORE == "memory":
        from server.store.memory import MemoryStore

        store: Store = MemoryStore()
    elif settings.STORE == "firestore":
        from server.store.firestore import FirestoreStore

        store = FirestoreStore(
            project=settings.FIRESTORE_PROJECT,
            emulator_host=settings.FIRESTORE_EMULATOR_HOST,
            database=settings.FIRESTORE_DATABASE,
            timeout=settings.STORE_TIMEOUT,
            credentials_file=settings.GOOGLE_APPLICATION_CREDENTIALS,
            cache_entries=settings.FIRESTORE_CACHE,
        )
    else:
        from server.store.sqlite import SQLiteStore

        store = SQLiteStore(
            settings.sqlite_path,
            timeout=settings.STORE_TIMEOUT,
            room_cache=settings.SQLITE_ROOM_CACHE,
        )
    # TimedStore forwards every attribute to ``store`` through __getattr__, which no type
    # checker can follow: it is a Store by delegation.
    return cast(Store, metrics.TimedStore(store))


def build_verifier(settings: Settings) -> TokenVerifier:
    return TokenVerifier(
        algorithms=settings.JWT_ALGORITHMS,
        secret=settings.JWT_SECRET,
        public_key=settings.JWT_PUBLIC_KEY,
        jwks_url=settings.JWT_JWKS_URL,
        jwks_min_refresh=settings.JWT_JWKS_MIN_REFRESH,
        audience=settings.JWT_AUDIENCE,
        issuer=settings.JWT_ISSUER,
        leeway=settings.JWT_LEEWAY,
    )


def dev_tokens(settings: Settings) -> tuple[DevTokens | None, str]:
    """The development token minter, or None and why it is off."""
    if not settings.DEV_TOKENS:
        return None, "development tokens are disabled (DEV_TOKENS=false)"
    if not settings.JWT_ALGORITHMS[0].startswith("HS"):
        return None, "development tokens need an HS* algorithm and JWT_SECRET"
    minter = DevTokens(
        secret=settings.JWT_SECRET,
        algorithm=settings.JWT_ALGORITHMS[0],
        audience=settings.JWT_AUDIENCE,
        issuer=settings.JWT_ISSUER,
    )
    return minter, ""


def redis_credentials(settings: Settings) -> RenewingCredentials | None:
    """A provider for rotating credentials (IAM token or password file), else None."""
    if settings.REDIS_IAM_AUTH:
        make = iam_token(
            settings.REDIS_IAM_AUTH,
            settings.REDIS_IAM_CACHE_NAME,
            settings.REDIS_USERNAME,
            settings.REDIS_IAM_REGION,
        )
        return RenewingCredentials(
            settings.REDIS_USERNAME, make, settings.REDIS_CREDENTIALS_RENEW_AFTER
        )
    if settings.REDIS_PASSWORD_FILE:
        # Read at every new connection: a rotated file is used at once.
        return RenewingCredentials(
            settings.REDIS_USERNAME, password_file(settings.REDIS_PASSWORD_FILE), 0
        )
    return None


def redis_config(settings: Settings) -> RedisConfig:
    return RedisConfig(
        url=settings.redis_url,
        pubsub_url=settings.pubsub_url,
        cluster=settings.REDIS_CLUSTER,
        timeout=settings.REDIS_TIMEOUT,
        key_prefix=settings.REDIS_KEY_PREFIX,
        max_connections=settings.REDIS_MAX_CONNECTIONS,
        credentials=redis_credentials(settings),
    )


def webhook_endpoints(settings: Settings) -> list[Endpoint]:
    """WEBHOOK_URLS paired with WEBHOOK_SECRETS by position (validated by Settings)."""
    return [
        Endpoint(str(i), url, secret)
        for i, (url, secret) in enumerate(
            zip(settings.WEBHOOK_URLS, settings.WEBHOOK_SECRETS, strict=True)
        )
    ]
