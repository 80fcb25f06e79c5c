"""How a Socket.IO manager publishes to and listens on Redis pub/sub: :class:`Delivery`.

Both Redis managers (``redis_manager.py``, ``cluster_manager.py``) hold one; they supply
what differs (how to send once, how to subscribe once) and it supplies the policy:

* **Publishing** is tried up to ``publish_attempts`` times within ``publish_timeout``
  seconds, and then given up without raising: the local clients already have the message.
  Every message given up is counted (``publish_failures`` and the metric
  ``chat_bus_publish_failures_total``) and logged at error level.
  python-socketio's own ``_publish`` tries twice with no delay and drops the message with
  one log line.
* **No attempt may take more than half of** ``publish_timeout`` (all of it when there is
  one attempt). Redis socket timeouts (``REDIS_TIMEOUT``, 5 s by default) outlast the whole
  budget, so a master that accepts connections and never answers costs one attempt, not all.
* **The listener never ends by itself.** Whatever ends a subscription (an error, the
  server closing it, a silent link noticed by the caller), it subscribes again after
  0.25, 0.5, 1, 2, 4, 5, 5 … s (``listen_backoff`` doubling up to ``listen_max_backoff``;
  python-socketio's listener waits 1 … 60 s). Every loss is logged and counted
  (``listener_reconnects``, ``chat_bus_listener_resubscribes_total``), and the pub/sub
  connection is closed on every way out.
  A listener that stops silently leaves an instance deaf to every other one:
  https://github.com/miguelgrinberg/python-socketio/issues/1581
* ``subscribed`` (an :class:`asyncio.Event`) is set exactly while a subscription is live.
* **After a lost subscription, before the first message of the new one**, the listener
  awaits ``on_resubscribed()`` (when set): what was published meanwhile never reached
  this instance, and the hook hands it over from the store (``server/transport/catchup.py``).
  Messages published after the new subscription wait in its socket until it returns, so
  nothing overtakes what it hands over. Its errors are logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from server.core import metrics

log = structlog.get_logger(__name__)


class SubscriptionLost(ConnectionError):
    """The server ended our subscription (slot moved, node demoted) or the link went silent."""


class Delivery:
    """Publish retries and the resubscribing listener loop of one manager's ``channel``."""

    def __init__(
        self,
        channel: str,
        *,
        publish_attempts: int = 4,
        publish_backoff: float = 0.1,
        publish_timeout: float = 2.0,
        listen_backoff: float = 0.25,
        listen_max_backoff: float = 5.0,
    ) -> None:
        self.channel = channel
        self.publish_attempts = max(1, publish_attempts)
        self.publish_backoff = publish_backoff
        self.publish_timeout = publish_timeout
        self.listen_backoff = listen_backoff
        self.listen_max_backoff = listen_max_backoff
        #: messages given up after all attempts (other instances never saw them)
        self.publish_failures = 0
        #: times the listener lost its subscription and started over
        self.listener_reconnects = 0
        #: set while the listener is subscribed
        self.subscribed = asyncio.Event()
        #: awaited after every subscription that follows a lost one (see the module doc)
        self.on_resubscribed: Callable[[], Awaitable[Any]] | None = None

    async def publish(
        self,
        send: Callable[[], Awaitable[Any]],
        after_failure: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """``send()`` until it succeeds, within the attempt and time budget.

        ``after_failure()`` runs after every failed attempt, before the next one (its own
        errors are ignored). Returns False, never raises, when it gives up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        per_attempt = self.publish_timeout / (1 if self.publish_attempts == 1 else 2)
        delay = self.publish_backoff
        for attempt in range(1, self.publish_attempts + 1):
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs send() in a
                # Task of its own, two more turns of a busy loop on every message's way
                async with asyncio.timeout(max(min(deadline - loop.time(), per_attempt), 0.001)):
                    await send()
                return True
            except Exception as exc:
                if after_failure is not None:
                    with contextlib.suppress(Exception):
                        await after_failure()
                if attempt == self.publish_attempts or loop.time() + delay >= deadline:
                    self.publish_failures += 1
                    metrics.BUS_PUBLISH_FAILURES.inc()
                    log.error(
                        "bus.publish_failed",
                        channel=self.channel,
                        attempts=attempt,
                        error=describe(exc),
                        publish_failures=self.publish_failures,
                        impact="only this instance's clients got the message; other instances missed it",
                        action="check that Redis is reachable and healthy (failover in progress? "
                        "REDIS_URL, network, auth); publishing resumes by itself when it answers",
                    )
                    return False
                log.warning(
                    "bus.publish_retry",
                    channel=self.channel,
                    attempt=attempt,
                    error=describe(exc),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        return False  # pragma: no cover - the loop always returns

    async def listen(
        self,
        subscribe: Callable[[], Awaitable[Any]],
        messages: Callable[[Any], AsyncIterator[Any]],
    ) -> AsyncIterator[Any]:
        """Yield ``messages(pubsub)`` of the pub/sub that ``subscribe()`` returns, forever.

        An error or the end of ``messages`` counts as a lost subscription: the pub/sub is
        closed and ``subscribe()`` is called again after a capped backoff, which starts over
        after every successful subscription. Cancellation closes the pub/sub and propagates.
        """
        failures = 0  # since the last successful subscription
        lost = False  # a subscription was live once and ended
        while True:
            pubsub = None
            try:
                pubsub = await subscribe()
                failures = 0
                self.subscribed.set()
                log.info(
                    "bus.listener_subscribed",
                    channel=self.channel,
                    reconnects=self.listener_reconnects,
                )
                if lost:
                    lost = False
                    await self._after_gap()
                async for item in messages(pubsub):
                    yield item
                raise SubscriptionLost("subscription ended")
            except Exception as exc:
                lost = lost or self.subscribed.is_set()
                self.subscribed.clear()
                self.listener_reconnects += 1
                metrics.BUS_LISTENER_RESUBSCRIBES.inc()
                failures += 1
                sleep = self.listen_delay(failures)
                log.warning(
                    "bus.listener_retry",
                    channel=self.channel,
                    error=describe(exc),
                    retry_in=sleep,
                    reconnects=self.listener_reconnects,
                )
                await close_quietly(pubsub)
                await asyncio.sleep(sleep)
            except BaseException:  # cancelled or closed: leave no connection behind
                self.subscribed.clear()
                await close_quietly(pubsub)
                raise

    async def _after_gap(self) -> None:
        if self.on_resubscribed is None:
            return
        try:
            await self.on_resubscribed()
        except Exception as exc:
            log.error(
                "bus.catch_up_failed",
                channel=self.channel,
                error=describe(exc),
                impact="messages published while this instance was not subscribed did not "
                "reach its sockets live; clients get them from history or when they rejoin",
            )

    def listen_delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts since the last subscription."""
        return min(self.listen_backoff * 2 ** (failures - 1), self.listen_max_backoff)


async def close_quietly(pubsub: Any) -> None:
    """Close a pub/sub object, giving up after 2 s and ignoring its errors."""
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pubsub.aclose(), 2)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, for logs (a bare TimeoutError says it timed out)."""
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        text = "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
