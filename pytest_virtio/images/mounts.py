"""Removing a half-built cache directory safely: mounts first, never through one.

A build runs in a private mount namespace (:func:`pytest_virtio.procs.start`
with ``contain=True``), so its mounts vanish with it.  A build killed under an
older version, or an mmdebstrap run by hand, leaves ``proc``, ``sys``,
``dev/pts`` and ``dev/shm`` mounted inside its directory, and ``dev/shm`` there
is the host's own ``/dev/shm`` bound in: ``rmtree`` through it would empty the
host's.  So every mount under the directory (``/proc/self/mountinfo``) is
detached first (``umount2(MNT_DETACH)``, deepest first), and the directory is
left alone if one stays, or if any process in any mount namespace still has
something mounted there (a build still running in its own namespace).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
from pathlib import Path

from pytest_virtio.errors import ImageError

__all__ = ["detach_mounts_under", "mount_points", "mounted_anywhere", "mounts_under",
           "remove_tree"]

log = logging.getLogger(__name__)

MNT_DETACH = 2
MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(r"\\([0-7]{3})")


def mount_points(mountinfo: str) -> list[str]:
    """Every mount point in a mountinfo text (field 5; ``\\040``-style escapes undone)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def mounts_under(path: Path, mountinfo: Path = MOUNTINFO) -> list[Path]:
    """Mounts at or below ``path`` in this mount namespace, deepest first."""
    root = os.path.realpath(path)
    found = {p for p in mount_points(mountinfo.read_text())
             if p == root or p.startswith(root.rstrip("/") + "/")}
    return [Path(p) for p in sorted(found, key=lambda p: (p.count("/"), p), reverse=True)]


def mounted_anywhere(path: Path, proc: Path = Path("/proc")) -> dict[Path, int]:
    """Mounts under ``path`` any process sees, in any mount namespace: mount → a pid.

    A build's own namespace (see :mod:`pytest_virtio.procs`) is invisible in
    ``/proc/self/mountinfo``; while any process still sees a mount there, the
    build it belongs to is still running.
    """
    found: dict[Path, int] = {}
    for info in proc.glob("[0-9]*/mountinfo"):
        try:
            points = mounts_under(path, info)
        except OSError:
            continue  # exited while we looked, or not ours to read
        for point in points:
            found.setdefault(point, int(info.parent.name))
    return found


def detach_mounts_under(path: Path) -> list[Path]:
    """Lazily unmount everything at or below ``path``; returns what is still mounted.

    Repeats while it makes progress: a mount point can hold several mounts
    stacked on one another.
    """
    left = mounts_under(path)
    while left:
        for point in left:
            _umount_lazy(point)
        now = mounts_under(path)
        if len(now) >= len(left):
            return now
        left = now
    return []


def _umount_lazy(point: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(point), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        log.warning("could not unmount %s: %s", point, os.strerror(err))
    else:
        log.info("unmounted %s (left by a killed image build)", point)


def remove_tree(path: Path) -> None:
    """Detach every mount under ``path``, then remove it; ImageError if one stays.

    Never removes through a mount: what is mounted there is not the cache's.
    """
    left = detach_mounts_under(path)
    if left:
        raise ImageError(f"cannot remove {path}: {left[0]} is still mounted; unmount it "
                         f"(as root: umount --lazy {left[0]}) and run "
                         "python -m pytest_virtio.images prune")
    if busy := mounted_anywhere(path):
        point, pid = next(iter(busy.items()))
        raise ImageError(f"cannot remove {path}: process {pid} still has {point} mounted "
                         "(a build running there); let it finish or kill it, then run "
                         "python -m pytest_virtio.images prune")
    shutil.rmtree(path)
