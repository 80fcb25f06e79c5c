"""The mutable state of this instance that several layers read: draining and work in flight."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class InstanceState:
    """Written by the transport (drain, the event guard), read by health and figures.

    Invariant: once ``draining`` is true it never goes back to false in this process.
    """

    #: This process's id in the cluster: the ``INSTANCE_ID``, or with ``uvicorn --workers N``
    #: one worker's ``<INSTANCE_ID>/p<pid>``.
    instance_id: str
    version: str
    draining: bool = False
    in_flight: int = 0
    #: The ``INSTANCE_ID`` shared by the workers of one instance (empty: ``instance_id``).
    instance: str = ""

    @property
    def instance_name(self) -> str:
        return self.instance or self.instance_id
