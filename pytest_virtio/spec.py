"""The device catalogue: a guest described as frozen data, turned into a QEMU argv.

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

import dataclasses
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeAlias

from pytest_virtio import ids
from pytest_virtio.errors import ConfigError
from pytest_virtio.units import parse_size

__all__ = [
    "CACHE_MODES",
    "CDROM_BUSES",
    "DEVICE_KINDS",
    "DISK_BUSES",
    "DISK_FORMATS",
    "EXPECTED_DRIVER",
    "MACHINES",
    "MATRIX_AXES",
    "NIC_MODELS",
    "ROOT_BUSES",
    "ROOT_MODULES",
    "SPEC_KEYS",
    "TRANSPORTS",
    "Balloon",
    "CdRom",
    "Device",
    "Disk",
    "LaunchContext",
    "MachineSpec",
    "Nic",
    "Pvpanic",
    "Rng",
    "SerialPorts",
    "apply_matrix",
    "device_argv",
    "driver_needs",
    "guest_modules",
    "hotplug_commands",
    "hotplug_props",
    "item_keys",
    "matrix_params",
    "nic_mac",
    "required_qemu_devices",
    "spec_from_kwargs",
    "to_argv",
]

# --------------------------------------------------------------------------- catalogue

DISK_BUSES: Final = ("virtio-blk", "vhost-user-blk", "virtio-scsi", "ide", "ahci", "lsi", "nvme")
ROOT_BUSES: Final = DISK_BUSES
VIRTIO_DISK_BUSES: Final = frozenset({"virtio-blk", "vhost-user-blk", "virtio-scsi"})
DISK_FORMATS: Final = ("raw", "qcow2")
CACHE_MODES: Final = ("none", "writeback", "writethrough", "unsafe", "directsync")
TRANSPORTS: Final = ("default", "modern", "legacy")
NIC_MODELS: Final = ("virtio-net", "e1000", "e1000e", "rtl8139")
CDROM_BUSES: Final = ("ide", "ahci", "scsi")
MACHINES: Final = ("pc", "q35")
DEVICE_KINDS: Final = ("balloon", "rng", "serial", "cdrom", "pvpanic")
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
_RESERVED_NAMES: Final = frozenset({ids.ROOT, ids.MODULES_DEVICE})


# --------------------------------------------------------------------------- helpers


def _choices(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _check_choice(value: object, choices: Sequence[str], what: str) -> None:
    """Raise a ConfigError naming the bad value and every valid one."""
    if value not in choices:
        raise ConfigError(f"{what} {value!r} is not valid; choose one of: {_choices(choices)}")


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} name {name!r} is not valid: use a letter then up to 31 letters, "
            "digits, '_' or '-' (it becomes a QEMU id)"
        )
    if name in _RESERVED_NAMES:
        raise ConfigError(f"{what} name {name!r} is reserved for the root disk; pick another")


def _check_virtio_identity(name: object, transport: object, what: str) -> None:
    """A virtio device's name and transport, validated the same way for every kind."""
    _check_name(name, what)
    _check_choice(transport, TRANSPORTS, f"{what} {name!r}: transport")


def _check_count(value: object, what: str, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}")


def _esc(value: str) -> str:
    """QEMU option values escape ',' by doubling it (paths may contain commas)."""
    return value.replace(",", ",,")


Props: TypeAlias = list[tuple[str, str]]


def _opts(head: str, props: Props) -> str:
    """``head,k=v,k=v`` with values escaped; an empty head gives ``k=v,...``."""
    parts = [head] if head else []
    parts += [f"{key}={_esc(val)}" for key, val in props]
    return ",".join(parts)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _transport_props(transport: str) -> Props:
    """Forcing modern-only or legacy-only virtio-pci (default: QEMU's transitional)."""
    if transport == "modern":
        return [("disable-legacy", "on"), ("disable-modern", "off")]
    if transport == "legacy":
        return [("disable-modern", "on"), ("disable-legacy", "off")]
    return []


