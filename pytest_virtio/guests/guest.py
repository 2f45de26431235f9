"""Guest: what a test holds — a thin face over the guest's rooms.

One way to run a command: ``guest.run(cmd) -> Result`` (``guest.check``
raises with the output); everything else is built on it, so the same code
works over the console, SSH or the agent.  Each capability is a room of its
own, given the Machine and the guest as a :class:`.shell.Shell`, never the
whole Guest: :mod:`.drivers` (devices, drivers, modules, disks and NICs as the
guest sees them), :mod:`.hotplug` (disks added and removed), :mod:`.nics` (NICs
added and removed, their link, the network set up again), :mod:`.storage`
(resize), :mod:`.media` (CD-ROM discs), :mod:`.memory` (balloon), :mod:`.ports`
(virtio-serial, guest agent), :mod:`.power` (poweroff, reboot, reset), :mod:`.runstate`
(pause, resume), :mod:`.writelogs` (logged disks), :mod:`.kernel_config` (the kernel's
config). A new capability is a new room and a one-line call here.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_virtio import ids
from pytest_virtio.channels.agent import GuestAgent
from pytest_virtio.channels.features import Features
from pytest_virtio.channels.inventory import Module, PciDevice, VirtioDevice
from pytest_virtio.channels.runners import VIAS, Result, Runner
from pytest_virtio.channels.serial import SerialPort
from pytest_virtio.channels.sshtrust import announced_key
from pytest_virtio.errors import ConfigError, GuestError, GuestTimeout
from pytest_virtio.guests import (
    drivers,
    hotplug,
    kernel_config,
    media,
    memory,
    nics,
    ports,
    power,
    runstate,
    storage,
    writelogs,
)
from pytest_virtio.guests.hotplug import AttachedDisks
from pytest_virtio.guests.kernel_log import KernelLog
from pytest_virtio.guests.nethost import NicHost, stop_nets
from pytest_virtio.guests.teardown import stop_backends
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec import ROOT_MODULES, guest_modules
from pytest_virtio.workloads import dd as dd_mod
from pytest_virtio.workloads import fio as fio_mod

if TYPE_CHECKING:
    from pytest_virtio.channels.balloon import BalloonStats
    from pytest_virtio.images import GuestImage
    from pytest_virtio.images.kconfig import KernelConfig
    from pytest_virtio.spec import Disk, LaunchContext, Nic
    from pytest_virtio.vhost_user.server import VhostUserBlkServer


@dataclass
class Guest:
    """A running guest; built only by :func:`pytest_virtio.guests.provision.start`
    (reached through :meth:`pytest_virtio.guests.session.VirtioSession.boot`)."""

    machine: Machine
    name: str
    accel: str
    timeout_scale: float
    run_dir: Path
    spec: Any = None
    backends: dict[str, VhostUserBlkServer] = field(default_factory=dict)
    #: Each NIC's host side (its passt, its tap's namespace), by NIC name: stopped
    #: after QEMU.  :func:`pytest_virtio.guests.nethost.host_of` finds a NIC's.
    nets: dict[str, NicHost] = field(default_factory=dict)
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
    #: The MAC of every NIC the guest has now, by name (booted, then as
    #: :meth:`hotplug_nic`/:meth:`unplug_nic` change it); empty: the spec's.
    nic_macs: dict[str, str] = field(default_factory=dict)
    #: NICs added by :meth:`hotplug_nic` and not yet unplugged, by name.
    hot_nics: dict[str, Nic] = field(default_factory=dict)
    #: The image it booted (its kernel's config is read from it, host side).
    image: GuestImage | None = None
    _kernel_config: KernelConfig | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.nic_macs = self.nic_macs or drivers.nic_macs(self.spec)
        #: The kernel's log since the last look (the plugin looks after each test).
        self.kernel_log = KernelLog(self)

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

    # -- drivers and modules (:mod:`.drivers`) -------------------------------
    def virtio_devices(self) -> list[VirtioDevice]:
        return drivers.virtio_devices(self)

    def drivers(self) -> dict[str, list[VirtioDevice]]:
        """Bound virtio drivers (``/sys/bus/virtio/drivers``) → the devices they drive."""
        return drivers.drivers(self)

    def pci_devices(self) -> list[PciDevice]:
        return drivers.pci_devices(self)

    def lsmod(self) -> dict[str, Module]:
        """Loaded modules (``/proc/modules``) plus built-ins (``modules.builtin``)."""
        return drivers.lsmod(self)

    def modprobe(self, name: str) -> Result:
        return self.check(f"modprobe {shlex.quote(name)}")

    def bound_drivers(self) -> set[str]:
        """Every driver bound to some device on any bus (virtio, PCI)."""
        return drivers.bound_drivers(self)

    def kernel_config(self, *, in_guest: bool = False) -> KernelConfig:
        """The running kernel's config (``.state("VIRTIO_BLK")``, ``.module(...)``).

        Read on the host when it has the kernel's config (build tree, package,
        the image's /boot), else, or with ``in_guest=True``, in the guest
        (``/proc/config.gz``, ``/boot/config-$(uname -r)``); read once per guest.
        """
        if in_guest:
            return kernel_config.read_in_guest(self)
        if self._kernel_config is None:
            host = kernel_config.image_config(self.image) if self.image else None
            self._kernel_config = host or kernel_config.read_in_guest(self)
        return self._kernel_config

    # -- workloads -----------------------------------------------------------
    def fio(self, device: str | fio_mod.FioJob | None = None, *, jobfile: str | None = None,
            timeout: float | None = None, **job: Any) -> fio_mod.FioResult:
        """Run fio in the guest and parse its JSON; WorkloadError carries its stderr.

        ``device`` is the guest path with FioJob options in ``job``, or a whole FioJob."""
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
           timeout: float | None = None) -> dd_mod.DdResult:
        """Run coreutils ``dd`` in the guest; WorkloadError carries dd's stderr.

        The console merges stderr into stdout, so the summary is parsed from both;
        the rootfs has GNU dd (busybox's prints no rate and would fail to parse).
        """
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
        return drivers.block_devices(self)

    def disk_path(self, name: str) -> str:
        """The guest device node of data disk ``name`` (matched by its serial)."""
        return drivers.find_disk(self, self.disk_serials.get(name, name), name,
                                 10 * self.timeout_scale, lambda: self._load_disk_driver(name))

    def _load_disk_driver(self, name: str) -> None:
        """Load the data disk's storage driver (its disks then appear asynchronously).

        No udev runs in the guest and the initramfs loads only the root bus's
        modules, so an IDE/AHCI/SCSI/NVMe data disk has no driver until asked.
        """
        mods = drivers.disk_modules(self.spec, name)
        if mods:
            self.run(f"modprobe -a {' '.join(mods)}")

    def load_drivers(self, modules: Iterable[str] | None = None) -> None:
        """Load the drivers the spec's data disks and devices need (default), or ``modules``.

        The guest has no udev, so nothing loads a driver when a device appears;
        this plays udev's part once at boot and after each hotplug. A module
        that cannot load is an error here, not a disk that silently never shows.
        """
        drivers.modprobe(self, modules if modules is not None else guest_modules(self.spec))
        if modules is None and self.serial_ports:
            ports.link(self, self.serial_ports)
            if ids.AGENT_PORT in self.serial_ports and self._agent is None:
                self._agent = ports.start_agent(self, self.serial_ports[ids.AGENT_PORT],
                                                self.machine, self.default_timeout())

    # -- virtio-balloon (:mod:`.memory`) ---------------------------------------
    def balloon(self, target: str | int, timeout: float | None = None) -> int:
        """Resize the guest to ``target`` (``"256M"`` or bytes) and wait until it got there.

        Returns the size reached (``query-balloon`` ``actual``, bytes); GuestTimeout
        names the size the guest did reach when it falls short.
        """
        return memory.balloon(self.machine, self.spec, target, self._timeout(timeout),
                              self.console_tail)

    def balloon_stats(self, timeout: float | None = None) -> BalloonStats:
        """A statistics report from the guest's balloon driver newer than this call."""
        return memory.stats(self.machine, self.spec, self._timeout(timeout))

    # -- CD-ROM media (:mod:`.media`) -------------------------------------------
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
        return media.change(self.machine, self, self.spec, name, iso, force=force,
                            timeout=self._timeout(timeout))

    def cdrom_eject(self, name: str, *, force: bool = False) -> None:
        """Open CD-ROM ``name``'s tray and take the disc out (the drive then has no medium)."""
        media.eject(self.machine, self.spec, name, force=force)

    # -- virtio-serial -------------------------------------------------------
    def serial_port(self, name: str) -> SerialPort:
        """The host end of virtio-serial port ``name``; the guest has ``/dev/virtio-ports/<name>``.

        ``send(data)``, ``recv()``, ``recv_exactly(n)``, ``recv_until(b"\\n")``, each
        with ``timeout=`` (default: the guest's command timeout).
        """
        return ports.serial_port(self.serial_ports, name)

    def disk_drivers(self, name: str) -> list[str]:
        """Drivers on the sysfs path from data disk ``name`` up to its PCI function.

        Nearest first, e.g. ``['sd', 'virtio_scsi', 'virtio-pci']``: this is how a
        test proves the disk it found by serial really goes through the driver
        under test, not just that the module is loaded.
        """
        dev = self.disk_path(name).removeprefix("/dev/")
        return drivers.driver_chain(self, f"/sys/block/{dev}/device")

    def nic_interface(self, name: str) -> str:
        """The guest interface (``eth0``...) of NIC ``name``, matched by its MAC."""
        return drivers.nic_interface(self, self.nic_macs, name)

    def nic_drivers(self, name: str) -> list[str]:
        """Drivers from NIC ``name``'s device up to its PCI function (nearest first)."""
        iface = self.nic_interface(name)
        return drivers.driver_chain(self, f"/sys/class/net/{iface}/device")

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
        added, self.ctx = hotplug.attach(self.machine, self._disks(), self.spec, self.ctx,
                                         self.run_dir, self._owner(), disk)
        self.load_drivers(ROOT_MODULES[added.bus])
        return hotplug.wait_block(self, self.disk_serials[added.name], added.name, present=True,
                                  timeout=self._timeout(timeout))

    def unplug(self, name: str, timeout: float | None = None) -> None:
        """Hot-remove disk ``name``; returns once QEMU and the guest both let it go.

        QEMU emits DEVICE_DELETED only after the guest ejected the device (ACPI
        for PCI), so waiting for it proves the guest cooperated; then the
        block-layer node or chardev is freed and the backend stopped.
        """
        hotplug.detach(self.machine, self, self._disks(), self._owner(), name,
                       self._timeout(timeout))

    def hotplug_nic(self, nic: Nic | Mapping[str, Any] | str,
                    timeout: float | None = None) -> str:
        """Hot-add ``nic`` through QMP and return its guest interface name (up, no address).

        ``nic`` is what a ``vm(nics=[...])`` item is: a Nic, a dict of the same keys
        (``{"model": "e1000"}``) or a model name; unnamed, it is called ``net<i>``,
        the first such name the guest does not use yet, and it gets the first MAC
        of the boot series no NIC has. Only ``backend="user"`` can be hot-plugged,
        without SSH forwarding (a dict or name gets ``hostfwd_ssh=False``; a Nic
        must say so). Waits until the guest shows the interface, its driver loaded.
        """
        return nics.attach(self.machine, self, self._nics(), self.spec, self.disk_serials,
                           self._owner(), nic, self._timeout(timeout))

    def unplug_nic(self, name: str, timeout: float | None = None) -> None:
        """Hot-remove NIC ``name`` (hot-plugged or booted); returns once QEMU freed its
        device and netdev and the guest's interface is gone."""
        nics.detach(self.machine, self, self._nics(), self._owner(), name,
                    self._timeout(timeout))

    def set_link(self, name: str, up: bool, timeout: float | None = None) -> None:
        """Link of NIC ``name`` up or down (QMP ``set_link`` on its device); returns once
        the guest's ``/sys/class/net/<if>/carrier`` agrees (if the interface is up)."""
        nics.set_link(self.machine, self, self.nic_macs, name, up, self._timeout(timeout))

    def restore_network(self, timeout: float | None = None) -> str:
        """The guest's network as its init set it at boot, again (after ``rmmod
        virtio_net; modprobe virtio_net``, say): drivers loaded, interfaces up,
        10.0.2.15/24 and the default route via 10.0.2.2; returns the address's interface."""
        return nics.restore_network(self, self._timeout(timeout))

    def nic_features(self, name: str) -> Features:
        """The virtio feature bits NIC ``name``'s driver negotiated (virtio 1.2 §5.1.3
        and §6 by name: ``"MRG_RXBUF" in guest.nic_features("net0")``)."""
        return nics.features(self, self.nic_interface(name), name)

    def nic_offloads(self, name: str) -> dict[str, bool]:
        """NIC ``name``'s offloads as ``ethtool -k`` shows them: {"tcp-segmentation-
        offload": True, ...}."""
        return nics.offloads(self, self.nic_interface(name), name)

    def _nics(self) -> nics.AttachedNics:
        """This guest's NIC bookkeeping, for :mod:`.nics` to update in place."""
        return nics.AttachedNics(self.nic_macs, self.hot_nics)

    def _disks(self) -> AttachedDisks:
        """This guest's disk bookkeeping, for :mod:`.hotplug` to update in place."""
        return AttachedDisks(self.disk_serials, self.hot_disks, self.backends)

    def _owner(self) -> str:
        return f"guest {self.name!r}"

    def _timeout(self, timeout: float | None) -> float:
        return timeout if timeout is not None else self.default_timeout()

    # -- storage and run state -----------------------------------------------
    def resize_disk(self, name: str, size: str | int, timeout: float | None = None) -> int:
        """Grow (or shrink) data disk ``name`` to ``size`` (``"128M"`` or bytes) and wait
        until the guest sees it; returns the size in bytes.

        QMP ``block_resize`` on the disk's node ``drv-<name>`` (see
        :mod:`pytest_virtio.guests.storage` for which buses tell the guest themselves).
        """
        what = f"guest.resize_disk({name!r}, {size!r})"
        disk = hotplug.data_disk(self.spec, self._disks(), name, "resize_disk")
        nbytes = storage.new_size(disk, size, what)
        self.machine.qmp("block_resize", **storage.block_resize_args(disk, nbytes))
        dev = self.disk_path(name).removeprefix("/dev/")
        return storage.wait_capacity(self.run, disk, dev, nbytes, self._timeout(timeout),
                                     self.console_tail)

    def logged_disk(self, name: str) -> writelogs.LoggedDisk:
        """Data disk ``name``'s write log (``Disk(write_log=True)``) so far, its base image
        (the disk before the guest started) and the durability rule its driver chose:
        what :func:`pytest_virtio.guests.crashcheck.check_crash_states` checks."""
        return writelogs.logged_disk(self.backends, self.run_dir, name, "guest")

    def pause(self) -> None:
        """Stop the guest's vCPUs (QMP ``stop``); commands refuse to run until :meth:`resume`."""
        runstate.pause(self.machine, self.name)

    def resume(self) -> None:
        """Let a paused guest run again (QMP ``cont``)."""
        runstate.resume(self.machine, self.name)

    def is_running(self) -> bool:
        """What QMP ``query-status`` says: False while paused."""
        return bool(runstate.status(self.machine).get("running", False))

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
        power.poweroff(self.machine, self, self.name, t)
        self.close()

    def reboot(self, timeout: float | None = None) -> None:
        """Reboot from inside, as a user would, and wait until the new boot answers.

        systemd images go through ``systemctl reboot``; our init syncs and
        reboots.  Afterwards every channel serves the new boot: the console's
        shell, SSH (the new host key pinned), the guest agent (started again)
        and the drivers of the data disks, hot-plugged ones included.
        """
        self._restart(lambda: self.check(power.REBOOT_SCRIPT), timeout)

    def reset(self, timeout: float | None = None) -> None:
        """Press reset (QMP ``system_reset``): no shutdown inside, the machine starts
        over with the same devices; returns once the new boot answers, as :meth:`reboot`."""
        self._restart(lambda: self.machine.qmp("system_reset"), timeout)

    def _restart(self, trigger: Callable[[], object], timeout: float | None) -> None:
        t = timeout if timeout is not None else self.default_timeout() * 2
        if self._ssh is not None:
            self._ssh.close()
        self._agent = None
        self.boot_uptime = power.restart(self.machine, self.name, t, trigger)
        if self._ssh is not None:
            announced = announced_key(self.machine.console_log)
            self._ssh.host_key_source = lambda: announced
            self.host_key = self._ssh.host_key_line()
        if self.spec is not None and (self.spec.disks or self.spec.devices):
            self.load_drivers()
        for disk in self.hot_disks.values():
            self.load_drivers(ROOT_MODULES[disk.bus])

    def close(self) -> None:
        """Stop QEMU (soft, then hard), then every NIC's host side and backend; always all.

        A backend that will not stop is a BackendError naming its disk.
        """
        if self._ssh is not None:
            self._ssh.close()
        for port in self.serial_ports.values():
            port.close()
        try:
            self.machine.shutdown(timeout=5.0)
        finally:
            stop_nets(self.nets)
            stop_backends(self.backends, f"guest {self.name!r}")

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
