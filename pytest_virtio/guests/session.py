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
from typing import TYPE_CHECKING, Any

from pytest_virtio import ids
from pytest_virtio import spec as spec_mod
from pytest_virtio.channels import ssh as ssh_mod
from pytest_virtio.errors import (
    BackendError,
    ConfigError,
    GuestError,
    LaunchError,
    MissingDriver,
    VirtioError,
)
from pytest_virtio.guests import reproduce
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.launch import (
    backend_socket,
    check_cdrom_isos,
    connect_serial_ports,
    create_overlay,
    external_sockets,
    prepare_disk_file,
    prepare_root_disk,
    root_file,
    serial_sockets,
    start_backend,
)
from pytest_virtio.guests.settings import Settings
from pytest_virtio.guests.teardown import Teardown, stop_backends
from pytest_virtio.images import GuestImage, custom_image, ensure_image, initramfs_for, load_recipe
from pytest_virtio.images import kernel as kernel_mod
from pytest_virtio.images.initramfs import available_modules
from pytest_virtio.qemu import capabilities
from pytest_virtio.qemu.accel import TIMEOUT_SCALE, AccelChoice, choose_accel
from pytest_virtio.qemu.machine import Machine, reap_all

if TYPE_CHECKING:
    from pytest_virtio.guests.snapshot import Templates

Progress = Callable[[str], None]
#: Kernel command line shared by every guest: quiet console, fast boot.
#: ``noreplace-smp``: a one-CPU kernel otherwise rewrites every SMP lock prefix
#: in its text at boot, each write a code-cache flush under TCG (measured 0.4 s of
#: a 2.8 s kernel init; see docs/boot-time.md).
BASE_APPEND = (
    "console=ttyS0,115200 quiet loglevel=1 panic=-1 pv.root=pvroot "
    "8250.nr_uarts=2 no_timer_check tsc=reliable i8042.noaux i8042.nokbd i8042.nopnp "
    "mitigations=off random.trust_cpu=on nokaslr cryptomgr.notests noreplace-smp"
)
RUN_PREFIX = "pv-"
#: sun_path holds 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107
#: The longest device name a spec accepts (a letter and up to 31 more, spec.catalogue._NAME_RE):
#: the longest socket name in a run directory is a vhost-user-blk disk's of that name.
LONGEST_NAME = "x" * 32
BOOT_TIMEOUT = 15.0
#: How long (before accelerator scaling) SSH keeps retrying to reach dropbear.
SSH_CONNECT_TIMEOUT = 5.0


class MissingDevices(LaunchError):
    """The installed QEMU lacks device models the spec needs: a capability, not a bug.

    The fixtures turn it into a skip (the test cannot run on this host), while a
    script using VirtioSession directly still gets a clear error.
    """

    def __init__(self, qemu: str, missing: frozenset[str]) -> None:
        self.qemu = qemu
        self.missing = missing
        super().__init__(
            f"QEMU lacks device model(s) {', '.join(sorted(missing))} ({qemu}); "
            "install a QEMU build that has them"
        )


