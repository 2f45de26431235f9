"""What exists: buses, models, machine types, slot limits and the drivers each device needs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from pytest_virtio import ids

DISK_BUSES: Final = ("virtio-blk", "vhost-user-blk", "virtio-scsi", "ide", "ahci", "lsi", "nvme")
ROOT_BUSES: Final = DISK_BUSES
VIRTIO_DISK_BUSES: Final = frozenset({"virtio-blk", "vhost-user-blk", "virtio-scsi"})
DISK_FORMATS: Final = ("raw", "qcow2")
CACHE_MODES: Final = ("none", "writeback", "writethrough", "unsafe", "directsync")
TRANSPORTS: Final = ("default", "modern", "legacy")
NIC_MODELS: Final = ("virtio-net", "e1000", "e1000e", "rtl8139")
#: What carries a NIC's frames on the host.  ``user``: QEMU's own user-mode stack
#: (slirp, in QEMU's process); ``passt``: Debian's ``passt``, one process per NIC
#: that QEMU reaches over a unix socket (``-netdev stream``); neither needs root.
#: ``tap``: a tap device in a network namespace of its own per NIC, made by the
#: plugin (root only); its fd is QEMU's (``-netdev tap,fd=N``).
NET_BACKENDS: Final = ("user", "passt", "tap")
CDROM_BUSES: Final = ("ide", "ahci", "scsi")
MACHINES: Final = ("pc", "q35")
#: How commands reach the guest's shell.  ``serial``: a second ISA UART (ttyS1), present
#: on every machine, emulated or not; exact, ~0.13 MB/s of output under TCG.
#: ``virtio-console``: a virtconsole port (hvc0) on its own virtio-serial controller;
#: the same framing, tens of times faster, but it adds a virtio device and virtio_console.
COMMAND_CHANNELS: Final = ("serial", "virtio-console")
#: The guest terminal each transport serves the shell on (pvinit's ``pv.cmd=``, default ttyS1).
COMMAND_TTYS: Final = MappingProxyType({"serial": "ttyS1", "virtio-console": "hvc0"})
DEVICE_KINDS: Final = ("balloon", "rng", "serial", "agent", "cdrom", "pvpanic")
MATRIX_AXES: Final = ("disk", "nic", "root_bus")

# Slot limits of the emulated controllers: exceeding them is a QEMU start failure,
# so they are checked up front.
IDE_UNITS: Final = 4  # PIIX: ide.0/ide.1 x unit 0/1
AHCI_PORTS: Final = 6  # one ide-hd/ide-cd per port
LSI_TARGETS: Final = 7  # scsi-id 0..6, 7 is the initiator
QUEUE_LIMIT: Final = 64

# Which buses accept which queue knobs (Disk field -> QEMU property per bus).
_NUM_QUEUES_PROP: Final[Mapping[str, str]] = MappingProxyType(
    {
        "virtio-blk": "num-queues",
        "vhost-user-blk": "num-queues",
        "virtio-scsi": "num_queues",
        "nvme": "max_ioqpairs",
    }
)
_QUEUE_SIZE_PROP: Final[Mapping[str, str]] = MappingProxyType(
    {"virtio-blk": "queue-size", "vhost-user-blk": "queue-size", "virtio-scsi": "virtqueue_size"}
)
#: Ring features a virtio-blk device may be told not to offer (QEMU's common virtio
#: device properties; virtio 1.2 §6: VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX).
RING_FEATURE_BUSES: Final = ("virtio-blk", "vhost-user-blk")
#: A Linux guest refuses a logical block larger than its page (blk_validate_block_size).
LOGICAL_BLOCK_SIZES: Final = (512, 1024, 2048, 4096)
#: Logical block sizes per bus: vhost-user-blk's is served by the in-process backend
#: (virtio 1.2 §5.2.4 blk_size); the others are QEMU's ``logical_block_size`` device
#: property (virtio-blk-pci, scsi-hd, ide-hd, nvme in 7.2); ide-hd refuses any but 512
#: ("logical_block_size must be 512 for IDE").
LOGICAL_BLOCK_SIZES_BY_BUS: Final[Mapping[str, tuple[int, ...]]] = MappingProxyType(
    {
        "vhost-user-blk": LOGICAL_BLOCK_SIZES,
        "virtio-blk": LOGICAL_BLOCK_SIZES,
        "virtio-scsi": LOGICAL_BLOCK_SIZES,
        "lsi": LOGICAL_BLOCK_SIZES,
        "nvme": LOGICAL_BLOCK_SIZES,
        "ide": (512,),
        "ahci": (512,),
    }
)
#: Buses whose QEMU device takes ``physical_block_size``: a power of two in
#: 512 B..2 MiB (QEMU 7.2's property range), never below the logical block.
PHYSICAL_BLOCK_SIZE_BUSES: Final = ("virtio-blk", "virtio-scsi", "ide", "ahci", "lsi", "nvme")
PHYSICAL_BLOCK_SIZES: Final = tuple(1 << n for n in range(9, 22))

#: The characters of a disk serial the guest sees, per bus. QEMU 7.2 takes a serial
#: of any length on every model and cuts it silently, so a longer one would never be
#: found in the guest: virtio-blk's GET_ID answer is VIRTIO_BLK_ID_BYTES (virtio 1.2
#: §5.2.6; the in-process vhost-user-blk backend answers the same), scsi-hd's VPD page
#: 0x80 holds 36, ATA IDENTIFY words 10-19 hold 20, NVMe's Identify Controller SN 20.
SERIAL_LIMITS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "virtio-blk": 20,
        "vhost-user-blk": 20,
        "virtio-scsi": 36,
        "lsi": 36,
        "ide": 20,
        "ahci": 20,
        "nvme": 20,
    }
)

ROOT_MODULES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "virtio-blk": ("virtio_pci", "virtio_blk"),
        "vhost-user-blk": ("virtio_pci", "virtio_blk"),
        "virtio-scsi": ("virtio_pci", "virtio_scsi", "sd_mod"),
        "ide": ("ata_piix", "sd_mod"),
        "ahci": ("ahci", "sd_mod"),
        "lsi": ("sym53c8xx", "sd_mod"),
        "nvme": ("nvme",),
    }
)
"""Root bus -> modules the initramfs must load before the root disk appears.

