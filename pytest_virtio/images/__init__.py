"""Guest images: the default Debian image built into a cache, or the user's own."""

from __future__ import annotations

from pathlib import Path

from pytest_virtio.errors import ImageError
from pytest_virtio.files import check_readable_file
from pytest_virtio.images.builder import (
    BootableDisk,
    GuestImage,
    default_cache_dir,
    ensure_disk_image,
    ensure_image,
    verify,
)
from pytest_virtio.images.driverdisk import driver_disk
from pytest_virtio.images.initramfs import initramfs_for, resolve
from pytest_virtio.images.recipe import Recipe, load_recipe

__all__ = [
    "BootableDisk",
    "GuestImage",
    "Recipe",
    "custom_image",
    "default_cache_dir",
    "driver_disk",
    "ensure_disk_image",
    "ensure_image",
    "initramfs_for",
    "load_recipe",
    "resolve",
    "verify",
]


def custom_image(kernel: str, initrd: str, rootfs: str, rootfs_format: str = "raw") -> GuestImage:
    """A user-supplied kernel/initrd/disk: used as they are, never rebuilt.

    The initrd must find a root filesystem labelled ``pvroot`` (or whatever
    ``pv.root=`` says) and run ``/sbin/pvinit``-compatible init for the
    console protocol to work.
    """
    paths = {"kernel": Path(kernel), "initrd": Path(initrd), "rootfs": Path(rootfs)}
    for what, path in paths.items():
        check_readable_file(path, f"{what} image", f"{what} file", error=ImageError)
    return GuestImage(
        key=f"custom-{paths['kernel'].name}",
        kernel=paths["kernel"],
        rootfs=paths["rootfs"],
        kernel_version="custom",
        modules_dir=None,
        initrd=paths["initrd"],
        rootfs_format=rootfs_format,
    )