def mem_available_mib(meminfo: str = "/proc/meminfo") -> int | None:
    """The host's MemAvailable in MiB (None where /proc/meminfo is unreadable)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory_available(spec: spec_mod.MachineSpec) -> None:
    """Refuse a guest bigger than the host's free RAM before launching it.

    QEMU allocates guest RAM lazily, so it would start fine and the OOM killer
    would later pick QEMU (or pytest) in the middle of a test.
    """
    avail = mem_available_mib()
    if avail is not None and spec.memory_mib > avail:
        raise LaunchError(
            f"vm(memory={spec.memory!r}) needs {spec.memory_mib} MiB but the host has only "
            f"{avail} MiB available (MemAvailable): ask for less memory, or run fewer "
            "guests at once (lower -n)"
        )


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

    # -- booting -------------------------------------------------------------
    def _probe_boot(self, timeout: float) -> float:
        guest = self._launch(spec_mod.MachineSpec(), "kvm-probe", accel="kvm",
                             boot_timeout=timeout, scale=1.0)
        try:
            return guest.boot_uptime or 0.0
        finally:
            guest.close()

    def boot(self, spec: spec_mod.MachineSpec | None = None, name: str = "guest") -> Guest:
        """A guest for ``spec`` whose shell answers: restored from the shape's snapshot
        template with ``--virtio-snapshot``, else booted."""
        spec = spec or spec_mod.MachineSpec()
        check_honoured(spec, self.settings)
        if self.settings.snapshot:
            self._check_can_launch(spec)
            restored = self.templates.guest(spec, name)
            if restored is not None:
                return restored
        return self.boot_fresh(spec, name)

    @property
    def templates(self) -> Templates:
        """The process's snapshot templates (:class:`pytest_virtio.guests.snapshot.Templates`)."""
        from pytest_virtio.guests.snapshot import Templates

        with self._lock:
            if self._templates is None:
                self._templates = Templates(self, self.progress)
            return self._templates

    def _check_can_launch(self, spec: spec_mod.MachineSpec) -> None:
        missing = capabilities.missing_devices(spec, self.qemu)
        if missing:
            raise MissingDevices(self.qemu, missing)
        check_memory_available(spec)

    def boot_fresh(self, spec: spec_mod.MachineSpec, name: str = "guest", *,
                   own_root: Path | None = None) -> Guest:
        """Boot a guest for ``spec`` and wait until its shell answers."""
        self._check_can_launch(spec)
        accel = self.accel().accel
        scale = self.timeout_scale
        budget = self.image_for(spec).boot_timeout or BOOT_TIMEOUT
        guest = self._launch(spec, name, accel=accel, boot_timeout=budget * scale,
                             scale=scale, own_root=own_root)
        self.guests.append(guest)
        return guest

    def _launch(self, spec: spec_mod.MachineSpec, name: str, *, accel: str,
                boot_timeout: float, scale: float, own_root: Path | None = None) -> Guest:
        """Boot ``spec``; ``own_root`` is a qcow2 overlay file made for its root disk (a
        snapshot template keeps it) instead of QEMU's temporary one."""
        image = self.image_for(spec)
        check_drivers(image, spec)
        check_cdrom_isos(spec)
        run_dir = self.new_run_dir()
        if own_root is not None:
            create_overlay(own_root, image.rootfs, image.rootfs_format)
        disk_files = {d.name: prepare_disk_file(d, run_dir) for d in spec.disks}
        serials = {d.name: d.serial or d.name for d in spec.disks}
        ssh_nic = next((n for n in spec.nics if n.hostfwd_ssh), None)
        backends = self._start_backends(spec, run_dir, disk_files, name)
        guest: Guest | None = None
        try:
            ctx = self._context(spec, image, name, accel=accel, run_dir=run_dir,
                                disk_files=disk_files, backends=backends,
                                own_root=own_root, ssh=ssh_nic is not None)
            argv = spec_mod.to_argv(spec, ctx)
            machine = Machine(argv, run_dir, qmp_socket=ctx.qmp_socket,
                              console_socket=ctx.console_socket,
                              console_log=Path(ctx.console_log))
            machine.reproducer = reproduce.script(argv, run_dir, spec, ctx)
            guest = Guest(machine=machine, name=name, accel=accel,
                          timeout_scale=scale,
                          run_dir=run_dir, spec=spec, backends=backends,
                          disk_serials=serials, ctx=ctx)
            machine.launch()
            guest.serial_ports = connect_serial_ports(ctx, guest.default_timeout())
        except BaseException as exc:
            _stop_after_failure(backends, name, exc)
            if isinstance(exc, VirtioError) and guest is not None:
                exc.failed_guest = guest
            raise
        with closed_on_failure(guest):
            guest.boot_uptime = _wait_ready(machine, spec, boot_timeout)
            if spec.disks or spec.devices:
                guest.load_drivers()
            if ssh_nic is not None:
                self.attach_ssh(guest, ssh_nic.name, scale)
        return guest

    def _context(self, spec: spec_mod.MachineSpec, image: GuestImage, name: str, *,
                 accel: str, run_dir: Path, disk_files: dict[str, str],
                 backends: dict[str, Any], own_root: Path | None, ssh: bool
                 ) -> spec_mod.LaunchContext:
        """Everything the argv needs from the host: image paths, the kernel command
        line, sockets, disk files, fw_cfg blobs."""
        root_image, root_format = str(image.rootfs), image.rootfs_format
        initrd = str(initramfs_for(image, spec.root_modules))
        if own_root is not None:
            root_image, root_format = str(own_root), "qcow2"
        if spec.root_disk is not None:
            root_image, root_format, initrd = self._own_root(spec.root_disk, image, run_dir,
                                                             initrd)
        args = ["pv.ssh=1"] if ssh else []
        if image.modules_disk is not None:
            args.append(f"pv.modules={image.kernel_version}")
        args += image.append
        fw_cfg = {ssh_mod.AUTHORIZED_KEYS_FW_CFG: str(self.ssh_key().public_path)} if ssh else {}
        return spec_mod.LaunchContext(
            qemu_binary=self.qemu, accel=accel, kernel=str(image.kernel),
            initrd=initrd, root_image=root_image, root_format=root_format,
            root_snapshot=own_root is None and spec.root_disk is None,
            append=" ".join([BASE_APPEND, *args, *spec.kernel_args]),
            qmp_socket=str(run_dir / "qmp.sock"),
            console_socket=str(run_dir / "con.sock"),
            console_log=str(run_dir / "console.log"),
            disk_files=disk_files,
            vhost_sockets={**{n: backend_socket(run_dir, n) for n in backends},
                           **external_sockets(spec)},
            serial_sockets=serial_sockets(spec, run_dir),
            name=name,
            fw_cfg=fw_cfg,
            modules_image=str(image.modules_disk) if image.modules_disk else None,
        )

    @staticmethod
    def _own_root(root_disk: str, image: GuestImage, run_dir: Path,
                  initrd: str) -> tuple[str, str, str]:
        """(root image, format, initrd) of a guest with its own kept root (``root_disk``).

        A distro image boots the initramfs its root holds now (what update-initramfs
        in an earlier boot wrote), read off the copy as its bootloader would.
        """
        path = Path(root_disk).resolve()
        prepare_root_disk(path, image.rootfs, image.rootfs_format)
        if image.root_initrd is not None:
            initrd = str(root_file(path, image.root_initrd, run_dir / "initrd.img"))
        return str(path), "raw", initrd

    def attach_ssh(self, guest: Guest, netdev: str, scale: float) -> None:
        """Give the guest its (lazily connecting) SSH session and pinned host key."""
        session = _ssh_session_for(guest.machine, self.ssh_key(), netdev,
                                      SSH_CONNECT_TIMEOUT * scale)
        guest._ssh = session
        guest.host_key = session.host_key_line()

    def _start_backends(self, spec: spec_mod.MachineSpec, run_dir: Path,
                        disk_files: dict[str, str], name: str = "guest") -> dict[str, Any]:
        """Start one in-process vhost-user-blk server per such disk, before QEMU."""
        wanted = [d for d in spec.disks
                  if d.bus == "vhost-user-blk" and d.external_socket is None]
        servers: dict[str, Any] = {}
        try:
            for disk in wanted:
                servers[disk.name] = start_backend(disk, disk_files[disk.name], run_dir,
                                                   spec.smp)
        except BaseException as exc:
            _stop_after_failure(servers, name, exc)
            raise
        return servers

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


