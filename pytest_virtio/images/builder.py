"""Build the default guest image into a content-addressed cache.

Why a cache keyed by content: the image takes ~1 minute to build (mmdebstrap
of a minbase rootfs plus a Debian kernel) and every guest of every xdist
worker boots it, so it is built once per machine and recipe.  Several workers
may ask at the same time: a file lock makes one build while the others wait,
and the finished directory appears by an atomic rename, so nobody ever sees a
half-built image.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tomllib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..errors import ImageError, MissingToolError

Progress = Callable[[str], None]

#: Bump when the build procedure changes in a way the recipe does not show.
BUILDER_VERSION = "1"
DATA_DIR = Path(__file__).resolve().parent / "data"
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
class Recipe:
    """A parsed ``images/<name>.toml`` plus the init scripts it ships."""

    name: str
    suite: str
    variant: str
    packages: tuple[str, ...]
    path_exclude: tuple[str, ...]
    rootfs_size: str
    files: tuple[tuple[str, bytes], ...]

    def key(self) -> str:
        """Content hash over everything that shapes the built image."""
        h = hashlib.sha256(BUILDER_VERSION.encode())
        for part in (self.name, self.suite, self.variant, self.rootfs_size,
                     *self.packages, *self.path_exclude):
            h.update(part.encode() + b"\0")
        for fname, data in self.files:
            h.update(fname.encode() + b"\0" + data)
        return f"{self.name}-{h.hexdigest()[:16]}"


def load_recipe(name: str = "bookworm", data_dir: Path = DATA_DIR) -> Recipe:
    """Read a recipe and the guest init scripts it is built with."""
    path = data_dir / f"{name}.toml"
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ImageError(f"cannot read image recipe {path}: {exc}") from exc
    files = tuple(
        (fname, (data_dir / fname).read_bytes()) for fname in ("pvinit", "initramfs-init")
    )
    return Recipe(
        name=raw["name"],
        suite=raw["suite"],
        variant=raw.get("variant", "minbase"),
        packages=tuple(raw["packages"]),
        path_exclude=tuple(raw.get("path_exclude", ())),
        rootfs_size=raw.get("rootfs_size", "1536M"),
        files=files,
    )


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

    @property
    def cache_dir(self) -> Path:
        return self.kernel.parent


MANIFEST = "manifest.json"


def _require(tool: str, package: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not found:
        raise MissingToolError(tool, package, "needed to build the guest image")
    return found


def _run(argv: list[str], progress: Progress, what: str) -> None:
    """Run a build step, streaming its lines to ``progress``; fail with its tail."""
    progress(f"{what}: {' '.join(argv[:3])} ...")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-40:], line.rstrip()]
        if line.startswith(("I: ", "E: ", "W: ")):
            progress(f"{what}: {line.rstrip()}")
    rc = proc.wait()
    if rc != 0:
        joined = "\n".join(tail)
        raise ImageError(f"{what} failed (exit {rc}):\n{joined}")


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
        f"--essential-hook={divert}",
        "--dpkgopt=force-confold",
    ]
    argv += [f"--dpkgopt=path-exclude={p}" for p in recipe.path_exclude]
    argv += [
        f'--customize-hook=install -m 755 "{DATA_DIR / "pvinit"}" "$1/sbin/pvinit"',
        '--customize-hook=rm -f "$1"/boot/initrd.img-*',
        recipe.suite,
        str(rootdir),
    ]
    return argv


def _kernel_version(rootdir: Path) -> str:
    kernels = sorted((rootdir / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(f"the rootfs in {rootdir} has no /boot/vmlinuz-*")
    return kernels[-1].name.removeprefix("vmlinuz-")


def _build_into(recipe: Recipe, out: Path, progress: Progress) -> None:
    """The build proper, into a private directory that is renamed when complete."""
    if os.geteuid() != 0:
        raise ImageError(
            "building the guest image needs root (mmdebstrap writes a rootfs owned by root); "
            "run once: sudo python -m pytest_virtio.images build"
        )
    rootdir = out / "rootfs"
    _run(_mmdebstrap_argv(recipe, rootdir), progress, "mmdebstrap")
    kver = _kernel_version(rootdir)
    shutil.copy2(rootdir / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    shutil.copy2(rootdir / "usr" / "bin" / "busybox", out / "busybox")
    progress("copying kernel modules for the initramfs builder")
    mods_src = rootdir / "usr" / "lib" / "modules" / kver
    shutil.copytree(mods_src, out / "modules" / kver, symlinks=True)
    mke2fs = _require("mke2fs", "e2fsprogs")
    _run(
        [mke2fs, "-q", "-t", "ext4", "-L", "pvroot", "-d", str(rootdir), "-F",
         str(out / "rootfs.img"), recipe.rootfs_size],
        progress, "mke2fs",
    )
    shutil.rmtree(rootdir)
    manifest = {
        "key": recipe.key(),
        "kernel_version": kver,
        "kernel_sha256": _sha256(out / "vmlinuz"),
        "rootfs_size": (out / "rootfs.img").stat().st_size,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Compressed-payload signatures inside a bzImage, and how to inflate them.
_PAYLOADS: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = (
    (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
    (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(wbits=31).decompress(b)),
)


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, or None if not found.

    Why: QEMU boots an ELF kernel with a PVH note directly in 32-bit mode,
    skipping real-mode setup and the in-guest decompression, which under TCG
    costs ~2 s of every boot (measured: 5.8 s → 3.4 s to shell).
    """
    for magic, inflate in _PAYLOADS:
        start = bzimage.find(magic)
        if start < 0:
            continue
        try:
            out = inflate(bzimage[start:])
        except (lzma.LZMAError, zlib.error):
            continue
        if out[:4] == b"\x7fELF":
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
        if _sha256(kernel) != manifest["kernel_sha256"]:
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
    return GuestImage(
        key=manifest["key"], kernel=_pvh_kernel(image_dir), rootfs=rootfs, kernel_version=kver,
        modules_dir=image_dir / "modules" / kver,
    )


