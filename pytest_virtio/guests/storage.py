"""A data disk's capacity changed from the host: QMP ``block_resize`` on the disk's
block node (``drv-<disk>``), then the wait until the guest sees the new size.

Who tells the guest: virtio-blk raises a config-change interrupt (virtio 1.2
§5.2.4 ``capacity``) and virtio-scsi sends VIRTIO_SCSI_T_PARAM_CHANGE "capacity
data has changed" (§5.6.6.3), which Linux answers with a rescan. A scsi-hd on
the LSI controller only changes what the next READ CAPACITY answers; on real
hardware udev or an administrator then asks the kernel to look again, and
pytest-virtio's guest has no udev, so it writes that sysfs file itself
(``_RESCAN``). The other buses are refused (``RESIZE_REFUSED``, each with why).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from pytest_virtio import ids
from pytest_virtio.channels.runners import Result
from pytest_virtio.errors import ConfigError, GuestError
from pytest_virtio.spec import DISK_BUSES, Disk
from pytest_virtio.spec._util import _choices
from pytest_virtio.units import format_size, parse_size

__all__ = ["RESIZE_REFUSED", "block_resize_args", "new_size", "rescan_command",
           "wait_capacity"]

log = logging.getLogger(__name__)

#: The sysfs file (under /sys/block/<dev>/) that makes the guest re-read the capacity,
#: on a bus that does not tell it (virtio-blk and virtio-scsi do).
_RESCAN: Final[Mapping[str, str]] = MappingProxyType({"lsi": "device/rescan"})
_ATA = ("the guest's libata keeps the capacity it read from IDENTIFY at probe time "
        "(a SCSI rescan does not re-identify)")
#: Buses a resize is refused on, and why (seen with QEMU 7.2 and Debian 12's kernel).
RESIZE_REFUSED: Final[Mapping[str, str]] = MappingProxyType(
    {
        "vhost-user-blk": "its capacity is served by the in-process backend, which cannot "
                          "change it",
        "ide": _ATA,
        "ahci": _ATA,
        "nvme": "QEMU 7.2's nvme namespace does not share the 'resize' permission on its "
                "drive (block_resize: permission conflict)",
    }
)
_SECTOR = 512
_POLL = 0.2


def new_size(disk: Disk, size: str | int, what: str) -> int:
    """``size`` in bytes, checked: a whole number of the disk's logical blocks, on a
    bus QEMU can resize."""
    if disk.bus in RESIZE_REFUSED:
        can = [b for b in DISK_BUSES if b not in RESIZE_REFUSED]
        raise ConfigError(f"{what}: disk {disk.name!r} is on bus {disk.bus!r}, which cannot "
                          f"be resized: {RESIZE_REFUSED[disk.bus]}; give a disk the test "
                          f"resizes one of the buses {_choices(can)}")
    nbytes = parse_size(size, f"{what}: size", positive=True)
    block = disk.logical_block_size or _SECTOR
    if nbytes % block:
        raise ConfigError(f"{what}: size {size!r} ({nbytes} bytes) is not a whole number of "
                          f"the disk's {block}-byte blocks; give a multiple of {block}")
    return nbytes


def block_resize_args(disk: Disk, nbytes: int) -> dict[str, Any]:
    """QMP ``block_resize`` arguments for ``disk``'s node ``drv-<disk>``.

    ``drv-<disk>`` is the ``-drive id=`` (a BlockBackend name: QMP ``device``) of a
    disk given at boot and the ``blockdev-add node-name=`` of a hot-plugged one;
    QEMU looks ``device`` up first, then ``node-name``, so naming both finds either.
    """
    node = ids.drive_id(disk.name)
    return {"device": node, "node-name": node, "size": nbytes}


def rescan_command(disk: Disk, dev: str) -> str | None:
    """The guest command that makes the kernel re-read ``dev``'s capacity, or None
    when the bus tells the guest itself."""
    path = _RESCAN.get(disk.bus)
    return None if path is None else f"echo 1 > /sys/block/{dev}/{path}"


def wait_capacity(run: Callable[[str], Result], disk: Disk, dev: str, nbytes: int,
                  timeout: float, tail: Callable[[], str]) -> int:
    """Poll ``/sys/block/<dev>/size`` until the guest sees ``nbytes``; return it.

    GuestError names what the guest still saw when ``timeout`` ran out.
    """
    rescan = rescan_command(disk, dev)
    if rescan is not None:
        run(rescan).check(tail())
    deadline = time.monotonic() + timeout
    seen = ""
    while True:
        seen = run(f"cat /sys/block/{dev}/size").check(tail()).stdout.strip()
        if seen.isdigit() and int(seen) * _SECTOR == nbytes:
            log.info("disk %s (%s): the guest sees %s", disk.name, dev, format_size(nbytes))
            return nbytes
        if time.monotonic() > deadline:
            got = f"{int(seen) * _SECTOR} bytes" if seen.isdigit() else repr(seen)
            raise GuestError(
                f"disk {disk.name!r}: QEMU resized it to {nbytes} bytes but the guest's "
                f"/sys/block/{dev}/size still says {got} after {timeout:.0f}s", tail())
        time.sleep(_POLL)
