"""Durable storage behind one interface; ``create_store`` picks the backend from settings."""

from __future__ import annotations

from ..config import Settings
from .base import Store


def create_store(settings: Settings) -> Store:
    if settings.STORE == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if settings.STORE == "firestore":
        from .firestore import FirestoreStore

        return FirestoreStore.from_settings(settings)
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.sqlite_path, timeout=settings.STORE_TIMEOUT)


__all__ = ["Store", "create_store"]
