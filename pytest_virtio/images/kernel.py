"""Your kernel alone: boot a kernel no recipe of ours built, with its own modules.

Why: people test *their* kernel. Given only the kernel (a bzImage, a vmlinux,
or a kernel build tree) and its modules (a ``make modules_install
INSTALL_MOD_PATH=…`` tree, a build tree, or a package's ``/lib/modules/<ver>``),
this stages the modules once per machine in the cache (running ``depmod``
when the tree has no ``modules.dep``, as Debian's kernel packages ship none),
packs them into a read-only ext4 disk (``mke2fs -d``) that our initramfs
mounts at ``/lib/modules/<ver>``, and boots it on the default image's rootfs.
The initramfs itself is then built per root bus from this tree like the
default image's (:mod:`.initramfs`).

Staged trees are keyed by the kernel's content and a fingerprint (path, size,
mtime) of every file of the modules tree, behind a file lock with an atomic
rename, like the image cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock

from pytest_virtio.errors import ConfigError, ImageError
from pytest_virtio.images.builder import (
    GuestImage,
    Progress,
    cache_entries,
    extract_vmlinux,
    file_sha256,
)
from pytest_virtio.tools import require_tool

log = logging.getLogger(__name__)

#: The label our initramfs looks for; also the disk's serial in the guest.
MODULES_LABEL = "pvmods"
#: Bump when the staging procedure changes in a way the inputs do not show.
STAGE_VERSION = "1"
MANIFEST = "kernel.json"
_ELF_MAGIC = b"\x7fELF"
#: Xen ELF note type XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point QEMU needs
#: to boot an ELF kernel directly (include/xen/interface/elfnote.h).
_PVH_NOTE = 18


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """A user kernel and its modules as given (paths checked, nothing staged yet)."""

    kernel: Path
    modules: Path | None
    where: str = "--virtio-kernel"


def _flag(where: str, key: str) -> str:
    return f"--virtio-{key}" if where.startswith("--") else f"{where}({key}=)"


def check_choice(kernel: str, modules: str | None, where: str = "--virtio-kernel"
                 ) -> KernelChoice:
    """Validate the paths up front (configure or collection time), naming the key."""
    kpath = Path(kernel).expanduser()
    if not kpath.exists():
        raise ConfigError(f"{_flag(where, 'kernel')}: {kernel} does not exist; give a "
                          "bzImage, a vmlinux or a kernel build tree")
    kfile = kernel_file(kpath, where)
    with kfile.open("rb") as f:
        head = f.read(0x210)
    if head[:4] != _ELF_MAGIC and head[0x202:0x206] != b"HdrS":
        raise ConfigError(f"{_flag(where, 'kernel')}: {kfile} is neither a bzImage nor an ELF "
                          "vmlinux")
    mpath = Path(modules).expanduser() if modules else None
    if mpath is None and not kpath.is_dir():
        raise ConfigError(f"{_flag(where, 'kernel')}: {kernel} is a kernel file; give its "
                          f"modules with {_flag(where, 'modules')} (a modules_install tree or "
                          "/lib/modules/<version>), or give a kernel build tree")
    if mpath is not None and not mpath.is_dir():
        raise ConfigError(f"{_flag(where, 'modules')}: {modules} is not a directory; give a "
                          "modules_install tree, a kernel build tree or /lib/modules/<version>")
    return KernelChoice(kpath, mpath, where)


def kernel_file(path: Path, where: str = "--virtio-kernel") -> Path:
    """The bootable file: itself, or in a build tree vmlinux (PVH) else the bzImage."""
    if path.is_file():
        return path
    for candidate in (path / "vmlinux", path / "arch" / "x86" / "boot" / "bzImage"):
        if candidate.is_file() and (candidate.name != "vmlinux" or has_pvh_note(candidate)):
            return candidate
    raise ConfigError(f"{_flag(where, 'kernel')}: {path} is a directory without vmlinux or "
                      "arch/x86/boot/bzImage; give a built kernel tree (run make first)")


def bzimage_release(data: bytes) -> str | None:
    """The version string of a bzImage (setup header ``kernel_version``, boot.rst)."""
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        return None
    (offset,) = struct.unpack_from("<H", data, 0x20E)
    start = offset + 0x200
    end = data.find(b"\0", start, start + 256)
    if not offset or end < 0:
        return None
    return data[start:end].decode(errors="replace").split()[0]


def elf_release(data: bytes) -> str | None:
    """The release in a vmlinux's ``Linux version <release> (...)`` banner."""
    at = data.find(b"Linux version ")
    if at < 0:
        return None
    return data[at + 14: at + 142].split(b" ", 1)[0].decode(errors="replace") or None


