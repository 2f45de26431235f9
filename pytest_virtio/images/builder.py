"""Build the default guest image into a content-addressed cache.

Why a cache keyed by content: the image takes ~1 minute to build (mmdebstrap
of a minbase rootfs plus a Debian kernel) and every guest of every xdist
worker boots it, so it is built once per machine and recipe.  Several workers
may ask at the same time: a file lock makes one build while the others wait,
and the finished directory appears by an atomic rename, so nobody ever sees a
half-built image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import lzma
import os
import queue
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from filelock import FileLock, Timeout

from pytest_virtio import procs
from pytest_virtio.errors import ImageError
from pytest_virtio.images import diskimage
from pytest_virtio.images.mounts import mounts_under, remove_tree
from pytest_virtio.images.recipe import (
    DATA_DIR,
    DISTRO_BOOT_TIMEOUT,
    FIRMWARE_FILES,
    Recipe,
    load_recipe,
)
from pytest_virtio.tools import require_tool
from pytest_virtio.units import parse_size

Progress = Callable[[str], None]

log = logging.getLogger(__name__)

EXT4_MAGIC_OFFSET = 1080
EXT4_MAGIC = b"\x53\xef"


def default_cache_dir() -> Path:
    """``$PYTEST_VIRTIO_CACHE`` or ``$XDG_CACHE_HOME/pytest-virtio`` (~/.cache)."""
    env = os.environ.get("PYTEST_VIRTIO_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pytest-virtio"


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A bootable image: kernel, rootfs, and the modules tree initramfs are made from.

    ``initrd`` is set only for user-supplied images; the default image gets
    an initramfs per root bus from :mod:`pytest_virtio.images.initramfs`.
    """

    key: str
    kernel: Path
    rootfs: Path
    kernel_version: str
    modules_dir: Path | None
    initrd: Path | None = None
    rootfs_format: str = "raw"
    #: A user kernel's modules as a read-only ext4 disk (label ``pvmods``) the
    #: initramfs mounts at ``/lib/modules/<kernel_version>``; None = in the rootfs.
    modules_disk: Path | None = None
    #: Where initramfs files for this image are cached (default: beside the kernel).
    cache: Path | None = None
    #: Kernel arguments this image needs (a distro initramfs: root=LABEL=pvroot).
    append: tuple[str, ...] = ()
    #: Seconds (before accelerator scaling) to the first shell; None = the session's
    #: default for our initramfs + pvinit.
    boot_timeout: float | None = None
    #: Where the rootfs keeps the initramfs its own tools (update-initramfs) write:
    #: a guest with its own writable root boots that one, as a bootloader would.
    root_initrd: str | None = None
    #: The kernel's config file on the host (a build tree's ``.config``, a package's
    #: ``config-<release>``); None = the rootfs's ``/boot/config-<release>`` for the
    #: image's own kernel, or unknown (:mod:`pytest_virtio.guests.kernel_config`).
    config: Path | None = None

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.kernel.parent


@dataclass(frozen=True, slots=True)
class BootableDisk:
    """A whole disk a firmware boots (a ``boot = "firmware"`` recipe's image).

    ``path`` is the cached qcow2: guests boot it through an overlay of their own,
    never writing it. Its GRUB finds the root by ``root_uuid``; the kernel prints
    to ttyS0 (``console=ttyS0,115200``) after GRUB's banner line
    (:data:`pytest_virtio.images.diskimage.GRUB_BANNER`).
    """

    key: str
    path: Path
    format: str
    kernel_version: str
    #: The kernel's config copied out of the image's /boot (driver verdicts on the host).
    config: Path
    #: The root filesystem's UUID (the kernel's root=UUID=) and its partition's number
    #: (the guest sees it as /dev/vda3, /dev/sda3, ... for 3).
    root_uuid: str
    root_partition: int
    #: The partition table as :meth:`diskimage.Layout.describe` gives it.
    layout: dict[str, object]


