"""What a guest launch prepares on the host, used by boot and hotplug alike.

Disk files (sparse data disks, user images checked before QEMU sees them,
qcow2 overlays), the in-process vhost-user-blk backends and their sockets, the
virtio-serial sockets and their host ends.  Why one module: boot
(``session._launch``) and hotplug (``Guest.hotplug``) both add a disk to a
guest, and they used to do it in two places (hotplug reaching back into the
session module, the one import cycle); :func:`with_disk` is now that step.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_virtio import files, ids
from pytest_virtio import spec as spec_mod
from pytest_virtio.channels import serial as serial_mod
from pytest_virtio.errors import LaunchError
from pytest_virtio.files import check_readable_file
from pytest_virtio.guests import writelogs
from pytest_virtio.tools import require_tool

if TYPE_CHECKING:
    from pytest_virtio.vhost_user.server import VhostUserBlkServer

__all__ = ["backend_socket", "check_cdrom_isos", "check_image_file", "connect_serial_ports",
           "create_overlay", "external_sockets", "prepare_disk_file", "prepare_root_disk",
           "root_file", "serial_sockets", "start_backend", "with_disk"]


def create_overlay(path: Path, backing: Path, backing_format: str) -> None:
    """A qcow2 file over ``backing`` (which it never writes): ``qemu-img create -b``."""
    qemu_img = require_tool("qemu-img", "qemu-utils")
    proc = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
         str(path)], capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise LaunchError(f"qemu-img could not create the overlay {path} over {backing}: "
                          f"{proc.stderr.strip()}")


def prepare_root_disk(path: Path, rootfs: Path, rootfs_format: str) -> None:
    """Make ``path`` a writable copy of the image's root, unless it is one already.

    Raw, so the host can read files off it between boots (``root_file``); sparse,
    so a 1.5 GiB root costs only the blocks in use. Made under a temporary name:
    an interrupted copy never passes for a root.
    """
    if path.exists():
        check_image_file("vm(root_disk=...)", path, "root disk")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    if rootfs_format == "raw":
        try:
            files.sparse_copy(rootfs, tmp)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LaunchError(f"cannot copy the root {rootfs} to {path}: {exc}") from None
    else:
        qemu_img = require_tool("qemu-img", "qemu-utils")
        argv = [qemu_img, "convert", "-f", rootfs_format, "-O", "raw", str(rootfs), str(tmp)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise LaunchError(f"cannot copy the root {rootfs} to {path}: {proc.stderr.strip()}")
    tmp.rename(path)


def root_file(root: Path, guest_path: str, dest: Path) -> Path:
    """Copy ``guest_path`` off an ext4 root image (not running) with debugfs(8).

    Why debugfs: it reads the filesystem as a file, no mount, loop device or root.
    """
    debugfs = require_tool("debugfs", "e2fsprogs")
    dest.unlink(missing_ok=True)
    request = f"dump {_debugfs_quote(guest_path)} {_debugfs_quote(str(dest))}"
    proc = subprocess.run([debugfs, "-R", request, str(root)],
                          capture_output=True, text=True, check=False)
    if not dest.is_file() or dest.stat().st_size == 0:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LaunchError(f"cannot read {guest_path} from the root disk {root}: {said}")
    return dest


def _debugfs_quote(arg: str) -> str:
    """One argument of a debugfs request: it splits on blanks, so quoted (a quote doubled)."""
    return '"' + arg.replace('"', '""') + '"'


def prepare_disk_file(disk: spec_mod.Disk, run_dir: Path) -> str:
    """A sparse file for a sized data disk; a user image is used in place."""
    if disk.image:
        _check_disk_image(disk.name, Path(disk.image))
        return str(disk.image)
    path = run_dir / f"disk-{disk.name}.img"
    with path.open("wb") as f:
        f.truncate(disk.size_bytes)
    return str(path)


def _check_disk_image(name: str, image: Path) -> None:
    """A missing or unreadable image is the test's mistake: say so before QEMU starts."""
    check_image_file(f"disk {name!r}: image", image, "raw or qcow2 image")


