"""Settings: `settings.toml` defaults per environment, overridden by environment variables.

Environment variables use the plain names of the contract (``REDIS_HOST``, ``JWT_SECRET``,
...). ``CHAT_ENV`` picks the environment section (development, testing, production).
Everything is validated once at start; a bad value stops the process with a message that
names the variable and what is wrong with it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from dynaconf import Dynaconf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.core import workers
from server.resources import SETTINGS_FILE

ENV_SWITCH = "CHAT_ENV"


class ConfigError(Exception):
    """Raised when the settings cannot start a server; the message says what to fix."""


class Settings(BaseModel):
    """The validated configuration of one instance."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    env: str = "development"
    INSTANCE_ID: str = ""
    HOST: str = "127.0.0.1"
    PORT: int = Field(8000, ge=1, le=65535)
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    LOG_FORMAT: Literal["json", "console"] = "json"
    LOG_LIBRARY_ERRORS_PER_MINUTE: int = Field(60, ge=1)

    REDIS_URL: str = ""
    REDIS_HOST: str = ""
    REDIS_PORT: int = Field(6379, ge=1, le=65535)
    REDIS_USERNAME: str = ""
    REDIS_PASSWORD: str = ""
    REDIS_SSL: bool = False
    REDIS_SSL_CA_CERTS: str = ""
    REDIS_DB: int = Field(0, ge=0)
    REDIS_CLUSTER: bool = False
    REDIS_PUBSUB_URL: str = ""
    REDIS_KEY_PREFIX: str = "chat:"
    REDIS_TIMEOUT: float = Field(5.0, gt=0)
    REDIS_MAX_CONNECTIONS: int = Field(200, ge=4, le=100_000)
    REDIS_PASSWORD_FILE: str = ""
    REDIS_IAM_AUTH: Literal["", "elasticache", "memorydb"] = ""
    REDIS_IAM_CACHE_NAME: str = ""
    REDIS_IAM_REGION: str = ""
    REDIS_CREDENTIALS_RENEW_AFTER: float = Field(600, gt=0, lt=900)
    BUS_ROOM_CHANNELS: bool = True
    BUS_ROOM_LINGER: float = Field(30, ge=0)

    WS_GRACE_PERIOD: float = Field(60, ge=0)
    WS_HEARTBEAT_INTERVAL: float = Field(25, gt=0)
    WS_CONNECT_TIMEOUT: float = Field(10, ge=0)
    WS_MAX_BACKLOG_PACKETS: int = Field(1000, ge=1)
    WS_MAX_BACKLOG_BYTES: int = Field(1_048_576, ge=65_536)

    JWT_SECRET: str = ""
    JWT_ALGORITHMS: list[str] = ["HS256"]
    JWT_PUBLIC_KEY: str = ""
    JWT_JWKS_URL: str = ""
    JWT_JWKS_MIN_REFRESH: float = Field(60, ge=1)
    JWT_AUDIENCE: str = ""
    JWT_ISSUER: str = ""
    JWT_LEEWAY: float = Field(0, ge=0)

    STORE: Literal["sqlite", "firestore", "memory"] = "sqlite"
    SQLITE_PATH: str = "data/chat.db"
    SQLITE_ROOM_CACHE: int = Field(10_000, ge=0)
    FIRESTORE_PROJECT: str = ""
    FIRESTORE_DATABASE: str = "(default)"
    FIRESTORE_CACHE: int = Field(10_000, ge=0)
    FIRESTORE_EMULATOR_HOST: str = ""
    GOOGLE_APPLICATION_CREDENTIALS: str = ""
    STORE_TIMEOUT: float = Field(5.0, gt=0)

    MAX_MESSAGE_LENGTH: int = Field(4000, ge=1, le=100_000)
    MAX_FRAME_BYTES: int = Field(65536, ge=1024)
    MAX_MENTIONS_PER_MESSAGE: int = Field(20, ge=1, le=1000)
    MAX_REACTION_LENGTH: int = Field(32, ge=1, le=256)
    MAX_REACTIONS_PER_MESSAGE: int = Field(20, ge=1, le=1000)
    QUOTE_LENGTH: int = Field(100, ge=0, le=4000)
    UNREAD_COUNT_CAP: int = Field(100, ge=1, le=100_000)
    RATE_LIMIT_CONNECTS_PER_MINUTE: int = Field(60, ge=1)
    REFUSAL_LIMITER_MAX_KEYS: int = Field(100_000, ge=100)
    MAX_CONNECTIONS_PER_USER: int = Field(20, ge=1)
    MAX_CONNECTIONS_PER_IP: int = Field(200, ge=1)
    MAX_ROOM_MEMBERS: int = Field(10_000, ge=2)
    MAX_JOINED_ROOMS: int = Field(200, ge=1)
    MAX_FOLLOWED_MEMBER_ROOMS: int = Field(1000, ge=0)
    ROOM_MEMBERS_PAGE: int = Field(500, ge=1, le=1000)
    ROOM_CREATES_PER_HOUR: int = Field(60, ge=1)
    MEMBER_CHANGES_PER_HOUR: int = Field(5000, ge=1)
    SEQ_KEY_TTL: int = Field(30 * 86400, ge=3600)
    TYPING_TIMEOUT: float = Field(6.0, gt=0)
    RATE_LIMIT_EVENTS_PER_SECOND: float = Field(20, gt=0)
    RATE_LIMIT_EVENTS_BURST: int = Field(40, ge=1)
    TRUST_PROXY_HEADERS: bool = False
    TRUSTED_PROXIES: list[str] = []

    WEBHOOK_URLS: list[str] = []
    WEBHOOK_SECRETS: list[str] = []
    WEBHOOK_TIMEOUT: float = Field(10.0, gt=0, le=120)
    WEBHOOK_MAX_ATTEMPTS: int = Field(30, ge=1, le=100)
    WEBHOOK_BACKOFF_BASE: float = Field(1.0, gt=0)
    WEBHOOK_BACKOFF_MAX: float = Field(600.0, gt=0)

    SERVER_API_KEYS: list[str] = []
    SERVER_API_RATE_PER_SECOND: float = Field(50, gt=0)
    SERVER_API_BURST: int = Field(100, ge=1)

    DEV_TOKENS: bool = False
    API_DOCS: bool = True
    METRICS_TOKEN: str = ""
    CORS_ORIGINS: list[str] = []
    SHUTDOWN_TIMEOUT: float = Field(25, gt=0)
    HEALTH_CHECK_TIMEOUT: float = Field(2.0, gt=0)

    @field_validator(
        "REDIS_PASSWORD",
        "REDIS_USERNAME",
        "JWT_SECRET",
        "INSTANCE_ID",
        "METRICS_TOKEN",
        mode="before",
    )
    @classmethod
    def _as_text(cls, value: Any) -> str:
        return "" if value is None else str(value)

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _level_any_case(cls, value: Any) -> Any:
        """``warning`` (uvicorn's spelling) and ``Warning`` mean ``WARNING``."""
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("TRUSTED_PROXIES")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
        return value

    @field_validator("SERVER_API_KEYS")
    @classmethod
    def _api_keys(cls, value: list[str]) -> list[str]:
        from server.auth import parse_api_key_entry

        names = [parse_api_key_entry(entry).name for entry in value]
        if len(set(names)) != len(names):
            raise ValueError("two server API keys share a name; names label metrics and logs")
        return value

    @field_validator(
        "JWT_ALGORITHMS",
        "CORS_ORIGINS",
        "TRUSTED_PROXIES",
        "SERVER_API_KEYS",
        "WEBHOOK_URLS",
        "WEBHOOK_SECRETS",
        mode="before",
    )
    @classmethod
    def _as_list(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return list(value)

    @field_validator("JWT_ALGORITHMS")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        allowed = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256"}
        unknown = [alg for alg in value if alg not in allowed]
        if unknown or not value:
            raise ValueError(
                f"unsupported algorithms {unknown or value}; choose from {sorted(allowed)}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        uses_hmac = any(alg.startswith("HS") for alg in self.JWT_ALGORITHMS)
        uses_keys = any(not alg.startswith("HS") for alg in self.JWT_ALGORITHMS)
        if uses_hmac and uses_keys:
            raise ValueError(
                "JWT_ALGORITHMS mixes HMAC (HS*) and public-key algorithms; that allows "
                "algorithm confusion. Configure one family."
            )
        if uses_hmac and not self.JWT_SECRET:
            raise ValueError("JWT_SECRET is empty: set it (HS* algorithms need a shared secret)")
        if uses_hmac and self.env == "production" and len(self.JWT_SECRET) < 32:
            raise ValueError("JWT_SECRET must be at least 32 characters in production")
        if uses_keys and not (self.JWT_PUBLIC_KEY or self.JWT_JWKS_URL):
            raise ValueError("RS/ES algorithms need JWT_PUBLIC_KEY (PEM) or JWT_JWKS_URL")
        if uses_keys and not (self.JWT_AUDIENCE and self.JWT_ISSUER):
            # One issuer's keys sign every tenant's tokens (Firebase: every project's), so
            # without both checks a token minted for someone else's project gets in.
            raise ValueError(
                "JWT_PUBLIC_KEY / JWT_JWKS_URL need JWT_AUDIENCE and JWT_ISSUER: without them "
                "any token signed by the same issuer for another application is accepted "
                "(docs/deployment.md gives the Firebase, Cognito and Auth0 values)"
            )
        if self.env == "production":
            if self.DEV_TOKENS:
                raise ValueError(
                    "DEV_TOKENS=true in production would mint a token for any user id; unset it"
                )
            if uses_hmac and self.JWT_SECRET in published_secrets():
                raise ValueError(
                    "JWT_SECRET is the development secret published in settings.toml; "
                    "set a secret of your own"
                )
        if self.STORE == "firestore" and not (
            self.FIRESTORE_PROJECT or self.FIRESTORE_EMULATOR_HOST
        ):
            raise ValueError("STORE=firestore needs FIRESTORE_PROJECT (or FIRESTORE_EMULATOR_HOST)")
        for name in ("REDIS_URL", "REDIS_PUBSUB_URL"):
            url = getattr(self, name)
            if (
                url.startswith(("redis+sentinel://", "valkey+sentinel://"))
                and len(url.split("/")) < 5
            ):
                raise ValueError(
                    f"{name}: a Sentinel URL needs the database and the service name: "
                    "redis+sentinel://host1:26379,host2:26379/0/mymaster"
                )
        if len(self.WEBHOOK_URLS) != len(self.WEBHOOK_SECRETS):
            raise ValueError(
                "WEBHOOK_URLS and WEBHOOK_SECRETS pair by position: give one secret per URL"
            )
        for url in self.WEBHOOK_URLS:
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"WEBHOOK_URLS: {url!r} is not an http(s) URL")
        if any(len(secret) < 16 for secret in self.WEBHOOK_SECRETS):
            raise ValueError("WEBHOOK_SECRETS: each secret needs at least 16 characters")
        if (self.REDIS_PASSWORD_FILE or self.REDIS_IAM_AUTH) and (
            self.REDIS_PASSWORD or "@" in self.REDIS_URL or "@" in self.REDIS_PUBSUB_URL
        ):
            raise ValueError(
                "REDIS_PASSWORD_FILE / REDIS_IAM_AUTH replace the password: leave REDIS_PASSWORD "
                "empty and put no credentials in REDIS_URL or REDIS_PUBSUB_URL"
            )
        if self.REDIS_PASSWORD_FILE and self.REDIS_IAM_AUTH:
            raise ValueError("set REDIS_PASSWORD_FILE or REDIS_IAM_AUTH, not both")
        if self.REDIS_IAM_AUTH and not (
            self.REDIS_USERNAME and self.REDIS_IAM_CACHE_NAME and self.REDIS_IAM_REGION
        ):
            raise ValueError(
                "REDIS_IAM_AUTH needs REDIS_USERNAME (the IAM-enabled user), REDIS_IAM_CACHE_NAME "
                "(replication group or cluster name) and REDIS_IAM_REGION"
            )
        if self.REDIS_CLUSTER and not self.redis_configured:
            raise ValueError("REDIS_CLUSTER=true needs REDIS_URL or REDIS_HOST")
        if self.WS_HEARTBEAT_INTERVAL >= 300:
            raise ValueError(
                "WS_HEARTBEAT_INTERVAL must stay below the load balancer idle timeout (< 300 s)"
            )
        return self

    @property
    def instance_id(self) -> str:
        return self.INSTANCE_ID or _default_instance_id()

    @property
    def redis_configured(self) -> bool:
        return bool(self.REDIS_URL or self.REDIS_HOST)

    @property
    def redis_url(self) -> str:
        """One URL for Redis, built from REDIS_URL or the REDIS_HOST family."""
        if self.REDIS_URL:
            return self.REDIS_URL
        if not self.REDIS_HOST:
            return ""
        scheme = "rediss" if self.REDIS_SSL else "redis"
        auth = ""
        if self.redis_credentials_rotate:
            auth = ""  # the credential provider authenticates every connection
        elif self.REDIS_USERNAME or self.REDIS_PASSWORD:
            auth = f"{quote(self.REDIS_USERNAME, safe='')}:{quote(self.REDIS_PASSWORD, safe='')}@"
        query = (
            f"?ssl_ca_certs={quote(self.REDIS_SSL_CA_CERTS, safe='/')}"
            if self.REDIS_SSL and self.REDIS_SSL_CA_CERTS
            else ""
        )
        return f"{scheme}://{auth}{self.REDIS_HOST}:{self.REDIS_PORT}/{self.REDIS_DB}{query}"

    @property
    def redis_credentials_rotate(self) -> bool:
        """Credentials come from a file or an IAM token, made again when they get old."""
        return bool(self.REDIS_PASSWORD_FILE or self.REDIS_IAM_AUTH)

    @property
    def pubsub_url(self) -> str:
        return self.REDIS_PUBSUB_URL or self.redis_url

    @property
    def sqlite_path(self) -> Path:
        path = Path(self.SQLITE_PATH)
        return path if path.is_absolute() else Path.cwd() / path


_INSTANCE_SUFFIX = uuid.uuid4().hex[:6]


def published_secrets() -> set[str]:
    """The JWT secrets that settings.toml publishes for development and tests."""
    with open(SETTINGS_FILE, "rb") as file:
        sections = tomllib.load(file)
    return {
        str(section["JWT_SECRET"])
        for section in sections.values()
        if isinstance(section, dict) and section.get("JWT_SECRET")
    }


def _default_instance_id() -> str:
    supervisor = workers.supervisor_pid()
    if supervisor is not None:  # workers of one uvicorn: one instance, one id
        return f"{socket.gethostname()}-{supervisor}"
    return f"{socket.gethostname()}-{os.getpid()}-{_INSTANCE_SUFFIX}"


def load_settings(**overrides: Any) -> Settings:
    """Load and validate settings; raise ConfigError naming every bad variable."""
    env = os.environ.get(ENV_SWITCH, "development")
    raw = Dynaconf(
        settings_files=[str(SETTINGS_FILE)],
        environments=True,
        env=env,
        env_switcher=ENV_SWITCH,
        envvar_prefix=False,
        load_dotenv=False,
    )
    values = {key: raw.get(key) for key in Settings.model_fields if raw.get(key) is not None}
    values["env"] = env
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({ENV_SWITCH}={env}): {problems}") from None
