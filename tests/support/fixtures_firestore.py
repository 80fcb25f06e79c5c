"""Pytest fixtures for the Firestore backend: one emulator process per test session."""

from __future__ import annotations

import pytest

from tests.support.firestore_emulator import FirestoreEmulator


@pytest.fixture(scope="session")
def firestore_emulator() -> str:
    """Address ("127.0.0.1:PORT") of an emulator shared by the whole session.

    Tests share its state, so they use unique ids (the ``uid`` fixture).
    """
    emulator = FirestoreEmulator.launch()
    try:
        yield emulator.host
    finally:
        emulator.close()
