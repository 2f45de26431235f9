"""Make an initramfs that carries exactly the modules a root bus needs.

Why our own initramfs: Debian's is 37 MB and probes everything; ours is a
busybox, an init script and the handful of ``.ko`` files the root disk's bus
needs (resolved through ``modules.dep``), so it unpacks in milliseconds and a
missing driver is a precise, testable diagnosis instead of a hang.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

from pytest_virtio.errors import ImageError, MissingToolError
from pytest_virtio.images.builder import GuestImage
from pytest_virtio.images.recipe import DATA_DIR

#: The root filesystem's modules, loaded after the bus drivers.
FS_MODULES = ("crc32c_generic", "ext4")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` → {module name: (relative path, [dependency paths])}."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        name = _norm(Path(path).name.split(".ko")[0])
        table[name] = (path, deps.split())
    return table


def builtin_modules(modules_dir: Path) -> frozenset[str]:
    """Names of drivers compiled into the kernel (=y): present without loading."""
    try:
        text = (modules_dir / "modules.builtin").read_text()
    except OSError:
        return frozenset()
    return frozenset(_norm(Path(p).name.split(".ko")[0]) for p in text.split())


@functools.lru_cache(maxsize=8)
def available_modules(modules_dir: Path) -> frozenset[str]:
    """Every driver the kernel can have: a module in ``modules.dep`` or built in."""
    try:
        dep = parse_modules_dep((modules_dir / "modules.dep").read_text())
    except OSError as exc:
        raise ImageError(f"cannot read {modules_dir}/modules.dep: {exc}") from exc
    return frozenset(dep) | builtin_modules(modules_dir)


def resolve(names: Iterable[str], modules_dir: Path) -> list[str]:
    """Module paths to insmod, dependencies first, built-ins dropped.

    Unknown names raise ImageError: a typo in a spec should not become a
    guest that silently cannot find its disk.
    """
    dep = parse_modules_dep((modules_dir / "modules.dep").read_text())
    builtin = builtin_modules(modules_dir)
    by_path = {path: name for name, (path, _) in dep.items()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(dep[by_path[path]][1]):
            visit(d)
        order.append(path)

    for raw in names:
        name = _norm(raw)
        if name in builtin:
            continue
        if name not in dep:
            raise ImageError(f"kernel module {raw!r} is not in {modules_dir}/modules.dep")
        visit(dep[name][0])
    return order


def _write_cpio(stage: Path, out: Path) -> None:
    cpio = shutil.which("cpio")
    if not cpio:
        raise MissingToolError("cpio", "cpio", "needed to pack the initramfs")
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    with out.open("wb") as f:
        subprocess.run(
            [cpio, "--quiet", "-o", "-H", "newc", "--owner=0:0"],
            input="\n".join([".", *files]).encode(), stdout=f, cwd=stage, check=True,
        )


def _find_busybox(image: GuestImage) -> Path:
    for candidate in (image.cache_dir / "busybox", Path("/usr/bin/busybox"), Path("/bin/busybox")):
        if candidate.is_file():
            return candidate
    raise MissingToolError("busybox", "busybox-static", "needed inside the initramfs")


def initramfs_for(image: GuestImage, modules: Iterable[str]) -> Path:
    """The cached initramfs loading ``modules`` (+ ext4), built on first use."""
    if image.initrd is not None:
        return image.initrd
    if image.modules_dir is None:
        raise ImageError("image has neither an initrd nor a modules tree to build one from")
    wanted = [*modules, *FS_MODULES]
    paths = resolve(wanted, image.modules_dir)
    init = (DATA_DIR / "initramfs-init").read_bytes()
    digest = hashlib.sha256(init + "\0".join(paths).encode()).hexdigest()[:16]
    out = image.cache_dir / f"initramfs-{digest}.cpio"
    if out.exists():
        return out
    with FileLock(str(out) + ".lock"):
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(dir=image.cache_dir) as tmp:
            stage = Path(tmp) / "stage"
            for d in ("bin", "dev", "proc", "sys", "newroot"):
                (stage / d).mkdir(parents=True)
            shutil.copy2(_find_busybox(image), stage / "bin" / "busybox")
            (stage / "init").write_bytes(init)
            (stage / "init").chmod(0o755)
            for rel in paths:
                dest = stage / "lib" / "modules" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(image.modules_dir / rel, dest)
            (stage / "modules.list").write_text("\n".join(paths) + "\n")
            part = Path(tmp) / "initramfs.cpio"
            _write_cpio(stage, part)
            os.rename(part, out)
    return out
