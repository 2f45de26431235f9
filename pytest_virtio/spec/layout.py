"""Where devices go: controller units, SCSI controllers and the placement of each disk.

Below ``model``: it reads a machine through the :class:`Units` protocol (a
``MachineSpec`` is one), so ``MachineSpec.__post_init__`` can check its slots
here without an import circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pytest_virtio.errors import ConfigError
from pytest_virtio.spec._util import Props, _transport_props


class Unit(Protocol):
    """A disk or CD-ROM as placement sees it."""

    @property
    def name(self) -> str: ...
    @property
    def bus(self) -> str: ...


class DiskUnit(Unit, Protocol):
    """A data disk: also the options a shared virtio-scsi controller takes from it."""

    @property
    def transport(self) -> str: ...
    @property
    def num_queues(self) -> int | None: ...
    @property
    def queue_size(self) -> int | None: ...


class Units(Protocol):
    """What placement reads of a machine: its root bus, data disks and CD-ROMs."""

    @property
    def root_bus(self) -> str: ...
    @property
    def disks(self) -> Sequence[DiskUnit]: ...
    @property
    def cdroms(self) -> Sequence[Unit]: ...


def _unit_buses(spec: Units) -> list[tuple[str, str]]:
    """(name, controller) for every unit in placement order: root, disks, CD-ROMs.

    Controller is ide/ahci/lsi/scsi (virtio-scsi) or '' for one-device-per-PCI buses.
    """
    controller = {"ide": "ide", "ahci": "ahci", "lsi": "lsi", "virtio-scsi": "scsi"}
    units = [("root", controller.get(spec.root_bus, ""))]
    units += [(d.name, controller.get(d.bus, "")) for d in spec.disks]
    units += [(c.name, c.bus) for c in spec.cdroms]
    return units


def _controller_users(spec: Units) -> dict[str, int]:
    counts = dict.fromkeys(("ide", "ahci", "lsi", "scsi", ""), 0)
    for _, ctrl in _unit_buses(spec):
        counts[ctrl] += 1
    return counts


def _placements(spec: Units) -> dict[str, Props]:
    """Deterministic bus/unit for every unit on a shared controller."""
    next_index = dict.fromkeys(("ide", "ahci", "lsi", "scsi"), 0)
    placed: dict[str, Props] = {}
    for name, ctrl in _unit_buses(spec):
        if not ctrl:
            continue
        index = next_index[ctrl]
        next_index[ctrl] += 1
        placed[name] = _placement(ctrl, index)
    return placed


def _placement(ctrl: str, index: int) -> Props:
    if ctrl == "ide":
        return [("bus", f"ide.{index // 2}"), ("unit", str(index % 2))]
    if ctrl == "ahci":
        return [("bus", f"ahci0.{index}")]
    if ctrl == "lsi":
        return [("bus", "lsi0.0"), ("scsi-id", str(index))]
    return [("bus", "scsi0.0"), ("scsi-id", str(index)), ("lun", "0")]


def _scsi_controller_options(spec: Units) -> Props:
    """virtio-scsi-pci options: one controller is shared, so disks must agree."""
    scsi = [d for d in spec.disks if d.bus == "virtio-scsi"]
    chosen: dict[str, tuple[str, str]] = {}
    for disk in scsi:
        wanted = {"transport": disk.transport, "num_queues": disk.num_queues}
        wanted["queue_size"] = disk.queue_size
        for key, value in wanted.items():
            if value is None or value == "default":
                continue
            if key in chosen and chosen[key][1] != str(value):
                raise ConfigError(
                    f"virtio-scsi disks share one controller: disk {disk.name!r} wants "
                    f"{key}={value!r} but disk {chosen[key][0]!r} wants {chosen[key][1]!r}"
                )
            chosen[key] = (disk.name, str(value))
    props: Props = []
    if "num_queues" in chosen:
        props.append(("num_queues", chosen["num_queues"][1]))
    if "queue_size" in chosen:
        props.append(("virtqueue_size", chosen["queue_size"][1]))
    if "transport" in chosen:
        props += _transport_props(chosen["transport"][1])
    return props