MANIFEST = "manifest.json"
#: The disk of a firmware-booted image, in its cache directory.
DISK_FILE = "disk.qcow2"
QCOW2_MAGIC = b"QFI\xfb"
#: A build in progress: ``.build-<key>-<builder pid>`` beside the final directory.
BUILD_PREFIX = ".build-"


def _require(tool: str, package: str) -> str:
    return require_tool(tool, package, "needed to build the guest image")


#: Seconds of silence after which a build step or a wait says it is still going.
HEARTBEAT = 10.0


def _run(argv: list[str], progress: Progress, what: str, scratch: Path) -> None:
    """Run a build step, streaming its lines to ``progress``; fail with its tail.

    ``TMPDIR`` is ``scratch``, inside the build's own directory: mmdebstrap
    makes its gpg home there, and a step killed mid-way must not leave it in
    the host's ``/tmp``.

    The step runs contained (:func:`pytest_virtio.procs.start`): it and every
    process it forks die with this one, even by SIGKILL, and its mounts
    (mmdebstrap's ``proc``, ``sys``, ``dev/pts``, ``dev/shm`` in the rootfs) are
    never visible outside and vanish with it.  An interrupted step is killed at
    once: its output is thrown away anyway.
    """
    progress(f"{what}: {' '.join(argv[:3])} ...")
    scratch.mkdir(exist_ok=True)
    proc = procs.start(argv, contain=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True,
                       env={**os.environ, "TMPDIR": str(scratch)})
    try:
        tail = _follow(proc.stdout, progress, what)
        proc.wait()
    finally:
        rc = procs.stop(proc, grace=0)
    if rc != 0:
        joined = "\n".join(tail)
        raise ImageError(f"{what} failed (exit {rc}):\n{joined}")


def _follow(out: IO[str] | None, progress: Progress, what: str) -> list[str]:
    """Pass a step's ``I:``/``E:``/``W:`` lines on until EOF; its last lines.

    mmdebstrap can be quiet for a minute (unpacking, configuring the kernel):
    a reader thread queues its lines so this thread, the one allowed to write
    to pytest's terminal, also says "still running" every HEARTBEAT seconds.
    """
    assert out is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for text in out:
            lines.put(text)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name=f"pv-build-{what}").start()
    tail: list[str] = []
    start = time.monotonic()
    while True:
        try:
            line = lines.get(timeout=HEARTBEAT)
        except queue.Empty:
            progress(f"{what}: still running ({time.monotonic() - start:.0f}s in this step)")
            continue
        if line is None:
            return tail
        tail = [*tail[-40:], line.rstrip()]
        if line.startswith(("I: ", "E: ", "W: ")):
            progress(f"{what}: {line.rstrip()}")


def _mmdebstrap_argv(recipe: Recipe, rootdir: Path) -> list[str]:
    """mmdebstrap into a directory, with update-initramfs stubbed out.

    We build our own initramfs, so Debian's (37 MB, ~10 s) is pure waste; the
    stub is installed by diverting the real tool before the kernel package
    configures.
    """
    divert = (
        'chroot "$1" dpkg-divert --quiet --local --rename '
        "--divert /usr/sbin/update-initramfs.real --add /usr/sbin/update-initramfs && "
        'printf "#!/bin/sh\\nexit 0\\n" > "$1/usr/sbin/update-initramfs" && '
        'chmod 755 "$1/usr/sbin/update-initramfs"'
    )
    argv = [
        _require("mmdebstrap", "mmdebstrap"),
        f"--variant={recipe.variant}",
        "--include=" + ",".join(recipe.packages),
        *([f"--essential-hook={divert}"] if recipe.boot == "ours" else []),
        "--dpkgopt=force-confold",
    ]
    argv += [f"--dpkgopt=path-exclude={p}" for p in recipe.path_exclude]
    argv += _firmware_hooks() if recipe.boot == "firmware" else _guest_hooks(recipe)
    return [*argv, recipe.suite, str(rootdir)]


