"""The one readable-file check behind options, disk/CD-ROM images and custom kernels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError, ImageError
from pytest_virtio.files import check_readable_file, sparse_copy
from pytest_virtio.guests.launch import check_image_file
from pytest_virtio.images import custom_image


def test_missing_file_names_what_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^disk 'd': image .*/nope does not exist; give "
                                          r"the path of an existing raw or qcow2 image$"):
        check_image_file("disk 'd': image", tmp_path / "nope", "raw or qcow2 image")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a regular file; give the kernel file itself"):
        check_readable_file(tmp_path, "--virtio-kernel:", "kernel file")


def test_unreadable_is_found_by_reading_not_by_asking() -> None:
    """/proc/self/mem is a regular file whose first byte no one can read, root
    included: ``os.access`` says it is readable."""
    with pytest.raises(ConfigError, match=r"is not readable by this user \(Input/output error\)"):
        check_readable_file(Path("/proc/self/mem"), "cdrom 'cd0': iso", "ISO image")


def test_custom_image_raises_image_error(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    with pytest.raises(ImageError, match=r"initrd image .* does not exist"):
        custom_image(str(kernel), str(tmp_path / "initrd"), str(kernel))


def test_a_readable_file_is_returned(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(b"\0" * 512)
    assert check_readable_file(f, "x", "image") == f


def test_sparse_copy_keeps_data_and_holes_and_never_writes_the_source(tmp_path: Path) -> None:
    src, dest = tmp_path / "src.img", tmp_path / "dest.img"
    with src.open("wb") as f:
        f.truncate(64 << 20)
        for at in (0, 5 << 20, (64 << 20) - 4096):
            f.seek(at)
            f.write(os.urandom(4096))
    before = src.read_bytes()
    src.chmod(0o444)
    sparse_copy(src, dest)
    assert dest.read_bytes() == before == src.read_bytes()
    assert dest.stat().st_blocks * 512 < 1 << 20  # 12 KiB of data, not 64 MiB


def test_sparse_copy_of_a_missing_file_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sparse_copy(tmp_path / "nope.img", tmp_path / "dest.img")
