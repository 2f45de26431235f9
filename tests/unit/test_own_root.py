"""A guest's own kept root (vm(root_disk=...)) and what the host reads off it between boots.

Real tools, no guest: mke2fs -d builds a small ext4 root, cp makes the sparse copy,
debugfs reads the initramfs back the way a bootloader would find it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.channels.console import DISTRO_NO_ROOT_RE, distro_no_root_diagnosis
from pytest_virtio.errors import ConfigError, LaunchError
from pytest_virtio.guests.launch import prepare_root_disk, root_file
from pytest_virtio.spec import MachineSpec, spec_from_kwargs

MKE2FS = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")


def _ext4_root(tmp_path: Path, initrd: bytes) -> Path:
    if MKE2FS is None:
        pytest.skip("mke2fs (e2fsprogs) is not installed")
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / "initrd.img-6.1.0-test").write_bytes(initrd)
    image = tmp_path / "rootfs.img"
    subprocess.run([MKE2FS, "-q", "-t", "ext4", "-L", "pvroot", "-d", str(tree), "-F",
                    str(image), "16M"], check=True)
    return image


def test_the_copy_is_made_once_and_then_kept(tmp_path: Path) -> None:
    image = _ext4_root(tmp_path, b"first initramfs")
    own = tmp_path / "own" / "root.raw"
    prepare_root_disk(own, image, "raw")
    assert own.read_bytes() == image.read_bytes()
    assert own.stat().st_blocks * 512 < image.stat().st_size  # sparse: only used blocks
    own.write_bytes(own.read_bytes()[:-1] + b"X")  # what a boot wrote
    prepare_root_disk(own, image, "raw")
    assert own.read_bytes()[-1:] == b"X"  # not copied over again
    assert not list(own.parent.glob(".*.part"))


def test_the_initramfs_is_read_off_the_root(tmp_path: Path) -> None:
    image = _ext4_root(tmp_path, b"\x07070 newc archive" * 1000)
    got = root_file(image, "/boot/initrd.img-6.1.0-test", tmp_path / "initrd.img")
    assert got.read_bytes() == b"\x07070 newc archive" * 1000


def test_a_destination_with_blanks_and_quotes(tmp_path: Path) -> None:
    """debugfs splits its request on blanks: an image cache under "My Cache" still works."""
    image = _ext4_root(tmp_path, b"config text")
    dest = tmp_path / 'My "Cache"' / ".config-6.1.0-test-1"
    dest.parent.mkdir()
    assert root_file(image, "/boot/initrd.img-6.1.0-test", dest).read_bytes() == b"config text"


def test_a_file_the_root_lacks_names_it(tmp_path: Path) -> None:
    image = _ext4_root(tmp_path, b"x")
    with pytest.raises(LaunchError, match=re.escape("/boot/initrd.img-9.9 from the root disk")):
        root_file(image, "/boot/initrd.img-9.9", tmp_path / "initrd.img")


def test_root_disk_and_image_keys() -> None:
    spec = spec_from_kwargs({"root_disk": "root.raw", "image": "bookworm-distro"}, where="vm")
    assert (spec.root_disk, spec.image) == ("root.raw", "bookworm-distro")
    with pytest.raises(ConfigError, match="root_disk must be a path"):
        MachineSpec(root_disk="")
    with pytest.raises(ConfigError, match="image and kernel"):
        MachineSpec(image="bookworm-distro", kernel="/boot/vmlinuz")


@pytest.mark.parametrize(("line", "said"), [
    ("ALERT!  LABEL=pvroot does not exist.  Dropping to a shell!",
     "ALERT!  LABEL=pvroot does not exist.  Dropping to a shell!"),
    ("[   12.3] dracut-initqueue[301]: Warning: Could not boot.",
     "dracut-initqueue[301]: Warning: Could not boot."),
])
def test_a_distro_initramfs_giving_up_is_recognised(line: str, said: str) -> None:
    match = re.search(DISTRO_NO_ROOT_RE, f"Begin: Waiting for root ... done.\r\n{line}\r\n")
    assert match is not None and match.group(1) == said
    text = distro_no_root_diagnosis(match.group(1))
    assert said in text and "/etc/initramfs-tools/modules" in text
