"""The built wheel serves the demo page and reads settings.toml outside a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support.servers import ROOT, TEST_SECRET, free_port


def uv() -> str:
    found = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    if not Path(found).exists():
        pytest.fail("uv is needed to build the wheel; `make install` puts it in .tools/")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [uv(), "build", "--wheel", "--out-dir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [built] = out.glob("chat_server-*.whl")
    return built


def test_the_wheel_carries_settings_and_the_demo_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "server/_data/settings.toml" in names
    assert "server/_data/client-demo/index.html" in names
    assert "server/main.py" in names


def test_an_unpacked_wheel_serves_outside_a_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),  # the wheel's code, not the checkout's
        "CHAT_ENV": "testing",
        "JWT_SECRET": TEST_SECRET,
        "STORE": "sqlite",
        "SQLITE_PATH": "chat.db",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "server.main:app", "--port", str(port)],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "the installed server did not start"
                time.sleep(0.2)
        assert health.status_code == 200
        assert health.json()["version"] == wheel.name.split("-")[1]
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        served_from = httpx.get(f"http://127.0.0.1:{port}/static/demo.js", timeout=5)
        assert served_from.status_code == 200
        assert (elsewhere / "chat.db").exists()  # a relative SQLITE_PATH is the working directory's
    finally:
        proc.terminate()
        proc.wait(timeout=30)