def _as_tuple(value: Any, what: str) -> tuple[Any, ...]:
    """Markers pass lists; frozen specs need tuples. A lone item becomes a 1-tuple."""
    if value is None:
        return ()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        return (value,)
    return tuple(value)


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    items = _as_tuple(value, what)
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{what} must be strings, got {item!r}")
    return items


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class Disk:
    """A data disk. ``bus`` picks the device model and who serves the I/O.

    The default bus is vhost-user-blk because the project's point is the
    in-process backend; ``image`` (raw|qcow2) replaces the blank ``size`` file.
    The guest sees ``serial`` (default: the name) so tests can find the disk by
    id; for vhost-user-blk the backend answers GET_ID, so QEMU's argv has none.
    """

    name: str = "disk0"
    bus: str = "vhost-user-blk"
    size: str | int = "64M"
    image: str | None = None
    format: str = "raw"
    readonly: bool = False
    cache: str = "none"
    serial: str | None = None
    num_queues: int | None = None
    queue_size: int | None = None
    #: The block size the guest sees (virtio 1.2 §5.2.4 blk_size), served by the
    #: in-process backend; requests not in whole blocks get IOERR.
    logical_block_size: int | None = None
    #: False switches the ring feature off on the device (QEMU ``event_idx=off``).
    event_idx: bool = True
    #: False switches indirect descriptors off (QEMU ``indirect_desc=off``).
    indirect_desc: bool = True
    transport: str = "default"
    discard: bool = False
    reconnect: int | None = None
    #: vhost-user-blk served by an outside daemon listening here (e.g. for comparing
    #: against qemu-storage-daemon): no in-process backend is started for the disk.
    external_socket: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "disk")
        _check_choice(self.bus, DISK_BUSES, f"disk {self.name!r}: bus")
        _check_choice(self.format, DISK_FORMATS, f"disk {self.name!r}: format")
        _check_choice(self.cache, CACHE_MODES, f"disk {self.name!r}: cache")
        _check_choice(self.transport, TRANSPORTS, f"disk {self.name!r}: transport")
        if self.image is None:
            parse_size(self.size, f"disk {self.name!r}: size", positive=True)
            if self.format != "raw":
                raise ConfigError(
                    f"disk {self.name!r}: a blank disk (no image=) is always 'raw'; "
                    f"format={self.format!r} needs image= an existing {self.format} file"
                )
        elif not isinstance(self.image, str) or not self.image:
            raise ConfigError(f"disk {self.name!r}: image must be a file path, got {self.image!r}")
        self._check_bus_options()
        self._check_queues()
        self._check_serial()

    @property
    def size_bytes(self) -> int:
        """The blank disk's size in bytes (meaningless when ``image`` is set)."""
        return parse_size(self.size)

    @property
    def drive_id(self) -> str:
        return ids.drive_id(self.name)

    def _check_bus_options(self) -> None:
        where = f"disk {self.name!r} (bus {self.bus!r})"
        if self.transport != "default" and self.bus not in VIRTIO_DISK_BUSES:
            raise ConfigError(
                f"{where}: transport={self.transport!r} only applies to virtio buses: "
                f"{_choices(sorted(VIRTIO_DISK_BUSES))}"
            )
        if self.bus == "vhost-user-blk":
            self._check_vhost_user()
        elif self.reconnect is not None:
            raise ConfigError(f"{where}: reconnect= only applies to bus 'vhost-user-blk'")
        elif self.external_socket is not None:
            raise ConfigError(f"{where}: external_socket= only applies to bus 'vhost-user-blk'")
        if self.readonly and self.bus in ("ide", "ahci"):
            raise ConfigError(
                f"{where}: QEMU's ide-hd cannot use a read-only drive; use one of "
                f"{_choices(b for b in DISK_BUSES if b not in ('ide', 'ahci'))} "
                "or a CdRom"
            )

    def _check_vhost_user(self) -> None:
        where = f"disk {self.name!r} (bus 'vhost-user-blk')"
        if self.format != "raw":
            raise ConfigError(
                f"{where}: the in-process backend serves raw files only; "
                "format must be 'raw' (or use bus 'virtio-blk' for qcow2)"
            )
        if self.cache != "none":
            raise ConfigError(
                f"{where}: cache= is a QEMU block-layer option and does not apply to "
                "vhost-user-blk; leave it at 'none' or use bus 'virtio-blk'"
            )
        if self.discard:
            raise ConfigError(f"{where}: discard= is a QEMU block-layer option; use 'virtio-blk'")
        _check_count(self.reconnect, f"{where}: reconnect (seconds)", 1, 60)

    def _check_queues(self) -> None:
        where = f"disk {self.name!r} (bus {self.bus!r})"
        if self.num_queues is not None and self.bus not in _NUM_QUEUES_PROP:
            raise ConfigError(
                f"{where}: num_queues is only supported on buses: {_choices(_NUM_QUEUES_PROP)}"
            )
        if self.queue_size is not None and self.bus not in _QUEUE_SIZE_PROP:
            raise ConfigError(
                f"{where}: queue_size is only supported on buses: {_choices(_QUEUE_SIZE_PROP)}"
            )
        _check_count(self.num_queues, f"{where}: num_queues", 1, QUEUE_LIMIT)
        _check_count(self.queue_size, f"{where}: queue_size", 2, 1024)
        size = self.queue_size
        if size is not None and size & (size - 1):
            raise ConfigError(f"{where}: queue_size must be a power of two, got {size}")
        for flag in ("event_idx", "indirect_desc"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {flag} must be True or False, got {value!r}")
            if not value and self.bus not in RING_FEATURE_BUSES:
                raise ConfigError(f"{where}: {flag}=False is only supported on buses: "
                                  f"{_choices(RING_FEATURE_BUSES)}")
        lbs = self.logical_block_size
        if lbs is not None:
            if self.bus != "vhost-user-blk" or self.external_socket is not None:
                raise ConfigError(f"{where}: logical_block_size is served by the in-process "
                                  "backend, so only bus 'vhost-user-blk' supports it")
            if isinstance(lbs, bool) or lbs not in LOGICAL_BLOCK_SIZES:
                raise ConfigError(f"{where}: logical_block_size must be one of "
                                  f"{_choices(str(n) for n in LOGICAL_BLOCK_SIZES)}, got {lbs!r}")

    def _check_serial(self) -> None:
        if self.serial is None:
            if len(self.name) > 20:
                raise ConfigError(
                    f"disk {self.name!r}: the name doubles as the disk serial, which holds "
                    "20 characters; shorten it or give serial="
                )
            return
        where = f"disk {self.name!r} (bus {self.bus!r})"
        if not isinstance(self.serial, str) or not re.match(r"^[A-Za-z0-9_.-]{1,20}$", self.serial):
            raise ConfigError(
                f"{where}: serial must be 1..20 characters of letters, digits, '_', '.', '-'"
                f", got {self.serial!r}"
            )


@dataclass(frozen=True, slots=True)
class Nic:
    """A NIC on QEMU user-mode networking (no root, no bridge, xdist-safe).

    ``hostfwd_ssh`` forwards a kernel-chosen host port (read back over QMP) to
    guest port 22. ``queues`` above 1 is refused: the user-mode netdev has a
    single queue pair, so multiqueue would silently measure nothing.
    """

    model: str = "virtio-net"
    name: str = "net0"
    hostfwd_ssh: bool = True
    transport: str = "default"
    queues: int | None = None
    mac: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "nic")
        _check_choice(self.model, NIC_MODELS, f"nic {self.name!r}: model")
        _check_choice(self.transport, TRANSPORTS, f"nic {self.name!r}: transport")
        if self.transport != "default" and self.model != "virtio-net":
            raise ConfigError(
                f"nic {self.name!r}: transport={self.transport!r} only applies to model "
                "'virtio-net'"
            )
        if self.queues is not None and self.model != "virtio-net":
            raise ConfigError(f"nic {self.name!r}: queues only applies to model 'virtio-net'")
        if self.queues not in (None, 1):
            raise ConfigError(
                f"nic {self.name!r}: queues={self.queues!r} is not possible: user-mode "
                "networking has one queue pair; valid values: None, 1"
            )
        if self.mac is not None and not re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", self.mac):
            raise ConfigError(
                f"nic {self.name!r}: mac must look like 52:54:00:12:34:56, got {self.mac!r}"
            )