def image_dir(recipe: Recipe, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "images" / recipe.key()


def _lock_path(image: Path) -> Path:
    """The lock beside an image directory: held while it is built, checked or pruned."""
    return image.with_name(image.name + ".lock")


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
    final = image_dir(recipe, cache_dir)
    if not force and (final / MANIFEST).exists():
        return verify(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock_path(final)):
        if (final / MANIFEST).exists():
            if not force:
                return verify(final)
            shutil.rmtree(final)
        tmp = final.parent / f".build-{recipe.key()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            progress(f"building guest image {recipe.key()} (once per machine, ~1 min)")
            _build_into(recipe, tmp, progress)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"guest image ready: {final}")
    return verify(final)


def _tree_size(path: Path) -> int:
    """Bytes on disk (the rootfs is sparse: its apparent size overstates it)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*")
               if p.is_file() and not p.is_symlink())


def _build_owner_alive(entry: Path) -> bool:
    """A ``.build-<key>-<pid>`` directory belongs to a build still running?"""
    pid = entry.name.rsplit("-", 1)[-1]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def stale_images(keep: set[str], cache_dir: Path | None = None) -> list[Path]:
    """Image directories (and dead half-builds) no current recipe would use.

    Every change to a recipe, the guest init or the builder makes a new key,
    so without pruning the cache grows by ~1 GiB per change.
    """
    root = (cache_dir or default_cache_dir()) / "images"
    if not root.is_dir():
        return []
    stale = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(".build-"):
            if not _build_owner_alive(entry):
                stale.append(entry)
        elif entry.name not in keep:
            stale.append(entry)
    return stale


def prune_images(
    keep: set[str], cache_dir: Path | None = None, dry_run: bool = False
) -> list[tuple[Path, int]]:
    """Remove :func:`stale_images`; returns each removed path and its size in bytes.

    An image whose lock another process holds (a session that is building or
    verifying it) is left alone.
    """
    removed = []
    for entry in stale_images(keep, cache_dir):
        size = _tree_size(entry)
        if dry_run:
            removed.append((entry, size))
            continue
        lock = FileLock(_lock_path(entry), timeout=0)
        try:
            with lock:
                shutil.rmtree(entry)
        except TimeoutError:
            continue
        _lock_path(entry).unlink(missing_ok=True)
        removed.append((entry, size))
    return removed


def current_keys(data_dir: Path = DATA_DIR) -> set[str]:
    """Cache keys of every recipe shipped with this version of pytest-virtio."""
    return {load_recipe(p.stem, data_dir).key() for p in sorted(data_dir.glob("*.toml"))}
