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

from server.core.redact import redact_values

THIRD_PARTY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "socketio", "engineio")


def configure_logging(level: str = "INFO", fmt: str = "json", instance_id: str = "") -> None:
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
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in THIRD_PARTY_LOGGERS:  # uvicorn installs handlers of its own before the app loads
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    for noisy in ("socketio", "engineio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
