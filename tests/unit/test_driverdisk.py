"""Driver disks: the modules and their dependencies on a real ISO 9660 image, in load order."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.errors import ImageError
from pytest_virtio.images import GuestImage, driver_disk

V = "kernel/drivers/virtio"
DEP = (f"{V}/virtio.ko:\n"
       f"{V}/virtio_ring.ko: {V}/virtio.ko\n"
       f"{V}/virtio_pci.ko: {V}/virtio_ring.ko {V}/virtio.ko\n"
       f"kernel/drivers/block/virtio_blk.ko: {V}/virtio_ring.ko {V}/virtio.ko\n")


def _image(tmp_path: Path) -> GuestImage:
    mods = tmp_path / "modules" / "6.1.0-test"
    for line in DEP.splitlines():
        rel = line.split(":")[0]
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(b"\x7fELF " + rel.encode())
    (mods / "modules.dep").write_text(DEP)
    (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    return GuestImage(key="t", kernel=tmp_path / "vmlinuz", rootfs=tmp_path / "rootfs.img",
                      kernel_version="6.1.0-test", modules_dir=mods, cache=tmp_path)


def _iso_file(iso: Path, name: str) -> str:
    isoinfo = shutil.which("isoinfo")
    if isoinfo is None:
        pytest.fail("isoinfo not found; install it with: apt-get install genisoimage")
    return subprocess.run([isoinfo, "-R", "-i", str(iso), "-x", f"/{name}"],
                          capture_output=True, text=True, check=True).stdout


def test_modules_and_dependencies_in_load_order(tmp_path: Path) -> None:
    iso = driver_disk(_image(tmp_path), ["virtio_pci", "virtio_blk"])
    assert _iso_file(iso, "modules.list").split() == [
        "virtio.ko", "virtio_ring.ko", "virtio_pci.ko", "virtio_blk.ko"]
    assert _iso_file(iso, "virtio_blk.ko") == "\x7fELF kernel/drivers/block/virtio_blk.ko"
    assert driver_disk(_image(tmp_path), ["virtio_pci", "virtio_blk"]) == iso  # cached


def test_built_in_or_unknown_modules_say_so(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="built into the kernel"):
        driver_disk(_image(tmp_path), ["ext4"])
    with pytest.raises(ImageError, match="'virtio_nope' is not in"):
        driver_disk(_image(tmp_path), ["virtio_nope"])
