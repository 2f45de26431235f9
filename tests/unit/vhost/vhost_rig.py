"""Shared test rig: mock driver ring + real GuestMemory + Virtqueue + BlkDevice."""

from __future__ import annotations

import os

from pytest_virtio.vhost_user.blk import BlkDevice, MemoryStorage
from pytest_virtio.vhost_user.faults import FaultInjector
from pytest_virtio.vhost_user.stats import Stats, Trace
from pytest_virtio.vhost_user.testing import MockMemory, MockSplitQueue
from pytest_virtio.vhost_user.virtqueue import Virtqueue


class Rig:
    def __init__(self, size: int = 64, storage_size: int = 1 << 20, *, event_idx: bool = False,
                 indirect: bool = True, readonly: bool = False,
                 layout: list[tuple[int, int]] | None = None, ring_base: int = 0x10000) -> None:
        self.mem = MockMemory(4 << 20, layout=layout)
        self.q = MockSplitQueue(self.mem, size, base=ring_base)
        self.gm = self.mem.guest_memory()
        self.storage = MemoryStorage(storage_size)
        self.stats = Stats(1)
        self.faults = FaultInjector()
        self.trace = Trace()
        self.dev = BlkDevice(self.storage, readonly=readonly, serial="rig-serial",
                             stats=self.stats, faults=self.faults, trace=self.trace)
        self.vq = Virtqueue(0, 1024, self.stats)
        self.vq.set_num(size)
        self.vq.indirect = indirect
        self.vq.event_idx = event_idx
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.vq.call_fd, self.vq.err_fd = self.call, self.err
        self.attach()

    def attach(self, base: int = 0) -> None:
        self.vq.set_base(base)
        self.vq.set_addr(self.q.vring_addr(), self.gm)
        self.vq.started = self.vq.enabled = True

    def run(self) -> int:
        return self.vq.drain(self.dev.handle)

    def do(self, rtype: int, sector: int = 0, data: bytes | int = 0) -> int:
        """One request through the ring; returns its status byte."""
        self.q.reset_alloc()
        req = self.q.blk_request(rtype, sector, data, indirect=True)
        self.q.publish(req.head)
        assert self.run() == 1
        (used,) = self.q.take_used()
        assert used[0] == req.head
        return self.q.status(req)

    @staticmethod
    def _count(fd: int) -> int:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def calls(self) -> int:
        return self._count(self.call)

    def errs(self) -> int:
        return self._count(self.err)

    def close(self) -> None:
        self.vq.detach()
        self.gm.close()
        self.mem.close()
        os.close(self.call)
        os.close(self.err)
