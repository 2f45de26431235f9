"""Guest: what a test holds — run commands, inspect drivers, run workloads.

One way to run a command: ``guest.run(cmd) -> Result`` (``guest.check``
raises with the output).  Everything else here — drivers, modules, fio —
is built on it, so the same code works over the console or SSH.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .console import Result
from .errors import ConfigError, GuestError
from .qemu.machine import Machine

if TYPE_CHECKING:
    from .workloads.fio import FioResult


@dataclass(frozen=True, slots=True)
class VirtioDevice:
    """A device on the guest's virtio bus and the driver bound to it.

    ``device_id`` is the virtio device ID (virtio 1.2 §5: 1 net, 2 block,
    3 console, 4 entropy, 5 balloon, 8 SCSI); ``pci`` is the PCI function
    the virtio-pci transport exposes it on.
    """

    name: str
    device_id: int
    driver: str | None
    pci: str | None


@dataclass(frozen=True, slots=True)
class PciDevice:
    slot: str
    vendor: int
    device: int
    pci_class: int
    driver: str | None


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    size: int
    used_by: tuple[str, ...]
    builtin: bool = False


_VIRTIO_SCRIPT = r"""
for dev in /sys/bus/virtio/devices/*; do
  [ -e "$dev" ] || continue
  n=${dev##*/}
  drv=-; [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
  parent=$(basename "$(dirname "$(readlink -f "$dev")")")
  echo "$n $(cat "$dev/device") $drv $parent"
done
"""

_BLOCK_SCRIPT = r"""
for b in /sys/block/*; do
  n=${b##*/}
  case "$n" in loop*|ram*) continue ;; esac
  s=""
  if [ -r "$b/serial" ]; then s=$(cat "$b/serial")
  elif [ -r "$b/device/serial" ]; then s=$(cat "$b/device/serial")
  elif [ -r "$b/device/vpd_pg80" ]; then s=$(tail -c +5 "$b/device/vpd_pg80" | tr -d '\000')
  fi
  echo "$n $s"
done
"""

_PCI_SCRIPT = r"""
for dev in /sys/bus/pci/devices/*; do
  drv=-; [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
  echo "${dev##*/} $(cat "$dev/vendor") $(cat "$dev/device") $(cat "$dev/class") $drv"