def check_drivers(image: GuestImage, spec: spec_mod.MachineSpec) -> None:
    """Every device of the spec has a driver in the image's kernel (module or built in)."""
    if image.modules_dir is None:
        return
    have = available_modules(image.modules_dir)
    for device, needs in spec_mod.driver_needs(spec):
        for alternatives in needs:
            if not any(m.replace("-", "_") in have for m in alternatives):
                raise MissingDriver(image.kernel_version, device, alternatives,
                                    str(image.modules_dir))


def _stop_after_failure(backends: dict[str, Any], guest: str, exc: BaseException) -> None:
    """Stop the backends of a boot that failed; one that will not stop is noted on
    the boot's own error (the cause the user must see first)."""
    try:
        stop_backends(backends, f"guest {guest!r}")
    except BackendError as stuck:
        exc.add_note(str(stuck))


@contextlib.contextmanager
def closed_on_failure(guest: Guest) -> Iterator[None]:
    """Shut ``guest`` down if the block fails; the error names it (for its artifacts)."""
    try:
        yield
    except BaseException as exc:
        guest.close()
        if isinstance(exc, VirtioError):
            exc.failed_guest = guest
        raise


def _wait_ready(machine: Machine, spec: spec_mod.MachineSpec, timeout: float) -> float:
    """Wait for the shell; a missing root disk names the modules the spec left out.

    Why here: only the session knows both the bus and the initramfs it chose, so
    the console's generic diagnosis is made precise (e.g. "lacks virtio_blk").
    """
    try:
        return machine.console.wait_ready(timeout)
    except GuestError as exc:
        left_out = [m for m in spec_mod.ROOT_MODULES[spec.root_bus]
                    if m not in spec.root_modules]
        if "no root disk" not in str(exc) or not left_out:
            raise
        raise GuestError(
            f"root bus {spec.root_bus!r} needs the initramfs modules "
            f"{', '.join(spec_mod.ROOT_MODULES[spec.root_bus])}, but initramfs_modules="
            f"{list(spec.root_modules)!r} lacks {', '.join(left_out)}: {exc}"
        ) from None


@contextlib.contextmanager
def booted(spec: spec_mod.MachineSpec | None = None, settings: Settings | None = None
           ) -> Iterator[Guest]:
    """One-shot helper for scripts and benchmarks."""
    with VirtioSession(settings or Settings.from_values({})) as session:
        yield session.boot(spec)


__all__ = ["MissingDevices", "VirtioSession", "booted", "check_drivers", "check_honoured",
           "sweep_stale_runs"]


def _ssh_session_for(machine: Machine, key: ssh_mod.KeyPair, netdev: str, connect_timeout: float
                     ) -> ssh_mod.SshSession:
    """The SSH session of a guest that just announced readiness.

    The host key is read once, now: init prints it before the readiness line,
    and QEMU runs with ``-no-reboot``, so it cannot change while this machine
    lives and a later console line cannot replace it.
    """
    port = ssh_mod.parse_hostfwd_port(machine.hmp("info usernet"), 22, netdev)
    announced = ssh_mod.parse_host_key(_read_log(machine.console_log))
    return ssh_mod.SshSession(port, key, lambda: announced, connect_timeout=connect_timeout,
                              console_tail=machine.console.tail,
                              alive=machine.check_alive, qemu_pid=machine.pid)


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
