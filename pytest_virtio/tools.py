"""Host programs: find one, or fail naming the Debian package that ships it.

One lookup for every tool the plugin runs (mke2fs, debugfs, qemu-img, depmod,
genisoimage, ...): PATH first, then /usr/sbin:/sbin, which a non-root PATH often
lacks although e2fsprogs and kmod install there.
"""

from __future__ import annotations

import shutil

from pytest_virtio.errors import MissingToolError

__all__ = ["require_tool"]


def require_tool(tool: str, package: str, why: str = "") -> str:
    """The path of ``tool``; MissingToolError naming ``package`` (and ``why``) if absent."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not found:
        raise MissingToolError(tool, package, why)
    return found