def _guest_hooks(recipe: Recipe) -> list[str]:
    """Our init, SSH start-up and command shell in; then the distro's console service,
    or (our own initramfs) the distro's initramfs out."""
    hooks = [f'--customize-hook=install -m 755 "{DATA_DIR / "pvinit"}" "$1/sbin/pvinit"']
    hooks += [f'--customize-hook=install -m 755 "{DATA_DIR / name}" "$1/usr/sbin/{name}"'
              for name in ("pv-ssh", "pv-shell")]
    if recipe.boot == "distro":
        return hooks + _distro_hooks()
    return [*hooks, '--customize-hook=rm -f "$1"/boot/initrd.img-*']


def _firmware_hooks() -> list[str]:
    """A cloud image's hygiene: no SSH host keys (each instance makes its own: cloud-init
    does on its first boot), no machine id (systemd makes one on the first boot), and
    a host name and hosts file of its own, not the build host's."""
    return ['--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*_key "$1"/etc/ssh/ssh_host_*_key.pub',
            '--customize-hook=: > "$1/etc/machine-id" && rm -f "$1/var/lib/dbus/machine-id"',
            '--customize-hook=echo debian > "$1/etc/hostname" && printf "127.0.0.1\\tlocalhost\\n'
            '127.0.1.1\\tdebian\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n" > "$1/etc/hosts"']


def _distro_hooks() -> list[str]:
    """The console service in; serial-getty@ttyS0 masked (it would read our console), and
    serial-getty@hvc0 too (systemd's getty generator starts one on a virtio console,
    where ``command_channel="virtio-console"`` serves the command shell)."""
    unit = "/etc/systemd/system/pytest-virtio-console.service"
    return [
        f'--customize-hook=install -m 755 "{DATA_DIR / "pv-console"}" "$1/usr/sbin/pv-console"',
        f'--customize-hook=install -m 644 "{DATA_DIR / "pytest-virtio-console.service"}" '
        f'"$1{unit}"',
        '--customize-hook=mkdir -p "$1/etc/systemd/system/multi-user.target.wants" && '
        f'ln -sf {unit} "$1/etc/systemd/system/multi-user.target.wants/"',
        '--customize-hook=ln -sf /dev/null "$1/etc/systemd/system/serial-getty@ttyS0.service"',
        '--customize-hook=ln -sf /dev/null "$1/etc/systemd/system/serial-getty@hvc0.service"',
    ]


