"""What the suite needs from the machine, and what happens when something is missing.

``make test`` installs these (see the Makefile's ``install-system`` and ``install-browser``).
When one is still missing, a test that needs it is skipped with the exact thing to install,
except under ``CI=true``, where a missing browser or server fails the test instead: CI must
never turn green by not running a part of the suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

MIN_REDIS = (7, 0)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(what: str) -> None:
    """Skip the calling test (fail it under CI=true) because ``what`` is not available."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: a missing dependency fails the run)", pytrace=False)
    pytest.skip(what)


def redis_version(server: str) -> tuple[int, int] | None:
    out = subprocess.run([server, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"v=(\d+)\.(\d+)", out.stdout)
    return (int(found[1]), int(found[2])) if found else None


def require_redis() -> None:
    """redis-server and redis-cli on PATH, redis-server at least 7.0."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        missing(
            "redis-server and redis-cli are required (Debian/Ubuntu: apt-get install "
            "redis-server redis-tools; `make test` does it)"
        )
    version = redis_version(server)
    if version is None or version < MIN_REDIS:
        missing(
            f"Redis {MIN_REDIS[0]}.{MIN_REDIS[1]} or newer is required; {server} is "
            f"{'unknown' if version is None else '.'.join(map(str, version))}"
        )


def require_tool(name: str, package: str) -> str:
    """The path of ``name``; skips (fails under CI) naming the Debian ``package`` otherwise."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is required (Debian/Ubuntu package {package}; `make test` installs it)")
    return path
