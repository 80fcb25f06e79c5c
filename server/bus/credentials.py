"""Redis credentials that change while the server runs: IAM tokens and rotated passwords.

ElastiCache and MemoryDB IAM authentication use a short-lived signed token (valid 15
minutes) as the password of an IAM-enabled user; a secret manager may rotate a plain
password and write the new one to a file. Either way a password fixed at start stops
working, at the latest when a connection has to be made again (a failover, a network
cut; ElastiCache closes IAM connections after 12 hours anyway).

:class:`RenewingCredentials` is a redis-py ``CredentialProvider`` (its documented hook
for this: https://redis.readthedocs.io/en/stable/examples/connection_examples.html#Connecting-to-a-redis-instance-with-ElastiCache-IAM-credential-provider).
redis-py asks it for credentials on every new connection: the state client's pool, every
pub/sub connection of the Socket.IO manager and of the session router, and their
reconnections. It hands out the cached secret until ``renew_after`` seconds have passed
since it was made, then makes a new one; with IAM tokens ``renew_after`` (default 600 s)
stays below the 900 s validity, so a token is renewed before it expires. An established
connection keeps the authentication it had (Redis does not drop it when a password
changes or a token expires); a reconnection authenticates with the current secret.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from server.core import metrics

IAM_TOKEN_LIFETIME = 900.0  # seconds, fixed by AWS


class RenewingCredentials:
    """``CredentialProvider`` with a secret made by ``make_secret``, renewed when it is
    older than ``renew_after`` seconds (0: made again for every connection)."""

    def __init__(self, username: str, make_secret: Callable[[], str], renew_after: float) -> None:
        self.username = username
        self.make_secret = make_secret
        self.renew_after = renew_after
        self._secret: str | None = None
        self._made_at = 0.0
        self._lock = threading.Lock()  # sync and async clients may share the provider

    def current(self) -> str:
        with self._lock:
            now = time.monotonic()
            if self._secret is None or now - self._made_at >= self.renew_after:
                self._secret = self.make_secret()
                self._made_at = now
                metrics.REDIS_CREDENTIALS_RENEWED.inc()
            return self._secret

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        secret = self.current()
        return (self.username, secret) if self.username else (secret,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def password_file(path: str) -> Callable[[], str]:
    """The password in ``path`` (first line), read again each time: rotated by a secret manager."""

    def read() -> str:
        return Path(path).read_text().splitlines()[0].strip()

    return read


def iam_token(service: str, cache_name: str, username: str, region: str) -> Callable[[], str]:
    """An ElastiCache (``service="elasticache"``) or MemoryDB (``"memorydb"``) IAM token:
    a SigV4-presigned ``connect`` request for ``username`` on ``cache_name`` (the
    replication group or cluster name), without its scheme. AWS credentials come from the
    usual chain (instance role, ECS task role, IRSA, environment). Needs botocore
    (``pip install 'chat-server[aws]'``)."""
    from botocore.auth import SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.session import get_session

    session = get_session()

    def sign() -> str:
        credentials = session.get_credentials()
        if credentials is None:
            raise RuntimeError("no AWS credentials found for Redis IAM authentication")
        request = AWSRequest(
            method="GET",
            url=f"http://{cache_name}/",
            params={"Action": "connect", "User": username},
        )
        SigV4QueryAuth(credentials, service, region, expires=int(IAM_TOKEN_LIFETIME)).add_auth(
            request
        )
        return str(request.url).removeprefix("http://")

    return sign
