"""Guest: what a test holds — run commands, inspect drivers, run workloads.

One way to run a command: ``guest.run(cmd) -> Result`` (``guest.check``
raises with the output).  Everything else here — drivers, modules, fio —
is built on it, so the same code works over the console or SSH.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_virtio import ids
from pytest_virtio.channels import inventory
from pytest_virtio.channels.agent import GuestAgent, agent_start_script
from pytest_virtio.channels.inventory import Module, PciDevice, VirtioDevice
from pytest_virtio.channels.runners import VIAS, Result, Runner
from pytest_virtio.channels.serial import SerialPort, guest_link_script
from pytest_virtio.errors import ConfigError, GuestError, GuestTimeout, QmpError, VirtioError
from pytest_virtio.guests import runstate
from pytest_virtio.guests.teardown import stop_backends
from pytest_virtio.qemu.machine import Machine

if TYPE_CHECKING:
    from pytest_virtio.channels.balloon import BalloonStats
    from pytest_virtio.spec import Disk, LaunchContext
    from pytest_virtio.workloads.dd import DdResult
    from pytest_virtio.workloads.fio import FioJob, FioResult


#: QEMU's refusals to free a backend its (unplugged, not yet finalized) device holds.
_STILL_HELD = re.compile(r"is in use|is busy")


#: What the guest prints on its kernel console when its power-off command failed.
POWEROFF_FAILED = "PYTEST-VIRTIO-POWEROFF-FAILED"

#: Picks the way to power off now, and fails now (rc 127, its reason on stderr)
#: when there is none: systemd's orderly ``systemctl poweroff`` when it is PID 1,
#: else the poweroff syscall after a sync, through busybox's applet (our init
#: runs under busybox; the default image has no poweroff program) or a poweroff
#: program.  Then answers (the framed reply must leave before systemd stops the
#: console service: seen as exit 143 'Terminated' when it did not) and powers
#: off a second later, its output and a failure (:data:`POWEROFF_FAILED`) on the
#: kernel's console, which the host watches while it waits.  Killed by a signal,
#: the command failed nothing: the shutdown it started stops its service.
POWEROFF_SCRIPT = f"""\
if [ -d /run/systemd/system ]; then off="systemctl poweroff"
elif /bin/busybox --list 2>/dev/null | grep -qx poweroff; then off="/bin/busybox poweroff -f"
elif command -v poweroff >/dev/null; then off="poweroff -f"
else
  echo "cannot power off: systemd is not running (no /run/systemd/system), /bin/busybox \
has no poweroff applet, no poweroff program on PATH ($PATH)" >&2
  exit 127