@dataclass(frozen=True, slots=True)
class Balloon:
    """virtio-balloon: ``guest.balloon(target)`` resizes guest RAM, ``balloon_stats()`` reads it.

    ``deflate_on_oom`` (virtio 1.2 §5.5.3, VIRTIO_BALLOON_F_DEFLATE_ON_OOM): the
    guest may take pages back from the balloon instead of OOM-killing.
    ``free_page_reporting`` (§5.5.3, VIRTIO_BALLOON_F_PAGE_REPORTING): the guest
    reports freed pages so the host can reclaim them.
    """

    name: str = "balloon0"
    transport: str = "default"
    deflate_on_oom: bool = False
    free_page_reporting: bool = False

    def __post_init__(self) -> None:
        _check_virtio_identity(self.name, self.transport, "balloon")
        for key in ("deflate_on_oom", "free_page_reporting"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(
                    f"balloon {self.name!r}: {key} must be True or False, "
                    f"got {getattr(self, key)!r}"
                )


@dataclass(frozen=True, slots=True)
class Rng:
    """virtio-rng fed from the host's /dev/urandom (never blocks the guest's boot)."""

    name: str = "rng0"
    transport: str = "default"

    def __post_init__(self) -> None:
        _check_virtio_identity(self.name, self.transport, "rng")


@dataclass(frozen=True, slots=True)
class SerialPorts:
    """A virtio-serial controller with named ports, each a unix socket on the host.

    The socket paths come from ``LaunchContext.serial_sockets`` (port name ->
    path) because only the machine knows its run directory.
    """

    names: tuple[str, ...] = ("org.test.0",)
    name: str = "vser0"
    transport: str = "default"

    def __post_init__(self) -> None:
        _check_virtio_identity(self.name, self.transport, "serial")
        names = _str_tuple(self.names, f"serial {self.name!r}: names")
        object.__setattr__(self, "names", names)
        if not names or len(names) > 30:
            raise ConfigError(f"serial {self.name!r}: give 1..30 port names, got {len(names)}")
        for port in names:
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", port):
                raise ConfigError(
                    f"serial {self.name!r}: port name {port!r} must be 1..64 characters of "
                    "letters, digits, '_', '.', '-'"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"serial {self.name!r}: duplicate port names in {names!r}")


@dataclass(frozen=True, slots=True)
class CdRom:
    """A read-only ISO on an emulated CD drive (ide-cd, or scsi-cd on virtio-scsi)."""

    iso: str = ""
    bus: str = "ide"
    name: str = "cd0"

    def __post_init__(self) -> None:
        _check_name(self.name, "cdrom")
        _check_choice(self.bus, CDROM_BUSES, f"cdrom {self.name!r}: bus")
        if not isinstance(self.iso, str) or not self.iso:
            raise ConfigError(f"cdrom {self.name!r}: iso= (path of an ISO image) is required")

    @property
    def drive_id(self) -> str:
        return ids.drive_id(self.name)


@dataclass(frozen=True, slots=True)
class Pvpanic:
    """pvpanic is in every guest's base argv (panics must fail fast); naming it is a no-op."""

    name: str = "pvpanic"


Device: TypeAlias = Balloon | Rng | SerialPorts | CdRom | Pvpanic
_DEVICE_TYPES: Final = (Balloon, Rng, SerialPorts, CdRom, Pvpanic)
_DEVICE_CLASS: Final[Mapping[str, type[Any]]] = MappingProxyType(
    {"balloon": Balloon, "rng": Rng, "serial": SerialPorts, "cdrom": CdRom, "pvpanic": Pvpanic}
)


# --------------------------------------------------------------------------- machine


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """One guest: memory, CPUs, root disk bus, data disks, NICs, other devices.

    ``kernel_args`` are for whoever builds ``LaunchContext.append`` (the machine
    joins them to the image's base line); ``extra_args`` are raw QEMU arguments
    appended last by ``to_argv`` (the escape hatch).
    """

    memory: str | int = "512M"
    smp: int = 1
    machine: str = "pc"
    root_bus: str = "virtio-blk"
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    devices: tuple[Device, ...] = ()
    kernel_args: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    #: Modules the initramfs loads to find the root disk; None = ROOT_MODULES[root_bus].
    #: Naming them lets a test prove what happens when a driver is missing.
    initramfs_modules: tuple[str, ...] | None = None
    #: This test's own kernel (bzImage, vmlinux or build tree) and its modules
    #: (see ``--virtio-kernel``/``--virtio-modules``); None = the session's.
    kernel: str | None = None
    modules: str | None = None

    def __post_init__(self) -> None:
        for name in ("disks", "nics", "devices"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name))
        object.__setattr__(self, "kernel_args", _str_tuple(self.kernel_args, "kernel_args"))
        object.__setattr__(self, "extra_args", _str_tuple(self.extra_args, "extra_args"))
        if self.initramfs_modules is not None:
            mods = _str_tuple(self.initramfs_modules, "initramfs_modules")
            for mod in mods:
                if not re.fullmatch(r"[A-Za-z0-9_-]+", mod):
                    raise ConfigError(f"initramfs_modules: {mod!r} is not a module name")
            object.__setattr__(self, "initramfs_modules", mods)
        for key in ("kernel", "modules"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{key} must be a path (str), got {value!r}")
        if self.modules is not None and self.kernel is None:
            raise ConfigError("modules goes with kernel: give the kernel these modules belong to")
        mem = parse_size(self.memory, "memory", positive=True)
        if mem % (1 << 20) or not 64 << 20 <= mem <= 64 << 30:
            raise ConfigError(
                f"memory must be a whole number of MiB in 64M..64G, got {self.memory!r}"
            )
        _check_count(self.smp, "smp", 1, 8)
        _check_choice(self.machine, MACHINES, "machine")
        _check_choice(self.root_bus, ROOT_BUSES, "root_bus")
        self._check_types()
        self._check_names()
        self._check_slots()
        _scsi_controller_options(self)

    @property
    def memory_mib(self) -> int:
        return parse_size(self.memory) >> 20

    @property
    def root_modules(self) -> tuple[str, ...]:
        """What the initramfs must load: the explicit list, else the root bus's drivers."""
        if self.initramfs_modules is not None:
            return self.initramfs_modules
        return ROOT_MODULES[self.root_bus]

    def replace(self, **changes: Any) -> MachineSpec:
        """A copy with ``changes`` applied and re-validated."""
        return dataclasses.replace(self, **changes)

    def merge(self, **changes: Any) -> MachineSpec:
        """Like ``replace`` but sequence fields are extended instead of replaced.

        Why: a fixture default (say, one NIC) plus a marker adding a disk should
        give both, not whichever came last."""
        merged: dict[str, Any] = {}
        for key, value in changes.items():
            current = getattr(self, key)
            merged[key] = current + _as_tuple(value, key) if isinstance(current, tuple) else value
        return dataclasses.replace(self, **merged)

    def _check_types(self) -> None:
        for disk in self.disks:
            if not isinstance(disk, Disk):
                raise ConfigError(f"disks must be Disk objects, got {disk!r}")
        for nic in self.nics:
            if not isinstance(nic, Nic):
                raise ConfigError(f"nics must be Nic objects, got {nic!r}")
        for dev in self.devices:
            if not isinstance(dev, _DEVICE_TYPES):
                raise ConfigError(
                    f"devices must be one of {_choices(DEVICE_KINDS)} "
                    f"(Balloon, Rng, SerialPorts, CdRom, Pvpanic), got {dev!r}"
                )

    def _check_names(self) -> None:
        seen: set[str] = set()
        for item in (*self.disks, *self.nics, *self.devices):
            if item.name in seen:
                raise ConfigError(
                    f"duplicate device name {item.name!r}: every disk, nic and device "
                    "needs its own name"
                )
            seen.add(item.name)
        if sum(isinstance(d, Balloon) for d in self.devices) > 1:
            raise ConfigError("QEMU supports only one balloon device per guest")
        ports = [p for d in self.devices if isinstance(d, SerialPorts) for p in d.names]
        if len(ports) != len(set(ports)):
            raise ConfigError(f"duplicate virtio-serial port names across devices: {ports!r}")

    def _check_slots(self) -> None:
        counts = _controller_users(self)
        if counts["ide"] and self.machine != "pc":
            raise ConfigError(
                f"IDE disks/CD-ROMs need machine 'pc' (PIIX IDE); machine {self.machine!r} "
                "has none — use bus 'ahci' instead"
            )
        limits = {"ide": IDE_UNITS, "ahci": AHCI_PORTS, "lsi": LSI_TARGETS}
        for bus, limit in limits.items():
            if counts[bus] > limit:
                raise ConfigError(
                    f"too many {bus} units: {counts[bus]} (root disk and CD-ROMs included) "
                    f"but the controller has {limit}"
                )


# --------------------------------------------------------------------------- layout


def _cdroms(spec: MachineSpec) -> list[CdRom]:
    return [d for d in spec.devices if isinstance(d, CdRom)]


def _unit_buses(spec: MachineSpec) -> list[tuple[str, str]]:
    """(name, controller) for every unit in placement order: root, disks, CD-ROMs.

    Controller is ide/ahci/lsi/scsi (virtio-scsi) or '' for one-device-per-PCI buses.
    """
    controller = {"ide": "ide", "ahci": "ahci", "lsi": "lsi", "virtio-scsi": "scsi"}
    units = [("root", controller.get(spec.root_bus, ""))]
    units += [(d.name, controller.get(d.bus, "")) for d in spec.disks]
    units += [(c.name, c.bus) for c in _cdroms(spec)]
    return units


def _controller_users(spec: MachineSpec) -> dict[str, int]:
    counts = dict.fromkeys(("ide", "ahci", "lsi", "scsi", ""), 0)
    for _, ctrl in _unit_buses(spec):
        counts[ctrl] += 1
    return counts


def _placements(spec: MachineSpec) -> dict[str, Props]:
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


def _scsi_controller_options(spec: MachineSpec) -> Props:
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


# --------------------------------------------------------------------------- context


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchContext:
    """Where things are on this host for this one launch (paths, binary, accel).

    Separate from MachineSpec because the spec is the test's wish (hashable,
    comparable, shown in ids) while these are per-run facts chosen by the machine.
    ``append`` is the complete kernel command line (image base line plus
    ``spec.kernel_args``): composing it is the machine's job, ``to_argv`` uses it
    verbatim.
    """

    qemu_binary: str
    accel: str
    kernel: str
    initrd: str
    root_image: str
    root_format: str = "raw"
    #: False when ``root_image`` is already this guest's own overlay (a snapshot
    #: template's, or one made for a restore): QEMU writes it instead of a temp file.
    root_snapshot: bool = True
    #: Guest RAM in a shared memfd, which vhost-user back-ends map.  A restored
    #: guest with no vhost-user device gets private RAM instead: loading a
    #: saved state reads every page, and a read of a memfd hole allocates it
    #: (all of RAM resident) where private memory maps the zero page.
    shared_memory: bool = True
    append: str = ""
    qmp_socket: str
    console_socket: str
    console_log: str
    disk_files: Mapping[str, str] = field(default_factory=dict)
    vhost_sockets: Mapping[str, str] = field(default_factory=dict)
    serial_sockets: Mapping[str, str] = field(default_factory=dict)
    name: str = "guest"
    #: fw_cfg blob name → host file (``-fw_cfg name=..,file=..``): per-launch data
    #: such as the session's SSH public key, which must not live in the shared image.
    fw_cfg: Mapping[str, str] = field(default_factory=dict)
    #: A user kernel's modules disk (read-only ext4, label ``pvmods``), attached
    #: on the root disk's bus so the initramfs's own root drivers find it.
    modules_image: str | None = None

    def __post_init__(self) -> None:
        _check_choice(self.accel, ("kvm", "tcg"), "accel")
        _check_choice(self.root_format, DISK_FORMATS, "root_format")
        for attr in ("disk_files", "vhost_sockets", "serial_sockets", "fw_cfg"):
            object.__setattr__(self, attr, _frozen_map(getattr(self, attr)))


def _lookup(mapping: Mapping[str, str], key: str, what: str) -> str:
    try:
        return mapping[key]
    except KeyError:
        raise ConfigError(
            f"LaunchContext.{what} has no entry for {key!r} (has: {_choices(sorted(mapping))})"
        ) from None


def _disk_file(disk: Disk, ctx: LaunchContext) -> str:
    if disk.name in ctx.disk_files:
        return ctx.disk_files[disk.name]
    if disk.image is not None:
        return disk.image
    return _lookup(ctx.disk_files, disk.name, "disk_files")


# --------------------------------------------------------------------------- argv


def _base_argv(spec: MachineSpec, ctx: LaunchContext) -> list[str]:
    mem = f"{spec.memory_mib}M"
    console = [("id", "con0"), ("path", ctx.console_socket), ("server", "on")]
    console += [("wait", "off"), ("logfile", ctx.console_log), ("logappend", "on")]
    qmp = [("id", "qmp0"), ("path", ctx.qmp_socket), ("server", "on"), ("wait", "off")]
    return [
        ctx.qemu_binary,
        "-name", ctx.name,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-machine", f"{spec.machine},accel={ctx.accel},memory-backend=mem",
        "-cpu", "host" if ctx.accel == "kvm" else "max",
        "-smp", str(spec.smp),
        "-m", mem,
        "-object", (f"memory-backend-memfd,id=mem,size={mem},share=on" if ctx.shared_memory
                    else f"memory-backend-ram,id=mem,size={mem}"),
        "-kernel", ctx.kernel,
        "-initrd", ctx.initrd,
        "-append", ctx.append,
        "-chardev", _opts("socket", console),
        "-serial", "chardev:con0",
        "-chardev", _opts("socket", qmp),
        "-mon", "chardev=qmp0,mode=control",
        "-device", "pvpanic",
        "-no-reboot",
        *_fw_cfg_argv(ctx),
    ]  # fmt: skip


def _fw_cfg_argv(ctx: LaunchContext) -> list[str]:
    """One ``-fw_cfg`` per blob, sorted so the argv does not depend on dict order."""
    argv: list[str] = []
    for name, path in sorted(ctx.fw_cfg.items()):
        argv += ["-fw_cfg", _opts("", [("name", name), ("file", path)])]
    return argv


def _controllers_argv(spec: MachineSpec) -> list[str]:
    """Shared controllers, once each, before any unit that plugs into them."""
    counts = _controller_users(spec)
    argv: list[str] = []
    if counts["scsi"]:
        argv += [
            "-device",
            _opts("virtio-scsi-pci", [("id", "scsi0"), *_scsi_controller_options(spec)]),
        ]
    if counts["ahci"]:
        argv += ["-device", "ahci,id=ahci0"]
    if counts["lsi"]:
        argv += ["-device", "lsi53c895a,id=lsi0"]
    return argv


def _drive(drive_id: str, path: str, props: Props) -> list[str]:
    return ["-drive", _opts("", [("if", "none"), ("id", drive_id), ("file", path), *props])]


def _disk_drive_props(disk: Disk) -> Props:
    props = [("format", disk.format), ("cache", disk.cache), ("readonly", _onoff(disk.readonly))]
    if disk.discard:
        props.append(("discard", "unmap"))
    return props


def _frontend_props(disk: Disk | None, bus: str) -> Props:
    """Per-disk device options: serial, queues, transport (None = the root disk)."""
    if disk is None:
        return [("serial", "root")] if bus == "nvme" else []
    props: Props = []
    if bus != "vhost-user-blk":
        props.append(("serial", disk.serial or disk.name))
    if disk.num_queues is not None and bus != "virtio-scsi":
        props.append((_NUM_QUEUES_PROP[bus], str(disk.num_queues)))
    if disk.queue_size is not None and bus != "virtio-scsi":
        props.append((_QUEUE_SIZE_PROP[bus], str(disk.queue_size)))
    props += [(k, "off") for k in _ring_features_off(disk)]
    if bus != "virtio-scsi":
        props += _transport_props(disk.transport)
    return props


def _ring_features_off(disk: Disk) -> list[str]:
    """QEMU property names of the ring features the disk switches off."""
    return [flag for flag in ("event_idx", "indirect_desc") if not getattr(disk, flag)]


_FRONTEND_MODEL: Final[Mapping[str, str]] = MappingProxyType(
    {
        "virtio-blk": "virtio-blk-pci",
        "virtio-scsi": "scsi-hd",
        "ide": "ide-hd",
        "ahci": "ide-hd",
        "lsi": "scsi-hd",
        "nvme": "nvme",
    }
)


def _block_device(
    bus: str, ident: str, drive_id: str, placement: Props, disk: Disk | None
) -> list[str]:
    """The -device for a disk served by QEMU's block layer."""
    props = [*placement, ("drive", drive_id), ("id", ident), *_frontend_props(disk, bus)]
    return ["-device", _opts(_FRONTEND_MODEL[bus], props)]


def _vhost_user_device(
    ident: str, socket: str, disk: Disk | None, reconnect: int | None
) -> list[str]:
    chardev = [("id", ids.vhost_chardev_id(ident)), ("path", socket)]
    if reconnect is not None:
        chardev.append(("reconnect", str(reconnect)))
    props = [("chardev", ids.vhost_chardev_id(ident)), ("id", ident),
             *_frontend_props(disk, "vhost-user-blk")]
    return ["-chardev", _opts("socket", chardev), "-device", _opts("vhost-user-blk-pci", props)]


def _root_argv(spec: MachineSpec, ctx: LaunchContext, placed: Mapping[str, Props]) -> list[str]:
    """The root disk: a snapshot=on overlay so no test can write the cached image."""
    if spec.root_bus == "vhost-user-blk":
        socket = _lookup(ctx.vhost_sockets, ids.ROOT, "vhost_sockets")
        return _vhost_user_device(ids.ROOT, socket, None, None)
    drive_props = [("format", ctx.root_format), ("snapshot", _onoff(ctx.root_snapshot)),
                   ("cache", "unsafe")]
    argv = _drive(ids.ROOT_DRIVE, ctx.root_image, drive_props)
    return argv + _block_device(spec.root_bus, ids.ROOT, ids.ROOT_DRIVE,
                                placed.get(ids.ROOT, []), None)


#: Units per shared controller; the modules disk takes the next free one after
#: the root, data disks and CD-ROMs (units 0..n-1 keep their usual places).
_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {"ide": IDE_UNITS, "ahci": AHCI_PORTS, "lsi": LSI_TARGETS, "scsi": 256}
)
_CONTROLLER: Final[Mapping[str, str]] = MappingProxyType(
    {"ide": "ide", "ahci": "ahci", "lsi": "lsi", "virtio-scsi": "scsi"}
)