def check_image_file(what: str, image: Path, kind: str) -> None:
    """``image`` exists and is readable, else a ConfigError naming ``what`` and the fix.

    Why before QEMU: QEMU's own refusal comes only at start-up, buried under
    its whole command line (seen for a mistyped CD-ROM ISO path).
    """
    check_readable_file(image, what, kind)


def check_cdrom_isos(spec: spec_mod.MachineSpec) -> None:
    """Every CD-ROM's ISO exists and is readable (checked before launch, like disk images)."""
    for dev in spec.devices:
        if isinstance(dev, spec_mod.CdRom):
            check_image_file(f"cdrom {dev.name!r}: iso", Path(dev.iso), "ISO image")


def serial_sockets(spec: spec_mod.MachineSpec, run_dir: Path) -> dict[str, str]:
    """QEMU's socket of every virtio-serial port, by port name (numbered: names are long)."""
    names = [p for d in spec.devices if isinstance(d, spec_mod.SerialPorts) for p in d.names]
    return {name: serial_mod.socket_path(run_dir, i) for i, name in enumerate(names)}


def connect_serial_ports(ctx: spec_mod.LaunchContext, timeout: float
                         ) -> dict[str, serial_mod.SerialPort]:
    """Connect the host end of every port right after launch (see :mod:`.serial` why)."""
    ports: dict[str, serial_mod.SerialPort] = {}
    try:
        for name, path in ctx.serial_sockets.items():
            ports[name] = serial_mod.SerialPort.connect(name, path, timeout)
    except BaseException:
        for port in ports.values():
            port.close()
        raise
    return ports


def external_sockets(spec: spec_mod.MachineSpec) -> dict[str, str]:
    """vhost-user-blk disks another process serves (``Disk.external_socket``), by name."""
    return {d.name: d.external_socket for d in spec.disks if d.external_socket is not None}


def backend_socket(run_dir: Path, name: str) -> str:
    """Where the vhost-user-blk server of disk ``name`` listens (short: sun_path)."""
    return str(run_dir / ids.vhost_socket_name(name))


def start_backend(disk: spec_mod.Disk, path: str, run_dir: Path, smp: int
                  ) -> VhostUserBlkServer:
    """Start the in-process vhost-user-blk server for ``disk`` (before QEMU connects);
    with ``write_log=True`` its storage is logged (:mod:`.writelogs`)."""
    # Start-up cost: the backend package takes 0.2-0.4 s to import (measured with
    # -X importtime on this 2-core host), paid only by sessions that serve a disk.
    from pytest_virtio.vhost_user import FileStorage, Storage, VhostUserBlkServer

    storage: Storage = FileStorage(path, readonly=disk.readonly)
    try:
        if disk.write_log:
            storage = writelogs.logged_storage(disk, storage, path, run_dir)
        server = VhostUserBlkServer(
            backend_socket(run_dir, disk.name), storage,
            num_queues=disk.num_queues or smp, readonly=disk.readonly,
            serial=disk.serial or disk.name, name=disk.name,
            queue_size_max=disk.queue_size or 1024,  # QEMU picks; a set size is a cap
            block_size=disk.logical_block_size or 512,
        )
        server.start()
    except BaseException:
        storage.close()
        raise
    return server


def with_disk(ctx: spec_mod.LaunchContext, disk: spec_mod.Disk, run_dir: Path
              ) -> spec_mod.LaunchContext:
    """``ctx`` with ``disk``'s file (made now) and, for vhost-user-blk, its socket."""
    ctx = dataclasses.replace(ctx, disk_files={**ctx.disk_files,
                                               disk.name: prepare_disk_file(disk, run_dir)})
    if disk.bus == "vhost-user-blk":
        ctx = dataclasses.replace(ctx, vhost_sockets={
            **ctx.vhost_sockets, disk.name: backend_socket(run_dir, disk.name)})
    return ctx