Debian builds every storage driver as a module, so the image builder needs this
list; modprobe resolves the dependencies (libata, nvme_core, virtio_ring...)."""

EXPECTED_DRIVER: Final[Mapping[str, str]] = MappingProxyType(
    {
        "virtio-blk": "virtio_blk",
        "vhost-user-blk": "virtio_blk",
        "virtio-scsi": "virtio_scsi",
        "ide": "ata_piix",
        "ahci": "ahci",
        "lsi": "sym53c8xx",
        "nvme": "nvme",
        "virtio-net": "virtio_net",
        "e1000": "e1000",
        "e1000e": "e1000e",
        "rtl8139": "8139cp",
        "virtio-balloon": "virtio_balloon",
        "virtio-rng": "virtio_rng",
        "virtio-serial": "virtio_console",
    }
)
"""Bus/model -> the Linux driver that binds it in a Debian guest.

rtl8139: QEMU's model advertises C+ mode, so Debian binds 8139cp (8139too is the
alternative driver a custom kernel may pick)."""

_NIC_DEVICE: Final[Mapping[str, str]] = MappingProxyType(
    {"virtio-net": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139"}
)

_DISK_DEVICES: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "virtio-blk": frozenset({"virtio-blk-pci"}),
        "vhost-user-blk": frozenset({"vhost-user-blk-pci"}),
        "virtio-scsi": frozenset({"virtio-scsi-pci", "scsi-hd"}),
        "ide": frozenset({"ide-hd"}),
        "ahci": frozenset({"ahci", "ide-hd"}),
        "lsi": frozenset({"lsi53c895a", "scsi-hd"}),
        "nvme": frozenset({"nvme"}),
    }
)

_NAME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_RESERVED_NAMES: Final = frozenset({ids.ROOT, ids.MODULES_DEVICE, ids.COMMAND_SERIAL_BUS})
