"""Image recipes: ``images/<name>.toml`` (or a user's file) read, validated and hashed.

A recipe is everything that shapes a built image (suite, variant, packages,
excluded paths, size, how it boots, and the init scripts it ships), so its
content hash names the cache entry. Every error names the file and the field.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_virtio.errors import ConfigError

__all__ = ["BOOTS", "BUILDER_VERSION", "DATA_DIR", "DISK_BUILDER_VERSION", "DISTRO_BOOT_TIMEOUT",
           "FIRMWARE_FILES", "REQUIRED_PACKAGES", "Recipe", "load_recipe", "load_recipe_file"]

#: Bump when the build procedure changes in a way the recipe does not show.
BUILDER_VERSION = "1"
#: Bump when a firmware-booted disk is assembled differently (images/diskimage.py:
#: layout, GRUB, its config): only ``boot = "firmware"`` keys change.
DISK_BUILDER_VERSION = "2"
DATA_DIR = Path(__file__).resolve().parent / "data"


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
    #: "ours" (our initramfs, pvinit) or "distro" (the distro's initramfs and systemd),
    #: both booted by QEMU's direct kernel boot; or "firmware": a whole GPT disk
    #: (BIOS boot, ESP, root) that SeaBIOS or OVMF boots through its own GRUB, the
    #: distro's initramfs and init, with none of pytest-virtio's files inside
    #: (images/diskimage.py).
    boot: str = "ours"

    def key(self) -> str:
        """Content hash over everything that shapes the built image."""
        h = hashlib.sha256(BUILDER_VERSION.encode())
        boot: tuple[str, ...] = ()  # "ours" adds nothing: keeps existing keys
        if self.boot != "ours":
            boot = (self.boot, DISK_BUILDER_VERSION) if self.boot == "firmware" else (self.boot,)
        for part in (self.name, self.suite, self.variant, self.rootfs_size,
                     *self.packages, *self.path_exclude, *boot):
            h.update(part.encode() + b"\0")
        for fname, data in self.files:
            h.update(fname.encode() + b"\0" + data)
        return f"{self.name}-{h.hexdigest()[:16]}"


#: Recipe fields, their TOML type and whether a recipe must give them.
_FIELDS: dict[str, tuple[type, bool]] = {
    "name": (str, True), "suite": (str, True), "variant": (str, False),
    "packages": (list, True), "path_exclude": (list, False), "rootfs_size": (str, False),
    "extends": (str, False), "boot": (str, False),
}
BOOTS = ("ours", "distro", "firmware")
#: systemd + udev coldplug (every matching module loaded) + a 37 MB initramfs:
#: measured 237 s guest uptime to the console under TCG at host load ~27 on 2
#: cores, vs pvinit's few seconds; scaled like every guest timeout (x4 TCG).
DISTRO_BOOT_TIMEOUT = 90.0
#: Files every image gets: init, SSH start-up and the command channel's shell loop.
_GUEST_FILES = ("pvinit", "pv-ssh", "pv-shell")
#: Files a distro-boot image gets besides: the console service.
_DISTRO_FILES = ("pv-console", "pytest-virtio-console.service")
#: Files a firmware-booted disk gets (data file -> path in the guest), and nothing of
#: ours: cloud-init looks for a NoCloud seed, else goes on with no datasource
#: instead of waiting for a cloud's metadata service.
FIRMWARE_FILES = {"cloud-init.cfg": "/etc/cloud/cloud.cfg.d/90-pytest-virtio.cfg"}
#: mmdebstrap --variant values (mmdebstrap(1)).
_VARIANTS = ("extract", "custom", "essential", "apt", "required", "minbase", "buildd",
             "important", "debootstrap", "standard")
#: What the guest side needs: the initramfs (busybox), pvinit (kmod, iproute2,
#: dropbear) and a kernel whose modules tree the initramfs is built from.
REQUIRED_PACKAGES = ("busybox-static", "kmod", "iproute2", "dropbear-bin")
#: A firmware-booted disk needs only the distro's initramfs generator (and a kernel).
_FIRMWARE_PACKAGES = ("initramfs-tools",)
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SIZE_RE = re.compile(r"^[1-9][0-9]*[KMG]$")


def load_recipe(name: str = "bookworm", data_dir: Path = DATA_DIR) -> Recipe:
    """A shipped recipe by name (``images/<name>.toml``), or a recipe file by path."""
    if name.endswith(".toml") or "/" in name:
        return load_recipe_file(Path(name), data_dir)
    return load_recipe_file(data_dir / f"{name}.toml", data_dir)


def load_recipe_file(path: Path, data_dir: Path = DATA_DIR) -> Recipe:
    """Read and validate a recipe; every error names the file and the field.

    ``extends = "bookworm"`` starts from a shipped recipe: its packages and
    path_exclude are extended, the other fields replaced.
    """
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read image recipe {path}: {exc}") from exc
    where = f"image recipe {path}"
    _check_fields(raw, where)
    fields: dict[str, Any] = {}
    if "extends" in raw:
        parent = raw["extends"]
        if "/" in parent or not (data_dir / f"{parent}.toml").is_file():
            shipped = ", ".join(sorted(p.stem for p in data_dir.glob("*.toml")))
            raise ConfigError(f"{where}: field 'extends': {parent!r} is not a shipped recipe "
                              f"(shipped: {shipped})")
        base = load_recipe_file(data_dir / f"{parent}.toml", data_dir)
        fields = {"suite": base.suite, "variant": base.variant, "packages": base.packages,
                  "path_exclude": base.path_exclude, "rootfs_size": base.rootfs_size,
                  "boot": base.boot}
        for key in ("packages", "path_exclude"):
            fields[key] = tuple(dict.fromkeys((*fields[key], *raw.pop(key, ()))))
    elif missing := [k for k, (_, req) in _FIELDS.items() if req and k not in raw]:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)} (or extends = "
                          "\"bookworm\" to start from the shipped recipe)")
    raw.pop("extends", None)
    fields.update({k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    boot = fields.get("boot", "ours")
    if boot not in BOOTS:
        raise ConfigError(f"{where}: field 'boot': {boot!r} is not one of {', '.join(BOOTS)}")
    names = {"ours": _GUEST_FILES, "distro": (*_GUEST_FILES, *_DISTRO_FILES),
             "firmware": tuple(FIRMWARE_FILES)}[boot]
    recipe = Recipe(
        name=fields["name"], suite=fields["suite"], variant=fields.get("variant", "minbase"),
        packages=fields["packages"], path_exclude=fields.get("path_exclude", ()),
        rootfs_size=fields.get("rootfs_size", "1536M"),
        # Only what goes into the rootfs: initramfs-init is not baked into the image
        # (each initramfs's own cache key covers it), so editing it keeps the image.
        files=tuple((f, (data_dir / f).read_bytes()) for f in names),
        boot=boot,
    )
    _check_values(recipe, where)
    return recipe


def _check_fields(raw: dict[str, Any], where: str) -> None:
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(_FIELDS)}")
    for key, value in raw.items():
        kind = _FIELDS[key][0]
        if not isinstance(value, kind):
            raise ConfigError(f"{where}: field {key!r} must be a {kind.__name__} "
                              f"(TOML {'array of strings' if kind is list else 'string'}), "
                              f"got {value!r}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: field {key!r} must list strings, got {value!r}")


def _check_values(recipe: Recipe, where: str) -> None:
    if not _NAME_RE.match(recipe.name):
        raise ConfigError(f"{where}: field 'name': {recipe.name!r} must be letters, digits, "
                          "'.', '_' or '-' (it names the cache directory)")
    if not _NAME_RE.match(recipe.suite):
        raise ConfigError(f"{where}: field 'suite': {recipe.suite!r} is not a suite name "
                          "(e.g. bookworm, trixie)")
    if recipe.variant not in _VARIANTS:
        raise ConfigError(f"{where}: field 'variant': {recipe.variant!r} is not one of "
                          f"{', '.join(_VARIANTS)}")
    if not _SIZE_RE.match(recipe.rootfs_size):
        raise ConfigError(f"{where}: field 'rootfs_size': {recipe.rootfs_size!r} must be a "
                          "size like 1536M or 2G")
    bad = [p for p in recipe.packages if not _PACKAGE_RE.match(p)]
    if bad:
        raise ConfigError(f"{where}: field 'packages': {', '.join(map(repr, bad))} "
                          "is not a Debian package name")
    firmware = recipe.boot == "firmware"
    required = _FIRMWARE_PACKAGES if firmware else REQUIRED_PACKAGES
    missing = [p for p in required if p not in recipe.packages]
    if not any(p.startswith("linux-image-") for p in recipe.packages):
        missing.append("a linux-image-* kernel")
    if missing:
        needs = ("the bootloader loads the distro's kernel and initramfs" if firmware
                 else "the guest init and initramfs need them")
        raise ConfigError(f"{where}: field 'packages' lacks {', '.join(missing)}: {needs}")
