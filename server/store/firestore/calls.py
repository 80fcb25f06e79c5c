"""One way to run a Firestore operation: deadline, retry with backoff, error translation.

:class:`Caller` runs ``op(attempt_timeout)`` through ``google.api_core.retry.AsyncRetry``.
Invariants:

- every attempt is bounded by ``timeout`` (``asyncio.timeout`` plus the same value as the
  RPC deadline), and the whole call, including waiting for this process's turn on a key,
  by ``budget`` (a deadline on the loop clock);
- only the codes in :data:`RETRYABLE` (and an attempt timeout) are retried, with
  AsyncRetry's jittered exponential backoff, until the budget is spent (like the library's
  own policy, bounded by time rather than by a count of attempts);
- INVALID_ARGUMENT (a request Firestore can never accept) raises ``ChatError("bad_request")``
  and is never retried nor reported as ``unavailable``;
- whatever else fails raises :class:`StoreUnavailable` naming the operation, the attempts,
  the time spent and the last error; nothing else escapes but the operation's own
  exceptions (``SeqTaken`` and the like) and cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

from google.api_core import exceptions as gexc
from google.api_core.retry import AsyncRetry

from server.core.errors import ChatError, StoreUnavailable
from server.core.locks import KeyedLock

T = TypeVar("T")

#: The library's own retryable codes for Firestore's RPCs (UNAVAILABLE, DEADLINE_EXCEEDED,
#: INTERNAL, RESOURCE_EXHAUSTED; see ``transports/base.py`` of google-cloud-firestore),
#: ABORTED (transaction contention, retried by the library's transaction helper), and an
#: attempt that reached its deadline. Writes are safe to retry: creates are guarded by
#: ``create()`` and stamped with a ``write_id``, the rest are idempotent sets.
RETRYABLE: tuple[type[BaseException], ...] = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.ResourceExhausted,
    gexc.Aborted,
    TimeoutError,
)
#: the library's backoff (0.1 s growing by 1.3, full jitter), capped by our own budget
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 1.0
BACKOFF_MULTIPLIER = 1.3
#: an attempt with less time than this left is not started
MIN_ATTEMPT = 0.01


class _OutOfTime(Exception):
    """No attempt could start before the deadline."""


def describe(exc: BaseException | None, attempt_timeout: float) -> str:
    if exc is None:
        return "no attempt could start before the deadline"
    if isinstance(exc, TimeoutError):
        return f"no answer within {attempt_timeout:.2f}s"
    if isinstance(exc, gexc.GoogleAPICallError):
        return f"{type(exc).__name__}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE)


class Caller:
    """Runs store operations under one deadline policy; ``locked`` also serialises per key."""

    def __init__(self, timeout: float, budget: float) -> None:
        self.timeout = timeout
        self.budget = budget
        self._locks = KeyedLock()

    async def __call__(
        self, what: str, op: Callable[[float], Awaitable[T]], *, deadline: float | None = None
    ) -> T:
        loop = asyncio.get_running_loop()
        started = loop.time()
        end = started + self.budget if deadline is None else deadline
        errors: list[BaseException] = []
        attempt_timeout = self.timeout

        async def attempt() -> T:
            nonlocal attempt_timeout
            remaining = end - loop.time()
            if remaining <= MIN_ATTEMPT:
                raise _OutOfTime()
            attempt_timeout = min(self.timeout, remaining)
            async with asyncio.timeout(attempt_timeout):
                return await op(attempt_timeout)

        def on_error(exc: Exception) -> None:
            errors.append(exc)

        retry = AsyncRetry(
            predicate=is_retryable,
            initial=BACKOFF_FIRST,
            maximum=BACKOFF_MAX,
            multiplier=BACKOFF_MULTIPLIER,
            timeout=max(0.0, end - loop.time()),
            on_error=on_error,
        )

        try:
            return await retry(attempt)()
        except (_OutOfTime, gexc.RetryError) as exc:
            last = errors[-1] if errors else None
            raise StoreUnavailable(
                f"firestore {what} failed after {len(errors)} attempt(s) in "
                f"{loop.time() - started:.2f}s: {describe(last, attempt_timeout)}"
            ) from (last or exc)
        except gexc.InvalidArgument as exc:
            raise ChatError("bad_request", f"firestore refused {what}: {exc.message}") from exc
        except gexc.GoogleAPICallError as exc:  # permission, missing index...
            raise StoreUnavailable(
                f"firestore {what} failed: {describe(exc, attempt_timeout)}"
            ) from exc

    async def locked(self, what: str, key: Hashable, op: Callable[[float], Awaitable[T]]) -> T:
        """Like calling, after taking this process's lock for ``key``, all within one budget.

        Transactions on one document from one process would only contend with each other;
        queueing them here leaves the transaction's own concurrency control for other
        processes.
        """
        deadline = asyncio.get_running_loop().time() + self.budget
        try:
            async with self._locks.hold(key, deadline):
                return await self(what, op, deadline=deadline)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"firestore {what} gave up after {self.budget:.2f}s waiting for earlier "
                "writes to the same document from this process"
            ) from exc
