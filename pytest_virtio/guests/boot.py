"""The boot strategy: launch QEMU on the spec's image and wait for its shell.

What a boot prepares on the host before :func:`.provision.start` builds the
guest: the image's drivers and the CD-ROM ISOs checked, disk files and the
root overlay, the in-process vhost-user-blk backends, the launch context
(kernel command line, sockets, fw_cfg blobs), the argv and its ``reproduce.sh``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_virtio import spec as spec_mod
from pytest_virtio.channels import ssh as ssh_mod
from pytest_virtio.errors import GuestError, LaunchError, MissingDriver
from pytest_virtio.guests import provision, reproduce
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.kernel_config import missing_driver_verdict
from pytest_virtio.guests.launch import (
    backend_socket,
    check_cdrom_isos,
    create_overlay,
    external_sockets,
    prepare_disk_file,
    prepare_root_disk,
    root_file,
    serial_sockets,
    start_backend,
)
from pytest_virtio.guests.nethost import NicHost, net_links, start_nets, stop_nets
from pytest_virtio.images import GuestImage, initramfs_for
from pytest_virtio.images.initramfs import available_modules
from pytest_virtio.qemu import capabilities
from pytest_virtio.qemu.machine import Machine

if TYPE_CHECKING:
    from pytest_virtio.vhost_user.server import VhostUserBlkServer

__all__ = ["BASE_APPEND", "BOOT_TIMEOUT", "Boot", "MissingDevices", "check_drivers",
           "check_memory_available", "mem_available_mib", "start_backends"]

#: Kernel command line shared by every guest: quiet console, fast boot.
#: ``noreplace-smp``: a one-CPU kernel otherwise rewrites every SMP lock prefix
#: in its text at boot, each write a code-cache flush under TCG (measured 0.4 s of
#: a 2.8 s kernel init; see docs/boot-time.md).
BASE_APPEND = (
    "console=ttyS0,115200 quiet loglevel=1 panic=-1 pv.root=pvroot "
    "8250.nr_uarts=2 no_timer_check tsc=reliable i8042.noaux i8042.nokbd i8042.nopnp "
    "mitigations=off random.trust_cpu=on nokaslr cryptomgr.notests noreplace-smp"
)
BOOT_TIMEOUT = 15.0


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


class Boot:
    """Strategy: a freshly booted guest (always gives one)."""

    def __init__(self, host: provision.Host) -> None:
        self.host = host

    def provide(self, spec: spec_mod.MachineSpec, name: str) -> Guest:
        return self.fresh(spec, name)

    def check_can_launch(self, spec: spec_mod.MachineSpec) -> None:
        """QEMU has the spec's device models and the host the RAM it asks for."""
        missing = capabilities.missing_devices(spec, self.host.qemu)
        if missing:
            raise MissingDevices(self.host.qemu, missing)
        check_memory_available(spec)

    def fresh(self, spec: spec_mod.MachineSpec, name: str = "guest", *,
              own_root: Path | None = None) -> Guest:
        """Boot a guest for ``spec`` and wait until its shell answers."""
        self.check_can_launch(spec)
        accel = self.host.accel().accel
        scale = self.host.timeout_scale
        budget = self.host.image_for(spec).boot_timeout or BOOT_TIMEOUT
        return self.launch(spec, name, accel=accel, boot_timeout=budget * scale,
                           scale=scale, own_root=own_root)

    def launch(self, spec: spec_mod.MachineSpec, name: str, *, accel: str,
               boot_timeout: float, scale: float, own_root: Path | None = None,
               register: bool = True) -> Guest:
        """Boot ``spec``; ``own_root`` is a qcow2 overlay file made for its root disk (a
        snapshot template keeps it) instead of QEMU's temporary one."""
        image = self.host.image_for(spec)
        check_drivers(image, spec)
        check_cdrom_isos(spec)
        run_dir = self.host.new_run_dir()
        if own_root is not None:
            create_overlay(own_root, image.rootfs, image.rootfs_format)
        disk_files = {d.name: prepare_disk_file(d, run_dir) for d in spec.disks}
        ssh = any(n.hostfwd_ssh for n in spec.nics)
        backends = start_backends(spec, run_dir, disk_files, name)
        nets: dict[str, NicHost] = {}
        try:
            nets = start_nets(spec, run_dir)
            ctx = self._context(spec, image, name, accel=accel, run_dir=run_dir,
                                disk_files=disk_files, backends=backends,
                                own_root=own_root, ssh=ssh)
            ctx = net_links(ctx, nets)
            argv = spec_mod.to_argv(spec, ctx)
            machine = Machine(argv, run_dir, qmp_socket=ctx.qmp_socket,
                              console_socket=ctx.console_socket,
                              console_log=Path(ctx.console_log),
                              pass_fds=tuple(ctx.net_fds.values()))
            machine.reproducer = reproduce.script(argv, run_dir, spec, ctx)
        except BaseException as exc:
            stop_nets(nets)
            provision.stop_after_failure(backends, name, exc)
            raise
        launch = provision.Launch(spec=spec, name=name, machine=machine, ctx=ctx,
                                  run_dir=run_dir, accel=accel, scale=scale, backends=backends,
                                  nets=nets)
        return provision.start(self.host, launch,
                               functools.partial(_bring_up, timeout=boot_timeout),
                               register=register)

    def _context(self, spec: spec_mod.MachineSpec, image: GuestImage, name: str, *,
                 accel: str, run_dir: Path, disk_files: dict[str, str],
                 backends: dict[str, VhostUserBlkServer], own_root: Path | None, ssh: bool
                 ) -> spec_mod.LaunchContext:
        """Everything the argv needs from the host: image paths, the kernel command
        line, sockets, disk files, fw_cfg blobs."""
        root_image, root_format = str(image.rootfs), image.rootfs_format
        initrd = str(initramfs_for(image, spec.root_modules))
        if own_root is not None:
            root_image, root_format = str(own_root), "qcow2"
        if spec.root_disk is not None:
            root_image, root_format, initrd = _own_root(spec.root_disk, image, run_dir, initrd)
        args = ["pv.ssh=1"] if ssh else []
        if image.modules_disk is not None:
            args.append(f"pv.modules={image.kernel_version}")
        args += image.append
        args += spec_mod.command_channel_append(spec)
        fw_cfg = ({ssh_mod.AUTHORIZED_KEYS_FW_CFG: str(self.host.ssh_key().public_path)}
                  if ssh else {})
        return spec_mod.LaunchContext(
            qemu_binary=self.host.qemu, accel=accel, kernel=str(image.kernel),
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


def _bring_up(guest: Guest, timeout: float) -> None:
    """A booted guest is ready once its shell answers and its devices have drivers."""
    spec: spec_mod.MachineSpec = guest.spec
    guest.boot_uptime = _wait_ready(guest.machine, spec, timeout)
    if spec.disks or spec.devices:
        guest.load_drivers()


def start_backends(spec: spec_mod.MachineSpec, run_dir: Path, disk_files: dict[str, str],
                   name: str = "guest") -> dict[str, VhostUserBlkServer]:
    """Start one in-process vhost-user-blk server per such disk, before QEMU."""
    wanted = [d for d in spec.disks
              if d.bus == "vhost-user-blk" and d.external_socket is None]
    servers: dict[str, VhostUserBlkServer] = {}
    try:
        for disk in wanted:
            servers[disk.name] = start_backend(disk, disk_files[disk.name], run_dir, spec.smp)
    except BaseException as exc:
        provision.stop_after_failure(servers, name, exc)
        raise
    return servers


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


def check_drivers(image: GuestImage, spec: spec_mod.MachineSpec) -> None:
    """Every device of the spec has a driver in the image's kernel (module or built in);
    a missing one is explained by the kernel's config when the host has it."""
    if image.modules_dir is None:
        return
    have = available_modules(image.modules_dir)
    for device, needs in spec_mod.driver_needs(spec):
        for alternatives in needs:
            if not any(m.replace("-", "_") in have for m in alternatives):
                raise MissingDriver(image.kernel_version, device, alternatives,
                                    str(image.modules_dir),
                                    missing_driver_verdict(image, alternatives))


def _wait_ready(machine: Machine, spec: spec_mod.MachineSpec, timeout: float) -> float:
    """Wait for the shell; a missing root disk names the modules the spec left out.

    Why here: only the boot knows both the bus and the initramfs it chose, so
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