def _modules_disk_argv(spec: MachineSpec, ctx: LaunchContext) -> list[str]:
    """The read-only modules disk of a user kernel, on the root disk's bus.

    Why that bus: the initramfs loads exactly the root bus's drivers, so the
    disk is found by them and adds no driver of its own (vhost-user-blk roots
    get a virtio-blk one: same guest driver).
    """
    if ctx.modules_image is None:
        return []
    bus = "virtio-blk" if spec.root_bus == "vhost-user-blk" else spec.root_bus
    ctrl = _CONTROLLER.get(bus, "")
    placement: Props = []
    if ctrl:
        used = _controller_users(spec)[ctrl]
        if used >= _UNITS[ctrl]:
            raise ConfigError(
                f"root bus {spec.root_bus!r}: the kernel's modules disk needs a free unit on "
                f"the {ctrl} controller, but the root disk, data disks and CD-ROMs use all of "
                "them; put a data disk on another bus"
            )
        placement = _placement(ctrl, used)
    # snapshot, not readonly: QEMU's ide-hd refuses a read-only drive; the
    # guest mounts it read-only and the cached image is never written either way.
    drive = _drive(ids.MODULES_DRIVE, ctx.modules_image,
                   [("format", "raw"), ("snapshot", "on"), ("cache", "unsafe")])
    props = [*placement, ("drive", ids.MODULES_DRIVE), ("id", ids.MODULES_DEVICE),
             ("serial", ids.MODULES_DEVICE)]
    return [*drive, "-device", _opts(_FRONTEND_MODEL[bus], props)]


