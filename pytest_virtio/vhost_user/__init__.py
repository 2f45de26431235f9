"""In-process vhost-user-blk backend: serves a guest's disk from the pytest process.

Start a :class:`VhostUserBlkServer` on a unix socket before QEMU, point
``-chardev socket,path=...`` + ``-device vhost-user-blk-pci`` at it, and assert
on ``server.stats`` / ``server.trace``; provoke error paths with ``server.faults``.
"""

from __future__ import annotations

from .blk import BlkStatus, BlkType, FileStorage, MemoryStorage, Storage
from .faults import FaultInjector, FaultRule, Stats, Trace, TraceEntry
from .memory import GuestMemory, GuestMemoryError
from .server import VhostUserBlkServer
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
