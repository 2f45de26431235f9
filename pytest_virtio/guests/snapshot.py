"""Snapshot templates: boot a machine shape once, then give each test a restored copy.

Why: under TCG a boot to the shell costs seconds and is the whole cost of most
tests.  Per process (xdist worker) and per machine shape, the first guest is
booted, stopped, its root disk switched to a new overlay (the old one now holds
the disk of that instant) and its full device and RAM state saved through QMP
``migrate`` to an ``exec:`` stream (QEMU 7.2 has no ``file:`` migration); then
it runs on for the test that asked.  Every later guest of the shape is a *new*
QEMU started with ``-incoming fd:N`` on the saved file, over a temporary
overlay (``snapshot=on``) of the template's overlay, which nobody writes again.

After a restore the guest is made as fresh as a boot (:mod:`.freshen`): the
wall clock is set from the host's, and the kernel's CRNG gets host entropy and
is reseeded at once (every restore of one template starts from the same RNG
state, so two guests would otherwise produce the same "random" bytes), by a
helper the template started before its save.  Console
commands are framed by a nonce the host draws per command, so nothing in the
restored memory is reused for framing; the SSH host key is the template's (the
guest's dropbear still holds it) and the SSH port is read back from the new
QEMU, whose host-side forward is a new kernel-chosen port.

Devices that cannot be in a template: in-process vhost-user-blk data disks
would need the backend to log dirty pages (VHOST_F_LOG_ALL / LOG_SHMFD) for
QEMU to allow migration at all.  Instead they are left out of the template and
hot-plugged into each restored guest: the backend then starts from a clean
connection (no ring state to carry over) and the save is a plain stop-and-copy
with no dirty tracking to get right; the cost is one PCI hotplug per test.
Shapes that still cannot be templated (a vhost-user root, a disk served by
another process, a disk image used in place, virtio-serial ports whose host
sockets a restore cannot reconnect, a NIC on passt) boot as before, said once per session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_virtio import ids
from pytest_virtio import spec as spec_mod
from pytest_virtio.errors import LaunchError
from pytest_virtio.guests import freshen, provision, reproduce
from pytest_virtio.guests.boot import Boot
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.launch import prepare_disk_file
from pytest_virtio.guests.nethost import RESTORE_REFUSAL
from pytest_virtio.qemu.machine import Machine

#: The root overlay a template keeps (and the one its first guest runs on).
ROOT_OVERLAY = "root.qcow2"

#: The template's state stream; the save is ``migrate exec:cat > STATE``.
STATE_FILE = "state.mig"
#: Bytes/s: QEMU's default migration limit (128 MiB/s) would make a save of a
#: few hundred MiB take seconds; a local file takes what the disk gives.
MAX_BANDWIDTH = 1 << 40
#: How long a save or a load may take (scaled by the accelerator's factor).
MIGRATE_TIMEOUT = 30.0
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Template:
    """One saved guest: state stream, root overlay and the launch it came from."""

    spec: spec_mod.MachineSpec
    directory: Path
    ctx: spec_mod.LaunchContext
    boot_uptime: float | None
    boot_seconds: float
    save_seconds: float

    @property
    def state(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def overlay(self) -> Path:
        return self.directory / ROOT_OVERLAY

    @property
    def console_log(self) -> Path:
        return Path(self.ctx.console_log)

    def disk_bytes(self) -> int:
        """What the template keeps on disk: state stream plus root overlay (allocated)."""
        return sum(p.stat().st_blocks * 512 for p in (self.state, self.overlay))


def unsupported(spec: spec_mod.MachineSpec) -> str | None:
    """Why ``spec`` cannot be restored from a template (None: it can)."""
    if spec.root_disk is not None:
        return (f"root_disk={spec.root_disk!r} is this guest's own root, kept across boots: "
                "a template would restore an older state of it")
    if spec.root_bus == "vhost-user-blk":
        return "a vhost-user-blk root disk cannot migrate (no VHOST_F_LOG_ALL) nor hotplug"
    for disk in spec.disks:
        if disk.external_socket is not None:
            return (f"disk {disk.name!r} is served by another process (external_socket): "
                    "its vhost-user back-end would have to support migration")
        if disk.image is not None:
            return (f"disk {disk.name!r} uses the image {disk.image} in place: its contents "
                    "may change between tests, a saved guest would not see that")
    for dev in spec.devices:
        if isinstance(dev, spec_mod.SerialPorts):
            return "virtio-serial ports: their host sockets cannot follow a restore"
    for nic in spec.nics:
        if nic.backend in RESTORE_REFUSAL:
            return f"nic {nic.name!r} has backend={nic.backend!r}: {RESTORE_REFUSAL[nic.backend]}"
    return None


def template_shape(spec: spec_mod.MachineSpec) -> tuple[spec_mod.MachineSpec,
                                                         tuple[spec_mod.Disk, ...]]:
    """The shape that is saved, and the in-process vhost-user-blk disks plugged after."""
    hotplugged = tuple(d for d in spec.disks if d.bus == "vhost-user-blk")
    kept = tuple(d for d in spec.disks if d.bus != "vhost-user-blk")
    return spec.replace(disks=kept), hotplugged


class Templates:
    """Strategy: a guest restored from its shape's template (the templates of one
    VirtioSession, one process, by machine shape); None for a shape that boots."""

    def __init__(self, host: provision.Host, boot: Boot, progress: Progress) -> None:
        self.host = host
        self.boot = boot
        self.progress = progress
        self._lock = threading.Lock()
        self._templates: dict[spec_mod.MachineSpec, Template] = {}
        self._failed: dict[spec_mod.MachineSpec, str] = {}
        self._said: set[str] = set()

    @property
    def templates(self) -> list[Template]:
        return list(self._templates.values())

    def provide(self, spec: spec_mod.MachineSpec, name: str) -> Guest | None:
        """A restored guest for ``spec``, or None when it must boot (said once).

        The first guest of a shape is booted, saved as the template and then
        handed to the test itself (on an overlay of its own), so a shape used
        once costs a boot plus a save, not a boot, a save and a restore.
        """
        self.boot.check_can_launch(spec)
        shape, hotplugged = template_shape(spec)
        reason = unsupported(spec) or self._failed.get(shape)
        if reason is not None:
            self._say_once(reason)
            return None
        with self._lock:
            template = self._templates.get(shape)
            made = self._make(shape, name) if template is None else None
        guest = made if template is None else self.restore(template, name, bool(hotplugged))
        assert guest is not None
        try:
            for disk in hotplugged:
                guest.hotplug(disk)
        except BaseException:
            guest.close()
            raise
        guest.spec = spec
        return guest

    def _say_once(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            self.progress(f"snapshot: booting instead of restoring: {reason}")

    # -- save ------------------------------------------------------------------
    def _make(self, shape: spec_mod.MachineSpec, name: str) -> Guest:
        """Boot ``shape``, save it as its template, and let the booted guest run on."""
        s = self.host
        directory = s.new_run_dir("t")
        start = time.monotonic()
        booted = self.boot.fresh(shape, name, own_root=directory / ROOT_OVERLAY)
        boot_seconds = time.monotonic() - start
        # Start the freshening helper and serve it one request before the
        # save, so its pages are in the saved RAM.  A rootfs that cannot run
        # it (no perl) is a shape that cannot be restored.
        res = booted.run(freshen.start_command() + " && " + freshen.request_command(
            freshen.request_line(last=False)))
        if not res.ok:
            self._failed[shape] = (f"the guest cannot be freshened after a restore (exit "
                                   f"{res.rc}: {res.output.strip()[-200:]}); it needs perl "
                                   "for settimeofday and RNDRESEEDCRNG")
            self._say_once(self._failed[shape])
            booted.run(freshen.stop_command())
            return booted
        try:
            save_start = time.monotonic()
            save(booted, directory, MIGRATE_TIMEOUT * s.timeout_scale)
            save_seconds = time.monotonic() - save_start
        except LaunchError as exc:
            if booted.machine.exitcode() is not None:
                booted.close()
                raise
            self._failed[shape] = f"this machine shape cannot be saved: {exc}"
            self._say_once(self._failed[shape])
            with contextlib.suppress(LaunchError):
                booted.machine.qmp("cont")
            booted.run(freshen.stop_command())
            return booted
        except BaseException:
            booted.close()
            raise
        with provision.closed_on_failure(booted):
            # Its clock stood still while it was saved; and the helper goes.
            booted.check(freshen.request_command(freshen.request_line()))
        assert booted.ctx is not None
        shutil.copyfile(booted.ctx.console_log, directory / "console.log")
        ctx = dataclasses.replace(booted.ctx, console_log=str(directory / "console.log"))
        template = Template(spec=shape, directory=directory, ctx=ctx,
                            boot_uptime=booted.boot_uptime, boot_seconds=boot_seconds,
                            save_seconds=save_seconds)
        self._templates[shape] = template
        mib = template.disk_bytes() / (1 << 20)
        self.progress(f"snapshot: template of a {shape.memory_mib} MiB guest saved in "
                      f"{save_seconds:.2f}s ({mib:.0f} MiB on disk)")
        return booted

    # -- restore -----------------------------------------------------------------
    def restore(self, template: Template, name: str, hotplug_vhost: bool = True) -> Guest:
        """A new QEMU loaded from ``template``, over its own overlay, freshened."""
        s = self.host
        scale = s.timeout_scale
        run_dir = s.new_run_dir()
        disk_files = {d.name: prepare_disk_file(d, run_dir) for d in template.spec.disks}
        console_log = run_dir / "console.log"
        # The boot's console history (kernel, init, the SSH host key line)
        # belongs to this guest too: artifacts show it, SSH pins the key from it.
        shutil.copyfile(template.console_log, console_log)
        state = os.open(template.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # snapshot=on over the template's overlay: QEMU writes a temporary
            # overlay of its own, the template's stays as saved.
            ctx = dataclasses.replace(
                template.ctx, root_image=str(template.overlay), root_snapshot=True,
                qmp_socket=str(run_dir / "qmp.sock"), console_socket=str(run_dir / "con.sock"),
                console_log=str(console_log), disk_files=disk_files, name=name,
                shared_memory=hotplug_vhost,
            )
            # fd:N, not exec:cat: QEMU reads the file itself instead of waking up
            # for every 64 KiB a pipe holds (measured 2.5-4 s for 77 MiB that way
            # on a loaded host).
            argv = [*spec_mod.to_argv(template.spec, ctx), "-incoming", f"fd:{state}"]
            machine = Machine(argv, run_dir, qmp_socket=ctx.qmp_socket,
                              console_socket=ctx.console_socket, console_log=console_log,
                              pass_fds=(state,))
            machine.reproducer = _boot_reproducer(s, template, run_dir, ctx)
            launch = provision.Launch(spec=template.spec, name=name, machine=machine, ctx=ctx,
                                      run_dir=run_dir, accel=template.ctx.accel, scale=scale,
                                      boot_uptime=template.boot_uptime)
            return provision.start(s, launch, _adopt_restored,
                                   incoming_timeout=MIGRATE_TIMEOUT * scale)
        finally:
            os.close(state)

    def close(self) -> None:
        self._templates.clear()


def _adopt_restored(guest: Guest) -> None:
    """A restored guest is ready once freshened: its command shell was set up before
    the save (no prelude to send)."""
    guest.machine.console.adopt_restored()
    guest.check(freshen.request_command(freshen.request_line()), timeout=guest.default_timeout())


def _boot_reproducer(host: provision.Host, template: Template, run_dir: Path,
                     ctx: spec_mod.LaunchContext) -> str:
    """``reproduce.sh`` of a restored guest: a *boot* of its shape (the saved state
    is gone after the session, and a restore is meant to equal a boot)."""
    image = host.image_for(template.spec)
    boot_ctx = dataclasses.replace(ctx, root_image=str(image.rootfs),
                                   root_format=image.rootfs_format, root_snapshot=True,
                                   shared_memory=True)
    text = reproduce.script(spec_mod.to_argv(template.spec, boot_ctx), run_dir,
                            template.spec, boot_ctx)
    head, _, rest = text.partition("\n")
    return (f"{head}\n# This guest was restored from a snapshot template; this boots the "
            "same machine shape\n# (hot-plugged vhost-user-blk disks are not in it).\n"
            f"{rest}")


def save(guest: Guest, directory: Path, timeout: float) -> None:
    """Write ``guest``'s whole state to ``directory/STATE_FILE`` and let it run on.

    Stopped first, then its root disk is switched to a new overlay in its own
    run directory (``blockdev-snapshot-sync``), so the template's overlay keeps
    the disk as it was at the instant of the saved RAM; then the state is
    streamed with QMP ``migrate`` and the guest continues (``cont``).
    """
    machine = guest.machine
    machine.qmp("stop")
    machine.qmp("blockdev-snapshot-sync", device=ids.ROOT_DRIVE, format="qcow2",
                **{"snapshot-file": str(guest.run_dir / ROOT_OVERLAY)})
    machine.qmp("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    state = directory / STATE_FILE
    machine.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
    machine.wait_migration(timeout)
    machine.qmp("cont")


__all__ = ["Template", "Templates", "template_shape", "unsupported"]
