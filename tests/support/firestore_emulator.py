"""A Firestore emulator process for tests and benchmarks.

Runs ``tests/support/firestore_emulator.js`` (the npm ``@firestore-emulator/server``
package, an in-memory implementation of Firestore's gRPC API) with ``node`` on a free
port. ``stop()`` and ``start()`` again reuse the same port, so a client pointed at it sees
an outage and then a fresh, empty backend; ``pause()``/``resume()`` freeze the process
instead (connections stay open, calls hang), which is how a stalled backend looks.

    emulator = FirestoreEmulator.launch()
    os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host   # "127.0.0.1:PORT"
    ...
    emulator.close()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_suffix(".js")
PACKAGE_DIR = ROOT / "node_modules" / "@firestore-emulator" / "server"


class EmulatorError(RuntimeError):
    """The emulator could not be installed, started or stopped."""


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_installed() -> None:
    """Install the Node packages (``npm ci``) when the emulator package is missing."""
    if shutil.which("node") is None:
        raise EmulatorError(
            "node is not on PATH: install Node.js 18+ to run the Firestore tests "
            "(or set CHAT_TEST_FIRESTORE=0 to skip the Firestore backend)"
        )
    if PACKAGE_DIR.is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise EmulatorError(f"{PACKAGE_DIR} is missing and npm is not on PATH to install it")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not PACKAGE_DIR.is_dir():
        raise EmulatorError(f"npm ci failed in {ROOT}:\n{result.stdout}\n{result.stderr}")


class FirestoreEmulator:
    """One emulator process on a fixed port; stop/start/pause/resume for outage tests."""

    def __init__(self, port: int | None = None, start_timeout: float = 20.0) -> None:
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self._process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(  # removed in close()
            prefix=f"firestore-emulator-{self.port}-", suffix=".log", delete=False
        )

    @classmethod
    def launch(cls, port: int | None = None) -> FirestoreEmulator:
        emulator = cls(port)
        emulator.start()
        return emulator

    @property
    def host(self) -> str:
        """The value for FIRESTORE_EMULATOR_HOST."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = Path(self._log.name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start on ``self.port`` (empty state) and wait until the port accepts connections."""
        if self.running:
            return
        ensure_installed()
        deadline = time.monotonic() + self.start_timeout
        while port_open(self.port):  # the previous process may still be releasing it
            if time.monotonic() > deadline:
                raise EmulatorError(f"port {self.port} is still taken by another process")
            time.sleep(0.05)
        self._process = subprocess.Popen(
            ["node", str(LAUNCHER), str(self.port), "--exit-with-stdin"],
            cwd=ROOT,
            stdin=subprocess.PIPE,  # the launcher exits when this pipe closes
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        while not port_open(self.port):
            if self._process.poll() is not None:
                raise EmulatorError(
                    f"firestore emulator exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmulatorError(
                    f"firestore emulator did not open port {self.port} within "
                    f"{self.start_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process and wait until the port is closed. State is lost."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if process.stdin is not None:
            process.stdin.close()
        deadline = time.monotonic() + timeout
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        """Stop, then start again on the same port (with empty state)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): the port stays open but nothing answers."""
        if not self.running:
            raise EmulatorError("firestore emulator is not running")
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.kill(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the process and remove its log file."""
        self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> FirestoreEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_emulator(port: int | None = None) -> FirestoreEmulator:
    """Start an emulator on ``port`` (a free one when None) and return it."""
    return FirestoreEmulator.launch(port)


def stop_emulator(emulator: FirestoreEmulator) -> None:
    emulator.stop()


def restart_emulator(emulator: FirestoreEmulator) -> None:
    """Restart on the same port; clients keep their address and see an empty store."""
    emulator.restart()
