"""Structured logging: JSON lines in production, readable lines in development.

Our own events go through structlog; the standard-library loggers of uvicorn, python-socketio
and the Redis and Google clients are rendered by the same processors, so every line of an
instance has one format (and, in JSON, the instance id), and no line carries a token or a
password: uvicorn logs each websocket URL, ``?token=`` included, at INFO
(``server/core/redact.py`` scrubs every rendered value).
"""

from __future__ import annotations

import logging
import sys

import structlog

from server.core import metrics
from server.core.ratelimit import TokenBucket
from server.core.redact import redact_values

THIRD_PARTY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "socketio", "engineio")


#: Libraries whose warnings and errors mostly describe one client's bad input: Socket.IO
#: and Engine.IO (undecodable packets), and uvicorn (invalid UTF-8 frames, exceptions that
#: Engine.IO lets out of the ASGI app for some bad websocket input).
LIBRARY_PREFIXES = ("socketio", "engineio", "uvicorn")


class LibraryErrors(logging.Filter):
    """What python-socketio, python-engineio and uvicorn log about a client's bad packet.

    They log a full traceback for many malformed packets (a packet or frame that does not
    decode, an event handler's bad arguments): one client could write a traceback per
    packet.
    Here each such record becomes one line (the exception's type and message, cut to 300
    characters), and at most ``per_minute`` of them are written a minute; the rest are
    counted in ``chat_log_lines_dropped_total``.
    """

    def __init__(self, per_minute: int) -> None:
        super().__init__()
        self.bucket = TokenBucket(per_minute / 60.0, per_minute)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(LIBRARY_PREFIXES):
            return True
        metrics.LIBRARY_ERRORS.inc()
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"[:300]
            record.args = None
            record.exc_info = None
            record.exc_text = None
        if not self.bucket.take():
            metrics.LOG_LINES_DROPPED.inc()
            return False
        return True


def configure_logging(
    level: str = "INFO",
    fmt: str = "json",
    instance_id: str = "",
    library_errors_per_minute: int = 60,
) -> None:
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if instance_id:
        structlog.contextvars.bind_contextvars(instance=instance_id)
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_values,  # last before rendering: the message and the traceback too
                renderer,
            ],
        )
    )
    handler.addFilter(LibraryErrors(library_errors_per_minute))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in THIRD_PARTY_LOGGERS:  # uvicorn installs handlers of its own before the app loads
        logger = logging.getLogger(name)
        if name == "uvicorn.access" and not logger.handlers and not logger.propagate:
            continue  # `--no-access-log`: uvicorn turned access lines off; keep them off
        logger.handlers = []
        logger.propagate = True
    # A level on the libraries' own loggers also stops them adding a stderr handler of
    # their own (python-engineio does when "engineio.server" has none), which would print
    # every traceback past our format and the filter below.
    for noisy in ("socketio", "engineio", "socketio.server", "engineio.server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger(noisy).handlers = []