def _disk_argv(disk: Disk, ctx: LaunchContext, placed: Mapping[str, Props]) -> list[str]:
    if disk.bus == "vhost-user-blk":
        socket = _lookup(ctx.vhost_sockets, disk.name, "vhost_sockets")
        return _vhost_user_device(disk.name, socket, disk, disk.reconnect)
    argv = _drive(disk.drive_id, _disk_file(disk, ctx), _disk_drive_props(disk))
    placement = placed.get(disk.name, [])
    return argv + _block_device(disk.bus, disk.name, disk.drive_id, placement, disk)


def nic_mac(nic: Nic, index: int) -> str:
    """The NIC's MAC: its own, else one derived from its position (how the guest finds it)."""
    return nic.mac or f"52:54:00:12:34:{0x56 + index:02x}"


def _nic_argv(nic: Nic, index: int) -> list[str]:
    netdev = [("id", nic.name)]
    if nic.hostfwd_ssh:
        netdev.append(("hostfwd", "tcp:127.0.0.1:0-:22"))
    mac = nic_mac(nic, index)
    props = [("netdev", nic.name), ("id", f"{nic.name}-dev"), ("mac", mac)]
    props += _transport_props(nic.transport)
    return ["-netdev", _opts("user", netdev), "-device", _opts(_NIC_DEVICE[nic.model], props)]


