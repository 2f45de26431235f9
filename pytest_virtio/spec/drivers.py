"""What a spec needs: QEMU device models (checked against the binary) and guest modules."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from pytest_virtio.spec.catalogue import _DISK_DEVICES, _NIC_DEVICE, ROOT_MODULES
from pytest_virtio.spec.model import Balloon, CdRom, Device, MachineSpec, Rng, SerialPorts


def required_qemu_devices(spec: MachineSpec) -> frozenset[str]:
    """QEMU device model names the spec needs (compare with ``device_models``)."""
    needed = {"pvpanic"} | _DISK_DEVICES[spec.root_bus]
    for disk in spec.disks:
        needed |= _DISK_DEVICES[disk.bus]
    needed |= {_NIC_DEVICE[nic.model] for nic in spec.nics}
    for dev in spec.devices:
        needed |= _device_models_for(dev)
    if spec.command_channel == "virtio-console":
        needed |= {"virtio-serial-pci", "virtconsole"}
    return frozenset(needed)


def _device_models_for(dev: Device) -> set[str]:
    if isinstance(dev, Balloon):
        return {"virtio-balloon-pci"}
    if isinstance(dev, Rng):
        return {"virtio-rng-pci"}
    if isinstance(dev, SerialPorts):
        return {"virtio-serial-pci", "virtserialport"}
    if isinstance(dev, CdRom):
        return {
            "ide": {"ide-cd"},
            "ahci": {"ahci", "ide-cd"},
            "scsi": {"virtio-scsi-pci", "scsi-cd"},
        }[dev.bus]
    return {"pvpanic"}


def guest_modules(spec: MachineSpec) -> tuple[str, ...]:
    """Modules the guest must load for the spec's data disks and devices, in order.

    Why: the guest runs no udev and its initramfs carries only the root bus's
    drivers, so without this an AHCI data disk or a virtio-rng has no driver —
    a real distro would have loaded it, and tests assert on what binds.
    """
    wanted: list[str] = []
    for disk in spec.disks:
        wanted += ROOT_MODULES[disk.bus]
    for dev in spec.devices:
        wanted += _DEVICE_MODULES.get(type(dev).__name__, ())
        if isinstance(dev, CdRom):
            wanted += (_CDROM_HBA[dev.bus], "sr_mod")
    return tuple(dict.fromkeys(wanted))


#: Drivers that can bind a NIC model (either will do).
_NIC_DRIVERS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"virtio-net": ("virtio_net",), "e1000": ("e1000",), "e1000e": ("e1000e",),
     "rtl8139": ("8139cp", "8139too")}
)


def nic_modules(model: str) -> tuple[str, ...]:
    """The guest modules that drive a NIC of ``model`` (a virtio one's transport too):
    what a hot-plugged NIC needs loaded, with no udev in the guest to do it."""
    transport = ("virtio_pci",) if model == "virtio-net" else ()
    return (*transport, _NIC_DRIVERS[model][0])


def driver_needs(spec: MachineSpec) -> tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]:
    """(device, [alternatives per needed driver]) for every device of the spec.

    Why: checked against a kernel's modules before boot, so a kernel without a
    device's driver is reported naming the device and the driver.
    """
    needs: list[tuple[str, tuple[tuple[str, ...], ...]]] = [
        (f"the root disk (bus {spec.root_bus})", tuple((m,) for m in spec.root_modules))
    ]
    needs += [(f"disk {d.name!r} (bus {d.bus})", tuple((m,) for m in ROOT_MODULES[d.bus]))
              for d in spec.disks]
    needs += [(f"nic {n.name!r} (model {n.model})", (_NIC_DRIVERS[n.model],))
              for n in spec.nics]
    for dev in spec.devices:
        mods = _DEVICE_MODULES.get(type(dev).__name__, ())
        if isinstance(dev, CdRom):
            mods = (_CDROM_HBA[dev.bus], "sr_mod")
        if mods:
            needs.append((f"{type(dev).__name__.lower()} {dev.name!r}", tuple((m,) for m in mods)))
    return tuple(needs)


_DEVICE_MODULES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "Balloon": ("virtio_pci", "virtio_balloon"),
        "Rng": ("virtio_pci", "virtio_rng"),
        "SerialPorts": ("virtio_pci", "virtio_console"),
        "GuestAgent": ("virtio_pci", "virtio_console"),
    }
)
_CDROM_HBA: Final[Mapping[str, str]] = MappingProxyType(
    {"ide": "ata_piix", "ahci": "ahci", "scsi": "virtio_scsi"}
)
