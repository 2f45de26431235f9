"""In-process vhost-user-blk backend: serves a guest's disk from the pytest process.

Start a :class:`VhostUserBlkServer` on a unix socket before QEMU, point
``-chardev socket,path=...`` + ``-device vhost-user-blk-pci`` at it, and assert
on ``server.stats`` / ``server.trace``; provoke error paths with ``server.faults``.
"""

from __future__ import annotations

from .blk import FileStorage, MemoryStorage, Storage
from .faults import FaultInjector, FaultRule
from .memory import GuestMemory, GuestMemoryError
from .protocol import BlkStatus, BlkType
from .server import VhostUserBlkServer
from .stats import Stats, Trace, TraceEntry
from .virtqueue import QueueBroken

__all__ = [
    "BlkStatus",
    "BlkType",
    "FaultInjector",
    "FaultRule",
    "FileStorage",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryStorage",
    "QueueBroken",
    "Stats",
    "Storage",
    "Trace",
    "TraceEntry",
    "VhostUserBlkServer",
]
