"""Secrets out of text that leaves the process (log lines, ``/api/health``).

Two shapes carry secrets in this product's text: query parameters (``?token=…``, which
uvicorn logs with every websocket URL at INFO) and URLs with credentials
(``redis://user:password@host``). Both are replaced by ``[redacted]``; everything else is
left as it was.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

REDACTED = "[redacted]"

_QUERY_SECRET = re.compile(
    r"(?i)((?:^|[?&;\s\"'])(?:token|access_token|id_token|jwt|password|secret|auth)=)[^&;\s\"']+"
)
_URL_CREDENTIALS = re.compile(r"([a-z][a-z0-9+.-]*://)([^/@\s:]*):([^@/\s]+)@", re.IGNORECASE)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """``text`` with tokens in query strings, URL passwords and bearer tokens replaced."""
    if "=" not in text and "@" not in text and "earer" not in text:
        return text  # the common case costs one scan
    text = _QUERY_SECRET.sub(rf"\1{REDACTED}", text)
    text = _URL_CREDENTIALS.sub(rf"\1\2:{REDACTED}@", text)
    return _BEARER.sub(rf"\1{REDACTED}", text)


def redact_values(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: :func:`redact` every string value of a log line."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
    return event_dict
