"""Where a guest kernel's config comes from: the host, once per kernel, else the guest.

Host side first (no guest needed, so a missing driver is explained before any
boot): a user kernel's build tree ``.config`` or the ``config-<release>`` beside
its kernel file (:func:`pytest_virtio.images.kernel.prepare` records it on the
image), or, for the image's own kernel, ``/boot/config-<release>`` in its root
disk, copied out once with debugfs beside the image. A bare kernel file has
none on the host; then only the running guest can tell (``/proc/config.gz``
with ``CONFIG_IKCONFIG_PROC``, or ``/boot/config-$(uname -r)``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import logging
import os
from pathlib import Path

from pytest_virtio.errors import GuestError, LaunchError, VirtioError
from pytest_virtio.guests.launch import root_file
from pytest_virtio.guests.shell import Shell
from pytest_virtio.images import GuestImage
from pytest_virtio.images.kconfig import KernelConfig, driver_verdict, parse_config, read_config

__all__ = ["GUEST_CONFIG_SCRIPT", "image_config", "missing_driver_verdict", "read_in_guest"]

log = logging.getLogger(__name__)

#: The first readable config in the guest: its path on one line, then the file
#: gzipped and base64-encoded (a tenth of the bytes through the console).
GUEST_CONFIG_SCRIPT = (
    'k=$(uname -r); for f in /proc/config.gz "/boot/config-$k"; do '
    '[ -r "$f" ] || continue; echo "$f"; '
    'case $f in *.gz) base64 "$f";; *) gzip -c "$f" | base64;; esac; exit; done; '
    'echo "neither /proc/config.gz (CONFIG_IKCONFIG_PROC) nor /boot/config-$k exists" >&2; '
    "exit 3"
)
_NO_CONFIG = 3


@functools.lru_cache(maxsize=8)
def image_config(image: GuestImage) -> KernelConfig | None:
    """The config of the kernel ``image`` boots, read on the host; None if the host has none.

    Cached per image: the session asks again for every missing-driver check and
    every ``guest.kernel_config()``.
    """
    if image.config is not None:
        return read_config(image.config)
    if image.modules_disk is not None or image.modules_dir is None:
        return None  # a user kernel without a config file, or a custom image
    if image.rootfs_format != "raw":
        return None
    path = _rootfs_config(image)
    return read_config(path) if path is not None else None


def _rootfs_config(image: GuestImage) -> Path | None:
    """``/boot/config-<release>`` of the image's root disk, copied beside the image once;
    None when the root disk has none (a recipe may leave it out)."""
    dest = image.cache_dir / f"config-{image.kernel_version}"
    if not dest.is_file():
        tmp = dest.with_name(f".{dest.name}-{os.getpid()}")
        try:
            root_file(image.rootfs, f"/boot/config-{image.kernel_version}", tmp)
        except LaunchError as exc:
            log.info("no kernel config on the host for %s: %s", image.kernel_version, exc)
            return None
        os.replace(tmp, dest)
        log.info("copied the kernel config of %s out of %s", image.kernel_version,
                    image.rootfs)
    return dest


def read_in_guest(shell: Shell) -> KernelConfig:
    """The running kernel's config as the guest has it; GuestError when it has none."""
    result = shell.run(GUEST_CONFIG_SCRIPT)
    if result.rc == _NO_CONFIG:
        raise GuestError(f"the guest has no kernel config to read: {result.stderr.strip()}; "
                         "build the kernel with CONFIG_IKCONFIG_PROC=y or install its "
                         "/boot/config-<release>", shell.console_tail())
    if result.rc != 0:
        raise GuestError(f"reading the kernel config in the guest failed (exit {result.rc}): "
                         f"{result.stderr.strip()}; it needs gzip and base64",
                         shell.console_tail())
    path, _, encoded = result.stdout.partition("\n")
    try:
        text = gzip.decompress(base64.b64decode(encoded)).decode(errors="replace")
    except (binascii.Error, OSError, EOFError) as exc:
        raise GuestError(f"the guest's {path} came through damaged ({exc}); the command "
                         "channel or the guest's gzip/base64 is at fault",
                         shell.console_tail()) from exc
    return parse_config(text, f"{path} in the guest")


def missing_driver_verdict(image: GuestImage, modules: tuple[str, ...]) -> str:
    """What the kernel's config says about each of ``modules`` ('' when it cannot say).

    Why never raise: this only explains a MissingDriver; a config that cannot be
    read is said in its place, the missing driver stays the error.
    """
    try:
        config = image_config(image)
    except VirtioError as exc:
        return f"its config could not be read: {exc}"
    where = image.modules_dir or "(none)"
    verdicts = [driver_verdict(m, config, where) for m in modules]
    return "; ".join(v for v in verdicts if v)
