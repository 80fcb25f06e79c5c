"""Realtime chat server: Socket.IO rooms and messages, Redis across instances."""

from importlib.metadata import PackageNotFoundError, version

from server.core.workers import use_shared_metrics_dir

try:
    __version__ = version("chat-server")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0.0.0+unknown"

# Before anything imports prometheus_client: under `uvicorn --workers N` every worker
# writes its metrics to one shared directory (server/core/workers.py).
use_shared_metrics_dir()
