"""Files the user names or we copy: one readability check and one sparse copy.

One check for "the user named a file we must read", used wherever a path comes in.

Why one: three copies (options, disk and CD-ROM images, a custom kernel) said
the same three things three ways, and one of them trusted ``os.access``, which
answers yes to root for a file root cannot read either (a FUSE or NFS mount
with root squashed).  Here readability is tried by reading a byte.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from pytest_virtio.errors import ConfigError, VirtioError

__all__ = ["check_readable_file", "sparse_copy"]

#: The read/write fallback's chunk where copy_file_range cannot copy.
_COPY_CHUNK = 1 << 20


def check_readable_file(path: Path, what: str, kind: str,
                        error: type[VirtioError] = ConfigError) -> Path:
    """``path`` if it is a regular file this process can read, else ``error``
    naming ``what`` (e.g. "disk 'data': image"), the path and the fix."""
    if not path.exists():
        raise error(f"{what} {path} does not exist; give the path of an existing {kind}")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file; give the {kind} itself")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise error(f"{what} {path} is not readable by this user ({exc.strerror}); fix its "
                    f"permissions (e.g. chmod a+r {path})") from None
    return path


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data in a file, holes skipped (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole is left
            yield pos, size - pos  # no SEEK_DATA here: all of it is data
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, min(length, 1 << 30), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.pwrite(dst, os.pread(src, min(length, _COPY_CHUNK), offset), offset)
        if n <= 0:
            raise OSError(errno.EIO, f"copy stopped at byte {offset} with {length} left")
        offset += n
        length -= n


def sparse_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` keeping holes (``src`` opened read-only, never written).

    Why not ``cp --sparse=always``: that reads every byte to find zeroes; this
    skips the holes (SEEK_DATA) and copies the data in the kernel
    (copy_file_range, a reflink where the filesystem has them).  OSError on failure.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dfd, size)
            for offset, length in _data_extents(sfd, size):
                _copy_range(sfd, dfd, offset, length)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
