"""Driver disks: kernel modules on a CD-ROM for a guest whose initramfs lacks them.

The second route of the virtio story (after fixing the initramfs inside the
guest): the driver comes on removable media, as virtio-win does for Windows and
a driver update disk (``inst.dd``) does for a Linux installer. Our initramfs
loads it with ``pv.dd=1`` on the kernel command line: it mounts the first
CD-ROM that carries ``/modules.list`` and insmods the modules it names, in that
order, before it looks for the root disk. For that the initramfs itself needs
the CD-ROM's drivers (e.g. ``initramfs_modules=["ata_piix", "sr_mod", "isofs"]``
for an IDE CD-ROM).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

from pytest_virtio.errors import ImageError
from pytest_virtio.images.builder import GuestImage
from pytest_virtio.images.initramfs import resolve
from pytest_virtio.tools import require_tool

__all__ = ["KERNEL_ARG", "driver_disk"]

#: What makes our initramfs look for a driver disk.
KERNEL_ARG = "pv.dd=1"
#: ISO 9660 volume id of the disks made here (what a reader of the media sees).
VOLUME_ID = "PVDRIVERS"


def driver_disk(image: GuestImage, modules: Iterable[str]) -> Path:
    """An ISO carrying ``modules`` of ``image``'s kernel (their dependencies first),
    cached by content beside the image's initramfs files."""
    if image.modules_dir is None:
        raise ImageError("a driver disk needs the image's modules tree (this image has none)")
    paths = resolve(modules, image.modules_dir)
    if not paths:
        raise ImageError(f"{', '.join(modules)}: built into the kernel, nothing to put on a disk")
    digest = hashlib.sha256()
    for rel in paths:
        digest.update(rel.encode() + b"\0" + (image.modules_dir / rel).read_bytes())
    out = image.cache_dir / f"driverdisk-{digest.hexdigest()[:16]}.iso"
    if out.exists():
        return out
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            _write_iso(image.modules_dir, paths, out)
    return out


def _write_iso(modules_dir: Path, paths: list[str], out: Path) -> None:
    tool = require_tool("genisoimage", "genisoimage", "to make a driver disk")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp) / "disk"
        stage.mkdir()
        names = []
        for rel in paths:
            name = Path(rel).name
            shutil.copy2(modules_dir / rel, stage / name)
            names.append(name)
        (stage / "modules.list").write_text("\n".join(names) + "\n")
        part = Path(tmp) / "disk.iso"
        proc = subprocess.run([tool, "-quiet", "-R", "-V", VOLUME_ID, "-o", str(part),
                               str(stage)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ImageError(f"genisoimage could not make the driver disk: {proc.stderr.strip()}")
        part.replace(out)
