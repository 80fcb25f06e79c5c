"""The mutable state of this instance that several layers read: draining and work in flight."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class InstanceState:
    """Written by the transport (drain, the event guard), read by health and figures.

    Invariant: once ``draining`` is true it never goes back to false in this process.
    """

    instance_id: str
    version: str
    draining: bool = False
    in_flight: int = 0
