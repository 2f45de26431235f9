"""A distro guest whose initramfs lacks virtio_blk: the failed boot, the fix inside, the next boot.

The story every virtio migration tells, on Debian's own boot (the shipped
``bookworm-distro`` recipe: initramfs-tools, systemd): an image installed on IDE
regenerates its initramfs with ``MODULES=dep``, which keeps only the drivers of
the disk it sits on; moved to virtio-blk it cannot find its root. The fix is
made the way an administrator makes it, inside the guest, and the root disk
(``vm(root_disk=...)``) keeps it for the next boot, whose initramfs is the one
the guest wrote to its /boot. Builds the distro image once per machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_virtio import Guest, MakeGuest, VirtioSession
from pytest_virtio.errors import GuestError
from pytest_virtio.images import driverdisk

DISTRO = "bookworm-distro"
#: update-initramfs compresses a few MiB of modules: minutes under TCG on a busy host.
UPDATE_TIMEOUT = 900.0
INITRD = "/boot/initrd.img-$(uname -r)"


def _regenerate(guest: Guest) -> str:
    """update-initramfs -u, then the modules the new initramfs carries."""
    guest.check("update-initramfs -u", timeout=UPDATE_TIMEOUT)
    return guest.check(f"lsinitramfs {INITRD} | grep -o '[a-z0-9_-]*\\.ko' | sort -u",
                       timeout=UPDATE_TIMEOUT).stdout


def test_modules_dep_initramfs_is_fixed_from_inside_the_guest(make_guest: MakeGuest,
                                                              tmp_path: Path) -> None:
    """A MODULES=dep initramfs made on IDE fails on virtio-blk; adding virtio_blk fixes it."""
    root = str(tmp_path / "root.raw")

    # 1. On IDE, as installed: the initramfs is regenerated with only this root's drivers.
    guest = make_guest(image=DISTRO, root_bus="ide", root_disk=root)
    guest.check("sed -i 's/^MODULES=.*/MODULES=dep/' /etc/initramfs-tools/initramfs.conf")
    carried = _regenerate(guest)
    assert "ata_piix.ko" in carried and "virtio_blk.ko" not in carried
    guest.poweroff()

    # 2. The root moves to virtio-blk: the initramfs gives up, in its own words, at once.
    with pytest.raises(GuestError, match=r"ALERT!\s+LABEL=pvroot does not exist"):
        make_guest(image=DISTRO, root_bus="virtio-blk", root_disk=root)

    # 3. Back on IDE, the fix an administrator makes: name the drivers, regenerate.
    guest = make_guest(image=DISTRO, root_bus="ide", root_disk=root)
    guest.check("printf 'virtio_pci\\nvirtio_blk\\n' >> /etc/initramfs-tools/modules")
    carried = _regenerate(guest)
    assert "virtio_blk.ko" in carried and "virtio_pci.ko" in carried
    guest.poweroff()

    # 4. The same root on virtio-blk now boots, through the driver it was missing.
    guest = make_guest(image=DISTRO, root_bus="virtio-blk", root_disk=root)
    root_dev = guest.check("findmnt -no SOURCE /").stdout.strip()
    assert root_dev.startswith("/dev/vd")
    assert "virtio_blk" in guest.lsmod()


def test_virtio_driver_loaded_from_a_cdrom(make_guest: MakeGuest,
                                          virtio_session: VirtioSession) -> None:
    """An initramfs without virtio_blk loads it from a driver CD-ROM and finds its virtio root."""
    image = virtio_session.image()
    iso = driverdisk.driver_disk(image, ["virtio_pci", "virtio_blk"])
    # The initramfs can read an IDE CD-ROM, and nothing of virtio.
    shape = {"root_bus": "virtio-blk", "initramfs_modules": ["ata_piix", "sr_mod", "isofs"],
             "devices": [{"kind": "cdrom", "iso": str(iso), "bus": "ide"}]}

    with pytest.raises(GuestError, match="lacks virtio"):
        make_guest(**shape)  # without the driver disk: no root

    guest = make_guest(**shape, kernel_args=[driverdisk.KERNEL_ARG])
    assert guest.check("findmnt -no SOURCE /").stdout.strip().startswith("/dev/vd")
    assert "pvinit: driver disk: loaded virtio_blk.ko" in guest.machine.console_log.read_text()
    assert "virtio_blk" in guest.lsmod() and "virtio_blk" in guest.drivers()
