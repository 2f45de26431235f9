"""The device catalogue: a guest described as frozen data, turned into a QEMU argv.

A package: model (devices, MachineSpec), catalogue, layout, context, argv,
drivers, hotplug, parse (marker keywords) and matrix; this module re-exports
the public names so ``from pytest_virtio import spec`` is the one entry.

Why this module is pure (no I/O, no subprocess, no filesystem reads): the argv is
the one artefact a user needs to reproduce a failure, so it must be a function of
the spec and the launch context alone — golden-testable, identical on every
machine, cheap to compute at collection time.  Everything that depends on the
host (does the ISO exist, which QEMU devices are compiled in) is checked elsewhere
(``qemu.capabilities``, ``qemu.machine``).

Validation happens in ``__post_init__`` so an impossible guest is a ConfigError
when the marker is read, not a cryptic QEMU exit half-way through a test run.
Every message lists the valid choices.
"""

from __future__ import annotations

from pytest_virtio.spec.argv import command_channel_append, device_argv, nic_mac, to_argv
from pytest_virtio.spec.catalogue import (
    CACHE_MODES,
    CDROM_BUSES,
    DEVICE_KINDS,
    DISK_BUSES,
    DISK_FORMATS,
    EXPECTED_DRIVER,
    MACHINES,
    MATRIX_AXES,
    NET_BACKENDS,
    NIC_MODELS,
    ROOT_BUSES,
    ROOT_MODULES,
    TRANSPORTS,
)
from pytest_virtio.spec.context import LaunchContext
from pytest_virtio.spec.drivers import (
    driver_needs,
    guest_modules,
    nic_modules,
    required_qemu_devices,
)
from pytest_virtio.spec.hotplug import hotplug_commands, hotplug_props, nic_hotplug_commands
from pytest_virtio.spec.matrix import apply_matrix, matrix_params
from pytest_virtio.spec.model import (
    Balloon,
    CdRom,
    Device,
    Disk,
    GuestAgent,
    MachineSpec,
    Nic,
    Pvpanic,
    Rng,
    SerialPorts,
)
from pytest_virtio.spec.parse import SPEC_KEYS, item_keys, spec_from_kwargs

__all__ = [
    "CACHE_MODES",
    "CDROM_BUSES",
    "DEVICE_KINDS",
    "DISK_BUSES",
    "DISK_FORMATS",
    "EXPECTED_DRIVER",
    "MACHINES",
    "MATRIX_AXES",
    "NET_BACKENDS",
    "NIC_MODELS",
    "ROOT_BUSES",
    "ROOT_MODULES",
    "SPEC_KEYS",
    "TRANSPORTS",
    "Balloon",
    "CdRom",
    "Device",
    "Disk",
    "GuestAgent",
    "LaunchContext",
    "MachineSpec",
    "Nic",
    "Pvpanic",
    "Rng",
    "SerialPorts",
    "apply_matrix",
    "command_channel_append",
    "device_argv",
    "driver_needs",
    "guest_modules",
    "hotplug_commands",
    "hotplug_props",
    "item_keys",
    "matrix_params",
    "nic_hotplug_commands",
    "nic_mac",
    "nic_modules",
    "required_qemu_devices",
    "spec_from_kwargs",
    "to_argv",
]