done
"""


@dataclass
class Guest:
    """A running guest; built by :func:`pytest_virtio.session.VirtioSession.boot`."""

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

    # -- commands ------------------------------------------------------------
    def default_timeout(self) -> float:
        return 30.0 * self.timeout_scale

    def run(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        """Run ``cmd`` through ``sh`` in the guest; never raises on non-zero exit."""
        self.raise_backend_errors()
        t = timeout if timeout is not None else self.default_timeout()
        if via == "console":
            return self.machine.console.run(cmd, t)
        if via == "ssh":
            result: Result = self.ssh_session().run(cmd, t)
            return result
        raise ConfigError(f"guest.run(via={via!r}): choose 'console' or 'ssh'")

    def check(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        """Run ``cmd``; raise CommandFailed (with output and console tail) unless exit 0."""
        return self.run(cmd, timeout, via).check(self.console_tail())

    def console_tail(self, lines: int = 40) -> str:
        return self.machine.console.tail(lines) if self.machine.state.value == "running" else ""

    def ssh_session(self) -> Any:
        """The guest's :class:`pytest_virtio.ssh.SshSession` (GuestError if it has no NIC)."""
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

    # -- drivers and modules -------------------------------------------------
    def virtio_devices(self) -> list[VirtioDevice]:
        out = self.check(_VIRTIO_SCRIPT).stdout
        devices = []
        for line in out.splitlines():
            name, dev_id, drv, parent = line.split()
            devices.append(VirtioDevice(
                name=name, device_id=int(dev_id, 16),
                driver=None if drv == "-" else drv,
                pci=parent if ":" in parent else None,
            ))
        return devices

    def drivers(self) -> dict[str, list[VirtioDevice]]:
        """Bound virtio drivers (``/sys/bus/virtio/drivers``) → the devices they drive."""
        bound: dict[str, list[VirtioDevice]] = {}
        for dev in self.virtio_devices():
            if dev.driver:
                bound.setdefault(dev.driver, []).append(dev)
        return bound

    def pci_devices(self) -> list[PciDevice]:
        out = self.check(_PCI_SCRIPT).stdout
        devices = []
        for line in out.splitlines():
            slot, vendor, device, cls, drv = line.split()
            devices.append(PciDevice(slot, int(vendor, 16), int(device, 16), int(cls, 16),
                                     None if drv == "-" else drv))
        return devices

    def lsmod(self) -> dict[str, Module]:
        """Loaded modules (``/proc/modules``) plus built-ins (``modules.builtin``)."""
        out = self.check(
            "cat /proc/modules; echo '--builtin--'; "
            "cat /lib/modules/$(uname -r)/modules.builtin 2>/dev/null"
        ).stdout
        loaded, _, builtin = out.partition("--builtin--\n")
        mods: dict[str, Module] = {}
        for line in builtin.split():
            name = Path(line).name.split(".ko")[0].replace("-", "_")
            mods[name] = Module(name, 0, (), builtin=True)
        for line in loaded.splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            users = tuple(u for u in parts[3].split(",") if u and u != "-")
            mods[parts[0]] = Module(parts[0], int(parts[1]), users)
        return mods

    def modprobe(self, name: str) -> Result:
        return self.check(f"modprobe {shlex.quote(name)}")

    def bound_drivers(self) -> set[str]:
        """Every driver bound to some device on any bus (virtio, PCI)."""
        names = {d for d in self.drivers()}
        names |= {p.driver for p in self.pci_devices() if p.driver}
        return names

    # -- workloads -----------------------------------------------------------
    def fio(self, device: str | None = None, *, jobfile: str | None = None,
            timeout: float | None = None, **job: Any) -> FioResult:
        """Run fio in the guest and parse its JSON; WorkloadError carries its stderr."""
        from .workloads import fio as fio_mod

        if jobfile is not None:
            cmd = fio_mod.fio_jobfile_shell(jobfile)
        else:
            if device is None:
                raise ConfigError("guest.fio(): give device= (e.g. '/dev/vdb') or jobfile=")
            cmd = fio_mod.fio_shell(fio_mod.FioJob(filename=device, **job))
        runtime = float(job.get("runtime", 10) or 10)
        t = timeout if timeout is not None else self.default_timeout() + runtime * 3
        res = self.run(cmd, timeout=t)
        return fio_mod.check_fio_run(res.rc, res.stdout, res.stderr)

    def block_devices(self) -> dict[str, str]:
        """Guest block devices → their serial number ("" if none).

        No udev runs in the guest, so /dev/disk/by-id is absent: the serial is
        read from sysfs (virtio-blk ``serial``, NVMe ``device/serial``, SCSI
        and ATA VPD page 0x80 after its 4-byte header).
        """
        out = self.check(_BLOCK_SCRIPT).stdout
        devs: dict[str, str] = {}
        for line in out.splitlines():
            name, _, serial = line.partition(" ")
            devs[name] = serial.strip()
        return devs

    def disk_path(self, name: str) -> str:
        """The guest device node of data disk ``name`` (matched by its serial)."""
        serial = self.disk_serials.get(name, name)
        for dev, ser in self.block_devices().items():
            if ser == serial:
                return f"/dev/{dev}"
        raise GuestError(f"no guest block device has serial {serial!r} (disk {name!r})",
                         self.console_tail())

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Stop QEMU (soft, then hard), then the backends; always both."""
        if self._ssh is not None:
            self._ssh.close()
        try:
            self.machine.shutdown(timeout=5.0)
        finally:
            for backend in self.backends.values():
                backend.stop()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_kv(text: str) -> Mapping[str, str]:
    """``key=value`` lines → dict (for small guest-side reports)."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
