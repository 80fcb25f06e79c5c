"""Realtime chat server: Socket.IO rooms and messages, Redis across instances."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("chat-server")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0.0.0+unknown"
