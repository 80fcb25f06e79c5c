"""Durable storage behind one interface (``base.Store``): memory, SQLite and Firestore."""

from server.store.base import Store

__all__ = ["Store"]
