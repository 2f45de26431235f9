"""CD-ROM media at run time in a real guest: change the disc, eject it, insert again.

Two small ISOs (genisoimage, Debian package ``genisoimage``) differ in volume
label and in the content of one file; the guest reads both from the drive
itself, so what it sees is the disc QEMU now holds, not a cached page.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import CdRom, MachineSpec


def _iso(directory: Path, label: str) -> Path:
    tool = shutil.which("genisoimage")
    if tool is None:
        pytest.fail("genisoimage not found; install it with: apt-get install genisoimage")
    tree = directory / label
    tree.mkdir()
    (tree / "id.txt").write_text(f"disc {label}\n")
    out = directory / f"{label}.iso"
    subprocess.run([tool, "-quiet", "-r", "-V", label, "-o", str(out), str(tree)], check=True)
    return out


@pytest.fixture(scope="module")
def isos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("iso")
    return {label: _iso(base, label) for label in ("DISC_A", "DISC_B")}


@pytest.fixture(scope="module")
def cd_guest(boot_shared: Callable[[MachineSpec, str], Guest], isos: dict[str, Path]) -> Guest:
    guest = boot_shared(MachineSpec(devices=(CdRom(iso=str(isos["DISC_A"]), bus="ide"),)), "cd")
    guest.modprobe("isofs")
    return guest


def _seen(guest: Guest) -> tuple[str, str]:
    """(volume label, /id.txt) of the disc in the guest's drive, read through the drive."""
    label = guest.check(
        "dd if=/dev/sr0 bs=2048 skip=16 count=1 2>/dev/null | tail -c +41 | head -c 32"
    ).stdout.strip()
    text = guest.check("mkdir -p /mnt/cd && mount -t iso9660 -o ro /dev/sr0 /mnt/cd && "
                       "cat /mnt/cd/id.txt; umount /mnt/cd").stdout.strip()
    return label, text


def test_boot_disc_is_seen(cd_guest: Guest) -> None:
    assert _seen(cd_guest) == ("DISC_A", "disc DISC_A")


def test_change_medium_guest_sees_the_new_disc(cd_guest: Guest, isos: dict[str, Path]) -> None:
    assert cd_guest.cdrom_change("cd0", isos["DISC_B"]) == "/dev/sr0"
    assert _seen(cd_guest) == ("DISC_B", "disc DISC_B")
    cd_guest.cdrom_change("cd0", isos["DISC_A"])
    assert _seen(cd_guest) == ("DISC_A", "disc DISC_A")


def test_eject_leaves_no_medium_then_insert(cd_guest: Guest, isos: dict[str, Path]) -> None:
    cd_guest.cdrom_eject("cd0")
    res = cd_guest.run("dd if=/dev/sr0 bs=2048 count=1 of=/dev/null")
    assert res.rc != 0 and "No medium found" in res.stdout + (res.stderr or ""), res
    cd_guest.cdrom_change("cd0", isos["DISC_B"])
    assert _seen(cd_guest) == ("DISC_B", "disc DISC_B")


def test_change_to_missing_iso_is_refused_before_qemu(cd_guest: Guest, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"iso .*nope\.iso does not exist"):
        cd_guest.cdrom_change("cd0", tmp_path / "nope.iso")
    with pytest.raises(ConfigError, match="no CD-ROM of that name; this guest has: cd0"):
        cd_guest.cdrom_eject("cd9")
