"""A Rig whose device writes through a LoggedStorage: the real backend, a synthetic guest."""

from __future__ import annotations

from pathlib import Path

from vhost_rig import Rig

from pytest_virtio.vhost_user.blk import BlkDevice, Storage
from pytest_virtio.vhost_user.protocol import BlkType
from pytest_virtio.vhost_user.testing import segments
from pytest_virtio.vhost_user.writelog import LoggedStorage, WriteLog


class LoggedRig(Rig):
    """``Rig`` with its device's storage wrapped: ``inner`` (default: the rig's RAM disk)."""

    def __init__(self, log_dir: Path, inner: Storage | None = None, *,
                 storage_size: int = 1 << 20,
                 device: BlkDevice | None = None) -> None:
        super().__init__(size=64, storage_size=storage_size)
        if device is not None:  # a second queue of another rig's device
            self.dev = device
            return
        self.inner = inner if inner is not None else self.storage
        self.log = WriteLog(log_dir, self.inner.size)
        self.logged = LoggedStorage(self.inner, self.log)
        self.dev = BlkDevice(self.logged, serial="rig-serial", stats=self.stats,
                             faults=self.faults, trace=self.trace)


    def write(self, sector: int, data: bytes) -> int:
        return self.do(BlkType.OUT, sector, data)

    def flush(self) -> int:
        return self.do(BlkType.FLUSH)

    def discard(self, sector: int, sectors: int) -> int:
        return self.do(BlkType.DISCARD, 0, segments((sector, sectors, 0)))

    def zeroes(self, sector: int, sectors: int, unmap: bool = False) -> int:
        return self.do(BlkType.WRITE_ZEROES, 0, segments((sector, sectors, int(unmap))))