def _serial_argv(dev: SerialPorts, ctx: LaunchContext) -> list[str]:
    argv = [
        "-device",
        _opts("virtio-serial-pci", [("id", dev.name), *_transport_props(dev.transport)]),
    ]
    for index, port in enumerate(dev.names):
        chardev_id = f"{dev.name}-p{index}"
        path = _lookup(ctx.serial_sockets, port, "serial_sockets")
        chardev = [("id", chardev_id), ("path", path), ("server", "on"), ("wait", "off")]
        props = [("bus", f"{dev.name}.0"), ("chardev", chardev_id), ("name", port)]
        props.append(("id", f"{dev.name}-port{index}"))
        argv += ["-chardev", _opts("socket", chardev), "-device", _opts("virtserialport", props)]
    return argv


def _cdrom_argv(dev: CdRom, placed: Mapping[str, Props]) -> list[str]:
    drive_props = [("format", "raw"), ("readonly", "on"), ("media", "cdrom")]
    model = "scsi-cd" if dev.bus == "scsi" else "ide-cd"
    props = [*placed.get(dev.name, []), ("drive", dev.drive_id), ("id", dev.name)]
    return [*_drive(dev.drive_id, dev.iso, drive_props), "-device", _opts(model, props)]


def _other_device_argv(dev: Device, ctx: LaunchContext, placed: Mapping[str, Props]) -> list[str]:
    if isinstance(dev, Balloon):
        props = [("id", dev.name), *_transport_props(dev.transport)]
        if dev.deflate_on_oom:
            props.append(("deflate-on-oom", "on"))
        if dev.free_page_reporting:
            props.append(("free-page-reporting", "on"))
        return ["-device", _opts("virtio-balloon-pci", props)]
    if isinstance(dev, Rng):
        obj = _opts("rng-random", [("id", dev.name), ("filename", "/dev/urandom")])
        props = [("rng", dev.name), ("id", f"{dev.name}-dev"), *_transport_props(dev.transport)]
        return ["-object", obj, "-device", _opts("virtio-rng-pci", props)]
    if isinstance(dev, SerialPorts):
        return _serial_argv(dev, ctx)
    if isinstance(dev, CdRom):
        return _cdrom_argv(dev, placed)
    return []  # Pvpanic: already in the base argv


def device_argv(
    dev: Disk | Nic | Device, ctx: LaunchContext, spec: MachineSpec | None = None
) -> list[str]:
    """The argv fragment for one device as placed in ``spec``.

    Without ``spec`` the device is placed as if it were the only one of its kind
    next to a virtio-blk root (controllers are not included: see ``to_argv``).
    """
    if spec is None:
        spec = _spec_holding(dev)
    placed = _placements(spec)
    if isinstance(dev, Disk):
        return _disk_argv(dev, ctx, placed)
    if isinstance(dev, Nic):
        index = next((i for i, n in enumerate(spec.nics) if n.name == dev.name), 0)
        return _nic_argv(dev, index)
    if isinstance(dev, Pvpanic):
        return ["-device", "pvpanic"]
    return _other_device_argv(dev, ctx, placed)


def _spec_holding(dev: Disk | Nic | Device) -> MachineSpec:
    if isinstance(dev, Disk):
        return MachineSpec(disks=(dev,))
    if isinstance(dev, Nic):
        return MachineSpec(nics=(dev,))
    return MachineSpec(devices=(dev,))


def to_argv(spec: MachineSpec, ctx: LaunchContext) -> list[str]:
    """THE QEMU command line for ``spec`` in ``ctx``: deterministic, pure.

    Order: base machine, shared controllers, root disk, data disks (spec order),
    NICs, other devices, ``extra_args``. Ids are derived from names so QMP and
    the guest-side checks can find every device again.
    """
    placed = _placements(spec)
    argv = _base_argv(spec, ctx) + _controllers_argv(spec) + _root_argv(spec, ctx, placed)
    argv += _modules_disk_argv(spec, ctx)
    for disk in spec.disks:
        argv += _disk_argv(disk, ctx, placed)
    for index, nic in enumerate(spec.nics):
        argv += _nic_argv(nic, index)
    for dev in spec.devices:
        argv += _other_device_argv(dev, ctx, placed)
    return argv + list(spec.extra_args)


