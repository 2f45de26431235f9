"""Logged disks (``Disk(write_log=True)``): where their write log and base image live,
and what a test reads back after its workload (``guest.logged_disk(name)``).

A logged in-process vhost-user-blk disk keeps two things in its guest's run
directory: the write log (``writelog-<disk>/``, :mod:`pytest_virtio.vhost_user.writelog`)
and the base, the disk's image as it was before its backend started
(``base-<disk>.img``: a sparse copy of the image, or for a blank disk a sparse
file of its size).  Crash states are the base plus records of the log
(:mod:`pytest_virtio.vhost_user.crashstates`), so both are needed, and the
durability rule the guest's driver chose (features negotiated, ``writeback``).

The backend package is imported inside the functions, as in ``launch.start_backend``
(its measured 0.2-0.4 s import is paid only by sessions that serve a disk).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_virtio.errors import ConfigError

if TYPE_CHECKING:
    from pytest_virtio.spec import Disk
    from pytest_virtio.vhost_user.blk import Storage
    from pytest_virtio.vhost_user.crashstates import Durability
    from pytest_virtio.vhost_user.server import VhostUserBlkServer
    from pytest_virtio.vhost_user.writelog import RecordedLog

__all__ = ["LoggedDisk", "base_path", "log_dir", "logged_disk", "logged_storage"]

log = logging.getLogger(__name__)


def log_dir(run_dir: Path, name: str) -> Path:
    """The write log directory of disk ``name``."""
    return run_dir / f"writelog-{name}"


def base_path(run_dir: Path, name: str) -> Path:
    """Disk ``name``'s image as it was before its backend started."""
    return run_dir / f"base-{name}.img"


@dataclass(frozen=True)
class LoggedDisk:
    """What a logged disk recorded: its log (synced now), its base image and the
    durability rule its driver negotiated; ``check_crash_states`` takes it whole."""

    name: str
    log: RecordedLog
    base: Path
    durability: Durability


def logged_storage(disk: Disk, inner: Storage, image: str, run_dir: Path) -> Storage:
    """``inner`` wrapped in a LoggedStorage; the base copied from ``image`` first.

    Called before the backend serves anything (before QEMU starts or the disk is
    hot-plugged), so the base is the disk before the guest's first request.
    """
    # Start-up cost: see the module docstring.
    from pytest_virtio.vhost_user.crashstates import sparse_copy
    from pytest_virtio.vhost_user.writelog import LoggedStorage, WriteLog

    directory, base = log_dir(run_dir, disk.name), base_path(run_dir, disk.name)
    if directory.exists():
        raise ConfigError(f"disk {disk.name!r}: write log {directory} exists already (the "
                          "disk was plugged before in this guest); give the disk a new name")
    sparse_copy(Path(image), base)
    writelog = WriteLog(directory, inner.size)
    log.info("disk %s: write log in %s, base image %s", disk.name, directory, base)
    return LoggedStorage(inner, writelog)


def logged_disk(backends: Mapping[str, VhostUserBlkServer], run_dir: Path, name: str,
                owner: str) -> LoggedDisk:
    """Disk ``name``'s log (its index flushed first), base and durability rule."""
    # Start-up cost: see the module docstring.
    from pytest_virtio.vhost_user.crashstates import durability_of
    from pytest_virtio.vhost_user.writelog import LoggedStorage

    server = backends.get(name)
    storage = server.storage if server is not None else None
    if server is None or not isinstance(storage, LoggedStorage):
        logged = sorted(n for n, b in backends.items() if isinstance(b.storage, LoggedStorage))
        raise ConfigError(f"{owner}.logged_disk({name!r}): no in-process disk of that name "
                          "with a write log; give the disk write_log=True (logged disks "
                          f"now: {', '.join(logged) or 'none'})")
    storage.log.check()
    durability = durability_of(server.features, server.device.writeback)
    return LoggedDisk(name, storage.log.recorded(), base_path(run_dir, name), durability)
