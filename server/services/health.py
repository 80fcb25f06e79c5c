"""The answer of ``/api/health``: bounded checks of every backend, draining, figures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server.core.redact import redact
from server.core.state import InstanceState
from server.services.figures import Figures

Check = Callable[[], Awaitable[Any]]


async def timed_check(name: str, check: Check, timeout: float) -> dict:
    """``{ok, latency_ms}`` or ``{ok: false, error}``; never takes longer than ``timeout``."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        return {"ok": False, "error": f"{name} did not answer within {timeout}s"}
    except Exception as exc:
        return {"ok": False, "error": redact(f"{name}: {exc}")[:300]}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


class Health:
    """Runs the checks concurrently; ``healthy`` only when all pass and the instance is not draining.

    ``checks`` maps a name to a ping; a name mapped to None is reported as disabled (Redis
    on a single instance).
    """

    def __init__(
        self,
        state: InstanceState,
        figures: Figures,
        checks: dict[str, Check | None],
        timeout: float,
    ) -> None:
        self.state = state
        self.figures = figures
        self.checks = checks
        self.timeout = timeout

    async def report(self) -> tuple[dict, bool]:
        """The health document and whether the instance should receive traffic."""
        enabled = {name: check for name, check in self.checks.items() if check is not None}
        names = list(enabled)
        results = await asyncio.gather(
            *(timed_check(name, check, self.timeout) for name, check in enabled.items())
        )
        checks: dict[str, dict] = dict(zip(names, results, strict=True))
        for name, check in self.checks.items():
            if check is None:
                checks[name] = {"ok": True, "mode": "disabled (single instance)"}
        checks = {name: checks[name] for name in self.checks}
        status = "healthy"
        if self.state.draining:
            status = "draining"
        elif not all(check["ok"] for check in checks.values()):
            status = "unhealthy"
        body = {
            "status": status,
            "instance_id": self.state.instance_id,
            "instance": self.state.instance_name,
            "version": self.state.version,
            "checks": checks,
            "connections": self.figures.local_connections(),
            "cluster": self.figures.summary,
        }
        return body, status == "healthy"