def has_pvh_note(path: Path) -> bool:
    """Does this ELF carry the Xen PVH entry note (so ``-kernel`` boots it directly)?"""
    try:
        out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True,
                             check=False).stdout
    except OSError:
        return _pvh_note_scan(path.read_bytes())
    return f"0x{_PVH_NOTE:08x}" in out


def _pvh_note_scan(data: bytes) -> bool:
    """Fallback without binutils: look for the 'Xen' note with the PVH type."""
    needle = struct.pack("<III", 4, 8, _PVH_NOTE) + b"Xen\0"
    return needle in data or struct.pack("<III", 4, 4, _PVH_NOTE) + b"Xen\0" in data


def release_of(kernel: Path) -> str | None:
    head = kernel.read_bytes()
    return elf_release(head) if head[:4] == _ELF_MAGIC else bzimage_release(head)


def _build_tree_release(tree: Path) -> str | None:
    try:
        return (tree / "include" / "config" / "kernel.release").read_text().strip() or None
    except OSError:
        return None


def modules_source(modules: Path, release: str | None, where: str) -> tuple[Path, str, bool]:
    """(directory, kernel release, is a build tree) of a modules argument.

    Accepted: ``/lib/modules/<ver>`` itself, a ``modules_install`` root holding
    ``lib/modules/<ver>`` (or ``usr/lib/modules``), or a build tree (has
    ``modules.order`` and ``include/config/kernel.release``).
    """
    flag = _flag(where, "modules")
    if (modules / "include" / "config" / "kernel.release").is_file():
        tree_release = _build_tree_release(modules)
        assert tree_release is not None
        return modules, tree_release, True
    if (modules / "modules.order").is_file() or (modules / "kernel").is_dir():
        return modules, modules.name, False
    for base in (modules / "lib" / "modules", modules / "usr" / "lib" / "modules"):
        if not base.is_dir():
            continue
        versions = sorted(p.name for p in base.iterdir() if p.is_dir())
        if release in versions:
            return base / release, release, False
        if len(versions) == 1:
            return base / versions[0], versions[0], False
        raise ConfigError(f"{flag}: {base} holds {', '.join(versions) or 'no versions'}; "
                          f"the kernel is {release or 'of unknown version'}")
    raise ConfigError(f"{flag}: {modules} holds no kernel modules (no modules.order, kernel/ "
                      "or lib/modules/<version>); give a modules_install tree, a build tree "
                      "or /lib/modules/<version>")


