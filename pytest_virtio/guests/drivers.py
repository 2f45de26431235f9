"""What the guest's kernel sees and drives: virtio and PCI devices, bound drivers,
modules, block devices by serial, NIC interfaces by MAC, and loading the drivers
the guest's devices need (no udev runs in the guest to do it).

The scripts and their parsers are :mod:`pytest_virtio.channels.inventory`; this
room runs them through a :class:`.shell.Shell`.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterable, Mapping

from pytest_virtio.channels import inventory
from pytest_virtio.channels.inventory import Module, PciDevice, VirtioDevice
from pytest_virtio.channels.runners import Result
from pytest_virtio.errors import ConfigError, GuestError
from pytest_virtio.guests.shell import Shell
from pytest_virtio.spec import ROOT_MODULES, MachineSpec, nic_mac

__all__ = ["block_devices", "bound_drivers", "disk_modules", "driver_chain", "drivers",
           "find_disk", "interfaces_by_mac", "lsmod", "modprobe", "nic_interface", "nic_macs",
           "pci_devices", "virtio_devices"]

_POLL = 0.2


def virtio_devices(shell: Shell) -> list[VirtioDevice]:
    return inventory.parse_virtio_devices(shell.check(inventory.VIRTIO_SCRIPT).stdout)


def drivers(shell: Shell) -> dict[str, list[VirtioDevice]]:
    """Bound virtio drivers (``/sys/bus/virtio/drivers``) → the devices they drive."""
    bound: dict[str, list[VirtioDevice]] = {}
    for dev in virtio_devices(shell):
        if dev.driver:
            bound.setdefault(dev.driver, []).append(dev)
    return bound


def pci_devices(shell: Shell) -> list[PciDevice]:
    return inventory.parse_pci_devices(shell.check(inventory.PCI_SCRIPT).stdout)


def lsmod(shell: Shell) -> dict[str, Module]:
    """Loaded modules (``/proc/modules``) plus built-ins (``modules.builtin``)."""
    return inventory.parse_modules(shell.check(inventory.MODULES_SCRIPT).stdout)


def bound_drivers(shell: Shell) -> set[str]:
    """Every driver bound to some device on any bus (virtio, PCI)."""
    names = set(drivers(shell))
    names |= {p.driver for p in pci_devices(shell) if p.driver}
    return names


def modprobe(shell: Shell, names: Iterable[str]) -> Result | None:
    """``modprobe -a`` every module of ``names`` (none: nothing runs); CommandFailed
    when one cannot load, rather than a device that silently never shows."""
    names = tuple(names)
    if not names:
        return None
    return shell.check(f"modprobe -a {' '.join(shlex.quote(n) for n in names)}")


def block_devices(shell: Shell) -> dict[str, str]:
    """Guest block devices → their serial number ("" if none), read from sysfs."""
    return inventory.parse_block_devices(shell.check(inventory.BLOCK_SCRIPT).stdout)


def disk_modules(spec: MachineSpec | None, name: str) -> tuple[str, ...]:
    """The storage driver modules data disk ``name``'s bus needs (() for an unknown disk)."""
    disks = spec.disks if spec is not None else ()
    disk = next((d for d in disks if d.name == name), None)
    return ROOT_MODULES.get(disk.bus, ()) if disk is not None else ()


def find_disk(shell: Shell, serial: str, name: str, timeout: float,
              load_driver: Callable[[], None]) -> str:
    """The guest device node (``/dev/vdb``) whose serial is ``serial``.

    Disks of a bus whose driver is not loaded yet appear only once it is: after the
    first miss ``load_driver`` runs, then the block devices are polled until
    ``timeout``.
    """
    deadline = time.monotonic() + timeout
    loaded = False
    while True:
        for dev, ser in block_devices(shell).items():
            if ser == serial:
                return f"/dev/{dev}"
        if time.monotonic() > deadline:
            raise GuestError(f"no guest block device has serial {serial!r} (disk {name!r})",
                             shell.console_tail())
        if not loaded:
            load_driver()
            loaded = True
        time.sleep(_POLL)


def driver_chain(shell: Shell, sysfs_device: str) -> list[str]:
    """Drivers on the sysfs path from ``sysfs_device`` up to its PCI function, nearest first."""
    return shell.check(inventory.DRIVER_CHAIN.format(path=sysfs_device)).stdout.split()


def nic_macs(spec: MachineSpec | None) -> dict[str, str]:
    """The MAC of every NIC the guest boots with, by NIC name (how the guest finds them)."""
    return {n.name: nic_mac(n, i) for i, n in enumerate(spec.nics if spec is not None else ())}


def interfaces_by_mac(shell: Shell) -> dict[str, str]:
    """The guest's network interfaces by MAC (``/sys/class/net/*/address``)."""
    out = shell.check('for i in /sys/class/net/*; do echo "${i##*/} $(cat $i/address)"; done')
    pairs = (line.partition(" ") for line in out.stdout.splitlines())
    return {addr.strip(): iface for iface, _, addr in pairs if addr.strip()}


def nic_interface(shell: Shell, macs: Mapping[str, str], name: str) -> str:
    """The guest interface (``eth0``...) of NIC ``name``, matched by its MAC.

    ``macs`` holds every NIC the guest has now by name (booted and hot-plugged:
    :func:`nic_macs`, kept by :mod:`.nics`)."""
    if name not in macs:
        raise ConfigError(f"no NIC named {name!r} in this guest (have: "
                          f"{', '.join(sorted(macs)) or 'none'})")
    iface = interfaces_by_mac(shell).get(macs[name])
    if iface is None:
        raise GuestError(f"no guest interface has MAC {macs[name]} (NIC {name!r})",
                         shell.console_tail())
    return iface
