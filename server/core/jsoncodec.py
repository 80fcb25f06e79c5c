"""orjson as python-socketio's JSON module (it calls ``dumps(..., separators=...)``)."""

from __future__ import annotations

import json
from typing import Any

import orjson


class OrjsonCodec:
    @staticmethod
    def dumps(obj: Any, *args: Any, **kwargs: Any) -> str:
        try:
            return orjson.dumps(obj).decode()
        except TypeError:  # e.g. integers beyond 64 bits: fall back to the standard module
            return json.dumps(obj, separators=(",", ":"))

    @staticmethod
    def loads(text: str | bytes, *args: Any, **kwargs: Any) -> Any:
        return orjson.loads(text)