def _fingerprint(tree: Path) -> str:
    """Cheap identity of a modules tree: every file's path, size and mtime."""
    h = hashlib.sha256()
    for p in sorted(tree.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            h.update(f"{p.relative_to(tree)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _tool(name: str, package: str) -> str:
    return require_tool(name, package, "needed to stage your kernel's modules")


def _copy_build_tree(tree: Path, dest: Path) -> None:
    """A build tree's modules laid out as ``modules_install`` would (kernel/<path>)."""
    dest.mkdir(parents=True)
    order = []
    for line in (tree / "modules.order").read_text().split():
        rel = line.removeprefix("kernel/")
        rel = rel[:-2] + ".ko" if rel.endswith(".o") else rel
        src = tree / rel
        if not src.is_file():
            raise ConfigError(f"--virtio-modules: {src} is listed in modules.order but not "
                              "built; run make modules first")
        target = dest / "kernel" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        order.append(f"kernel/{rel}")
    (dest / "modules.order").write_text("\n".join(order) + "\n")
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        if (tree / name).is_file():
            shutil.copy2(tree / name, dest / name)


def stage_modules(src: Path, release: str, build_tree: bool, root: Path,
                   progress: Progress) -> Path:
    """Copy the tree to ``root/lib/modules/<release>``; depmod when modules.dep is missing."""
    dest = root / "lib" / "modules" / release
    progress(f"staging kernel modules for {release}")
    if build_tree:
        _copy_build_tree(src, dest)
    else:
        shutil.copytree(src, dest, symlinks=True,
                        ignore=shutil.ignore_patterns("build", "source"))
    if not (dest / "modules.dep").is_file():
        progress(f"running depmod for {release} (the tree has no modules.dep)")
        proc = subprocess.run([_tool("depmod", "kmod"), "-b", str(root), release],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not (dest / "modules.dep").is_file():
            raise ImageError(f"depmod -b {root} {release} failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip()}")
    return dest


def _modules_disk(tree: Path, out: Path) -> None:
    """A read-only ext4 image of the tree, labelled for the initramfs to find."""
    used = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    files = sum(1 for _ in tree.rglob("*"))
    size_mib = used * 5 // 4 // 2**20 + 16
    proc = subprocess.run(
        [_tool("mke2fs", "e2fsprogs"), "-q", "-t", "ext4", "-O", "^has_journal",
         "-L", MODULES_LABEL, "-N", str(files + 256), "-d", str(tree), "-F", str(out),
         f"{size_mib}M"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ImageError(f"mke2fs of the modules disk failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()}")


def _boot_kernel(kernel: Path, stage: Path) -> Path:
    """An ELF with a PVH note boots ~2 s faster under TCG: extract it from a bzImage."""
    data = kernel.read_bytes()
    if data[:4] == _ELF_MAGIC:
        return kernel
    elf = extract_vmlinux(data)
    if elf is None:
        return kernel
    out = stage / "vmlinux"
    out.write_bytes(elf)
    return out if has_pvh_note(out) else kernel


def prepare(choice: KernelChoice, base: GuestImage, cache_dir: Path,
            progress: Progress = lambda _m: None) -> GuestImage:
    """The default image's rootfs with this kernel and its modules (staged once)."""
    kfile = kernel_file(choice.kernel, choice.where)
    release = release_of(kfile)
    msrc = choice.modules or choice.kernel
    src, mrelease, build_tree = modules_source(msrc, release, choice.where)
    if release and release != mrelease:
        raise ConfigError(
            f"{_flag(choice.where, 'modules')}: {choice.modules or msrc} has modules for "
            f"{mrelease} but {kfile} is {release}; give the modules of this kernel"
        )
    key = hashlib.sha256(
        f"{STAGE_VERSION}\0{file_sha256(kfile)}\0{mrelease}\0{_fingerprint(src)}".encode()
    ).hexdigest()[:16]
    final = cache_dir / "kernels" / f"{mrelease}-{key}"
    if not (final / MANIFEST).exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if not (final / MANIFEST).exists():
                _stage(kfile, src, mrelease, build_tree, final, progress)
                if (base.cache_dir / "busybox").is_file():
                    shutil.copy2(base.cache_dir / "busybox", final / "busybox")
    manifest = json.loads((final / MANIFEST).read_text())
    boot = final / manifest["boot_kernel"] if manifest["boot_kernel"] else kfile
    return replace(
        base, key=f"{base.key}+kernel-{mrelease}-{key}", kernel=boot,
        kernel_version=mrelease, modules_dir=final / "root" / "lib" / "modules" / mrelease,
        modules_disk=final / "modules.img", initrd=None, cache=final,
        config=config_file(choice, kfile, mrelease),
    )


def config_file(choice: KernelChoice, kfile: Path, release: str) -> Path | None:
    """The kernel's config on the host: a build tree's ``.config`` (the kernel's tree,
    else the modules' tree), else ``config-<release>`` beside the kernel file (as
    ``/boot`` and an unpacked kernel package have it); None for a bare kernel file.

    Not staged: it is read where it is, so an edited ``.config`` is what is reported.
    """
    trees = [p for p in (choice.kernel, choice.modules) if p is not None and p.is_dir()]
    candidates = [t / ".config" for t in trees] + [kfile.parent / f"config-{release}"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        log.info("no config for kernel %s (looked at %s)", kfile,
                 ", ".join(map(str, candidates)))
    return found


def _stage(kfile: Path, src: Path, release: str, build_tree: bool, final: Path,
           progress: Progress) -> None:
    tmp = final.with_name(f".stage-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tree = stage_modules(src, release, build_tree, tmp / "root", progress)
        progress(f"building the modules disk for {release}")
        _modules_disk(tree, tmp / "modules.img")
        boot = _boot_kernel(kfile, tmp)
        manifest = {"release": release, "kernel": str(kfile),
                    "boot_kernel": boot.name if boot.parent == tmp else ""}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stale_kernels(cache_dir: Path) -> list[Path]:
    """Staged kernels superseded by a newer staging of the same kernel file, and dead
    half-stagings.

    Why: every rebuild of a kernel (new mtimes) stages its modules anew (a copy
    plus a disk image, ~200 MB for a distro config); only the newest is useful.
    """
    stale, finished = cache_entries(cache_dir / "kernels", ".stage-")
    newest: dict[str, tuple[int, Path]] = {}
    for entry in finished:
        try:
            source = json.loads((entry / MANIFEST).read_text())["kernel"]
            made = (entry / MANIFEST).stat().st_mtime_ns
        except (OSError, ValueError, KeyError):
            stale.append(entry)
            continue
        if source in newest:
            keep, drop = sorted([newest[source], (made, entry)], reverse=True)
            stale.append(drop[1])
            newest[source] = keep
        else:
            newest[source] = (made, entry)
    return sorted(stale)


def _apt_run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-400:]}; is the package name right and "
                         "`apt-get update` done?")
    return proc.stdout


def _concrete_package(package: str) -> str:
    """A metapackage (linux-image-cloud-amd64) → the versioned kernel it depends on."""
    out = _apt_run([_tool("apt-cache", "apt"), "depends", package])
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep
    return package


def fetch_deb_kernel(package: str, cache_dir: Path,
                     progress: Progress = lambda _m: None) -> tuple[Path, Path]:
    """(kernel, modules dir) of a Debian kernel package, downloaded and unpacked once.

    Uses ``apt-get download`` (the host's configured Debian mirror) and
    ``dpkg-deb -x``, never installs anything: this is how a test gets a kernel
    no recipe of ours built, e.g. ``linux-image-cloud-amd64``.
    """
    concrete = _concrete_package(package)
    final = cache_dir / "debs" / concrete
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if not (final / "root" / "boot").is_dir():
            tmp = final.with_name(f".fetch-{concrete}-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                progress(f"downloading {concrete} (apt-get download)")
                _apt_run([_tool("apt-get", "apt"), "download", concrete], cwd=tmp)
                debs = sorted(tmp.glob("*.deb"))
                if not debs:
                    raise ImageError(f"apt-get download {concrete} left no .deb in {tmp}")
                _apt_run([_tool("dpkg-deb", "dpkg"), "-x", str(debs[0]), str(tmp / "root")])
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    root = final / "root"
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError(f"{concrete} has no /boot/vmlinuz-*: not a kernel image package")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if (base / release).is_dir():
            return kernels[-1], base / release
    raise ImageError(f"{concrete} has no lib/modules/{release}")