fi
command -v "${{off%% *}}" >/dev/null || {{ echo "cannot power off: ${{off%% *}} not found \
on PATH ($PATH)" >&2; exit 127; }}
(sleep 1; sync; $off || {{ r=$?; [ $r -gt 128 ] || echo "{POWEROFF_FAILED}: '$off' exited $r"; }}
) >/dev/console 2>&1 &
"""

#: While it waits for QEMU to exit, poweroff() looks at the console this often.
_POWEROFF_POLL = 0.5

#: ISO 9660 §8.4: the primary volume descriptor is the 2048-byte sector 16.
_ISO_SECTOR = 2048
_ISO_PVD_OFFSET = 16 * _ISO_SECTOR

_CDROM_FIND = r"""
for try in $(seq 1 {tries}); do
  for d in /dev/sr*; do
    [ -b "$d" ] || continue
    sum=$(dd if="$d" bs=2048 skip=16 count=1 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$sum" = {digest} ] && echo "$d" && exit 0
  done
  sleep 0.2
done
exit 1
"""


@dataclass
class Guest:
    """A running guest; built by :func:`pytest_virtio.guests.session.VirtioSession.boot`."""

    machine: Machine
    name: str
    accel: str
    timeout_scale: float
    run_dir: Path
    spec: Any = None
    backends: dict[str, Any] = field(default_factory=dict)
    disk_serials: dict[str, str] = field(default_factory=dict)
    boot_uptime: float | None = None
    host_key: str | None = None
    _ssh: Any = field(default=None, repr=False)
    _agent: GuestAgent | None = field(default=None, repr=False)
    #: The launch's paths (sockets, disk files): hotplug needs them for QMP arguments.
    ctx: LaunchContext | None = None
    #: Host ends of the virtio-serial ports, by port name (connected at launch).
    serial_ports: dict[str, SerialPort] = field(default_factory=dict)
    #: Disks added by :meth:`hotplug` and not yet unplugged, by name.
    hot_disks: dict[str, Disk] = field(default_factory=dict)

    # -- commands ------------------------------------------------------------
    def default_timeout(self) -> float:
        return 30.0 * self.timeout_scale

    def run(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        """Run ``cmd`` through ``sh`` in the guest; never raises on non-zero exit.

        A failure of an in-process disk backend (a broken queue, a bug in its
        thread) ends the wait at once with its BackendError, because the
        command could only time out.  On a timeout each backend's queue state
        is written next to the console log (see :meth:`dump_backend_state`).
        A paused guest (:meth:`pause`) is a GuestError at once, for the same reason.
        """
        self.raise_backend_errors()
        runstate.check_running(self.machine, self.name, "a command")
        t = timeout if timeout is not None else self.default_timeout()
        runner = self._runner(via)
        watch = self.raise_backend_errors if self.backends else None
        try:
            return runner.run(cmd, t, watch)
        except GuestTimeout as exc:
            for path in self.dump_backend_state():
                exc.add_note(f"in-process disk state at the timeout: {path.name} "
                             "(with this guest's artifacts)")
            raise

    def check(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        """Run ``cmd``; raise CommandFailed (with output and console tail) unless exit 0."""
        return self.run(cmd, timeout, via).check(self.console_tail())

    def console_tail(self, lines: int = 40) -> str:
        return self.machine.console.tail(lines) if self.machine.state.value == "running" else ""

    def _runner(self, via: str) -> Runner:
        if via == "console":
            return self.machine.console
        if via == "ssh":
            session: Runner = self.ssh_session()
            return session
        if via == "agent":
            return self.agent
        raise ConfigError(f"guest.run(via={via!r}): choose one of {', '.join(VIAS)}")

    @property
    def agent(self) -> GuestAgent:
        """The guest agent client (GuestError if the vm has no ``devices=["agent"]``)."""
        if self._agent is None:
            raise GuestError("this guest has no guest agent: add devices=['agent'] to the vm "
                             "(the image needs qemu-guest-agent)")
        return self._agent

    def ssh_session(self) -> Any:
        """The guest's :class:`~pytest_virtio.channels.ssh.SshSession`."""
        if self._ssh is None:
            raise GuestError("this guest has no SSH: give it a NIC (nics=['virtio-net'])")
        return self._ssh

    @property
    def ssh(self) -> Any:
        """A connected ``paramiko.SSHClient`` as root; reconnects if the link dropped."""
        return self.ssh_session().client

    def reconnect_ssh(self) -> Any:
        """Drop the SSH connection and connect afresh (e.g. after restarting dropbear)."""
        return self.ssh_session().reconnect()

    def put(self, local: str | Path, remote: str) -> None:
        """Copy a host file into the guest (SFTP over the guest's SSH)."""
        self.ssh_session().put(local, remote)

    def get(self, remote: str, local: str | Path) -> None:
        """Copy a guest file to the host (SFTP over the guest's SSH)."""
        self.ssh_session().get(remote, local)

    def raise_backend_errors(self) -> None:
        """Re-raise in the test an exception a vhost-user backend thread hit."""
        for backend in self.backends.values():
            backend.check()

    def dump_backend_state(self) -> list[Path]:
        """Write ``vhost-state-<disk>.json`` (queues, indices, kicks, calls, stats) per
        in-process disk into the run directory, which failure artifacts copy."""
        paths = []
        for name, backend in self.backends.items():
            path = self.run_dir / f"vhost-state-{name}.json"
            with contextlib.suppress(OSError):
                path.write_text(json.dumps(backend.queue_state(), indent=1, default=str))
                paths.append(path)
        return paths

    # -- drivers and modules -------------------------------------------------
    def virtio_devices(self) -> list[VirtioDevice]:
        return inventory.parse_virtio_devices(self.check(inventory.VIRTIO_SCRIPT).stdout)

    def drivers(self) -> dict[str, list[VirtioDevice]]:
        """Bound virtio drivers (``/sys/bus/virtio/drivers``) → the devices they drive."""
        bound: dict[str, list[VirtioDevice]] = {}
        for dev in self.virtio_devices():
            if dev.driver:
                bound.setdefault(dev.driver, []).append(dev)
        return bound

    def pci_devices(self) -> list[PciDevice]:
        return inventory.parse_pci_devices(self.check(inventory.PCI_SCRIPT).stdout)

    def lsmod(self) -> dict[str, Module]:
        """Loaded modules (``/proc/modules``) plus built-ins (``modules.builtin``)."""
        return inventory.parse_modules(self.check(inventory.MODULES_SCRIPT).stdout)

    def modprobe(self, name: str) -> Result:
        return self.check(f"modprobe {shlex.quote(name)}")

    def bound_drivers(self) -> set[str]:
        """Every driver bound to some device on any bus (virtio, PCI)."""
        names = {d for d in self.drivers()}
        names |= {p.driver for p in self.pci_devices() if p.driver}
        return names

    # -- workloads -----------------------------------------------------------
    def fio(self, device: str | FioJob | None = None, *, jobfile: str | None = None,
            timeout: float | None = None, **job: Any) -> FioResult:
        """Run fio in the guest and parse its JSON; WorkloadError carries its stderr.

        ``device`` is the guest path with FioJob options in ``job``, or a whole FioJob."""
        from pytest_virtio.workloads import fio as fio_mod

        runtime = fio_mod.FioJob.UNTIMED_SECONDS
        if jobfile is not None:
            cmd = fio_mod.fio_jobfile_shell(jobfile)
        else:
            if device is None:
                raise ConfigError("guest.fio(): give device= (e.g. '/dev/vdb') or jobfile=")
            if isinstance(device, fio_mod.FioJob) and job:
                raise ConfigError("guest.fio(): give a FioJob or FioJob options, not both")
            fio_job = (device if isinstance(device, fio_mod.FioJob)
                       else fio_mod.FioJob(filename=device, **job))
            cmd, runtime = fio_mod.fio_shell(fio_job), fio_job.runtime_seconds
        t = timeout if timeout is not None else self.default_timeout() + runtime * 3
        res = self.run(cmd, timeout=t)
        return fio_mod.check_fio_run(res.rc, res.stdout, res.stderr)

    def dd(self, source: str, dest: str, *, bs: str | int = "1M", count: int | None = None,
           iflag: str | None = None, oflag: str | None = None, conv: str | None = None,
           timeout: float | None = None) -> DdResult:
        """Run coreutils ``dd`` in the guest; WorkloadError carries dd's stderr.

        The console merges stderr into stdout, so the summary is parsed from both;
        the rootfs has GNU dd (busybox's prints no rate and would fail to parse).
        """
        from pytest_virtio.workloads import dd as dd_mod

        cmd = dd_mod.dd_shell(source, dest, bs=bs, count=count, iflag=iflag, oflag=oflag,
                              conv=conv)
        res = self.run(f"{cmd} 2>&1", timeout=timeout)
        return dd_mod.check_dd_run(res.rc, res.stdout + (res.stderr or ""))

    def block_devices(self) -> dict[str, str]:
        """Guest block devices → their serial number ("" if none).

        No udev runs in the guest, so /dev/disk/by-id is absent: the serial is
        read from sysfs (virtio-blk ``serial``, NVMe ``device/serial``, SCSI
        and ATA VPD page 0x80 after its 4-byte header).
        """
        return inventory.parse_block_devices(self.check(inventory.BLOCK_SCRIPT).stdout)

    def disk_path(self, name: str) -> str:
        """The guest device node of data disk ``name`` (matched by its serial)."""
        serial = self.disk_serials.get(name, name)
        deadline = time.monotonic() + 10 * self.timeout_scale
        loaded = False
        while True:
            for dev, ser in self.block_devices().items():
                if ser == serial:
                    return f"/dev/{dev}"
            if time.monotonic() > deadline:
                raise GuestError(f"no guest block device has serial {serial!r} (disk {name!r})",
                                 self.console_tail())
            if not loaded:
                self._load_disk_driver(name)
                loaded = True
            time.sleep(0.2)

    def _load_disk_driver(self, name: str) -> None:
        """Load the data disk's storage driver (its disks then appear asynchronously).

        No udev runs in the guest and the initramfs loads only the root bus's
        modules, so an IDE/AHCI/SCSI/NVMe data disk has no driver until asked.
        """
        from pytest_virtio.spec import ROOT_MODULES

        disk = next((d for d in getattr(self.spec, "disks", ()) if d.name == name), None)
        mods = ROOT_MODULES.get(disk.bus, ()) if disk is not None else ()
        if mods:
            self.run(f"modprobe -a {' '.join(mods)}")

    def load_drivers(self, modules: Iterable[str] | None = None) -> None:
        """Load the drivers the spec's data disks and devices need (default), or ``modules``.

        The guest has no udev, so nothing loads a driver when a device appears;
        this plays udev's part once at boot and after each hotplug. A module
        that cannot load is an error here, not a disk that silently never shows.
        """
        from pytest_virtio.spec import guest_modules

        names = tuple(modules) if modules is not None else guest_modules(self.spec)
        if names:
            self.check(f"modprobe -a {' '.join(shlex.quote(n) for n in names)}")
        if modules is None and self.serial_ports:
            self.check(guest_link_script(tuple(self.serial_ports)))
            if ids.AGENT_PORT in self.serial_ports and self._agent is None:
                self._start_agent()

    def _start_agent(self) -> None:
        """Start qemu-ga on its port (our init has no udev/systemd to) and sync with it."""
        self.check(agent_start_script())
        agent = GuestAgent(self.serial_ports[ids.AGENT_PORT], qemu_pid=self.machine.pid,
                           console_tail=self.console_tail, alive=self.machine.check_alive)
        agent.sync(self.default_timeout())
        self._agent = agent

    # -- virtio-balloon ------------------------------------------------------
    def _balloon_device(self) -> str:
        from pytest_virtio.spec import Balloon

        dev = next((d for d in getattr(self.spec, "devices", ()) if isinstance(d, Balloon)), None)
        if dev is None:
            raise ConfigError("this guest has no balloon: add devices=['balloon'] to the vm")
        return dev.name

    def balloon(self, target: str | int, timeout: float | None = None) -> int:
        """Resize the guest to ``target`` (``"256M"`` or bytes) and wait until it got there.

        Returns the size reached (``query-balloon`` ``actual``, bytes); GuestTimeout
        names the size the guest did reach when it falls short.
        """
        from pytest_virtio.channels import balloon as balloon_mod
        from pytest_virtio.units import parse_size

        self._balloon_device()
        size = parse_size(target, "guest.balloon(target)", positive=True)
        t = timeout if timeout is not None else self.default_timeout()
        return balloon_mod.resize(self.machine.qmp, size, t, self.console_tail)

    def balloon_stats(self, timeout: float | None = None) -> BalloonStats:
        """A statistics report from the guest's balloon driver newer than this call."""
        from pytest_virtio.channels import balloon as balloon_mod

        t = timeout if timeout is not None else self.default_timeout()
        return balloon_mod.stats(self.machine.qmp, self._balloon_device(), t)

    # -- CD-ROM media -------------------------------------------------------
    def _cdrom(self, name: str, call: str) -> None:
        from pytest_virtio.spec import CdRom

        names = [d.name for d in getattr(self.spec, "devices", ()) if isinstance(d, CdRom)]
        if name not in names:
            raise ConfigError(f"guest.{call}({name!r}): no CD-ROM of that name; this guest "
                              f"has: {', '.join(names) or 'none'}")

    def cdrom_change(self, name: str, iso: str | Path, *, force: bool = False,
                     timeout: float | None = None) -> str:
        """Put ``iso`` in CD-ROM ``name`` and return the guest device that now reads it.

        QMP ``blockdev-change-medium`` opens the tray, swaps the medium and closes
        it. Then the guest reads each ``/dev/sr*`` until one returns the new
        disc's volume descriptor: the first read after a change fails in the
        guest (the drive reports the media change), and a test should not have
        to know that. A guest holding the disc (mounted) has locked the tray: the
        change fails unless ``force=True``.
        """
        from pytest_virtio.guests.launch import check_image_file

        self._cdrom(name, "cdrom_change")
        path = Path(iso)
        check_image_file(f"guest.cdrom_change({name!r}): iso", path, "ISO image")
        self.machine.qmp("blockdev-change-medium", id=name, filename=str(path), format="raw",
                         force=force, **{"read-only-mode": "read-only"})
        with path.open("rb") as f:
            f.seek(_ISO_PVD_OFFSET)
            digest = hashlib.md5(f.read(_ISO_SECTOR), usedforsecurity=False).hexdigest()
        t = timeout if timeout is not None else self.default_timeout()
        res = self.run(_CDROM_FIND.format(digest=digest, tries=max(int(t / 0.2), 1)), timeout=t)
        if res.rc != 0:
            raise GuestError(f"guest.cdrom_change({name!r}): QEMU took {path} but no guest "
                             f"/dev/sr* reads it within {t:.0f}s", self.console_tail())
        return res.stdout.strip()

    def cdrom_eject(self, name: str, *, force: bool = False) -> None:
        """Open CD-ROM ``name``'s tray and take the disc out (the drive then has no medium)."""
        self._cdrom(name, "cdrom_eject")
        self.machine.qmp("blockdev-open-tray", id=name, force=force)
        self.machine.qmp("blockdev-remove-medium", id=name)

    # -- virtio-serial -------------------------------------------------------
    def serial_port(self, name: str) -> SerialPort:
        """The host end of virtio-serial port ``name``; the guest has ``/dev/virtio-ports/<name>``.

        ``send(data)``, ``recv()``, ``recv_exactly(n)``, ``recv_until(b"\\n")``, each
        with ``timeout=`` (default: the guest's command timeout).
        """
        if name not in self.serial_ports:
            have = ", ".join(self.serial_ports) or "none (add devices=['serial'] to the vm)"
            raise ConfigError(f"guest.serial_port({name!r}): no such virtio-serial port; "
                              f"this guest has: {have}")
        return self.serial_ports[name]

    def disk_drivers(self, name: str) -> list[str]:
        """Drivers on the sysfs path from data disk ``name`` up to its PCI function.

        Nearest first, e.g. ``['sd', 'virtio_scsi', 'virtio-pci']``: this is how a
        test proves the disk it found by serial really goes through the driver
        under test, not just that the module is loaded.
        """
        dev = self.disk_path(name).removeprefix("/dev/")
        chain = inventory.DRIVER_CHAIN.format(path=f"/sys/block/{dev}/device")
        return self.check(chain).stdout.split()

    def nic_interface(self, name: str) -> str:
        """The guest interface (``eth0``...) of NIC ``name``, matched by its MAC."""
        from pytest_virtio.spec import nic_mac

        nics = list(getattr(self.spec, "nics", ()))
        index = next((i for i, n in enumerate(nics) if n.name == name), None)
        if index is None:
            raise ConfigError(f"no NIC named {name!r} in this guest's spec")
        mac = nic_mac(nics[index], index)
        out = self.check('for i in /sys/class/net/*; do echo "${i##*/} $(cat $i/address)"; done')
        for line in out.stdout.splitlines():
            iface, _, addr = line.partition(" ")
            if addr.strip() == mac:
                return iface
        raise GuestError(f"no guest interface has MAC {mac} (NIC {name!r})", self.console_tail())

    def nic_drivers(self, name: str) -> list[str]:
        """Drivers from NIC ``name``'s device up to its PCI function (nearest first)."""
        iface = self.nic_interface(name)
        chain = inventory.DRIVER_CHAIN.format(path=f"/sys/class/net/{iface}/device")
        return self.check(chain).stdout.split()

    # -- hotplug -------------------------------------------------------------
    def hotplug(self, disk: Disk | Mapping[str, Any] | str,
                timeout: float | None = None) -> str:
        """Hot-add ``disk`` through QMP and return its guest device path.

        ``disk`` is what a ``vm(disks=[...])`` item is: a Disk, a dict of the same
        keys (``{"bus": "virtio-blk", "size": "8M"}``) or a bus name; unnamed, it
        is called ``disk<i>``, the first such name the guest does not use yet.
        Waits until the guest kernel shows a block device with the disk's
        serial, because QMP's success only means QEMU added it — the test
        cares that the guest can use it. vhost-user-blk gets its in-process
        backend started first (QEMU connects during device_add).
        """
        from pytest_virtio import spec as spec_mod
        from pytest_virtio.guests import launch
        from pytest_virtio.spec.parse import disk_from

        disk = disk_from(disk, "guest.hotplug(disk)", self._free_disk_name())
        if disk.name in self.disk_serials or disk.name == ids.ROOT:
            raise ConfigError(f"guest.hotplug(): a disk named {disk.name!r} is already attached")
        ctx = launch.with_disk(self._launch_ctx(), disk, self.run_dir)
        commands = spec_mod.hotplug_commands(disk, ctx)
        if disk.bus == "vhost-user-blk":
            self.backends[disk.name] = launch.start_backend(
                disk, ctx.disk_files[disk.name], self.run_dir, getattr(self.spec, "smp", 1))
        self._run_hotplug(disk, commands)
        self.ctx = ctx
        self.disk_serials[disk.name] = disk.serial or disk.name
        self.hot_disks[disk.name] = disk
        self.load_drivers(spec_mod.ROOT_MODULES[disk.bus])
        return self._wait_block(disk.name, present=True, timeout=timeout)

    def unplug(self, name: str, timeout: float | None = None) -> None:
        """Hot-remove disk ``name``; returns once QEMU and the guest both let it go.

        QEMU emits DEVICE_DELETED only after the guest ejected the device (ACPI
        for PCI), so waiting for it proves the guest cooperated; then the
        block-layer node or chardev is freed and the backend stopped.
        """
        if name not in self.disk_serials:
            raise ConfigError(f"guest.unplug(): no data disk named {name!r} "
                              f"(have: {', '.join(sorted(self.disk_serials)) or 'none'})")
        t = timeout if timeout is not None else self.default_timeout()
        mark = len(self.machine.events)
        self.machine.qmp("device_del", id=name)
        self.machine.wait_event("DEVICE_DELETED", t, {"device": name}, since=mark)
        self._wait_qom_gone(name, t)
        if name in self.backends:
            self._qmp_once_released(t, "chardev-remove", id=ids.vhost_chardev_id(name))
            stop_backends({name: self.backends.pop(name)}, f"guest {self.name!r}")
        else:
            self._qmp_once_released(t, "blockdev-del", **{"node-name": ids.drive_id(name)})
        self._wait_block(name, present=False, timeout=t)
        del self.disk_serials[name]
        self.hot_disks.pop(name, None)

    def _free_disk_name(self) -> str:
        """``disk<i>`` for the first ``i`` no disk, NIC or device of this guest is called."""
        spec_items = (*getattr(self.spec, "disks", ()), *getattr(self.spec, "nics", ()),
                      *getattr(self.spec, "devices", ()))
        taken = {*self.disk_serials, *(item.name for item in spec_items)}
        return next(f"disk{i}" for i in range(len(taken) + 1) if f"disk{i}" not in taken)

    def _data_disk(self, name: str, call: str) -> Disk:
        """Data disk ``name`` as attached now (from the spec or hot-plugged)."""
        booted: tuple[Disk, ...] = getattr(self.spec, "disks", ())
        disks = {d.name: d for d in booted} | self.hot_disks
        if name not in self.disk_serials or name not in disks:
            raise ConfigError(f"guest.{call}({name!r}): no data disk of that name; this guest "
                              f"has: {', '.join(sorted(self.disk_serials)) or 'none'}")
        return disks[name]

    # -- storage and run state -----------------------------------------------
    def resize_disk(self, name: str, size: str | int, timeout: float | None = None) -> int:
        """Grow (or shrink) data disk ``name`` to ``size`` (``"128M"`` or bytes) and wait
        until the guest sees it; returns the size in bytes.

        QMP ``block_resize`` on the disk's node ``drv-<name>`` (see
        :mod:`pytest_virtio.guests.storage` for which buses tell the guest themselves).
        """
        from pytest_virtio.guests import storage

        what = f"guest.resize_disk({name!r}, {size!r})"
        disk = self._data_disk(name, "resize_disk")
        nbytes = storage.new_size(disk, size, what)
        self.machine.qmp("block_resize", **storage.block_resize_args(disk, nbytes))
        dev = self.disk_path(name).removeprefix("/dev/")
        t = timeout if timeout is not None else self.default_timeout()
        return storage.wait_capacity(self.run, disk, dev, nbytes, t, self.console_tail)

    def pause(self) -> None:
        """Stop the guest's vCPUs (QMP ``stop``); commands refuse to run until :meth:`resume`."""
        runstate.pause(self.machine, self.name)

    def resume(self) -> None:
        """Let a paused guest run again (QMP ``cont``)."""
        runstate.resume(self.machine, self.name)

    def is_running(self) -> bool:
        """What QMP ``query-status`` says: False while paused."""
        return bool(runstate.status(self.machine).get("running", False))

    def _launch_ctx(self) -> LaunchContext:
        if self.ctx is None:
            raise GuestError("guest.hotplug() needs the guest's LaunchContext (boot it "
                             "through VirtioSession)")
        return self.ctx

    def _run_hotplug(self, disk: Disk, commands: list[tuple[str, dict[str, Any]]]) -> None:
        """Send the QMP commands; on failure undo what was added so the guest stays clean."""

        done: list[str] = []
        try:
            for cmd, args in commands:
                self.machine.qmp(cmd, **args)
                done.append(cmd)
        except BaseException:
            with contextlib.suppress(VirtioError, OSError):
                if "blockdev-add" in done:
                    self.machine.qmp("blockdev-del", **{"node-name": disk.drive_id})
                if "chardev-add" in done:
                    self.machine.qmp("chardev-remove", id=ids.vhost_chardev_id(disk.name))
            if disk.name in self.backends:
                stop_backends({disk.name: self.backends.pop(disk.name)},
                              f"guest {self.name!r}")
            raise

    def _qmp_once_released(self, timeout: float, cmd: str, **args: Any) -> None:
        """Run ``cmd``, retrying while QEMU still holds the backend ("in use", "busy").

        DEVICE_DELETED and the QOM path going away come before the device is
        finalized, and only finalizing detaches its drive or chardev; seen as
        "Node drv-x is in use" once in 20 runs under TCG.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.machine.qmp(cmd, **args)
                return
            except QmpError as exc:
                if not _STILL_HELD.search(exc.desc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def _wait_qom_gone(self, name: str, timeout: float) -> None:
        """Poll QOM until ``name`` left /machine/peripheral (a stale event cannot fool it)."""
        deadline = time.monotonic() + timeout
        while any(p.get("name") == name for p in
                  self.machine.qmp("qom-list", path="/machine/peripheral")):
            if time.monotonic() > deadline:
                raise GuestError(f"device {name!r} still in QEMU {timeout:.0f}s after "
                                 "DEVICE_DELETED", self.console_tail())
            time.sleep(0.1)

    def _wait_block(self, name: str, *, present: bool, timeout: float | None) -> str:
        """Poll /sys/block until the disk's serial appears (or is gone)."""
        serial = self.disk_serials[name]
        t = timeout if timeout is not None else self.default_timeout()
        deadline = time.monotonic() + t
        while True:
            found = [d for d, s in self.block_devices().items() if s == serial]
            if bool(found) == present:
                return f"/dev/{found[0]}" if found else ""
            if time.monotonic() > deadline:
                state = "appear" if present else "go away"
                raise GuestError(f"guest block device with serial {serial!r} (disk {name!r}) "
                                 f"did not {state} within {t:.0f}s", self.console_tail())
            time.sleep(0.2)

    # -- lifecycle -----------------------------------------------------------
    def poweroff(self, timeout: float | None = None) -> None:
        """Power the guest off from inside, as a user would, and wait until QEMU exits.

        systemd images go through ``systemctl poweroff`` (units stopped, filesystems
        unmounted); our init syncs and powers off. What the guest wrote to a kept
        root (``vm(root_disk=...)``) is then on the host for the next boot.  A guest
        with no way to power off is a CommandFailed at once, with the reason; a
        power-off command that fails is a GuestError as soon as the console shows it.
        """
        t = timeout if timeout is not None else self.default_timeout() * 4
        self.check(POWEROFF_SCRIPT)  # no way to power off: CommandFailed now, with why
        end = time.monotonic() + t
        while self.machine.wait_exit(min(_POWEROFF_POLL, max(0.0, end - time.monotonic()))) \
                is None:
            tail = self.console_tail()
            failed = [line for line in tail.splitlines() if POWEROFF_FAILED in line]
            if failed:
                raise GuestError(f"guest {self.name!r} could not power off: "
                                 f"{failed[-1].strip()}", tail)
            if time.monotonic() >= end:
                raise GuestTimeout(f"guest {self.name!r} did not power off within {t:.0f}s",
                                   tail)
        self.close()

    def close(self) -> None:
        """Stop QEMU (soft, then hard), then every backend; always all of them.

        A backend that will not stop is a BackendError naming its disk.
        """
        if self._ssh is not None:
            self._ssh.close()
        for port in self.serial_ports.values():
            port.close()
        try:
            self.machine.shutdown(timeout=5.0)
        finally:
            stop_backends(self.backends, f"guest {self.name!r}")

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
