"""Realtime chat server: Socket.IO rooms and messages, Redis across instances."""

__version__ = "0.1.0"
