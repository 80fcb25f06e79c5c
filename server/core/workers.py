"""Which process of an instance this is: one process, or one of ``uvicorn --workers N``.

The deployment guide starts every instance as ``uvicorn server.main:app --workers N`` with
one ``INSTANCE_ID`` per machine, so the start command cannot carry anything else.

How a worker knows it is one: uvicorn's supervisor (``--workers``, and ``--reload``)
starts each worker with :mod:`multiprocessing`'s *spawn* context, and
:func:`multiprocessing.parent_process` is then set in the child; it is None in a process
that uvicorn runs directly. Nothing here depends on uvicorn's internals, an environment
variable or the command line of the parent. Siblings recognise each other by the
supervisor's pid on the same host (:func:`owner_token`): that is the identity of the
instance, whatever the number of its workers.

* Each worker is its own cluster member, ``<INSTANCE_ID>/p<pid>`` (:func:`member_id`): its
  own heartbeat, its own connections, reaped alone if it dies.
* Without Redis, two workers would be two separate servers behind one port (rooms and
  presence in each process's memory). :class:`SoleWorkerLock` takes a file lock named by
  the supervisor's pid: the second worker cannot, and refuses to start.
* A worker whose supervisor is SIGKILLed (or dies any other way) would run on as an
  orphan, still holding its connections and its place in the cluster, with nothing left
  to stop it. :func:`stop_with_supervisor` asks Linux to send the worker SIGTERM when its
  parent dies (``prctl(PR_SET_PDEATHSIG)``), so it drains as on a normal stop.
* Metrics: prometheus-client's multiprocess mode needs ``PROMETHEUS_MULTIPROC_DIR`` set
  before it is first imported (it picks its value class at import time).
  :func:`use_shared_metrics_dir` sets it, when the operator has not, to a directory named
  by the supervisor's pid, so every worker of one run writes to the same place and a new
  run starts empty. ``server/__init__.py`` calls it, before any module imports
  prometheus_client.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import IO

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
RUNTIME_DIR = Path(tempfile.gettempdir()) / "chat-server"


def supervisor_pid() -> int | None:
    """The pid of the process that spawned this worker, or None when this is not a worker."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None else None


def is_worker() -> bool:
    return supervisor_pid() is not None


def member_id(instance_id: str) -> str:
    """This process's id in the instance registry: the instance id itself, or with workers
    ``<instance_id>/p<pid>``."""
    return f"{instance_id}/p{os.getpid()}" if is_worker() else instance_id


def owner_token() -> str:
    """What every process of this instance, and no other, has in common: host and the pid
    of the supervisor (or of this process when it runs alone)."""
    return f"{socket.gethostname()}:{supervisor_pid() or os.getpid()}"


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_supervisor() -> bool:
    """In a worker on Linux: receive SIGTERM when the supervisor dies. True when armed.

    The signal is sent when the thread that spawned this process exits; uvicorn spawns
    and respawns its workers from its main thread. A supervisor that died before the call
    is caught by comparing the parent pid, and SIGTERM is sent at once.
    """
    supervisor = supervisor_pid()
    if supervisor is None or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != supervisor:  # already an orphan
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def use_shared_metrics_dir() -> str | None:
    """In a worker, point prometheus-client at one directory for all workers of this run.

    Keeps an operator's ``PROMETHEUS_MULTIPROC_DIR``; otherwise uses
    ``<tmp>/chat-server/metrics/<supervisor pid>`` and removes the directories of
    supervisors that are gone. Returns the directory, or None outside worker mode.
    """
    configured = os.environ.get(METRICS_DIR_VARIABLE)
    if configured:
        Path(configured).mkdir(parents=True, exist_ok=True)
        return configured
    parent = supervisor_pid()
    if parent is None:
        return None
    base = RUNTIME_DIR / "metrics"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():
        if old.name.isdigit() and int(old.name) != parent and not _pid_alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = base / str(parent)
    path.mkdir(exist_ok=True)
    os.environ[METRICS_DIR_VARIABLE] = str(path)
    return str(path)


class SoleWorkerLock:
    """A file lock held for the life of the process: at most one worker per supervisor.

    ``acquire`` returns False when a sibling holds it. The lock is released by the
    kernel when the process ends, however it ends (``--reload`` restarts a worker only
    after the previous one exited, so it takes the lock again).
    """

    def __init__(self) -> None:
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        parent = supervisor_pid()
        if parent is None:
            return True
        RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
        handle = open(RUNTIME_DIR / f"sole-worker-{parent}.lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
