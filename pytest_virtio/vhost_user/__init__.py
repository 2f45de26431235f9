"""In-process vhost-user-blk backend: serves a guest's disk from the pytest process.

Start a :class:`VhostUserBlkServer` on a unix socket before QEMU, point
``-chardev socket,path=...`` + ``-device vhost-user-blk-pci`` at it, and assert
on ``server.stats`` / ``server.trace``; provoke error paths with ``server.faults``.
"""

from __future__ import annotations

from pytest_virtio.vhost_user.blk import FileStorage, MemoryStorage, Storage
from pytest_virtio.vhost_user.faults import FaultInjector, FaultRule
from pytest_virtio.vhost_user.memory import GuestMemory, GuestMemoryError
from pytest_virtio.vhost_user.protocol import BlkStatus, BlkType
from pytest_virtio.vhost_user.server import VhostUserBlkServer
from pytest_virtio.vhost_user.stats import Stats, Trace, TraceEntry
from pytest_virtio.vhost_user.virtqueue import QueueBroken

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
