"""Presence backends: who is online, each transition decided exactly once (memory, Redis)."""
