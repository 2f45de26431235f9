"""One check for "the user named a file we must read", used wherever a path comes in.

Why one: three copies (options, disk and CD-ROM images, a custom kernel) said
the same three things three ways, and one of them trusted ``os.access``, which
answers yes to root for a file root cannot read either (a FUSE or NFS mount
with root squashed).  Here readability is tried by reading a byte.
"""

from __future__ import annotations

from pathlib import Path

from pytest_virtio.errors import ConfigError, VirtioError

__all__ = ["check_readable_file"]


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