def _kernel_version(rootdir: Path) -> str:
    kernels = sorted((rootdir / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(f"the rootfs in {rootdir} has no /boot/vmlinuz-*")
    return kernels[-1].name.removeprefix("vmlinuz-")


def _need_root(recipe: Recipe) -> None:
    if os.geteuid() != 0:
        raise ImageError(
            "building the guest image needs root (mmdebstrap writes a rootfs owned by root); "
            f"run once: sudo python -m pytest_virtio.images build --recipe {recipe.name}"
        )


def _build_into(recipe: Recipe, out: Path, progress: Progress) -> None:
    """The build proper, into a private directory that is renamed when complete."""
    _need_root(recipe)
    rootdir = out / "rootfs"
    scratch = out / "tmp"
    _run(_mmdebstrap_argv(recipe, rootdir), progress, "step 1/3 mmdebstrap", scratch)
    kver = _kernel_version(rootdir)
    shutil.copy2(rootdir / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    shutil.copy2(rootdir / "usr" / "bin" / "busybox", out / "busybox")
    progress("step 2/3 copying kernel modules for the initramfs builder")
    mods_src = rootdir / "usr" / "lib" / "modules" / kver
    shutil.copytree(mods_src, out / "modules" / kver, symlinks=True)
    mke2fs = _require("mke2fs", "e2fsprogs")
    _run(
        [mke2fs, "-q", "-t", "ext4", "-L", "pvroot", "-d", str(rootdir), "-F",
         str(out / "rootfs.img"), recipe.rootfs_size],
        progress, "step 3/3 mke2fs", scratch,
    )
    initrd = rootdir / "boot" / f"initrd.img-{kver}"
    if recipe.boot == "distro":
        if not initrd.is_file():
            raise ImageError(f"boot = distro but the rootfs has no /boot/initrd.img-{kver}: "
                             "is initramfs-tools in packages?")
        shutil.copy2(initrd, out / "initrd.img")
    shutil.rmtree(rootdir)
    shutil.rmtree(scratch)
    manifest = {
        "key": recipe.key(),
        "initrd": "initrd.img" if recipe.boot == "distro" else None,
        "kernel_version": kver,
        "kernel_sha256": file_sha256(out / "vmlinuz"),
        "rootfs_size": (out / "rootfs.img").stat().st_size,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _build_disk_into(recipe: Recipe, out: Path, progress: Progress) -> None:
    """A firmware-booted disk: the rootfs, configured for its layout, assembled into a
    sparse raw disk in place (:mod:`.diskimage`: no loop device, no mount), exported
    as qcow2. The raw disk and the rootfs are removed; the kernel's config is kept."""
    _need_root(recipe)
    rootdir, scratch = out / "rootfs", out / "tmp"
    _run(_mmdebstrap_argv(recipe, rootdir), progress, "step 1/3 mmdebstrap", scratch)
    kver = _kernel_version(rootdir)
    layout = diskimage.plan_layout(parse_size(recipe.rootfs_size, "rootfs_size"), recipe.key())
    files = dict(recipe.files)
    diskimage.configure_root(
        rootdir, layout, f"Debian GNU/Linux {recipe.suite} ({recipe.name})",
        extra={guest: files[name].decode() for name, guest in FIRMWARE_FILES.items()})
    shutil.copy2(rootdir / "boot" / f"config-{kver}", out / f"config-{kver}")
    raw = out / "disk.raw"
    diskimage.assemble(raw, layout, rootdir, scratch / "grub",
                       lambda argv, what: _run(argv, progress, f"step 2/3 {what}", scratch))
    diskimage.export_qcow2(raw, out / DISK_FILE,
                           lambda argv, what: _run(argv, progress, f"step 3/3 {what}", scratch))
    raw.unlink()
    shutil.rmtree(rootdir)
    shutil.rmtree(scratch)
    manifest = {
        "key": recipe.key(),
        "disk": DISK_FILE,
        "format": "qcow2",
        "disk_bytes": (out / DISK_FILE).stat().st_size,
        "kernel_version": kver,
        "config": f"config-{kver}",
        "layout": layout.describe(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inflate_tool(argv: list[str], data: bytes) -> bytes | None:
    """Inflate with a host tool (lz4, zstd: no stdlib module); None if it is missing.

    The exit status is not trusted: the kernel's build appends the inflated
    size after the stream, which ``lz4`` reports as trailing garbage (exit 1)
    after writing the whole kernel; the caller checks for an ELF instead.
    """
    if shutil.which(argv[0]) is None:
        return None
    proc = subprocess.run(argv, input=data, capture_output=True, check=False)
    return proc.stdout or None


#: Compressed-payload signatures inside a bzImage, and how to inflate them.
_PAYLOADS: tuple[tuple[bytes, Callable[[bytes], bytes | None]], ...] = (
    (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
    (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(wbits=31).decompress(b)),
    # Legacy-frame LZ4 (Debian's cloud kernel) and zstd, through their CLIs.
    (b"\x02\x21\x4c\x18", lambda b: _inflate_tool(["lz4", "-dc"], b)),
    (b"\x28\xb5\x2f\xfd", lambda b: _inflate_tool(["zstd", "-dcq"], b)),
)


def _payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel named by the setup header (payload_offset/length, boot.rst)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start:start + length] if offset and length else None


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, or None if not found.

    Why: QEMU boots an ELF kernel with a PVH note directly in 32-bit mode,
    skipping real-mode setup and the in-guest decompression, which under TCG
    costs ~2 s of every boot (measured: 5.8 s → 3.4 s to shell).  The payload
    is located through the setup header; a signature scan is the fallback.
    """
    payload = _payload(bzimage)
    candidates = [payload] if payload is not None else []
    candidates += [bzimage[start:] for magic, _ in _PAYLOADS
                   if (start := bzimage.find(magic)) >= 0]
    for blob in candidates:
        for magic, inflate in _PAYLOADS:
            if not blob.startswith(magic):
                continue
            try:
                out = inflate(blob)
            except (lzma.LZMAError, zlib.error):
                continue
            if out is not None and out[:4] == b"\x7fELF":
                return out
    return None


def _pvh_kernel(image_dir: Path) -> Path:
    """``vmlinux`` next to ``vmlinuz`` (made once, atomically), else ``vmlinuz``."""
    vmlinux = image_dir / "vmlinux"
    if vmlinux.exists():
        return vmlinux
    elf = extract_vmlinux((image_dir / "vmlinuz").read_bytes())
    if elf is None:
        return image_dir / "vmlinuz"
    tmp = image_dir / f".vmlinux-{os.getpid()}"
    tmp.write_bytes(elf)
    os.replace(tmp, vmlinux)
    return vmlinux


def verify(image_dir: Path) -> GuestImage:
    """Check a cached image against its manifest; ImageError says how to rebuild."""
    fix = f"remove {image_dir} (or run: python -m pytest_virtio.images build --force)"
    try:
        manifest = json.loads((image_dir / MANIFEST).read_text())
        kernel = image_dir / "vmlinuz"
        rootfs = image_dir / "rootfs.img"
        if file_sha256(kernel) != manifest["kernel_sha256"]:
            raise ImageError(f"cached guest kernel {kernel} is corrupt (checksum); {fix}")
        if rootfs.stat().st_size != manifest["rootfs_size"]:
            raise ImageError(f"cached rootfs {rootfs} has the wrong size; {fix}")
        with rootfs.open("rb") as f:
            f.seek(EXT4_MAGIC_OFFSET)
            if f.read(2) != EXT4_MAGIC:
                raise ImageError(f"cached rootfs {rootfs} is not an ext4 image; {fix}")
        kver = manifest["kernel_version"]
        if not (image_dir / "modules" / kver / "modules.dep").is_file():
            raise ImageError(f"cached modules tree for {kver} is missing; {fix}")
    except (OSError, KeyError, ValueError) as exc:
        raise ImageError(f"cached guest image {image_dir} is unreadable: {exc}; {fix}") from exc
    initrd = manifest.get("initrd")
    return GuestImage(
        key=manifest["key"], kernel=_pvh_kernel(image_dir), rootfs=rootfs, kernel_version=kver,
        modules_dir=image_dir / "modules" / kver,
        initrd=image_dir / initrd if initrd else None,
        # The distro's initramfs finds its root by root=; systemd remounts nothing rw
        # without an fstab, so the root is mounted rw from the start.
        append=("root=LABEL=pvroot", "rw") if initrd else (),
        boot_timeout=DISTRO_BOOT_TIMEOUT if initrd else None,
        root_initrd=f"/boot/initrd.img-{kver}" if initrd else None,
    )


def verify_disk(image_dir: Path) -> BootableDisk:
    """Check a cached firmware-booted disk against its manifest; ImageError says how
    to rebuild."""
    fix = f"remove {image_dir} (or run: python -m pytest_virtio.images build --force)"
    try:
        manifest = json.loads((image_dir / MANIFEST).read_text())
        disk = image_dir / manifest["disk"]
        if disk.stat().st_size != manifest["disk_bytes"]:
            raise ImageError(f"cached disk image {disk} has the wrong size; {fix}")
        with disk.open("rb") as f:
            if f.read(4) != QCOW2_MAGIC:
                raise ImageError(f"cached disk image {disk} is not a qcow2 file; {fix}")
        config = image_dir / manifest["config"]
        if not config.is_file():
            raise ImageError(f"cached kernel config {config} is missing; {fix}")
        layout = manifest["layout"]
        [root] = [p["number"] for p in layout["partitions"] if p["name"] == "root"]
        return BootableDisk(key=manifest["key"], path=disk, format=manifest["format"],
                            kernel_version=manifest["kernel_version"], config=config,
                            root_uuid=layout["root_uuid"], root_partition=root, layout=layout)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ImageError(f"cached disk image {image_dir} is unreadable: {exc}; {fix}") from exc


def image_dir(recipe: Recipe, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "images" / recipe.key()


def _lock_path(image: Path) -> Path:
    """The lock beside an image directory: held while it is built, checked or pruned.

    A half-built ``.build-<key>-<pid>`` directory's is its image's: the builder
    holds it for the whole build.
    """
    key = _build_key(image)
    return image.with_name((key or image.name) + ".lock")


def ensure_image(
    recipe: Recipe | None = None,
    cache_dir: Path | None = None,
    progress: Progress = lambda _msg: None,
    force: bool = False,
) -> GuestImage:
    """Return the cached image, building it first if no worker has yet.

    The lock is held only while checking and building; a finished image is
    read-only from then on (guests boot it through a snapshot overlay).
    """
    recipe = recipe or load_recipe()
    if recipe.boot == "firmware":
        raise ImageError(f"image recipe {recipe.name} is boot = \"firmware\": a whole disk "
                         "its own bootloader boots, not a kernel and a root for direct kernel "
                         "boot; build it with ensure_disk_image (python -m "
                         f"pytest_virtio.images build --recipe {recipe.name})")
    return _ensure(recipe, cache_dir, progress, force, _build_into, verify)


def ensure_disk_image(
    recipe: Recipe,
    cache_dir: Path | None = None,
    progress: Progress = lambda _msg: None,
    force: bool = False,
) -> BootableDisk:
    """A ``boot = "firmware"`` recipe's disk from the cache, built first if missing;
    cached, locked and verified as :func:`ensure_image` does for the others."""
    if recipe.boot != "firmware":
        raise ImageError(f"image recipe {recipe.name} is boot = {recipe.boot!r}: QEMU boots its "
                         "kernel directly; only a boot = \"firmware\" recipe (e.g. "
                         "bookworm-cloud) makes a bootable disk")
    return _ensure(recipe, cache_dir, progress, force, _build_disk_into, verify_disk)


_Built = TypeVar("_Built")


def _ensure(recipe: Recipe, cache_dir: Path | None, progress: Progress, force: bool,
            build: Callable[[Recipe, Path, Progress], None],
            check: Callable[[Path], _Built]) -> _Built:
    """The cached build of ``recipe`` (``check``-ed), made by ``build`` under the image
    lock if missing or ``force``; a half-built directory is never seen."""
    final = image_dir(recipe, cache_dir)
    if not force and (final / MANIFEST).exists():
        return check(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def timed(msg: str) -> None:
        progress(f"[{time.monotonic() - start:4.0f}s] {msg}")

    with _image_lock(final, recipe.key(), timed):
        if (final / MANIFEST).exists():
            if not force:
                return check(final)
            shutil.rmtree(final)
        _remove_dead_builds(final.parent, recipe.key(), timed)
        tmp = final.parent / f"{BUILD_PREFIX}{recipe.key()}-{os.getpid()}"
        tmp.mkdir()
        try:
            timed(f"building guest image {recipe.key()} (once per machine, 1-5 min)")
            build(recipe, tmp, timed)
            os.rename(tmp, final)
        finally:
            if tmp.exists():  # the build failed or was interrupted
                _discard(tmp, timed)
        timed(f"guest image ready: {final}")
    return check(final)


def _build_key(entry: Path) -> str | None:
    """The image key of a ``.build-<key>-<pid>`` directory, None for any other name."""
    if not entry.name.startswith(BUILD_PREFIX):
        return None
    key, _, pid = entry.name.removeprefix(BUILD_PREFIX).rpartition("-")
    return key if key and pid.isdigit() else None


def _remove_dead_builds(images: Path, key: str, progress: Progress) -> None:
    """Remove what killed builds of ``key`` left (its image lock must be held).

    Whoever holds the lock is the only builder of ``key``, so every other
    ``.build-<key>-*`` directory is a dead one's, whatever its pid now names.
    Mounts under it are detached first (see :mod:`.mounts`).
    """
    for entry in sorted(images.glob(f"{BUILD_PREFIX}*")):
        if _build_key(entry) == key and entry.is_dir():
            progress(f"removing {entry}, left by a build that was killed")
            _discard(entry, progress)


def _discard(entry: Path, progress: Progress) -> None:
    """:func:`.mounts.remove_tree`, saying why instead of raising when it cannot."""
    try:
        remove_tree(entry)
    except (ImageError, OSError) as exc:
        log.warning("%s", exc)
        progress(f"warning: {exc}")


@contextlib.contextmanager
def _image_lock(final: Path, key: str, progress: Progress) -> Iterator[None]:
    """Hold the image lock; while another process has it, say so every HEARTBEAT s.

    Under xdist one worker builds and the others block here: without this they
    sat silent for the whole build.
    """
    lock = FileLock(_lock_path(final))
    while True:
        try:
            lock.acquire(timeout=HEARTBEAT)
            break
        except Timeout:
            builders = [p.name.rpartition("-")[2]
                        for p in final.parent.glob(f"{BUILD_PREFIX}{key}-*")]
            who = f"process {', '.join(builders)}" if builders else "another process"
            progress(f"waiting for {who} to finish building guest image {key}")
    try:
        yield
    finally:
        lock.release()


def _tree_size(path: Path) -> int:
    """Bytes on disk (the rootfs is sparse: its apparent size overstates it).

    Mounts under ``path`` (a killed build's ``proc``, ``dev/shm``) are not counted.
    """
    skip = {str(p) for p in mounts_under(path)}
    total = 0
    for top, dirs, files in os.walk(os.path.realpath(path)):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def build_owner_alive(entry: Path) -> bool:
    """A ``.build-<key>-<pid>`` (or ``.stage-…-<pid>``) directory's build still running?"""
    pid = entry.name.rsplit("-", 1)[-1]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def cache_entries(root: Path, partial: str) -> tuple[list[Path], list[Path]]:
    """(half-built directories whose builder died, finished directories) under ``root``.

    Half-built ones are named ``<partial>…-<pid>`` until their atomic rename.
    """
    dead: list[Path] = []
    finished: list[Path] = []
    if not root.is_dir():
        return dead, finished
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(partial):
            if not build_owner_alive(entry):
                dead.append(entry)
        else:
            finished.append(entry)
    return dead, finished


def stale_images(keep: set[str], cache_dir: Path | None = None) -> list[Path]:
    """Image directories (and dead half-builds) no current recipe would use.

    Every change to a recipe, the guest init or the builder makes a new key,
    so without pruning the cache grows by ~1 GiB per change.
    """
    dead, finished = cache_entries((cache_dir or default_cache_dir()) / "images", BUILD_PREFIX)
    stale = dead + [entry for entry in finished if entry.name not in keep]
    return stale


def prune_images(
    keep: set[str], cache_dir: Path | None = None, dry_run: bool = False
) -> list[tuple[Path, int]]:
    """Remove :func:`stale_images`; returns each removed path and its size in bytes.

    An image whose lock another process holds (a session that is building or
    verifying it) is left alone.
    """
    return remove_unlocked(stale_images(keep, cache_dir), dry_run)


def remove_unlocked(entries: list[Path], dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove cache directories whose ``<dir>.lock`` nobody holds; (path, bytes) of each."""
    removed = []
    for entry in entries:
        if dry_run:
            removed.append((entry, _tree_size(entry)))
            continue
        try:
            with FileLock(_lock_path(entry), timeout=0):
                size = _remove_entry(entry)
        except TimeoutError:
            continue
        except ImageError as exc:
            log.warning("%s", exc)
            continue
        if _build_key(entry) is None:  # a build's lock is its image's: that stays
            _lock_path(entry).unlink(missing_ok=True)
        removed.append((entry, size))
    return removed


def _remove_entry(entry: Path) -> int:
    """Remove ``entry``, mounts under it detached first (:func:`.mounts.remove_tree`);
    the bytes it held."""
    size = _tree_size(entry)
    remove_tree(entry)
    return size


def current_keys(data_dir: Path = DATA_DIR) -> set[str]:
    """Cache keys of every recipe shipped with this version of pytest-virtio."""
    return {load_recipe(p.stem, data_dir).key() for p in sorted(data_dir.glob("*.toml"))}
