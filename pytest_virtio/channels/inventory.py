"""What the guest's sysfs says about devices and drivers: the scripts and their parsers.

Pure: each parser takes the text its script printed in the guest, so the
parsing is unit-tested without a guest and ``Guest`` only runs the script.
No udev runs in our guests, so everything is read from sysfs and /proc
directly rather than from /dev/disk/by-id or udevadm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = [
    "BLOCK_SCRIPT",
    "DRIVER_CHAIN",
    "MODULES_SCRIPT",
    "PCI_SCRIPT",
    "VIRTIO_SCRIPT",
    "Module",
    "PciDevice",
    "VirtioDevice",
    "parse_block_devices",
    "parse_modules",
    "parse_pci_devices",
    "parse_virtio_devices",
]


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


VIRTIO_SCRIPT = r"""
for dev in /sys/bus/virtio/devices/*; do
  [ -e "$dev" ] || continue
  n=${dev##*/}
  drv=-; [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
  parent=$(basename "$(dirname "$(readlink -f "$dev")")")
  echo "$n $(cat "$dev/device") $drv $parent"
done
"""

BLOCK_SCRIPT = r"""
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

DRIVER_CHAIN = r"""
d=$(readlink -f {path})
while [ "$d" != / ] && [ "$d" != /sys/devices ]; do
  [ -e "$d/driver" ] && basename "$(readlink "$d/driver")"
  d=$(dirname "$d")
done
"""

PCI_SCRIPT = r"""
for dev in /sys/bus/pci/devices/*; do
  drv=-; [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
  echo "${dev##*/} $(cat "$dev/vendor") $(cat "$dev/device") $(cat "$dev/class") $drv"
done
"""

#: Loaded modules, then (after a marker line) the kernel's built-in ones.
MODULES_SCRIPT = (
    "cat /proc/modules; echo '--builtin--'; "
    "cat /lib/modules/$(uname -r)/modules.builtin 2>/dev/null"
)


def parse_virtio_devices(out: str) -> list[VirtioDevice]:
    """VIRTIO_SCRIPT's lines: name, device id (hex), driver or '-', parent."""
    devices = []
    for line in out.splitlines():
        name, dev_id, drv, parent = line.split()
        devices.append(VirtioDevice(
            name=name, device_id=int(dev_id, 16),
            driver=None if drv == "-" else drv,
            pci=parent if ":" in parent else None,
        ))
    return devices


def parse_pci_devices(out: str) -> list[PciDevice]:
    """PCI_SCRIPT's lines: slot, vendor, device, class (hex), driver or '-'."""
    devices = []
    for line in out.splitlines():
        slot, vendor, device, cls, drv = line.split()
        devices.append(PciDevice(slot, int(vendor, 16), int(device, 16), int(cls, 16),
                                 None if drv == "-" else drv))
    return devices


def parse_modules(out: str) -> dict[str, Module]:
    """MODULES_SCRIPT's output: /proc/modules entries and built-ins (``builtin=True``)."""
    loaded, _, builtin = out.partition("--builtin--\n")
    mods: dict[str, Module] = {}
    for line in builtin.split():
        name = PurePosixPath(line).name.split(".ko")[0].replace("-", "_")
        mods[name] = Module(name, 0, (), builtin=True)
    for line in loaded.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        users = tuple(u for u in parts[3].split(",") if u and u != "-")
        mods[parts[0]] = Module(parts[0], int(parts[1]), users)
    return mods


def parse_block_devices(out: str) -> dict[str, str]:
    """BLOCK_SCRIPT's lines: device name, then its serial ("" if none)."""
    devs: dict[str, str] = {}
    for line in out.splitlines():
        name, _, serial = line.partition(" ")
        devs[name] = serial.strip()
    return devs

