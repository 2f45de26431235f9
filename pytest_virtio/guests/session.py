"""VirtioSession: image, accelerator and run directories for one test session.

Usable without pytest (a script can ``with VirtioSession(Settings()) as s:
s.boot(MachineSpec())``); the plugin keeps one per process in the config
stash, so each xdist worker has its own run directory and guests while the
image cache and accelerator verdict are shared through file locks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from pytest_virtio import ids
from pytest_virtio import spec as spec_mod
from pytest_virtio.channels import ssh as ssh_mod
from pytest_virtio.errors import ConfigError
from pytest_virtio.guests import provision
from pytest_virtio.guests.boot import Boot, MissingDevices, check_drivers, mem_available_mib
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.kernel_config import image_config
from pytest_virtio.guests.settings import Settings
from pytest_virtio.guests.sharing import Shared, SharedGuests
from pytest_virtio.guests.snapshot import Templates
from pytest_virtio.guests.teardown import Teardown
from pytest_virtio.images import GuestImage, custom_image, ensure_image, load_recipe
from pytest_virtio.images import kernel as kernel_mod
from pytest_virtio.images.kconfig import KernelConfig
from pytest_virtio.qemu import capabilities
from pytest_virtio.qemu.accel import TIMEOUT_SCALE, AccelChoice, choose_accel
from pytest_virtio.qemu.machine import reap_all

Progress = Callable[[str], None]
RUN_PREFIX = "pv-"
#: sun_path holds 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107
#: The longest device name a spec accepts (a letter and up to 31 more, spec.catalogue._NAME_RE):
#: the longest socket name in a run directory is a vhost-user-blk disk's of that name.
LONGEST_NAME = "x" * 32


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie counts as dead.

    A SIGKILLed xdist worker stays a zombie until its controller reaps it, and
    ``kill(pid, 0)`` succeeds on zombies: without this the replacement worker's
    sweep would keep the dead worker's run directory.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def sweep_stale_runs(base: Path) -> list[Path]:
    """Remove run directories whose owning process is gone (a killed session)."""
    removed = []
    for d in base.glob(f"{RUN_PREFIX}*"):
        try:
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class VirtioSession:
    """Lazily resolves the image and the accelerator; boots guests on request."""

    def __init__(self, settings: Settings, progress: Progress = lambda _m: None) -> None:
        self.settings = settings
        self.progress = progress
        self._lock = threading.RLock()
        self._image: GuestImage | None = None
        self._kernel_images: dict[tuple[str, str | None], GuestImage] = {}
        self._recipe_images: dict[str, GuestImage] = {}
        self._accel: AccelChoice | None = None
        self._qemu: str | None = None
        self._run_root: Path | None = None
        self._counter = 0
        self._ssh_key: ssh_mod.KeyPair | None = None
        self._templates: Templates | None = None
        self._boot = Boot(self)
        self.guests: list[Guest] = []

    # -- resolved lazily -----------------------------------------------------
    @property
    def qemu(self) -> str:
        if self._qemu is None:
            self._qemu = capabilities.find_qemu(self.settings.qemu)
        return self._qemu

    def qemu_version(self) -> str:
        return ".".join(str(p) for p in capabilities.qemu_version(self.qemu))

    def base_image(self) -> GuestImage:
        """The image built from the recipe (whose rootfs a user kernel boots on)."""
        return self._recipe_image(self.settings.image or "bookworm")

    def image(self) -> GuestImage:
        """The session image: custom as given, the recipe's with a user kernel, or the recipe's."""
        with self._lock:
            if self._image is None:
                s = self.settings
                if s.kernel and s.initrd and s.rootfs:
                    self._image = custom_image(s.kernel, s.initrd, s.rootfs)
                elif s.kernel:
                    self._image = self._kernel_image(s.kernel, s.modules, "--virtio-kernel")
                else:
                    self._image = self.base_image()
            return self._image

    def image_for(self, spec: spec_mod.MachineSpec) -> GuestImage:
        """The image a spec boots: its own ``vm(image=...)`` or ``vm(kernel=...)``."""
        if spec.image is not None:
            return self._recipe_image(spec.image)
        if spec.kernel is None:
            return self.image()
        return self._kernel_image(spec.kernel, spec.modules, "vm")

    def kernel_config(self, spec: spec_mod.MachineSpec | None = None) -> KernelConfig | None:
        """The config of the kernel ``spec`` (default: the session's) boots, read on the
        host without booting; None when the host has none (a bare kernel file: ask a
        booted guest's :meth:`Guest.kernel_config`)."""
        return image_config(self.image_for(spec or spec_mod.MachineSpec()))

    def _recipe_image(self, recipe: str) -> GuestImage:
        """A recipe's image (the session's or a test's ``vm(image=...)``), built once, cached."""
        with self._lock:
            if recipe not in self._recipe_images:
                self._recipe_images[recipe] = ensure_image(
                    load_recipe(recipe), self.settings.cache_dir, self.progress)
            return self._recipe_images[recipe]

    def _kernel_image(self, kernel: str, modules: str | None, where: str) -> GuestImage:
        with self._lock:
            key = (kernel, modules)
            if key not in self._kernel_images:
                choice = kernel_mod.check_choice(kernel, modules, where)
                self._kernel_images[key] = kernel_mod.prepare(
                    choice, self.base_image(), self.settings.cache_dir, self.progress)
            return self._kernel_images[key]

    def accel(self) -> AccelChoice:
        with self._lock:
            if self._accel is None:
                qemu_id = hashlib.sha256(
                    f"{self.qemu}:{self.qemu_version()}:{self.image().key}".encode()
                ).hexdigest()[:12]
                self._accel = choose_accel(
                    self.settings.accel, self.settings.cache_dir, qemu_id, self._probe_boot
                )
            return self._accel

    @property
    def timeout_scale(self) -> float:
        if self.settings.timeout_scale is not None:
            return self.settings.timeout_scale
        return TIMEOUT_SCALE[self.accel().accel]

    @property
    def run_root(self) -> Path:
        """Short per-process directory for sockets (sun_path is 108 bytes)."""
        with self._lock:
            if self._run_root is None:
                base = Path(tempfile.gettempdir())
                sweep_stale_runs(base)
                root = base / f"{RUN_PREFIX}{secrets.token_hex(3)}"
                root.mkdir(mode=0o700)
                (root / "owner.pid").write_text(str(os.getpid()))
                self._run_root = root
            return self._run_root

    def ssh_key(self) -> ssh_mod.KeyPair:
        """The session's SSH client key, made on first use in the private run root."""
        with self._lock:
            if self._ssh_key is None:
                self._ssh_key = ssh_mod.generate_keypair(self.run_root / "ssh")
            return self._ssh_key

    def new_run_dir(self, prefix: str = "g") -> Path:
        with self._lock:
            self._counter += 1
            d = self.run_root / f"{prefix}{self._counter}"
        longest = d / ids.vhost_socket_name(LONGEST_NAME)
        if len(str(longest)) > SUN_PATH_MAX:
            raise ConfigError(
                f"run directory {d} is too long for unix socket paths "
                f"({len(str(longest))} > {SUN_PATH_MAX} bytes): set TMPDIR to a shorter "
                "directory, e.g. TMPDIR=/tmp"
            )
        d.mkdir()
        return d

    # -- reaching a guest ----------------------------------------------------
    def _probe_boot(self, timeout: float) -> float:
        guest = self._boot.launch(spec_mod.MachineSpec(), "kvm-probe", accel="kvm",
                                  boot_timeout=timeout, scale=1.0, register=False)
        try:
            return guest.boot_uptime or 0.0
        finally:
            guest.close()

    def boot(self, spec: spec_mod.MachineSpec | None = None, name: str = "guest", *,
             pool: SharedGuests | None = None) -> Guest:
        """A guest for ``spec`` whose shell answers, reached by :meth:`strategy`:
        ``pool``'s live guest of the shape, restored from the shape's snapshot
        template with ``--virtio-snapshot``, else booted."""
        spec = spec or spec_mod.MachineSpec()
        check_honoured(spec, self.settings)
        return provision.reach(self.strategy(pool), spec, name)

    def strategy(self, pool: SharedGuests | None = None) -> provision.Strategy:
        """The one place the way to a guest is chosen (:mod:`.provision`)."""
        way: provision.Strategy = self._boot
        if self.settings.snapshot:
            way = provision.Fallback(self.templates, way)
        if pool is not None:
            way = Shared(pool, way)
        return way

    @property
    def templates(self) -> Templates:
        """The process's snapshot templates (the restore strategy)."""
        with self._lock:
            if self._templates is None:
                self._templates = Templates(self, self._boot, self.progress)
            return self._templates

    def boot_fresh(self, spec: spec_mod.MachineSpec, name: str = "guest", *,
                   own_root: Path | None = None) -> Guest:
        """Boot a guest for ``spec`` and wait until its shell answers."""
        return self._boot.fresh(spec, name, own_root=own_root)

    # -- teardown ------------------------------------------------------------
    def close(self) -> None:
        """Close every guest and reap every QEMU; then raise a backend that would
        not stop (BackendError naming its disk), once everything else is done."""
        teardown = Teardown()
        for guest in self.guests:
            teardown.close(guest)
        self.guests.clear()
        if self._templates is not None:
            self._templates.close()
        reap_all()
        if self._run_root is not None and self.settings.keep != "always":
            shutil.rmtree(self._run_root, ignore_errors=True)
            self._run_root = None
        teardown.raise_stuck()

    def __enter__(self) -> VirtioSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_honoured(spec: spec_mod.MachineSpec, settings: Settings) -> None:
    """A custom ``--virtio-initrd`` is used as is: refuse what it cannot honour.

    Why: root_bus and initramfs_modules work by building the initramfs; with the
    user's own, a test of a missing driver would pass when it should fail.
    """
    recipe = spec.image or settings.image
    distro = _distro_boot(recipe)  # loads the recipe: a bad vm(image=...) fails here, named
    if not settings.initrd or spec.image is not None:
        if spec.initramfs_modules is not None and distro:
            raise ConfigError(
                f"initramfs_modules={list(spec.initramfs_modules)!r}: the image recipe "
                f"{recipe} boots the distro's own initramfs (boot = \"distro\"), so "
                "pytest-virtio cannot choose the modules it loads; drop the key")
        return
    why = "--virtio-initrd is used as is, so pytest-virtio cannot"
    if spec.initramfs_modules is not None:
        raise ConfigError(f"initramfs_modules={list(spec.initramfs_modules)!r}: {why} choose "
                          "the modules it loads; drop the key or --virtio-initrd")
    default_bus = spec_mod.MachineSpec().root_bus
    if spec.root_bus != default_bus:
        raise ConfigError(f"root_bus={spec.root_bus!r}: {why} make it load the "
                          f"{', '.join(spec_mod.ROOT_MODULES[spec.root_bus])} drivers that bus "
                          f"needs; drop the key (the root stays on {default_bus}) or "
                          "--virtio-initrd")
    if spec.kernel is not None:
        raise ConfigError(f"kernel={spec.kernel!r}: {why} build an initramfs for another "
                          "kernel; drop the key or use --virtio-kernel with --virtio-modules")


@functools.lru_cache(maxsize=4)
def _distro_boot(recipe: str | None) -> bool:
    return recipe is not None and load_recipe(recipe).boot == "distro"


@contextlib.contextmanager
def booted(spec: spec_mod.MachineSpec | None = None, settings: Settings | None = None
           ) -> Iterator[Guest]:
    """One-shot helper for scripts and benchmarks."""
    with VirtioSession(settings or Settings.from_values({})) as session:
        yield session.boot(spec)


__all__ = ["MissingDevices", "VirtioSession", "booted", "check_drivers", "check_honoured",
           "mem_available_mib", "sweep_stale_runs"]

