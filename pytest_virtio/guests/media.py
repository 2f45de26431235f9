"""Removable media: a CD-ROM's disc changed or ejected from the host (QMP), and the
guest device that then reads the new disc."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pytest_virtio.errors import ConfigError, GuestError
from pytest_virtio.guests.launch import check_image_file
from pytest_virtio.guests.shell import Shell
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec import CdRom, MachineSpec

__all__ = ["change", "check_cdrom", "eject", "volume_digest"]

log = logging.getLogger(__name__)

#: ISO 9660 §8.4: the primary volume descriptor is the 2048-byte sector 16.
_ISO_SECTOR = 2048
_ISO_PVD_OFFSET = 16 * _ISO_SECTOR

_CDROM_FIND = r"""
for try in $(seq 1 {tries}); do
  for d in /dev/sr*; do
    [ -b "$d" ] || continue
    sum=$(dd if="$d" bs=2048 skip=16 count=1 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$sum" = {digest} ] && echo "$d" && exit 0
  done
  sleep 0.2
done
exit 1
"""


def check_cdrom(spec: MachineSpec | None, name: str, call: str) -> None:
    """ConfigError naming the CD-ROMs there are, unless ``spec`` has one called ``name``."""
    devices = spec.devices if spec is not None else ()
    names = [d.name for d in devices if isinstance(d, CdRom)]
    if name not in names:
        raise ConfigError(f"guest.{call}({name!r}): no CD-ROM of that name; this guest "
                          f"has: {', '.join(names) or 'none'}")


def volume_digest(iso: Path) -> str:
    """MD5 of the ISO's primary volume descriptor: what the guest compares each disc to."""
    with iso.open("rb") as f:
        f.seek(_ISO_PVD_OFFSET)
        return hashlib.md5(f.read(_ISO_SECTOR), usedforsecurity=False).hexdigest()


def change(machine: Machine, shell: Shell, spec: MachineSpec | None, name: str,
           iso: str | Path, *, force: bool, timeout: float) -> str:
    """Put ``iso`` in CD-ROM ``name``; the guest device that reads it (see
    :meth:`pytest_virtio.guests.guest.Guest.cdrom_change`)."""
    check_cdrom(spec, name, "cdrom_change")
    path = Path(iso)
    check_image_file(f"guest.cdrom_change({name!r}): iso", path, "ISO image")
    log.info("%s: CD-ROM %s gets %s", machine.name, name, path)
    machine.qmp("blockdev-change-medium", id=name, filename=str(path), format="raw",
                force=force, **{"read-only-mode": "read-only"})
    digest = volume_digest(path)
    res = shell.run(_CDROM_FIND.format(digest=digest, tries=max(int(timeout / 0.2), 1)),
                    timeout=timeout)
    if res.rc != 0:
        raise GuestError(f"guest.cdrom_change({name!r}): QEMU took {path} but no guest "
                         f"/dev/sr* reads it within {timeout:.0f}s", shell.console_tail())
    return res.stdout.strip()


def eject(machine: Machine, spec: MachineSpec | None, name: str, *, force: bool) -> None:
    """Open CD-ROM ``name``'s tray and take the disc out (the drive then has no medium)."""
    check_cdrom(spec, name, "cdrom_eject")
    log.info("%s: CD-ROM %s ejected", machine.name, name)
    machine.qmp("blockdev-open-tray", id=name, force=force)
    machine.qmp("blockdev-remove-medium", id=name)