def required_qemu_devices(spec: MachineSpec) -> frozenset[str]:
    """QEMU device model names the spec needs (compare with ``device_models``)."""
    needed = {"pvpanic"} | _DISK_DEVICES[spec.root_bus]
    for disk in spec.disks:
        needed |= _DISK_DEVICES[disk.bus]
    needed |= {_NIC_DEVICE[nic.model] for nic in spec.nics}
    for dev in spec.devices:
        needed |= _device_models_for(dev)
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
    }
)
_CDROM_HBA: Final[Mapping[str, str]] = MappingProxyType(
    {"ide": "ata_piix", "ahci": "ahci", "scsi": "virtio_scsi"}
)


# --------------------------------------------------------------------------- hotplug

_HOTPLUG_BUSES: Final = ("virtio-blk", "vhost-user-blk", "virtio-scsi")


def _blockdev_cache(cache: str) -> dict[str, bool]:
    """-drive cache= modes expressed as blockdev-add's cache.direct/no-flush."""
    return {"direct": cache in ("none", "directsync"), "no-flush": cache == "unsafe"}


def hotplug_props(disk: Disk, ctx: LaunchContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backend args, ``device_add`` args) for hot-plugging ``disk`` over QMP.

    The backend args are for ``blockdev-add`` (block-layer buses) or
    ``chardev-add`` (vhost-user-blk); ``hotplug_commands`` pairs them with the
    right command name. virtio-scsi needs the ``scsi0`` controller at boot (a
    virtio-scsi disk or root in the spec); the hot disk goes to a free scsi-id
    chosen by QEMU.
    """
    if disk.bus not in _HOTPLUG_BUSES:
        raise ConfigError(
            f"disk {disk.name!r}: bus {disk.bus!r} cannot be hot-plugged; "
            f"choose one of: {_choices(_HOTPLUG_BUSES)}"
        )
    if disk.bus == "vhost-user-blk":
        return _vhost_user_hotplug(disk, ctx)
    blockdev: dict[str, Any] = {
        "node-name": disk.drive_id,
        "driver": disk.format,
        "read-only": disk.readonly,
        "cache": _blockdev_cache(disk.cache),
        "file": {"driver": "file", "filename": _disk_file(disk, ctx)},
    }
    if disk.discard:
        blockdev["discard"] = "unmap"
    device: dict[str, Any] = {"driver": _FRONTEND_MODEL[disk.bus], "id": disk.name}
    device["drive"] = disk.drive_id
    if disk.bus == "virtio-scsi":
        device["bus"] = "scsi0.0"
    if disk.cache in ("writethrough", "directsync"):
        device["write-cache"] = "off"
    device.update(_qmp_frontend_props(disk))
    return blockdev, device


def _qmp_frontend_props(disk: Disk) -> dict[str, Any]:
    """Typed device_add values: QMP wants ints/bools where -device takes strings."""
    props: dict[str, Any] = {}
    if disk.bus != "vhost-user-blk":
        props["serial"] = disk.serial or disk.name
    if disk.bus == "virtio-scsi":
        return props
    if disk.num_queues is not None:
        props[_NUM_QUEUES_PROP[disk.bus]] = disk.num_queues
    if disk.queue_size is not None:
        props[_QUEUE_SIZE_PROP[disk.bus]] = disk.queue_size
    props.update({flag: False for flag in _ring_features_off(disk)})
    if disk.transport == "modern":
        props.update({"disable-legacy": "on", "disable-modern": False})
    elif disk.transport == "legacy":
        props.update({"disable-legacy": "off", "disable-modern": True})
    return props


def _vhost_user_hotplug(disk: Disk, ctx: LaunchContext) -> tuple[dict[str, Any], dict[str, Any]]:
    socket = _lookup(ctx.vhost_sockets, disk.name, "vhost_sockets")
    data: dict[str, Any] = {"addr": {"type": "unix", "data": {"path": socket}}, "server": False}
    if disk.reconnect is not None:
        data["reconnect"] = disk.reconnect
    chardev = {"id": ids.vhost_chardev_id(disk.name), "backend": {"type": "socket", "data": data}}
    device: dict[str, Any] = {"driver": "vhost-user-blk-pci", "id": disk.name}
    device["chardev"] = ids.vhost_chardev_id(disk.name)
    device.update(_qmp_frontend_props(disk))
    return chardev, device


def hotplug_commands(disk: Disk, ctx: LaunchContext) -> list[tuple[str, dict[str, Any]]]:
    """The QMP commands, in order, that hot-plug ``disk`` (then ``device_del`` by id)."""
    backend, device = hotplug_props(disk, ctx)
    first = "chardev-add" if disk.bus == "vhost-user-blk" else "blockdev-add"
    return [(first, backend), ("device_add", device)]


# --------------------------------------------------------------------------- user input

#: Every key ``@pytest.mark.vm`` / ``make_guest`` accepts (the MachineSpec fields).
SPEC_KEYS: Final = tuple(f.name for f in dataclasses.fields(MachineSpec))


def _fields_of(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def item_keys() -> dict[str, tuple[str, ...]]:
    """The dict keys each ``disks=``/``nics=``/``devices=`` item accepts, by item kind.

    ``disk``, ``nic``, then one entry per device kind (its dict also takes
    ``kind``). What ``pytest --markers`` and the README list, and what passes.
    """
    keys = {"disk": _fields_of(Disk), "nic": _fields_of(Nic)}
    keys.update({kind: _fields_of(cls) for kind, cls in _DEVICE_CLASS.items()})
    return keys


def _build(cls: type[Any], data: Mapping[str, Any], what: str) -> Any:
    """``cls(**data)`` with unknown keys reported as a ConfigError listing the allowed."""
    allowed = _fields_of(cls)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{what}: unknown key(s) {_choices(unknown)}; allowed: {_choices(allowed)}"
        )
    return cls(**data)


def _disk_from(item: Any, index: int, where: str) -> Disk:
    if isinstance(item, Disk):
        return item
    if isinstance(item, str):
        _check_choice(item, DISK_BUSES, f"{where}: disks[{index}] bus")
        return Disk(name=f"disk{index}", bus=item)
    if isinstance(item, Mapping):
        data = {"name": f"disk{index}", **item}
        disk: Disk = _build(Disk, data, f"{where}: disks[{index}]")
        return disk
    raise ConfigError(
        f"{where}: disks[{index}] must be a bus name ({_choices(DISK_BUSES)}), a dict or a Disk"
        f", got {item!r}"
    )


def _nic_from(item: Any, index: int, where: str) -> Nic:
    if isinstance(item, Nic):
        return item
    if isinstance(item, str):
        _check_choice(item, NIC_MODELS, f"{where}: nics[{index}] model")
        return Nic(model=item, name=f"net{index}")
    if isinstance(item, Mapping):
        nic: Nic = _build(Nic, {"name": f"net{index}", **item}, f"{where}: nics[{index}]")
        return nic
    raise ConfigError(
        f"{where}: nics[{index}] must be a model ({_choices(NIC_MODELS)}), a dict or a Nic"
        f", got {item!r}"
    )


def _device_from(item: Any, index: int, where: str) -> Device:
    if isinstance(item, _DEVICE_TYPES):
        return item
    if isinstance(item, str):
        item = {"kind": item}
    if not isinstance(item, Mapping) or "kind" not in item:
        raise ConfigError(
            f"{where}: devices[{index}] must be a kind ({_choices(DEVICE_KINDS)}), a dict with "
            f"'kind', or a device object, got {item!r}"
        )
    data = dict(item)
    kind = data.pop("kind")
    _check_choice(kind, DEVICE_KINDS, f"{where}: devices[{index}] kind")
    if kind == "serial" and "names" in data:
        data["names"] = _str_tuple(data["names"], f"{where}: devices[{index}] names")
    dev: Device = _build(_DEVICE_CLASS[kind], data, f"{where}: devices[{index}] ({kind})")
    return dev


def spec_from_kwargs(marker_kwargs: Mapping[str, Any], *, where: str = "vm") -> MachineSpec:
    """A MachineSpec from a marker's plain-data keywords.

    Strings name a bus/model/kind, dicts give fields, objects pass through;
    unnamed disks and NICs are numbered by position (disk0, net0...). Every
    error names ``where`` (the marker) so the collection error points at it.
    """
    unknown = sorted(set(marker_kwargs) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"@pytest.mark.{where}: unknown key(s) {_choices(unknown)}; "
            f"allowed: {_choices(SPEC_KEYS)}"
        )
    data = dict(marker_kwargs)
    label = f"@pytest.mark.{where}"
    try:
        if "disks" in data:
            items = _as_tuple(data["disks"], "disks")
            data["disks"] = tuple(_disk_from(x, i, label) for i, x in enumerate(items))
        if "nics" in data:
            items = _as_tuple(data["nics"], "nics")
            data["nics"] = tuple(_nic_from(x, i, label) for i, x in enumerate(items))
        if "devices" in data:
            items = _as_tuple(data["devices"], "devices")
            data["devices"] = tuple(_device_from(x, i, label) for i, x in enumerate(items))
        return MachineSpec(**data)
    except ConfigError as exc:
        if str(exc).startswith(label):
            raise
        raise ConfigError(f"{label}: {exc}") from None


# --------------------------------------------------------------------------- matrix

_AXIS_VALUES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"disk": DISK_BUSES, "nic": NIC_MODELS, "root_bus": ROOT_BUSES}
)


def _axis_values(axis: str, values: Any) -> tuple[str, ...]:
    _check_choice(axis, MATRIX_AXES, "@pytest.mark.virtio_matrix: axis")
    items = _as_tuple(values, axis)
    if not items:
        raise ConfigError(f"@pytest.mark.virtio_matrix: axis {axis!r} needs at least one value")
    for value in items:
        _check_choice(value, _AXIS_VALUES[axis], f"@pytest.mark.virtio_matrix: {axis}")
    if len(set(items)) != len(items):
        raise ConfigError(f"@pytest.mark.virtio_matrix: axis {axis!r} repeats a value: {items!r}")
    return items


def matrix_params(kwargs: Mapping[str, Sequence[str]]) -> list[tuple[str, dict[str, str]]]:
    """The cartesian product of the axes as (id, choice), ids like ``disk=ahci-nic=e1000``.

    Axes keep the order the user wrote them in, so ids read like the marker.
    """
    if not kwargs:
        raise ConfigError(
            f"@pytest.mark.virtio_matrix needs at least one axis: {_choices(MATRIX_AXES)}"
        )
    axes = {axis: _axis_values(axis, values) for axis, values in kwargs.items()}
    params: list[tuple[str, dict[str, str]]] = []
    for combo in itertools.product(*axes.values()):
        choice = dict(zip(axes, combo, strict=True))
        params.append(("-".join(f"{k}={v}" for k, v in choice.items()), choice))
    return params


def _rebus(disk: Disk, bus: str) -> Disk:
    """``disk`` moved to ``bus``, dropping options the new bus cannot express.

    Why drop instead of fail: a matrix over buses is the point of the marker; a
    num_queues written for virtio-blk must not make the IDE leg uncollectable.
    Options that change the data (image/format) are kept and still validated.
    """
    changes: dict[str, Any] = {"bus": bus}
    if bus not in VIRTIO_DISK_BUSES:
        changes["transport"] = "default"
    if bus not in _NUM_QUEUES_PROP:
        changes["num_queues"] = None
    if bus not in _QUEUE_SIZE_PROP:
        changes["queue_size"] = None
    if bus not in RING_FEATURE_BUSES:
        changes.update(event_idx=True, indirect_desc=True)
    if bus != "vhost-user-blk":
        changes["reconnect"] = None
        changes["logical_block_size"] = None
    else:
        changes.update(cache="none", discard=False, serial=None)
    return dataclasses.replace(disk, **changes)


def _remodel(nic: Nic, model: str) -> Nic:
    """``nic`` as ``model``; virtio-only options are dropped for emulated models."""
    if model == "virtio-net":
        return dataclasses.replace(nic, model=model)
    return dataclasses.replace(nic, model=model, transport="default", queues=None)


def apply_matrix(spec: MachineSpec, choice: Mapping[str, str]) -> MachineSpec:
    """Apply one matrix choice: disk -> first data disk's bus (or add disk0), nic ->
    first NIC's model (or add net0), root_bus -> root_bus."""
    for axis in choice:
        _check_choice(axis, MATRIX_AXES, "@pytest.mark.virtio_matrix: axis")
    changes: dict[str, Any] = {}
    if "disk" in choice:
        bus = choice["disk"]
        first = _rebus(spec.disks[0], bus) if spec.disks else Disk(name="disk0", bus=bus)
        changes["disks"] = (first, *spec.disks[1:])
    if "nic" in choice:
        model = choice["nic"]
        changes["nics"] = (
            _remodel(spec.nics[0], model) if spec.nics else Nic(model=model),
            *spec.nics[1:],
        )
    if "root_bus" in choice:
        changes["root_bus"] = choice["root_bus"]
    return spec.replace(**changes)
